"""Coverage review (session 24): radix-tree paths the suite did not run, pinned to their documented
behaviour. Each names the _radix_tree.pyx line it covers (as of the review)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RecordingAllocator, RecordingStates, RecordingSWAAllocator

from pymllm.mem_cache import TokenToKVPoolAllocator
from pymllm.mem_cache.base_prefix_cache import RadixKey
from pymllm.mem_cache.errors import InvalidFreeError, InvalidKeyError, InvalidValueError
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache
from pymllm.mem_cache.radix_cache import RadixCache


def _snapshot(cache):
    nodes = sorted((n.id, repr(n.key), n.value.tolist()) for n in cache._nodes())
    return cache.total_size(), cache.evictable_size(), cache.protected_size(), nodes


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, 2**64 + 5])
def test_priority_outside_64_bits_is_refused_and_changes_nothing(cls, priority) -> None:
    """_int64's range check (pyx ~4342): an exact int past 64 bits overflows the C fast path;
    it must be InvalidValueError, not a wrapped priority, with nothing taken."""
    alloc = TokenToKVPoolAllocator(64)
    cache = cls(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2))
    before = _snapshot(cache)
    v = alloc.alloc(3)
    with pytest.raises(InvalidValueError, match="64-bit"):
        cache.insert(RadixKey([1, 2, 3]), v, priority=priority)
    assert _snapshot(cache) == before
    cache._check_invariants()
    alloc.free(v)  # still the caller's: the failed insert took none of them
    alloc._check_invariants()


@pytest.mark.parametrize(
    "tokens",
    [
        np.array([1, 2**32], dtype=">u8"),  # byte-swapped uint64: not read as native words
        np.array([1, 5, 2**32, 7], dtype=np.uint64)[::2],  # strided uint64
    ],
    ids=["swapped", "strided"],
)
def test_non_native_uint64_key_with_a_token_past_32_bits(tokens) -> None:
    """_load_token_array's uint64 max check (pyx ~1980)."""
    alloc = RecordingAllocator()
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2))
    before = _snapshot(cache)
    with pytest.raises(InvalidKeyError, match="outside"):
        cache.match_prefix(RadixKey(tokens))
    v = alloc.alloc(2)
    with pytest.raises(InvalidKeyError, match="outside"):
        cache.insert(RadixKey(tokens), v)
    assert _snapshot(cache) == before
    assert alloc.free_calls == []  # nothing freed: v is still the caller's
    cache._check_invariants()


def test_value_numpy_cannot_read_is_invalid_value() -> None:
    """_load_value: np.asarray(value) raising ValueError/TypeError (pyx ~2033)."""

    class Unreadable:
        def __array__(self, *args, **kwargs):
            raise ValueError("no array here")

    alloc = RecordingAllocator()
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    before = _snapshot(cache)
    with pytest.raises(InvalidValueError, match="cannot read"):
        cache.insert(RadixKey([1, 2]), Unreadable())
    assert _snapshot(cache) == before
    cache._check_invariants()


@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
def test_value_that_is_a_deleted_jax_array(cls) -> None:
    """_load_value's RuntimeError branch (pyx ~2036): a donated (deleted) jax array."""
    alloc = TokenToKVPoolAllocator(64)
    cache = cls(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(2)
    v = jnp.asarray(slots)
    v.delete()
    with pytest.raises(InvalidValueError, match="deleted"):
        cache.insert(RadixKey([1, 2]), v)
    assert cache.total_size() == 0
    alloc.free(slots)  # still the caller's
    cache._check_invariants()


def test_mamba_value_that_is_a_deleted_jax_array() -> None:
    """_parse_state_slot's RuntimeError branch (pyx ~4386)."""
    alloc = TokenToKVPoolAllocator(64)
    states = TokenToKVPoolAllocator(8)
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=states)
    slots = alloc.alloc(2)
    st = jnp.asarray(states.alloc(1))
    st.delete()
    with pytest.raises(InvalidValueError, match="deleted"):
        cache.insert(RadixKey([1, 2]), slots, mamba_value=st)
    assert cache.total_size() == 0 and cache.mamba_evictable_size() == 0
    alloc.free(slots)
    cache._check_invariants()


