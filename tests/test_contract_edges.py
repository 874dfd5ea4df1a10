"""Edges of the tree's contract found by reviews (sessions 9 and 11), each reproduced first.

A negative insert priority was raised to 0; an extra_key whose hash changed after insert
made evict raise midway (slots leaked, the tree half changed); a huge swa_evicted_seqlen
overflowed when rounded up to a page; ints past 2**63 raised OverflowError; evicted
handles of a cache without a sliding window answered swa_tombstone and swa_lock_ref.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    hash_bytes,
    hash_token_ids,
)
from pymllm.mem_cache.errors import (
    InvalidFreeError,
    InvalidValueError,
    LockStateError,
    StaleNodeError,
)


def test_a_negative_priority_is_evicted_before_priority_zero() -> None:
    cache = RadixCache(eviction_policy="priority")
    older = cache.insert(RadixKey([1, 2]), [1, 2]).last_node  # priority 0
    newer = cache.insert(RadixKey([7, 8]), [7, 8], priority=-5).last_node
    cache.evict(1)
    assert newer.evicted and not older.evicted
    # an insert through an existing node never lowers it
    cache.insert(RadixKey([1, 2, 3]), [1, 2, 3], priority=-9)
    cache.evict(1)  # the new [3] leaf (-9) goes, then [1, 2] would be next at 0
    assert not older.evicted
    cache._check_invariants()


class MutableName:
    """An extra_key whose hash follows a field the caller changes (a caller bug that
    Python's dicts do not tolerate either)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MutableName) and other.name == self.name


def test_an_extra_key_whose_hash_changed_does_not_break_evict() -> None:
    alloc = TokenToKVPoolAllocator(64)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    key = MutableName("a")
    cache.insert(RadixKey([1, 2, 3], key), alloc.alloc(3))
    cache.insert(RadixKey([4, 5]), alloc.alloc(2))
    key.name = "b"
    assert cache.evict(100).full_evicted == 5  # raised KeyError midway before
    assert alloc.available_size() == 64  # every slot back
    assert cache.total_size() == 0
    cache._check_invariants()
    # the namespace stays registered, empty; other keys never land in it
    cache.insert(RadixKey([1, 2, 3], MutableName("c")), alloc.alloc(3))
    assert cache.match_prefix(RadixKey([1, 2, 3], MutableName("c"))).prefix_len == 3
    cache._check_invariants()


class IdentityKey:
    """An extra_key equal only to itself, whose hash the caller changes."""

    def __init__(self, h: int) -> None:
        self.h = h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return self is other


def test_a_changed_hash_that_hits_another_namespace_frees_neither() -> None:
    """One key object registered twice (its hash changed between inserts): releasing the
    second namespace found the first one's entry under the key's hash of the moment and
    deleted it, then freed the second id while the registry still mapped the key to it.
    A new extra_key then got that id and matched the first key's KV."""
    cache = RadixCache()
    a = IdentityKey(1)
    cache.insert(RadixKey([1, 2, 3], a), np.arange(0, 3, dtype=np.int32))  # ns 1, hash 1
    a.h = 2
    cache.insert(RadixKey([4, 5, 6], a), np.arange(10, 13, dtype=np.int32))  # ns 2, hash 2
    a.h = 1
    cache.match_prefix(RadixKey([1, 2, 3], a))  # ns 1's node is the most recent
    cache.evict(3)  # ns 2's node goes; its release looks the key up under hash 1
    cache._check_invariants()
    a.h = 2
    cache.insert(RadixKey([7, 8, 9], a), np.arange(20, 23, dtype=np.int32))
    cache._check_invariants()
    b = IdentityKey(3)
    assert cache.insert(RadixKey([7, 8, 9], b), np.arange(30, 33, dtype=np.int32)).prefix_len == 0
    assert cache.match_prefix(RadixKey([7, 8, 9], b)).indices.tolist() == [30, 31, 32]
    a.h = 1  # the first namespace's entry was put back: its node is still found
    assert cache.match_prefix(RadixKey([1, 2, 3], a)).indices.tolist() == [0, 1, 2]
    cache._check_invariants()


@pytest.mark.parametrize("es", [8, 10**6, 2**62, 2**63 - 1])
def test_an_evicted_window_past_the_key_caches_nothing_and_frees_everything(es: int) -> None:
    alloc = SWATokenToKVPoolAllocator(64, 64, page_size=2)
    cache = RadixCache(page_size=2, sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(8)
    r = cache.insert(RadixKey(list(range(1, 9))), slots, swa_evicted_seqlen=es)
    assert r.prefix_len == 0 and cache.total_size() == 0
    assert (alloc.full_available_size(), alloc.swa_available_size()) == (64, 64)
    cache._check_invariants()


@pytest.mark.parametrize(
    "call",
    [
        lambda c, v: c.insert(RadixKey([1, 2]), v, swa_evicted_seqlen=2**64),
        lambda c, v: c.insert(RadixKey([1, 2]), v, prev_prefix_len=2**64),
        lambda c, v: c.dec_lock_ref(c.match_prefix(RadixKey([9])).last_node, 2**64),
    ],
    ids=["swa_evicted_seqlen", "prev_prefix_len", "swa_boundary_id"],
)
def test_ints_past_2_63_are_invalid_values_and_change_nothing(call) -> None:
    alloc = SWATokenToKVPoolAllocator(64, 64)
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    node = cache.insert(RadixKey([9]), alloc.alloc(1)).last_node
    cache.inc_lock_ref(node)
    value = alloc.alloc(2)  # the caller's, before and after the failed call
    before = (cache.total_size(), cache.protected_size(), alloc.available_size())
    with pytest.raises(InvalidValueError, match=r"2\*\*63"):  # OverflowError before
        call(cache, value)
    assert (cache.total_size(), cache.protected_size(), alloc.available_size()) == before
    assert alloc.is_allocated(value).all() and node.lock_ref == 1
    cache._check_invariants()


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
@pytest.mark.parametrize("attr", ["swa_tombstone", "swa_lock_ref"])
def test_evicted_handles_raise_for_the_window_attributes_too(cls, attr: str) -> None:
    cache = cls()
    node = cache.insert(RadixKey([1, 2]), np.array([1, 2], dtype=np.int32)).last_node
    cache.evict(2)
    assert node.evicted
    with pytest.raises(StaleNodeError):
        getattr(node, attr)


def test_an_unlock_cannot_take_another_requests_sliding_window_lock() -> None:
    """dec_lock_ref checked only that the nodes past the boundary held some SWA lock, so a
    wrong boundary (here None for A's lock, which covers [5, 6] only) released C's lock
    on [1..4], and the next SWA evict tombstoned a node C still held."""
    alloc = SWATokenToKVPoolAllocator(64, 64)
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4))
    head = cache.match_prefix(RadixKey([1, 2, 3, 4]))
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), np.concatenate([head.indices, alloc.alloc(2)]))
    upper = cache.match_prefix(RadixKey([1, 2, 3, 4])).last_node
    deep = cache.match_prefix(RadixKey([1, 2, 3, 4, 5, 6])).last_node
    lock_c = cache.inc_lock_ref(upper)  # C: SWA lock on [1..4]
    lock_a = cache.inc_lock_ref(deep)  # A: a window of 2 locks [5, 6] only
    assert (lock_c, lock_a) == (0, 4)
    for wrong in (None, 0, 2):
        with pytest.raises(LockStateError, match="does not match an SWA lock"):
            cache.dec_lock_ref(deep, wrong)
    assert upper.swa_lock_ref == 1 and deep.swa_lock_ref == 1
    cache.evict(0, 100)
    assert not upper.swa_tombstone  # C's lock held
    cache.dec_lock_ref(deep, lock_a)
    cache.dec_lock_ref(upper, lock_c)
    assert cache.swa_protected_size() == 0 and cache.protected_size() == 0
    cache._check_invariants()


