"""The seed's shared types: hashing helpers, RadixKey, result dataclasses, the ABC."""

from __future__ import annotations

import hashlib
import struct
import sys

import numpy as np
import pytest
from conftest import run_child, sha256_hex  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import (
    BasePrefixCache,
    EvictResult,
    InsertResult,
    MatchResult,
    RadixKey,
    hash_bytes,
    hash_to_int64,
    hash_token_ids,
)
from pymllm.mem_cache.errors import CacheError, InvalidKeyError


def test_hash_token_ids_packs_uint32_little_endian():
    assert hash_token_ids([1, 2, 0xFFFFFFFF]) == sha256_hex(struct.pack("<3I", 1, 2, 0xFFFFFFFF))


def test_hash_token_ids_tuple_tokens_hash_each_element_in_order():
    expected = sha256_hex(struct.pack("<4I", 1, 2, 3, 4))
    assert hash_token_ids([(1, 2), (3, 4)]) == expected
    assert hash_token_ids([(1, 2), (3, 4)]) != hash_token_ids([(2, 1), (3, 4)])


def test_hash_token_ids_chains_on_raw_bytes_of_prior_hash():
    prior = hash_token_ids([7])
    assert hash_token_ids([8], prior) == sha256_hex(bytes.fromhex(prior), struct.pack("<I", 8))
    assert hash_token_ids([8], prior) != hash_token_ids([8])


@pytest.mark.parametrize(
    "tokens",
    [
        [5, 6, 7],
        np.array([5, 6, 7], dtype=np.int32),
        np.array([5, 6, 7], dtype=np.uint64),
        RadixKey([5, 6, 7]),
    ],
)
def test_hash_token_ids_accepts_lists_arrays_and_keys(tokens):
    assert hash_token_ids(tokens) == sha256_hex(struct.pack("<3I", 5, 6, 7))


@pytest.mark.parametrize("extra_key", ["lora-A", 0, ("img", 7)])
def test_hash_token_ids_refuses_a_key_whose_namespace_it_would_drop(extra_key):
    """A RadixKey was hashed by its tokens alone: two adapters' equal pages had one hash,
    which a page store keyed by it would share between them. With an extra_key it is an
    InvalidKeyError; its tokens hash as before."""
    key = RadixKey([5, 6, 7], extra_key)
    with pytest.raises(InvalidKeyError, match="extra_key"):
        hash_token_ids(key)
    assert hash_token_ids(key.token_ids) == sha256_hex(struct.pack("<3I", 5, 6, 7))


@pytest.mark.parametrize("bad", [[-1], [1 << 32], [1, 2**70], [1.5]])
def test_hash_token_ids_rejects_tokens_outside_uint32(bad):
    with pytest.raises(ValueError):
        hash_token_ids(bad)


@pytest.mark.parametrize(
    "bad",
    [
        [True, False],  # a page: packed by struct, which took True as 1
        [True, False] * 200,  # longer than a page: numpy refused it
        [3, True],  # numpy reads it as int64 [3, 1]
        [np.True_, 2],
        (4, True),
        [(True, 1)],  # numpy reads it as int64
        [(1, 2), (3, np.False_)],
        np.array([True, False]),
        type("Tokens", (list,), {})([3, True]),  # a list subclass
        __import__("collections").deque([True, 2]),
    ],
)
def test_hash_token_ids_refuses_bools_whatever_the_length(bad):
    """A bool is not a token (the compiled caches refuse it); short lists took it as 1 and
    longer ones refused it."""
    with pytest.raises(InvalidKeyError, match="integers"):
        hash_token_ids(bad)


@pytest.mark.parametrize("prior", ["", "ab cd", "abc", "zz", " ab", b"ab", 7])
def test_hash_token_ids_refuses_a_prior_hash_that_is_no_hex_digest(prior):
    """bytes.fromhex took "" (as no prior hash at all) and skipped whitespace."""
    with pytest.raises(InvalidKeyError, match="prior_hash"):
        hash_token_ids([1], prior)


def test_hash_token_ids_tuple_subclass_tokens_are_tuples():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    assert hash_token_ids([Pair(1, 2), Pair(3, 4)]) == hash_token_ids([(1, 2), (3, 4)])


def test_hash_token_ids_rejects_ragged_tuples():
    with pytest.raises(InvalidKeyError):
        hash_token_ids([(1, 2), (3,)])


def test_hash_token_ids_empty_page():
    assert hash_token_ids([]) == sha256_hex(b"")


def test_hash_to_int64_is_signed_first_16_hex_chars():
    assert hash_to_int64("0000000000000001" + "f" * 48) == 1
    assert hash_to_int64("ffffffffffffffff" + "0" * 48) == -1
    assert hash_to_int64("8000000000000000") == -(1 << 63)


