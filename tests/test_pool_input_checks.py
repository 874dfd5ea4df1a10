"""Inputs that used to be converted silently into another slot (or the wrong error).

Each case was found by a review of the pools and helpers: a big-endian int32 array read in
native byte order by the allocator's fast path, negative or wide slots wrapped by numpy
conversions, writes to the padding row, and error types other than the documented ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache import (
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    hash_bytes,
    hash_to_int64,
    memory_pool,
)
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError
from pymllm.mem_cache.memory_pool import (
    KVPool,
    MambaPool,
    ReqToTokenPool,
    pad_slots,
    scatter_rows,
)


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
def test_free_of_a_big_endian_int32_array_frees_the_slots_it_names(swa: bool) -> None:
    a = SWATokenToKVPoolAllocator(70_000, 70_000) if swa else TokenToKVPoolAllocator(70_000)
    slots = a.alloc(70_000)
    assert slots is not None
    a.free(np.array([256], dtype=">i4"))  # read natively, 256 would be 65536
    assert not a.is_allocated(np.array([256]))[0]
    assert a.is_allocated(np.array([65536]))[0]
    assert a.available_size() == 1


def test_translate_rejects_slots_outside_the_pool() -> None:
    a = SWATokenToKVPoolAllocator(8, 8)
    full = a.alloc(8)
    assert a.translate_loc_from_full_to_swa(full).tolist() == list(range(1, 9))
    for bad in ([-1], [9], [1.0], [True]):
        with pytest.raises(InvalidValueError):
            a.translate_loc_from_full_to_swa(bad)
    assert a.translate_loc_from_full_to_swa([]).tolist() == []


@pytest.mark.parametrize(
    "loc",
    [
        np.array([2**32 + 5], dtype=np.int64),  # would wrap to slot 5
        np.array([2**31 + 3], dtype=np.uint32),  # would turn negative
        [1.9, 2.2],  # would truncate to 1, 2
        [-1],
    ],
    ids=["int64-wide", "uint32-wide", "float", "negative"],
)
def test_pad_slots_rejects_what_it_would_turn_into_another_slot(loc) -> None:
    with pytest.raises(InvalidValueError):
        pad_slots(loc)


def test_pad_slots_pads_good_slots_with_the_padding_slot() -> None:
    out = pad_slots(np.array([3, 4], dtype=np.int64))
    assert out.dtype == np.int32 and out.tolist() == [3, 4] + [0] * 14


@pytest.mark.parametrize(
    ("index", "values"),
    [
        ((0, slice(0, 3)), [5, 6, 7]),  # the padding row
        ((-5, slice(0, 3)), [5, 6, 7]),  # the padding row again, from the end
        ((1, slice(0, 2)), np.array([2**32 + 3, 1], dtype=np.int64)),  # would wrap to 3
        ((1, slice(0, 2)), [1.5, 2.0]),
        ((1, slice(0, 2)), [-1, 2]),
        ((1, 0), 2**40),  # OverflowError from numpy before
        ((9, slice(0, 2)), [1, 2]),
        ((slice(1, 3, 0), 0), 1),  # a bare ValueError from numpy before
    ],
    ids=[
        "row0",
        "negative-row",
        "int64-wide",
        "float",
        "negative",
        "huge-int",
        "row-out",
        "zero-step",
    ],
)
def test_req_to_token_write_rejects_and_writes_nothing(index, values) -> None:
    pool = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError):
        pool.write(index, values)
    assert not pool.req_to_token.any()


def test_req_to_token_write_accepts_rows_slices_and_arrays() -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((1, slice(0, 3)), np.array([5, 6, 7], dtype=np.int64))
    pool.write((slice(2, 4), slice(0, 2)), [[1, 2], [3, 4]])
    pool.write(np.array([4]), np.full((1, 8), 9))
    assert pool.req_to_token[1, :3].tolist() == [5, 6, 7]
    assert pool.req_to_token[2:4, :2].tolist() == [[1, 2], [3, 4]]
    assert pool.req_to_token[4].tolist() == [9] * 8
    assert not pool.req_to_token[0].any()


@pytest.mark.parametrize("args", [(2**31,), (10.0,), (10, 2.0), (-1,), (10, 0)])
def test_allocator_constructor_rejects_non_int_and_out_of_range_sizes(args) -> None:
    with pytest.raises(InvalidValueError):
        TokenToKVPoolAllocator(*args)


def test_swa_allocator_constructor_rejects_a_float_window_pool() -> None:
    with pytest.raises(InvalidValueError):
        SWATokenToKVPoolAllocator(8, 8.0)


@pytest.mark.parametrize("text", ["-1", "0x10", " 1_0", "+f", "", "ab-cd"])
def test_hash_to_int64_takes_hex_digits_only(text: str) -> None:
    with pytest.raises(InvalidKeyError):
        hash_to_int64(text)


def test_hash_to_int64_reads_a_short_hex_string() -> None:
    assert hash_to_int64("ff") == 255
    assert hash_to_int64("ffffffffffffffff" + "zz") == -1


def test_hash_bytes_of_a_strided_array_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        hash_bytes(np.arange(10, dtype=np.uint8)[::2])


@pytest.mark.parametrize(
    ("cls", "args"),
    [(TokenToKVPoolAllocator, (64,)), (SWATokenToKVPoolAllocator, (64, 32))],
    ids=["full", "swa"],
)
def test_allocator_init_again_raises_and_keeps_its_slots(cls, args) -> None:
    """A second __init__ forgot every allocated slot: their owners' later frees then hit
    slots handed out again. It now raises and changes nothing."""
    alloc = cls(*args)
    held = alloc.alloc(10)
    before = alloc.available_size()
    with pytest.raises(RuntimeError, match="already initialized"):
        alloc.__init__(*args)
    assert alloc.available_size() == before
    alloc.free(held)
    assert alloc.available_size() == before + 10


def test_pools_init_again_raise_and_keep_their_state() -> None:
    """The JAX pools' __init__ run again replaced their buffers (the cached KV and states)
    and free lists under the caches and callers pointing into them. It now raises."""
    from pymllm.mem_cache.memory_pool import KVPool, MambaPool

    kv = KVPool(16, 1, 1, 2, dtype=np.float32)
    buffers = kv.buffers
    with pytest.raises(RuntimeError, match="already initialized"):
        kv.__init__(16, 1, 1, 2, dtype=np.float32)
    assert kv.buffers is buffers
    reqs = ReqToTokenPool(4, 8)
    held = reqs.alloc(2)
    with pytest.raises(RuntimeError, match="already initialized"):
        reqs.__init__(4, 8)
    assert reqs.available_size() == 2
    reqs.free(held)
    mamba = MambaPool(4, 1, (2,), (2,))
    got = mamba.alloc(1)
    with pytest.raises(RuntimeError, match="already initialized"):
        mamba.__init__(4, 1, (2,), (2,))
    assert mamba.available_size() == 3
    mamba.free(got)


# -- found by the review of session 9 ----------------------------------------------------


@pytest.mark.parametrize(
    ("size", "exc"),
    [(2, InvalidValueError), (-1, InvalidValueError), (2.0, TypeError), (True, TypeError)],
)
def test_pad_slots_rejects_a_size_that_cannot_hold_the_slots(size, exc: type) -> None:
    """A short or negative size raised numpy's bare ValueError (a float or True was taken
    as an int); a size that is not an int is a call's argument of the wrong type."""
    with pytest.raises(exc, match="size") as got:
        pad_slots([1, 2, 3], size)
    assert exc is InvalidValueError or not isinstance(got.value, InvalidValueError)