@pytest.mark.parametrize("token", [0, 5, True, "x"])
def test_an_unlock_without_a_window_refuses_a_token_it_never_gave(token: object) -> None:
    """Without a window inc_lock_ref returns None; any other token passed back was ignored,
    so a scheduler that mixed tokens up failed only once a window was turned on."""
    cache = RadixCache()
    node = cache.insert(RadixKey([1, 2]), [1, 2]).last_node
    lock = cache.inc_lock_ref(node)
    assert lock is None
    with pytest.raises(LockStateError, match="no sliding window"):
        cache.dec_lock_ref(node, token)
    assert node.lock_ref == 1 and cache.protected_size() == 2  # nothing changed
    cache.dec_lock_ref(node, lock)
    assert cache.protected_size() == 0
    cache._check_invariants()


def _unaligned_int32(values: object) -> np.ndarray:
    """An int32 array whose data starts 1 byte past an aligned address (numpy allows it;
    C may not read int32 there)."""
    values = np.asarray(values, dtype=np.int32)
    raw = np.zeros(values.nbytes + 1, dtype=np.uint8)
    arr = raw[1:].view(np.int32)
    arr[:] = values
    assert not arr.flags.aligned and arr.flags.c_contiguous
    return arr


def test_unaligned_int32_keys_values_and_frees_are_read_right() -> None:
    # the zero-copy paths take aligned arrays only; an unaligned one is copied first
    alloc = TokenToKVPoolAllocator(64, need_sort=False)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(6)
    key = _unaligned_int32([5, 6, 7, 8, 9, 10])
    assert cache.insert(RadixKey(key), _unaligned_int32(slots)).prefix_len == 0
    m = cache.match_prefix(RadixKey(_unaligned_int32([5, 6, 7, 1])))
    assert (m.prefix_len, m.indices.tolist()) == (3, slots[:3].tolist())
    more = alloc.alloc(2)
    alloc.free(_unaligned_int32(more))
    assert not alloc.is_allocated(more).any()
    with pytest.raises(InvalidFreeError, match="not allocated"):
        alloc.free(_unaligned_int32(more[:1]))
    cache.evict(6)
    assert alloc.available_size() == 64
    cache._check_invariants()
    alloc._check_invariants()