def test_hash_bytes_is_first_8_digest_bytes_big_endian():
    digest = hashlib.sha256(b"image").digest()
    assert hash_bytes(b"image") == int.from_bytes(digest[:8], "big")
    assert 0 <= hash_bytes(b"") < 1 << 64


def test_radix_key_slots_len_iter():
    k = RadixKey([1, 2, 3], extra_key="lora")
    assert RadixKey.__slots__ == ("token_ids", "extra_key")  # the seed's order
    assert len(k) == 3 and list(k) == [1, 2, 3]
    with pytest.raises(AttributeError):
        k.other = 1  # type: ignore[attr-defined]


def test_radix_key_getitem_slice_keeps_extra_key():
    k = RadixKey([1, 2, 3, 4], extra_key=9)
    s = k[1:3]
    assert isinstance(s, RadixKey) and s.token_ids == [2, 3] and s.extra_key == 9


@pytest.mark.parametrize("tokens", [[1, 2, 3], np.array([1, 2, 3]), [(1, 2), (3, 4), (5, 6)]])
def test_radix_key_int_index_gives_one_token_key(tokens):
    k = RadixKey(tokens, extra_key="x")
    one = k[-1]
    assert isinstance(one, RadixKey) and len(one) == 1 and one.extra_key == "x"
    assert next(iter(one)) == (tokens[-1] if not isinstance(tokens, np.ndarray) else 3)


def test_radix_key_index_out_of_range():
    with pytest.raises(IndexError):
        RadixKey([1, 2])[2]
    with pytest.raises(IndexError):
        RadixKey([1, 2])[-3]


def test_radix_key_repr_shows_extra_key_and_first_ten_tokens():
    r = repr(RadixKey(list(range(12)), extra_key="a"))
    assert "'a'" in r and "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]..." in r
    assert "..." not in repr(RadixKey([1, 2]))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
@pytest.mark.parametrize("n", [3, 12])
def test_radix_key_repr_of_an_array_key_reads_as_the_list_key(dtype, n):
    tokens = list(range(n))
    assert repr(RadixKey(np.array(tokens, dtype=dtype), "a")) == repr(RadixKey(tokens, "a"))


def test_result_dataclass_defaults():
    m = MatchResult(indices=np.zeros(0, dtype=np.int32))
    assert (m.last_node, m.prefix_len, m.mamba_branching_seqlen) == (None, 0, None)
    assert InsertResult() == InsertResult(prefix_len=0, last_node=None, mamba_exist=False)
    assert EvictResult() == EvictResult(full_evicted=0, swa_evicted=0, mamba_evicted=0)


def test_compiled_caches_build_results_equal_to_the_dataclass_constructors():
    # The compiled caches fill the result slots directly (no __init__): every field must
    # still be set, of the right type, and equal to what the constructor would build.
    from conftest import RecordingAllocator

    from pymllm.mem_cache import MambaRadixCache, RadixCache

    c = RadixCache()
    ins = c.insert(RadixKey([1, 2, 3]), np.array([5, 6, 7]))
    assert ins == InsertResult(prefix_len=0, last_node=ins.last_node, mamba_exist=False)
    assert type(ins.prefix_len) is int and ins.mamba_exist is False
    m = c.match_prefix(RadixKey([1, 2, 9]))
    assert type(m) is MatchResult and type(m.prefix_len) is int
    assert (m.indices.tolist(), m.prefix_len, m.mamba_branching_seqlen) == ([5, 6], 2, None)
    ev = c.evict(1)
    assert ev == EvictResult(full_evicted=1, swa_evicted=0, mamba_evicted=0)
    assert all(type(v) is int for v in (ev.full_evicted, ev.swa_evicted, ev.mamba_evicted))
    mc = MambaRadixCache(mamba_pool=RecordingAllocator())
    got = mc.insert(RadixKey([1, 2]), np.array([3, 4]), mamba_value=7)
    assert got.mamba_exist is False
    again = mc.insert(RadixKey([1, 2]), np.array([3, 4]), mamba_value=8)
    assert again.mamba_exist is True and type(again.prefix_len) is int


def test_compiled_results_hold_no_extra_references():
    from pymllm.mem_cache import RadixCache

    c = RadixCache()
    c.insert(RadixKey([1, 2, 3]), np.array([5, 6, 7]))
    results = [c.match_prefix(RadixKey([1, 2, 3])) for _ in range(100)]
    # each field's object is referenced by its slot only (+ getrefcount's argument)
    assert all(sys.getrefcount(r.indices) == 2 for r in results)
    assert all(sys.getrefcount(r.last_node) == 2 for r in results)
    ins = [c.insert(RadixKey([1, 2, 3, 4]), np.array([5, 6, 7, 8])) for _ in range(10)]
    assert all(sys.getrefcount(r.last_node) == 2 for r in ins)