@pytest.mark.parametrize("bad", [1.0, True, "1", None])
def test_a_call_argument_that_is_not_an_int_is_a_type_error(bad: object) -> None:
    """errors.py: a float where an int goes, passed to a method, raises a plain TypeError
    (it raised InvalidValueError, the family's error for a value out of range); the range
    check stays InvalidValueError. Nothing is written."""
    pool = KVPool(16, 2, 1, 4, dtype=jnp.float32)
    rows = np.ones((1, 1, 4), np.float32)
    calls = [
        lambda i: pool.get_kv(i, [1]),
        lambda i: pool.get_kv_buffer(i),
        lambda i: pool.set_kv_buffer(i, [1], rows, rows),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="layer_id must be an int") as got:
            call(bad)
        assert not isinstance(got.value, InvalidValueError)
        with pytest.raises(InvalidValueError, match="layer_id"):
            call(2)
    assert float(np.abs(np.asarray(pool.get_kv(1, [1])[0])).max()) == 0.0


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
@pytest.mark.parametrize("bad", [[1.5], [True], [3, True]], ids=["float", "bool", "int-bool"])
def test_is_allocated_refuses_what_is_not_a_slot_id(swa: bool, bad) -> None:
    """is_allocated([1.5]) answered for slot 1 (free refuses the same float); a bool in a
    list was read as slot 1. (An int beyond 64 bits is a slot id, outside the pool: below.)"""
    a = SWATokenToKVPoolAllocator(8, 8) if swa else TokenToKVPoolAllocator(8)
    assert a.alloc(2) is not None
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.is_allocated(bad)