# -- found by the review of session 11 ---------------------------------------------------


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
def test_page_size_takes_any_integer_but_a_bool(cls) -> None:
    """np.int64(4) was refused (every other integer argument goes through __index__)."""

    class BadIndex:
        def __init__(self, v) -> None:
            self.v = v

        def __index__(self):
            return self.v

    assert cls(page_size=np.int64(4)).page_size == 4
    for bad in (True, np.True_, 0, 2**31, 4.0, "4", BadIndex(2.5)):
        with pytest.raises(InvalidValueError, match="page_size"):
            cls(page_size=bad)


def test_sliding_window_size_takes_any_integer_but_a_bool() -> None:
    alloc = SWATokenToKVPoolAllocator(16, 16)
    cache = RadixCache(sliding_window_size=np.int64(4), token_to_kv_pool_allocator=alloc)
    assert cache.sliding_window_size == 4 and type(cache.sliding_window_size) is int
    for bad in (True, 0, 4.0):
        with pytest.raises(InvalidValueError, match="sliding_window_size"):
            RadixCache(sliding_window_size=bad)


def test_tuple_subclass_tokens_are_tuple_tokens() -> None:
    """A namedtuple token was refused ("tokens must be integers"); it is a tuple, hashed
    and matched as one."""
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    cache = RadixCache(page_size=2)
    r = cache.insert(RadixKey([Pair(1, 2), Pair(3, 4), Pair(5, 6)]), [7, 8, 9])
    assert r.prefix_len == 0
    m = cache.match_prefix(RadixKey([(1, 2), (3, 4), (5, 6)]))
    assert (m.prefix_len, m.indices.tolist()) == (2, [7, 8])
    with pytest.raises(ValueError, match="tuple"):
        cache.insert(RadixKey([Pair(1, 2), 3]), [1, 2])
    cache._check_invariants()


# -- session 14's review -----------------------------------------------------------------