def test_key_array_resized_by_the_extra_key_hash_is_refused() -> None:
    """_check_key_kept's refusal (pyx ~1865): an int32 key is read in place; the
    extra_key's __hash__ reallocates that array. The insert must refuse (the key now
    points at freed memory) and change nothing."""
    tokens = np.arange(1, 9, dtype=np.int32)

    class Resizer:
        armed = False

        def __hash__(self) -> int:
            if Resizer.armed:
                Resizer.armed = False
                tokens.resize(4096, refcheck=False)  # a new data block
            return 7

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Resizer)

    alloc = RecordingAllocator()
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([5, 6, 7]), alloc.alloc(3))
    before = _snapshot(cache)
    v = alloc.alloc(8)
    Resizer.armed = True
    with pytest.raises(InvalidKeyError, match="resized"):
        cache.insert(RadixKey(tokens, Resizer()), v)
    assert _snapshot(cache) == before
    assert len(alloc.free_calls) == 0
    cache._check_invariants()


def test_mamba_state_of_one_node_refused_under_a_new_namespace() -> None:
    """_book_state with a cached state and a key in a namespace the tree does not have:
    _find_end's early NIL (pyx ~4138). InvalidValueError, nothing changed, the state stays
    the first node's."""
    alloc = TokenToKVPoolAllocator(64)
    states = TokenToKVPoolAllocator(8)
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=states)
    st = states.alloc(1)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2), mamba_value=st)
    before = (_snapshot(cache), cache.mamba_evictable_size())
    v = alloc.alloc(2)
    with pytest.raises(InvalidValueError, match="already belongs"):
        cache.insert(RadixKey([1, 2], "adapter-b"), v, mamba_value=st)
    assert (_snapshot(cache), cache.mamba_evictable_size()) == before
    with pytest.raises(InvalidFreeError):
        states.free(st)  # still the cache's
    alloc.free(v)
    cache._check_invariants()
    states._check_invariants()


def test_swa_evict_whose_free_swa_raises_still_finishes() -> None:
    """_after_evict's SWA stage raising first (pyx ~3120): errors.py promises that an evict
    whose allocator's free raises still hands every slot over and then raises that error.
    The full free and on_node_evict still run; the tree stays consistent."""

    class FailingSWA(RecordingSWAAllocator):
        fail = True

        def free_swa(self, indices) -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("free_swa refused")
            super().free_swa(indices)

    alloc = FailingSWA()
    evicted: list[int] = []
    cache = RadixCache(
        sliding_window_size=2, token_to_kv_pool_allocator=alloc, on_node_evict=evicted.append
    )
    cache.insert(RadixKey(list(range(1, 9))), alloc.alloc(8))
    v = alloc.alloc(8)
    cache.insert(RadixKey([1, 2, 3, 4, 20, 21, 22, 23]), v)  # SWA: the tree frees duplicates
    with pytest.raises(RuntimeError, match="free_swa refused"):
        cache.evict(0, 100)
    cache._check_invariants()
    assert evicted, "on_node_evict must still run after free_swa raised"
    # every full slot the evict took out was freed: the caller holds none, so the live
    # slots are exactly the tree's
    assert len(alloc.live) == cache.total_size(), (sorted(alloc.live), cache.total_size())
    cache.reset()
    assert not alloc.live, f"leaked full slots: {sorted(alloc.live)}"


def test_mamba_state_pool_free_raising_in_evict_is_raised_after_the_kv_free() -> None:
    """The evict's state hand-over to a Python pool that raises: the KV slots are still
    freed and the error raised after (errors.py)."""

    class FailingStates(RecordingStates):
        def free(self, slots) -> None:
            super().free(slots)
            raise RuntimeError("pool refused")

    alloc = RecordingAllocator()
    states = FailingStates()
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=states)
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3), mamba_value=np.int32(5))
    with pytest.raises(RuntimeError, match="pool refused"):
        cache.evict(3)
    assert states.freed == [5]
    alloc.assert_all_free()
    assert cache.total_size() == 0
    cache._check_invariants()