def test_is_allocated_answers_false_outside_the_pool() -> None:
    a = TokenToKVPoolAllocator(8)
    slots = a.alloc(2)
    assert slots is not None
    huge = np.array([2**64 - 1, 1], dtype=np.uint64)  # wraps negative as int64
    assert a.is_allocated(huge).tolist() == [False, True]
    assert a.is_allocated([2**70, 1, -(2**70)]).tolist() == [False, True, False]  # was an error
    wide = np.array([2**40, -3, 2], dtype=np.int64)
    assert a.is_allocated(wide).tolist() == [False, False, True]
    assert a.is_allocated([]).tolist() == []


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
def test_alloc_refuses_a_bool_count(swa: bool) -> None:
    """alloc(True) handed out a slot, where free(True) is refused."""
    a = SWATokenToKVPoolAllocator(8, 8) if swa else TokenToKVPoolAllocator(8)
    with pytest.raises(TypeError, match="bool"):
        a.alloc(True)
    assert a.available_size() == 8


@pytest.mark.parametrize(
    "shape", [(1.7,), (-1,), (0,), (2, True), 3], ids=["float", "negative", "zero", "bool", "int"]
)
def test_mamba_pool_refuses_a_state_shape_that_is_not_positive_ints(shape) -> None:
    """(1.7,) was truncated to (1,), and (-1,) failed inside JAX with a TypeError."""
    from pymllm.mem_cache.memory_pool import MambaPool

    with pytest.raises(InvalidValueError, match="conv_state_shape"):
        MambaPool(2, 1, shape, (2,))


def test_setting_donated_buffers_is_refused_and_the_pool_keeps_its_own() -> None:
    """A stale reference (deleted by the update that donated it) was accepted: the pool
    dropped its live buffers and every later call failed inside XLA."""
    from pymllm.mem_cache.memory_pool import KVPool, MambaPool

    kv = KVPool(8, 1, 1, 2, dtype=np.float32)
    stale = kv.buffers
    kv.set_kv_buffer(
        0,
        np.array([1], dtype=np.int32),
        np.full((1, 1, 2), 7, np.float32),
        np.full((1, 1, 2), 7, np.float32),
    )
    assert stale.k.is_deleted()
    with pytest.raises(InvalidValueError, match="deleted"):
        kv.buffers = stale
    k, _ = kv.get_kv(0, np.array([1], dtype=np.int32))
    assert np.asarray(k).ravel().tolist() == [7.0, 7.0]
    with pytest.raises(InvalidValueError, match="KVBuffers"):
        kv.buffers = (kv.buffers.k,)  # a bare AttributeError before
    kv.buffers = tuple(kv.buffers)  # any pair of arrays is taken
    mamba = MambaPool(2, 1, (2,), (2,))
    old = mamba.buffers
    mamba.reset_states(np.array([1], dtype=np.int32))
    with pytest.raises(InvalidValueError, match="deleted"):
        mamba.buffers = old