class _Tok(int):
    """An int subclass whose own __index__ says something else: operator.index, numpy and
    hash_token_ids read its value, so must the caches."""

    def __index__(self) -> int:
        return 99


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
def test_an_int_subclass_is_read_by_its_value(cls) -> None:
    alloc = TokenToKVPoolAllocator(16, need_sort=False)
    cache = cls(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(2)
    state = {"mamba_value": 1} if cls is MambaRadixCache else {}
    cache.insert(RadixKey([_Tok(5), 6]), [_Tok(int(slots[0])), int(slots[1])], **state)
    m = cache.match_prefix(RadixKey([5, 6]))
    assert m.prefix_len == 2 and m.indices.tolist() == slots.tolist()
    assert cache.match_prefix(RadixKey([99, 6])).prefix_len == 0
    assert alloc.is_cached(slots).all()
    first = hash_token_ids([5])
    assert cache.compute_node_hash(m.last_node) == [first, hash_token_ids([6], first)]
    # the window, evict and lock arguments read it the same way
    cache.evict(_Tok(0))
    assert not m.last_node.evicted
    cache._check_invariants()


class _TokenList(list):
    """A list subclass: its stored items are the tokens (as for a plain list)."""

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("field", ["token_ids", "value"])
def test_a_list_subclass_is_read_as_a_list(field: str) -> None:
    cache = RadixCache(page_size=1)
    with pytest.raises(ValueError, match="bool"):  # as a plain list: a bool is no token
        if field == "token_ids":
            cache.insert(RadixKey(_TokenList([True, 2])), [1, 2])
        else:
            cache.insert(RadixKey([1, 2]), _TokenList([True, 2]))
    assert cache.total_size() == 0
    # tuple tokens in a list subclass are tuple tokens, not a 2-D array
    r = cache.insert(RadixKey(_TokenList([(1, 2), (3, 4)])), _TokenList([7, 8]))
    assert r.prefix_len == 0
    m = cache.match_prefix(RadixKey([(1, 2), (3, 4)]))
    assert m.prefix_len == 2 and m.indices.tolist() == [7, 8]
    cache._check_invariants()


def test_an_extra_key_that_rewrites_the_value_cannot_slip_in_a_bad_slot() -> None:
    """The namespace is looked up before the value is read: an extra_key whose __hash__
    writes a negative slot into the caller's array is refused like that array."""

    class Rewriter:
        arr: Any = None

        def __hash__(self) -> int:
            if Rewriter.arr is not None:
                Rewriter.arr[1] = -5
            return 3

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Rewriter)

    freed: list[list[int]] = []

    class Recorder:
        def free(self, idx: Any) -> None:
            freed.append(np.asarray(idx).tolist())

    cache = RadixCache(token_to_kv_pool_allocator=Recorder())
    extra = Rewriter()
    cache.insert(RadixKey([1, 2], extra), np.array([1, 2], dtype=np.int32))  # its namespace
    value = np.array([10, 11, 12], dtype=np.int32)
    Rewriter.arr = value
    with pytest.raises(InvalidValueError, match="-5"):
        cache.insert(RadixKey([1, 2, 3], extra), value)
    assert cache.total_size() == 2
    cache.evict(100)
    assert freed == [[1, 2]]


def test_a_windowed_new_namespace_reads_its_copy_of_the_value() -> None:
    """Taking a new namespace runs the extra_key's __hash__ after the slots were checked
    and booked: rewriting the caller's array then changes neither what the tree keeps nor
    the allocator's books."""

    class Rewriter:
        arr: Any = None
        calls = 0

        def __hash__(self) -> int:
            Rewriter.calls += 1
            if Rewriter.arr is not None and Rewriter.calls >= 2:  # while interning
                Rewriter.arr[:] = [60, 61, 62, 63]
            return 3

        def __eq__(self, other: object) -> bool:
            return self is other

    alloc = SWATokenToKVPoolAllocator(64, 64, need_sort=False)
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    value = alloc.alloc(4)
    kept = value.copy()
    Rewriter.arr = value
    cache.insert(RadixKey([1, 2, 3, 4], Rewriter()), value)
    assert value.tolist() == [60, 61, 62, 63] != kept.tolist()  # the rewrite happened
    (node,) = [n for n in cache._nodes() if n.parent is not None]
    assert np.asarray(node.value).tolist() == kept.tolist()
    assert alloc.is_cached(kept).all()
    cache._check_invariants()
    alloc._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == 64
    alloc._check_invariants()