def test_base_prefix_cache_is_abstract():
    with pytest.raises(TypeError):
        BasePrefixCache()  # type: ignore[abstract]
    assert set(BasePrefixCache.__abstractmethods__) == {
        "reset",
        "match_prefix",
        "insert",
        "evict",
        "inc_lock_ref",
        "dec_lock_ref",
    }


def test_errors_are_one_family_and_builtin_compatible():
    assert issubclass(InvalidKeyError, CacheError) and issubclass(InvalidKeyError, ValueError)


def test_radix_key_is_hashable_by_identity_as_the_seeds() -> None:
    """The seed's RadixKey defines no __eq__, so keys are hashable by identity: a serving
    loop can map a request's key object to its state. This one compared by value and was
    unhashable (TypeError on a dict key)."""
    a, b = RadixKey([1, 2, 3], "x"), RadixKey([1, 2, 3], "x")
    requests = {a: "first", b: "second"}
    assert requests[a] == "first" and requests[b] == "second"
    assert a != b and a == a


def test_the_package_lists_its_lazily_loaded_pools():
    """dir() (tab completion, help) shows every public name, the device pools too, before
    they are loaded; a host-only import still does not load JAX."""
    out = run_child(
        """
        import sys
        import pymllm.mem_cache as mc
        names = dir(mc)
        assert "jax" not in sys.modules, "dir() loaded JAX"
        missing = sorted(set(mc.__all__) - set(names))
        assert missing == [], missing
        import importlib.util
        if importlib.util.find_spec("jax") is not None:  # the JAX-free CI job has none
            assert callable(mc.KVPool)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_the_package_exports_every_error_class():
    """``from pymllm.mem_cache import CacheError`` works for every exception the package
    raises: the same class objects as in ``pymllm.mem_cache.errors``, listed in the
    package's ``__all__`` (they were importable from the errors module only)."""
    import pymllm.mem_cache as mc
    from pymllm.mem_cache import errors

    assert errors.__all__, "errors lists no exception"
    for name in errors.__all__:
        assert getattr(mc, name) is getattr(errors, name), name
        assert name in mc.__all__, name
        assert issubclass(getattr(mc, name), mc.CacheError)


def _pyx_init_signature(module: str, core: str) -> list[tuple[str, object]]:
    """(name, default, or ``inspect.Parameter.empty`` for a required one) of each parameter
    of ``def __init__`` of ``cdef class core`` in ``pyx/pymllm/mem_cache/<module>.pyx``
    (read with ast: these signatures are plain Python)."""
    import ast
    import inspect
    from pathlib import Path

    pyx = Path(__file__).resolve().parents[1] / f"pyx/pymllm/mem_cache/{module}.pyx"
    src = pyx.read_text()
    start = src.index("def __init__(", src.index(f"cdef class {core}"))
    header = src[start : src.index("):", start) + 2]
    (fn,) = ast.parse(" ".join(header.split()) + " pass").body
    assert isinstance(fn, ast.FunctionDef)
    names = [a.arg for a in fn.args.args[1:]]  # after self
    defaults = [ast.literal_eval(d) for d in fn.args.defaults]
    padded = [inspect.Parameter.empty] * (len(names) - len(defaults)) + defaults
    return list(zip(names, padded, strict=True))


@pytest.mark.parametrize(
    ("cls", "source", "required"),
    [
        ("RadixCache", ("_radix_tree", "RadixTreeCore"), {}),
        ("MambaRadixCache", ("_radix_tree", "MambaTreeCore"), {}),
        ("TokenToKVPoolAllocator", ("_allocator", "TokenToKVPoolAllocator"), {"size": 8}),
        (
            "SWATokenToKVPoolAllocator",
            ("_allocator", "SWATokenToKVPoolAllocator"),
            {"size": 8, "swa_size": 8},
        ),
    ],
)
def test_the_compiled_classes_constructors_have_signatures(cls, source, required):
    """inspect.signature (IDEs, help()) gives each compiled class's constructor; it raised
    ValueError ("no signature found for builtin type"). The signature is written by hand
    in the class docstring, so this pins it to the ``def __init__`` in the .pyx source
    (names, order and defaults) and to what the built __init__ accepts: every keyword,
    every default, and no more positional arguments than it lists."""
    import inspect

    import pymllm.mem_cache as mc

    klass = getattr(mc, cls)
    params = inspect.signature(klass).parameters
    stated = [(n, p.default) for n, p in params.items()]
    assert stated == _pyx_init_signature(*source)
    assert set(required) <= set(params)
    values = {
        name: required.get(name, p.default)
        for name, p in params.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    }
    assert list(values) == list(params), "the signature lists a keyword-only or *args"
    assert inspect.Parameter.empty not in values.values()
    klass(**values)
    klass(*values.values())
    with pytest.raises(TypeError):
        klass(*values.values(), None)