# -- found by the review of the pools (session 10) ---------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dtype": np.float64}, "dtype"),
        ({"dtype": np.int64}, "dtype"),
        ({"dtype": "foo"}, "dtype"),  # numpy's TypeError before
        ({"dtype": object}, "dtype"),  # a TypeError from jnp.zeros before
        ({"dtype": np.str_}, "dtype"),
        ({"mesh": "tp"}, "mesh"),  # AttributeError before
        ({"head_axis": "tp"}, "head_axis"),  # ignored without a mesh before
        ({"device": "cpu:0"}, "device"),
    ],
    ids=["float64", "int64", "foo", "object", "str", "mesh-str", "axis-no-mesh", "device-str"],
)
def test_kv_pool_constructor_names_the_bad_argument(kwargs, name) -> None:
    """With x64 off, dtype=float64 made a pool whose dtype said float64 while its buffers
    were float32 (JAX only warned): mem_bytes() doubled, its own buffers refused by the
    setter, float64 K/V truncated, float32 K/V refused."""
    from pymllm.mem_cache.memory_pool import KVPool

    assert not jax.config.jax_enable_x64
    with pytest.raises(InvalidValueError, match=name):
        KVPool(8, 1, 1, 2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"conv_dtype": np.int64}, "conv_dtype"),
        ({"temporal_dtype": np.float64}, "temporal_dtype"),
        ({"conv_dtype": "foo"}, "conv_dtype"),
        ({"device": 0}, "device"),
    ],
    ids=["int64", "float64", "foo", "device-int"],
)
def test_mamba_pool_constructor_names_the_bad_argument(kwargs, name) -> None:
    from pymllm.mem_cache.memory_pool import MambaPool

    with pytest.raises(InvalidValueError, match=name):
        MambaPool(4, 1, (2,), (2,), **kwargs)


def test_pool_dtype_is_the_dtype_its_buffers_hold() -> None:
    from pymllm.mem_cache.memory_pool import KVPool, MambaPool

    kv = KVPool(8, 1, 1, 2, dtype=np.float32)
    assert kv.buffers.k.dtype == kv.dtype == np.float32
    assert kv.mem_bytes() == kv.buffers.k.nbytes + kv.buffers.v.nbytes
    kv.buffers = kv.buffers  # its own buffers are always taken back
    mamba = MambaPool(4, 1, (2,), (2,), conv_dtype=np.int32, temporal_dtype=jnp.bfloat16)
    assert (mamba.buffers.conv.dtype, mamba.buffers.temporal.dtype) == (
        mamba.conv_dtype,
        mamba.temporal_dtype,
    )
    mamba.buffers = mamba.buffers


@pytest.mark.parametrize(
    ("max_len", "exc"),
    [
        (2.5, TypeError),
        (-7, InvalidValueError),
        (0, InvalidValueError),
        (True, TypeError),
        ("8", TypeError),
    ],
)
def test_to_device_refuses_a_max_len_that_is_not_a_positive_int(max_len, exc: type) -> None:
    """2.5 raised a TypeError naming `n`; -7 and 0 were taken (one bucket of 16 columns). Not
    an int: a TypeError naming max_len (not the family's InvalidValueError, see errors.py)."""
    pool = ReqToTokenPool(4, 64)
    slots = pool.alloc(2)
    with pytest.raises(exc, match="max_len") as got:
        pool.to_device(slots, max_len=max_len)
    assert exc is InvalidValueError or not isinstance(got.value, InvalidValueError)
    assert pool.to_device(slots, max_len=1).shape == (16, 16)


# -- found by the review of the pools (session 11) ---------------------------------------