def test_hash_token_ids_reads_tokens_as_the_caches_do() -> None:
    """Whatever the length or form (plain list, tuple tokens), numpy ints of both signs and
    objects with __index__ hash as their ints, and bools and malformed keys are refused."""

    class Idx:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    for n in (2, 300):
        mixed = [np.uint64(5), np.int64(6)] * (n // 2)
        assert hash_token_ids(mixed) == hash_token_ids([5, 6] * (n // 2))
        assert hash_token_ids([Idx(5)] * n) == hash_token_ids([5] * n)
        assert hash_token_ids([_Tok(5)] * n) == hash_token_ids([5] * n)
    assert hash_token_ids([(np.uint64(1), np.int64(2))]) == hash_token_ids([(1, 2)])
    for bad in (
        np.array([True, 2], dtype=object),
        np.array(5),
        5,
        [()],
        np.zeros((2, 2, 2), dtype=np.int32),
        [1.5, 2],
    ):
        with pytest.raises(ValueError):
            hash_token_ids(bad)


def test_hash_bytes_refuses_an_array_of_python_objects() -> None:
    """Its buffer holds pointers: equal arrays would hash apart, and differently per run."""
    with pytest.raises(TypeError):
        hash_bytes(np.array([1, "image-0001"], dtype=object))
    assert hash_bytes(np.array([1, 2], dtype=np.int64)) == hash_bytes(
        np.array([1, 2], dtype=np.int64).tobytes()
    )


def test_a_key_over_a_deque_prints_and_slices() -> None:
    key = RadixKey(collections.deque(range(12)), "a")
    assert repr(key) == "RadixKey(extra_key='a', token_ids=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]...)"
    assert list(key[3].token_ids) == [3] and key[3].extra_key == "a"
    assert list(key[2:4].token_ids) == [2, 3]
    cache = RadixCache()
    cache.insert(key, list(range(12)))
    assert cache.match_prefix(key[:5]).prefix_len == 5


class _Liar(int):
    """An int subclass whose comparisons always say "in range"."""

    def __lt__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True


@pytest.mark.parametrize("arg", ["prev_prefix_len", "swa_evicted_seqlen", "swa_boundary_id"])
def test_an_int_subclass_argument_is_range_checked_by_its_value(arg: str) -> None:
    """Read as an exact int: its own comparisons never decide (a negative one crashed)."""
    cache = RadixCache(sliding_window_size=2)
    r = cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4])
    with pytest.raises(InvalidValueError, match="-1"):
        if arg == "swa_boundary_id":
            cache.inc_lock_ref(r.last_node)
            cache.dec_lock_ref(r.last_node, _Liar(-1))
        else:
            cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), [1, 2, 3, 4, 5, 6], **{arg: _Liar(-1)})
    assert cache.total_size() == 4
    cache._check_invariants()


def test_arguments_that_run_python_code_are_read_before_the_value() -> None:
    """An __index__ (the window's arguments) or an __array__ (a state slot) that rewrites
    the caller's value array runs before the array is checked, so the rewrite is checked."""
    value = np.array([10, 11, 12, 13], dtype=np.int32)

    class Sneaky:
        def __index__(self) -> int:
            value[2] = -5
            return 0

    windowed = RadixCache(sliding_window_size=2)
    with pytest.raises(InvalidValueError, match="-5"):
        windowed.insert(RadixKey([1, 2, 3, 4]), value, swa_evicted_seqlen=Sneaky())
    assert windowed.total_size() == 0

    value2 = np.array([20, 21, 22, 23], dtype=np.int32)

    class SneakyState:
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            value2[1] = -9
            return np.array([3])

    mamba = MambaRadixCache()
    with pytest.raises(InvalidValueError, match="-9"):
        mamba.insert(RadixKey([1, 2, 3, 4]), value2, mamba_value=SneakyState())
    assert mamba.total_size() == 0


