"""The vectorised range scan every int32 key, value and allocation prefix goes through
(``first_outside`` in ``pyx/pymllm/mem_cache/_copy.pxd``): an unrolled vector loop, its
vector remainder and a scalar tail. One bad entry at every position of arrays of every
length around those boundaries must be found, and named, and a clean array passed. A list
key is read four ints at a time (``pymllm_small_nonneg_run`` in ``_radix_tree.pyx``), a group
that holds anything else one item at a time: every kind of item at every position of lists
of every length around a group must read as its value, or be refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError

# every length up to four unrolled AVX2 iterations and a few past, then larger ones
LENGTHS = [*range(1, 70), 127, 128, 129, 1023, 1024, 1025]


def _positions(n: int) -> list[int]:
    return list(range(n)) if n <= 70 else sorted({0, 1, 7, 8, 31, 32, n // 2, n - 2, n - 1})


@pytest.mark.parametrize("n", LENGTHS)
def test_a_negative_token_anywhere_in_a_key_is_found(n: int) -> None:
    cache = RadixCache()
    tokens = np.arange(1, n + 1, dtype=np.int32)
    assert cache.match_prefix(RadixKey(tokens)).prefix_len == 0
    for bad in (-1, -(2**31)):
        for j in _positions(n):
            key = tokens.copy()
            key[j] = bad
            with pytest.raises(InvalidKeyError, match=f"token {bad} is outside"):
                cache.match_prefix(RadixKey(key))
    assert cache.total_size() == 0


@pytest.mark.parametrize("n", LENGTHS)
def test_a_negative_slot_anywhere_in_a_value_is_found(n: int) -> None:
    cache = RadixCache()
    key = RadixKey(np.arange(1, n + 1, dtype=np.int32))
    value = np.arange(1, n + 1, dtype=np.int32)
    for j in _positions(n):
        bad = value.copy()
        bad[j] = -5
        with pytest.raises(InvalidValueError, match="KV index -5 is outside"):
            cache.insert(key, bad)
        assert cache.total_size() == 0
    assert cache.insert(key, value).prefix_len == 0
    assert cache.total_size() == n


@pytest.mark.parametrize("n", LENGTHS)
def test_a_prefix_slot_outside_the_pool_anywhere_is_found(n: int) -> None:
    size = 2048
    alloc = TokenToKVPoolAllocator(size)
    prefix = np.arange(1, n + 1, dtype=np.int32)
    for bad in (0, size + 1, -1, 2**31 - 1):
        for j in _positions(n):
            p = prefix.copy()
            p[j] = bad
            with pytest.raises(InvalidValueError, match=f"slot {bad} is outside"):
                alloc.alloc(1, prefix=p)
    assert alloc.available_size() == size
    p = prefix.copy()
    p[-1] = size  # the last slot is inside
    out = alloc.alloc(1, prefix=p)
    assert out is not None and out[:n].tolist() == p.tolist()


class _Int(int):
    """An int subclass: read through its value, never the fast path's digit."""


# (item, the token it reads as); None: refused with that error
_LIST_ITEMS = [
    (0, 0),  # an int with no digit (size 0 on 3.11)
    (7, 7),
    (2**30 - 1, 2**30 - 1),  # the largest one-digit int
    (2**30, 2**30),  # two digits: the general path
    (2**32 - 1, 2**32 - 1),
    (_Int(9), 9),
    (np.int64(11), 11),
    (-1, InvalidKeyError),
    (2**32, InvalidKeyError),
    (-(2**40), InvalidKeyError),
    (1.0, InvalidKeyError),
    (True, InvalidKeyError),
    (None, InvalidKeyError),
    (object(), InvalidKeyError),
]


@pytest.mark.parametrize("n", [*range(1, 14), 64, 65, 66, 67])
def test_every_item_at_every_position_of_a_list_key(n: int) -> None:
    cache = RadixCache()
    base = list(range(100, 100 + n))
    for item, want in _LIST_ITEMS:
        for j in range(n):
            tokens = base.copy()
            tokens[j] = item
            if isinstance(want, type):
                with pytest.raises(want, match=f"token {j}|token {item}|tokens must be"):
                    cache.insert(RadixKey(tokens), np.arange(1, n + 1, dtype=np.int32))
                assert cache.total_size() == 0
                continue
            expect = np.array(base, dtype=np.int64)
            expect[j] = want
            # the list key reads as the same tokens as the array of its values
            cache.insert(RadixKey(tokens), np.arange(1, n + 1, dtype=np.int32))
            m = cache.match_prefix(RadixKey(expect.astype(np.uint32)))
            assert m.prefix_len == n, (item, j)
            assert cache.match_prefix(RadixKey(tokens)).prefix_len == n
            cache.reset()


class _Pair(tuple):
    """A tuple subclass: read as a tuple by the general path, never the exact-tuple one."""