KV4 = np.ones((2, 1, 4), np.float32)
STATES = np.ones((1, 2, 2), np.float32)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda kv, m, r: pad_slots([True, 5]), id="pad_slots"),
        pytest.param(lambda kv, m, r: pad_slots([[5, np.True_]]), id="pad_slots-nested"),
        pytest.param(lambda kv, m, r: kv.set_kv_buffer(0, [True, 5], KV4, KV4), id="set_kv"),
        pytest.param(lambda kv, m, r: kv.set_kv_all((5, True), KV4[None], KV4[None]), id="all"),
        pytest.param(lambda kv, m, r: kv.copy([2, 3], [True, 5]), id="copy"),
        pytest.param(lambda kv, m, r: kv.get_kv(0, [True]), id="get_kv"),
        pytest.param(lambda kv, m, r: m.reset_states([True, 3]), id="reset_states"),
        pytest.param(lambda kv, m, r: m.set_states([3, True], STATES, STATES), id="set_states"),
        pytest.param(lambda kv, m, r: m.copy_states([True, 2], [3, 4]), id="copy_states"),
        pytest.param(lambda kv, m, r: r.write((1, slice(0, 2)), [True, 7]), id="write-values"),
        pytest.param(
            lambda kv, m, r: r.write(slice(1, 3), [[6] * 4, [7, 8, True, 9]]), id="write-2d"
        ),
        pytest.param(
            lambda kv, m, r: r.write((slice(1, 3), slice(0, 1)), [[6], [False]]), id="write-col"
        ),
        pytest.param(lambda kv, m, r: r.write(([2, True], 0), [6, 7]), id="write-rows"),
        pytest.param(lambda kv, m, r: r.to_device([True]), id="to_device"),
    ],
)
def test_a_bool_in_a_slot_list_is_refused_and_changes_nothing(call) -> None:
    """numpy reads [True, 5] as [1, 5]: a bool inside a list was slot 1 (row 1 of the
    request table), where the allocator refuses free([True, 5])."""
    kv = KVPool(32, 1, 1, 4, dtype=jnp.float32)
    mamba = MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32)
    req = ReqToTokenPool(4, 4)
    kv_buffers, states = kv.buffers, mamba.buffers
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        call(kv, mamba, req)
    assert kv.buffers is kv_buffers and mamba.buffers is states and not req.req_to_token.any()


@pytest.mark.parametrize("big", [[2**63, -1], [3, 2**64]], ids=["both-signs", "past-64-bits"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda kv, m, r, b: pad_slots(b), id="pad_slots"),
        pytest.param(lambda kv, m, r, b: kv.set_kv_buffer(0, b, KV4[:2], KV4[:2]), id="set_kv"),
        pytest.param(lambda kv, m, r, b: kv.copy([2, 3], b), id="copy"),
        pytest.param(lambda kv, m, r, b: kv.get_kv(0, b), id="get_kv"),
        pytest.param(lambda kv, m, r, b: m.reset_states(b), id="reset_states"),
        pytest.param(lambda kv, m, r, b: r.write((1, slice(0, 2)), b), id="write-values"),
    ],
)
def test_ints_past_int64_in_a_slot_list_are_out_of_range(call, big) -> None:
    """numpy reads [2**63, -1] as float64 and [3, 2**64] as objects: both are integers
    outside every pool, and the pools said "must hold integers, got dtype float64" (or
    object) where the allocators name the slot as out of range. Nothing changes."""
    kv = KVPool(32, 1, 1, 4, dtype=jnp.float32)
    mamba = MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32)
    req = ReqToTokenPool(4, 4)
    kv_buffers, states = kv.buffers, mamba.buffers
    with pytest.raises(InvalidValueError, match=f"slot {max(big, key=abs)} is outside"):
        call(kv, mamba, req, big)
    assert kv.buffers is kv_buffers and mamba.buffers is states and not req.req_to_token.any()


class _Allocating(Exception):
    """Raised by the test in place of a pool's first allocation."""


def _allocating(*args, **kwargs):
    raise _Allocating