def test_a_windowed_insert_reads_no_caller_array_after_the_allocators_free() -> None:
    """The duplicates go to a Python allocator's free before the tree takes the rest: the
    new nodes and the revived parts hold what was checked, whatever the free does."""
    value: Any = None

    class Rewriting(SWATokenToKVPoolAllocator):  # a subclass: its Python free is called
        def free(self, free_index: Any) -> None:
            super().free(free_index)
            if value is not None:
                value[4] = -3

    alloc = Rewriting(64, 64, need_sort=False)
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4))
    value = alloc.alloc(5)
    checked = value.copy()
    r = cache.insert(RadixKey([1, 2, 3, 4, 5]), value)  # value[:4] duplicates: freed first
    assert r.prefix_len == 4 and value[4] == -3  # the free rewrote the caller's array
    assert np.asarray(r.last_node.value).tolist() == [checked[4]]
    cache._check_invariants()


def test_an_int_subclass_state_slot_is_range_checked_by_its_value() -> None:
    cache = MambaRadixCache()
    for bad in (-1, 2**32 + 7, 2**31 + 5):
        with pytest.raises(InvalidValueError, match="state slot"):
            cache.insert(RadixKey([1, 2]), [1, 2], mamba_value=_Liar(bad))
    assert cache.total_size() == 0
    r = cache.insert(RadixKey([1, 2]), [1, 2], mamba_value=_Liar(3))
    assert np.asarray(r.last_node.mamba_value).tolist() == [3]
    cache._check_invariants()


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache, "windowed"])
def test_a_bad_value_is_reported_before_a_bad_extra_key(cls: Any) -> None:
    """The namespace is looked up before the value is read, but its error waits: a bad
    value is reported first, as before, and the extra_key's error once the value is good."""
    cache = RadixCache(sliding_window_size=2) if cls == "windowed" else cls()
    with pytest.raises(InvalidValueError, match="-3"):
        cache.insert(RadixKey([1, 2, 3, 4], []), [1, 2, -3, 4])
    with pytest.raises(TypeError, match="hashable"):
        cache.insert(RadixKey([1, 2, 3, 4], []), [1, 2, 3, 4])
    assert cache.total_size() == 0
    r = cache.insert(RadixKey([1, 2, 3, 4], "ok"), [1, 2, 3, 4])
    assert r.prefix_len == 0 and cache.total_size() == 4


@pytest.mark.parametrize(
    "dtype", [[("a", "O")], [("a", "O"), ("b", "<i4")], [("a", "O", (2,))]], ids=str
)
def test_hash_bytes_refuses_a_buffer_of_records_with_objects(dtype: Any) -> None:
    records = np.zeros(2, dtype=dtype)
    for data in (records, memoryview(records)):
        with pytest.raises(TypeError):
            hash_bytes(data)


def test_hash_bytes_takes_a_structured_array() -> None:
    """Only an array of Python objects is refused: a field named "Offset" puts an "O" in
    the buffer's format string, not an object."""
    a = np.zeros(3, dtype=[("Offset", "<i4")])
    assert hash_bytes(a) == hash_bytes(a.tobytes())


# -- session 17's review: the reference models read integers as the compiled caches do ---