@pytest.mark.parametrize("width", [2, 3])
@pytest.mark.parametrize("n", [*range(1, 10), 33, 34])
def test_every_item_at_every_position_of_a_tuple_key(n: int, width: int) -> None:
    """Bigram keys are read two tuples (four ints) a step, other widths a tuple a step: an
    odd item anywhere goes through the general path, which reads or refuses it."""
    cache = RadixCache()
    base = [tuple(range(100 + width * i, 100 + width * (i + 1))) for i in range(n)]
    for item, want in _LIST_ITEMS:
        for slot in range(width):
            for j in range(n):
                tokens = base.copy()
                tup = list(base[j])
                tup[slot] = item
                tokens[j] = tuple(tup)
                value = np.arange(1, n + 1, dtype=np.int32)
                if isinstance(want, type):
                    with pytest.raises(want, match=f"token {item}|tokens must be"):
                        cache.insert(RadixKey(tokens), value)
                    assert cache.total_size() == 0
                    continue
                cache.insert(RadixKey(tokens), value)
                same = base.copy()
                same[j] = tuple(int(x) for x in tokens[j])
                assert cache.match_prefix(RadixKey(same)).prefix_len == n, (item, j, slot)
                assert cache.match_prefix(RadixKey(tokens)).prefix_len == n
                cache.reset()
    # a tuple subclass anywhere reads as its tuple; a list, or another width, is refused
    for j in range(n):
        tokens = base.copy()
        tokens[j] = _Pair(base[j])
        cache.insert(RadixKey(tokens), np.arange(1, n + 1, dtype=np.int32))
        assert cache.match_prefix(RadixKey(base)).prefix_len == n
        cache.reset()
        widths = [(*base[j], 1), base[j][:-1]] if n > 1 else []  # one token: any width
        for bad in [list(base[j]), *widths]:
            tokens = base.copy()
            tokens[j] = bad  # type: ignore[call-overload]
            # (at token 0 a list makes it a key of ints, another width the key's width)
            with pytest.raises(InvalidKeyError, match=r"token \d+ is|tokens must be"):
                cache.insert(RadixKey(tokens), np.arange(1, n + 1, dtype=np.int32))
            assert cache.total_size() == 0


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 128, 129, 200])
def test_a_64_bit_key_or_value_is_checked_and_narrowed_at_every_position(n, dtype) -> None:
    """int64 (numpy's default) and uint64 arrays are narrowed to 32 bits in 64-entry blocks:
    an entry out of range at any position is named, and the tree is left as it was."""
    cache = RadixCache()
    tokens = np.arange(2**32 - n, 2**32, dtype=np.uint64).astype(dtype)  # the top of the range
    value = np.arange(2**31 - n, 2**31, dtype=dtype)
    bad_tokens = [2**32, 2**63 - 1] + ([-1, -(2**63)] if dtype == np.int64 else [2**64 - 1])
    for j in _positions(n):
        for bad in bad_tokens:
            key = tokens.copy()
            key[j] = bad
            with pytest.raises(InvalidKeyError, match=f"token {bad} is outside"):
                cache.insert(RadixKey(key), value)
        for bad in [2**31, 2**32 + 1] + ([-5] if dtype == np.int64 else []):
            v = value.copy()
            v[j] = bad
            with pytest.raises(InvalidValueError, match=f"KV index {bad} is outside"):
                cache.insert(RadixKey(tokens), v)
        assert cache.total_size() == 0
    r = cache.insert(RadixKey(tokens), value)
    assert r.prefix_len == 0 and cache.total_size() == n
    m = cache.match_prefix(RadixKey(tokens.astype(np.uint32)))
    assert m.prefix_len == n
    assert m.indices.tolist() == value.tolist()
    # read back through a 32-bit key as well: the same node
    assert cache.match_prefix(RadixKey(tokens.tolist())).last_node.id == m.last_node.id


def test_a_small_object_beside_a_bigram_is_read_only_within_itself() -> None:
    """A pair of bigrams is checked for tuple types before their sizes: ob_size lies past
    the end of a 16-byte object (an object() or None), so an object ending a page that is
    followed by an unmapped one crashed the insert. Here such an object is laid there, in a
    child process."""
    code = """
import ctypes, mmap, sys
from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.errors import InvalidKeyError
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = libc.mmap(None, 2 * PAGE, 3, 0x22, -1, 0)  # read/write, private anonymous
assert libc.mprotect(base + PAGE, PAGE, 0) == 0  # the second page: no access
addr = base + PAGE - 16  # a 16-byte object ending the first page
ctypes.c_ssize_t.from_address(addr).value = 1 << 40  # a refcount it never loses
ctypes.c_void_p.from_address(addr + 8).value = id(object)
obj = ctypes.cast(addr, ctypes.py_object).value
assert type(obj) is object and sys.getsizeof(obj) == 16
for key in ([(1, 2), (3, 4), obj, (5, 6)], [(1, 2), obj, (3, 4), (5, 6)]):
    try:
        RadixCache().insert(RadixKey(key), [1, 2, 3, 4])
    except InvalidKeyError:
        print("refused")
"""
    assert run_child(code).split() == ["refused", "refused"]