@pytest.mark.parametrize(
    ("make", "size", "refused"),
    [
        pytest.param(lambda n: KVPool(n, 1, 1, 1), 2**31, True, id="kv-2**31"),
        pytest.param(lambda n: KVPool(n, 1, 1, 1), 2**30, True, id="kv-rows-2**30+1"),
        pytest.param(lambda n: KVPool(n, 1, 1, 1), 2**30 - 1, False, id="kv-rows-2**30"),
        pytest.param(lambda n: KVPool(n, 1, 1, 1, page_size=4), 2**30, True, id="kv-pages"),
        pytest.param(lambda n: KVPool(n, 1, 1, 1, page_size=4), 2**30 - 4, False, id="kv-pages-ok"),
        pytest.param(lambda n: MambaPool(n, 1, (1,), (1,)), 2**30, True, id="mamba-2**30+1"),
        pytest.param(lambda n: MambaPool(n, 1, (1,), (1,)), 2**30 - 1, False, id="mamba-ok"),
    ],
)
def test_pools_refuse_rows_beyond_int32_before_allocating(
    monkeypatch: pytest.MonkeyPatch, make, size: int, refused: bool
) -> None:
    """KVPool(2**31, ...) allocated its buffers (2**31 + 1 rows, past int32, which the
    allocator refuses) and every write then failed with a bare OverflowError. The pool's
    first allocation raises _Allocating here, so no buffer is ever made."""
    monkeypatch.setattr(memory_pool, "_zeros", _allocating)
    monkeypatch.setattr(memory_pool, "TokenToKVPoolAllocator", _allocating)
    with pytest.raises(InvalidValueError if refused else _Allocating):
        make(size)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_scatter_rows_routes_a_wide_numpy_slot_past_the_end_without_x64(dtype) -> None:
    """With x64 off, jnp.asarray kept the low 32 bits of a numpy int64 slot: 2**32 + 5 went
    to row 5 instead of past the end, which the scatter drops."""
    assert not jax.config.jax_enable_x64
    loc = np.array([10, 2**32 + 5, 0, 3], dtype=dtype)
    assert scatter_rows(loc, 11).tolist() == [10, 12, 13, 3]
    valid = np.array([True, True, True, False])
    assert scatter_rows(loc, 11, valid).tolist() == [10, 12, 0, 14]
    assert scatter_rows(np.int64(2**32 + 5), 11).tolist() == 11
    if dtype is np.int64:  # a negative one from -rows still wraps, as JAX's scatter does
        assert scatter_rows(np.array([-1, -(2**40)], dtype), 11).tolist() == [-1, 12]
    # a list of such numpy scalars is refused, as a list of Python ints past int32 is
    with pytest.raises(InvalidValueError, match="does not fit"):
        scatter_rows([dtype(3), dtype(2**32 + 5)], 11)
    assert scatter_rows([dtype(3), dtype(0)], 11).tolist() == [3, 12]


def _deleted(x: jax.Array) -> jax.Array:
    x.delete()
    return x


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda p, m, s: p.set_kv_all(s, p.buffers.k[:, :1], p.buffers.v[:, :1]), id="set"
        ),
        pytest.param(lambda p, m, s: p.get_kv_all(s), id="get"),
        pytest.param(lambda p, m, s: p.copy(s, [2]), id="copy"),
        pytest.param(lambda p, m, s: m.get_states(s), id="mamba-get"),
        pytest.param(lambda p, m, s: m.free(s), id="mamba-free"),
        pytest.param(lambda p, m, s: TokenToKVPoolAllocator(4).free(s), id="allocator-free"),
        pytest.param(lambda p, m, s: TokenToKVPoolAllocator(4).alloc(1, prefix=s), id="prefix"),
        pytest.param(lambda p, m, s: pad_slots(s), id="pad_slots"),
        pytest.param(lambda p, m, s: scatter_rows(s, 8), id="scatter_rows"),
        pytest.param(lambda p, m, s: ReqToTokenPool(2, 4).write((1, slice(0, 1)), s), id="req"),
        pytest.param(
            lambda p, m, s: SWATokenToKVPoolAllocator(4, 4).translate_loc_from_full_to_swa(s),
            id="swa-translate",
        ),
        pytest.param(lambda p, m, s: TokenToKVPoolAllocator(4).is_allocated(s), id="is_allocated"),
    ],
)
@pytest.mark.parametrize("form", ["array", "list item"])
def test_a_deleted_slot_array_is_a_typed_error(call, form: str) -> None:
    """A donated (deleted) jax array of slots raised a bare RuntimeError from numpy's
    conversion; the K/V arrays already had a typed error for it. As an item of a list of
    slots it still did (only the argument itself was looked at)."""
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    mamba = MambaPool(4, 1, (2,), (2,))
    before = np.asarray(pool.buffers.k).copy()
    if form == "array":
        slots = _deleted(jnp.asarray([1], jnp.int32))
    else:
        slots = [_deleted(jnp.asarray(1, jnp.int32))]
    with pytest.raises(InvalidValueError, match="deleted"):
        call(pool, mamba, slots)
    assert (np.asarray(pool.buffers.k) == before).all()