class _Index:
    """Not an int, but an integer through __index__ (as a 0-d numpy array is)."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v


def _index_calls(cls: Any, **kwargs: Any) -> list[Any]:
    """Integer-like page size, window, key tokens, list values and eviction counts, given to
    a cache of `cls`: each call's outcome, and the cache's state after each."""
    from conftest import outcome  # tests/ is on sys.path (rootdir conftest)

    cache = cls(page_size=_Index(1), **kwargs)
    out: list[Any] = []
    for call in (
        lambda: cache.insert(RadixKey([_Index(1), np.array(2), 3]), [_Index(5), 6, 7]).prefix_len,
        lambda: cache.match_prefix(RadixKey([_Index(1), _Index(2), 9])).prefix_len,
        lambda: cache.insert(RadixKey([(_Index(1), 2)]), [_Index(8)]).prefix_len,
        lambda: cache.insert(RadixKey([1, 2]), [_Index(5), 2.0]),  # a float: refused
        lambda: cache.evict(_Index(1), np.array(0)).full_evicted,
        lambda: cache.evict(True),  # a bool: refused
    ):
        out.append(outcome(call))
        out.append((cache.evictable_size(), cache.total_size()))
    return out


@pytest.mark.parametrize("kind", ["plain", "swa", "mamba"])
def test_reference_models_read_integer_like_arguments_as_the_caches(kind: str) -> None:
    """The reference models refused what the compiled caches accept through __index__
    (tokens, list values, eviction counts, page and window sizes), so the comparison tests
    could not draw such arguments."""
    from reference_mamba import RefMambaRadixCache
    from reference_model import RefRadixCache
    from reference_swa import RefSWARadixCache

    if kind == "plain":
        pair = (RadixCache, RefRadixCache, {})
    elif kind == "swa":
        pair = (RadixCache, RefSWARadixCache, {"sliding_window_size": _Index(2)})
    else:
        pair = (MambaRadixCache, RefMambaRadixCache, {})
    compiled, ref, kwargs = pair
    got = _index_calls(compiled, **kwargs)
    assert got == _index_calls(ref, **kwargs)
    assert got[0] == ("ok", 0) and got[8][0] == "ok"  # accepted: inserted, then evicted
    assert got[6][0] == "raised" and got[10] == ("raised", TypeError)


def test_reference_model_agrees_on_argument_order_namespaces_and_empty_float_arrays() -> None:
    """Three disagreements a review found between RefRadixCache and RadixCache: insert's
    third positional argument (prev_prefix_len in the compiled cache; the reference read
    it as the priority), the extra_key object a namespace keeps (its first, for equal
    extra_keys), and empty float arrays (refused as keys and values by the compiled
    cache, accepted by the reference)."""
    from conftest import outcome
    from reference_model import RefRadixCache

    def run(cls: Any) -> list[Any]:
        order: list[int] = []
        cache = cls(eviction_policy="priority", on_node_evict=order.append)
        cache.insert(RadixKey([1]), [1], 5)  # prev_prefix_len 5: ignored without a window
        cache.insert(RadixKey([2]), [2], prev_prefix_len=0, priority=1)
        cache.evict(1)
        cache.insert(RadixKey([3], 7), [3])
        node = cache.insert(RadixKey([3, 4], 7.0), [3, 4]).last_node
        kinds = (type(node.key.extra_key), type(node.parent.key.extra_key))
        return [
            order,
            kinds,
            outcome(lambda: cache.insert(RadixKey(np.array([])), [])),
            outcome(lambda: cache.insert(RadixKey([]), np.array([]))),
            outcome(lambda: cache.match_prefix(RadixKey(np.array([]))).prefix_len),
        ]

    got = run(RadixCache)
    assert got == run(RefRadixCache)
    assert got[:2] == [[1], (int, int)]
    assert got[2][0] == got[3][0] == got[4][0] == "raised"


def test_an_allocator_subclass_is_served_through_its_free_unbooked() -> None:
    """Booking is for the package's allocator types exactly (documented): a subclass's own
    Python free is what a cache calls, so the cache books nothing there."""
    freed: list[list[int]] = []

    class Counting(TokenToKVPoolAllocator):
        def free(self, indices: Any) -> None:
            freed.append(np.asarray(indices).tolist())
            super().free(indices)

    alloc = Counting(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), slots)
    assert not alloc.is_cached(slots).any() and alloc.is_allocated(slots).all()
    cache.evict(4)
    assert freed == [slots.tolist()] and alloc.available_size() == 16


def test_pretty_print_of_a_deep_chain_is_linear_in_its_nodes(capsys) -> None:
    """Indentation stops at 32 levels; deeper lines name their depth (a 1e4-deep chain
    printed 100 MB when every level indented two more spaces)."""
    cache = RadixCache()
    depth = 300
    for n in range(1, depth + 1):  # each key one token longer: a chain of one-token nodes
        cache.insert(RadixKey(list(range(n))), np.arange(1, n + 1, dtype=np.int32))
    cache.pretty_print()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == depth + 1  # the nodes, then the totals
    assert lines[-1].startswith(f"#tokens: {depth}")
    nodes = lines[:-1]
    assert not nodes[0].startswith(" ")
    assert nodes[31].startswith("  " * 31) and not nodes[31].startswith("  " * 32)
    assert nodes[32].startswith("  " * 32) and "(depth" not in nodes[32]
    for d in (34, 100, depth):
        line = nodes[d - 1]
        assert line.startswith("  " * 32 + f"(depth {d}) ")
        assert not line.startswith("  " * 33)


def test_children_and_pretty_print_list_siblings_oldest_first(capsys) -> None:
    """Siblings come in node id order, the order their nodes were made, whichever freed
    node slots they took (they came in slot order: a node made after an evict took the
    evicted node's slot and printed before its older siblings)."""
    cache = RadixCache()
    first = cache.insert(RadixKey([1, 1]), None).last_node
    cache.insert(RadixKey([2, 2]), None)
    cache.insert(RadixKey([3, 3]), None)
    cache.match_prefix(RadixKey([2, 2]))
    cache.match_prefix(RadixKey([3, 3]))
    assert cache.evict(2).full_evicted == 2 and first.evicted  # the oldest slot is free
    cache.insert(RadixKey([4, 4]), None)  # the newest node, in the freed slot
    cache.insert(RadixKey([2, 2, 5]), None)  # children of [2, 2]: made in this order
    cache.insert(RadixKey([2, 2, 6]), None)
    cache.insert(RadixKey([2, 2, 0]), None)
    kids = cache.children(cache.root_node)
    assert [k.key.token_ids for k in kids] == [[2, 2], [3, 3], [4, 4]]
    assert [k.id for k in kids] == sorted(k.id for k in kids)
    grandkids = cache.children(kids[0])
    assert [k.key.token_ids for k in grandkids] == [[5], [6], [0]]
    cache.pretty_print()
    lines = capsys.readouterr().out.splitlines()[:-1]
    keys = [line.split("key=")[1].split("]")[0] + "]" for line in lines]
    assert keys == ["[2, 2]", "[5]", "[6]", "[0]", "[3, 3]", "[4, 4]"]
    assert [line.startswith("  ") for line in lines] == [False, True, True, True, False, False]


def test_pretty_print_names_the_namespace_of_each_root_child(capsys) -> None:
    """Namespaces with equal tokens printed identical lines; a root child in a namespace
    now ends with its extra_key's repr (taken after the tree is released, so a repr that
    calls the cache works), and the default namespace prints no extra_key."""
    cache = RadixCache()

    class CallsTheCache:
        def __repr__(self) -> str:
            return f"CallsTheCache(total={cache.total_size()})"

    cache.insert(RadixKey([1, 2, 3], "lora-a"))
    cache.insert(RadixKey([1, 2, 3], "lora-b"))
    cache.insert(RadixKey([1, 2, 4], "lora-b"))
    cache.insert(RadixKey([1, 2, 3]))
    cache.insert(RadixKey([1, 2, 3], CallsTheCache()))
    cache.pretty_print()
    lines = capsys.readouterr().out.splitlines()
    roots = [line for line in lines[:-1] if not line.startswith(" ")]
    assert len(roots) == 4 and len(lines) == 7
    ends = sorted(line.split("  extra_key=")[1] for line in roots if "extra_key=" in line)
    assert ends == ["'lora-a'", "'lora-b'", "CallsTheCache(total=13)"]
    assert sum("extra_key=" in line for line in lines) == 3


def test_pretty_print_keeps_a_multi_line_extra_key_repr_on_one_line(capsys) -> None:
    """An extra_key whose repr spans lines (a frozen dataclass holding a prompt template,
    say) printed its node over several lines, so the printout no longer read one node a
    line; its line breaks are now escaped."""

    class Template:
        def __repr__(self) -> str:
            return "Template(\n  'system'\r\n)"

    cache, template = RadixCache(), Template()
    cache.insert(RadixKey([1, 2, 3], template))
    cache.insert(RadixKey([1, 2, 3, 4], template))
    cache.insert(RadixKey([5], Template()))  # another namespace (compared by identity)
    cache.pretty_print()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # two root children, the first with a child; the totals
    ends = [line.split("  extra_key=")[1] for line in lines if "extra_key=" in line]
    assert ends == ["Template(\\n  'system'\\r\\n)"] * 2