def test_a_free_refused_for_a_deleted_item_frees_nothing() -> None:
    alloc = TokenToKVPoolAllocator(8)
    slots = alloc.alloc(3)
    with pytest.raises(InvalidValueError, match="item 1 is a deleted array"):
        alloc.free([int(slots[0]), _deleted(jnp.asarray(1, jnp.int32))])
    assert alloc.available_size() == 5
    assert alloc.is_allocated(slots).all()


@pytest.mark.parametrize("where", ["key", "value", "key-of-mamba", "mamba_value"])
@pytest.mark.parametrize("form", ["array", "list item", "tuple token"])
def test_the_caches_refuse_a_deleted_array_with_a_typed_error(where: str, form: str) -> None:
    """A donated (deleted) jax array as a key's tokens, an insert's value or a Mamba state
    raised numpy's bare RuntimeError from the radix caches too; as one item of a list
    (or of a tuple token), it still did."""
    from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
    from pymllm.mem_cache.errors import CacheError

    if form == "array":
        gone = _deleted(jnp.asarray([1, 2], jnp.int32))
    elif form == "list item" or where != "key":
        gone = [1, _deleted(jnp.asarray(2, jnp.int32))]
    else:
        gone = [(1, _deleted(jnp.asarray(2, jnp.int32)))]
    ok = np.array([1, 2], np.int32)
    cache = MambaRadixCache() if "mamba" in where else RadixCache()
    with pytest.raises(CacheError, match="deleted"):
        if where.startswith("key"):
            cache.match_prefix(RadixKey(gone))
        elif where == "value":
            cache.insert(RadixKey(ok), gone)
        else:
            state = _deleted(jnp.asarray([3] if form == "array" else 3, jnp.int32))
            cache.insert(RadixKey(ok), ok, mamba_value=state if form == "array" else [state])
    assert cache.total_size() == 0


def test_writes_refuse_the_padding_page_but_its_slot_0() -> None:
    """With pages, slots 1..P-1 are the padding page's rows too (never handed out, zeros),
    but a write or a copy to them went through."""
    pool = KVPool(16, 1, 1, 1, dtype=jnp.float32, page_size=4)
    ones = jnp.ones((1, 2, 1, 1))
    for loc in ([1, 4], [4, 3]):
        with pytest.raises(InvalidValueError, match="padding page 0"):
            pool.set_kv_all(loc, ones, ones)
        with pytest.raises(InvalidValueError, match="padding page 0"):
            pool.set_kv_buffer(0, loc, ones[0], ones[0])
        with pytest.raises(InvalidValueError, match="padding page 0"):
            pool.copy([4, 5], loc)
    assert not np.asarray(pool.buffers.k).any()
    pool.set_kv_all([0, 4], ones, ones)  # slot 0 is a padding entry: it writes nothing
    assert np.asarray(pool.buffers.k)[0, :, 0, 0].tolist() == [0, 0, 0, 0, 1] + [0] * 15
    assert pool.get_kv_all([1, 2])[0].shape == (1, 2, 1, 1)  # reads of the page are zeros


@pytest.mark.parametrize("bad", [[1.5], ["a"], [[1]], None, [True]])
@pytest.mark.parametrize("pool_kind", ["mamba", "req_to_token"])
def test_pool_free_errors_name_the_pools_argument(pool_kind: str, bad: object) -> None:
    """``MambaPool.free`` and ``ReqToTokenPool.free`` take ``slots``: their refusals name
    it, not the inner allocator's ``indices``, and keep their type."""
    pool = (
        MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
        if pool_kind == "mamba"
        else ReqToTokenPool(4, 8)
    )
    with pytest.raises(InvalidValueError, match=r"^slots: "):
        pool.free(bad)
