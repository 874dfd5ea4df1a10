"""Session 41's mutation review of the full-attention core (pages, splits, recency, evict,
locks, page hashes, handles, the printout): fixed cases for the mutants that every other
test let through, and for one that only the randomized state machine caught (that kill
depends on the draw: a fixed case pins the rule on every run)."""

from __future__ import annotations

import numpy as np
from conftest import RecordingAllocator  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import RadixCache, RadixKey


def _arr(*slots: int) -> np.ndarray:
    return np.array(slots, dtype=np.int32)


# -- survivors of the whole suite -------------------------------------------------------


def test_match_results_of_two_nodes_with_equal_slots_differ() -> None:
    """MatchResult compares field by field, ``last_node`` included: the match of a prefix
    that was evicted and cached again (same tokens, same slots, a new node) is not equal
    to the match of the old node, whose handle is stale.
    Mutant: ``__eq__`` left ``last_node`` out."""
    cache = RadixCache()  # no allocator: the same slots can be inserted again
    cache.insert(RadixKey([1, 2, 3]), _arr(7, 8, 9))
    before = cache.match_prefix(RadixKey([1, 2, 3]))
    assert before == cache.match_prefix(RadixKey([1, 2, 3]))
    assert cache.evict(3).full_evicted == 3 and before.last_node.evicted
    cache.insert(RadixKey([1, 2, 3]), _arr(7, 8, 9))
    after = cache.match_prefix(RadixKey([1, 2, 3]))
    assert after.prefix_len == before.prefix_len == 3
    assert after.indices.tolist() == before.indices.tolist() == [7, 8, 9]
    assert after.last_node != before.last_node
    assert after != before and not (after == before)


def test_a_stale_handle_differs_from_the_node_that_reused_its_slot() -> None:
    """Handles compare equal when they name the same node (its id, never reused), not the
    same storage slot: an evicted node's handle is not equal to the handle of the node
    that took its slot afterwards.
    Mutant: ``TreeNode.__eq__`` compared slots."""
    cache = RadixCache()
    old = cache.insert(RadixKey([1, 2]), _arr(1, 2)).last_node
    cache.evict(2)
    new = cache.insert(RadixKey([3, 4]), _arr(3, 4)).last_node
    assert cache._storage_state()["slots_used"] == 2  # the new node took the freed slot
    assert old.evicted and not new.evicted
    assert old.id != new.id
    assert old != new and not (old == new)
    assert new == cache.match_prefix(RadixKey([3, 4])).last_node


def test_a_node_repr_marks_left_out_tokens_only() -> None:
    """A node's repr lists its first eight tokens and adds ``...`` only when it has more:
    a node of exactly eight tokens is shown whole.
    Mutant: ``...`` added from eight tokens on."""
    cache = RadixCache()
    eight = cache.insert(RadixKey(list(range(8))), None).last_node
    nine = cache.insert(RadixKey(list(range(100, 109))), None).last_node
    assert "key=[0, 1, 2, 3, 4, 5, 6, 7]," in repr(eight)
    assert "..." not in repr(eight)
    assert "key=[100, 101, 102, 103, 104, 105, 106, 107, ...]," in repr(nine)


def test_pretty_print_totals_name_evictable_and_protected_tokens(capsys) -> None:
    """The printout ends with the tree's tokens, then how many are evictable and how many
    protected (locked), as ``evictable_size()`` and ``protected_size()`` count them.
    Mutant: the two counts were printed under each other's names."""
    cache = RadixCache()
    locked = cache.insert(RadixKey([1, 2, 3]), None).last_node
    cache.insert(RadixKey([7, 8]), None)
    cache.inc_lock_ref(locked)
    assert (cache.evictable_size(), cache.protected_size()) == (2, 3)
    cache.pretty_print()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "#tokens: 5 (evictable 2, protected 3)"


# -- caught only by the randomized state machines ---------------------------------------


def test_an_evict_that_frees_nothing_makes_no_free_call(allocator: RecordingAllocator) -> None:
    """The freed slots go back in one ``free`` call, and an evict that frees nothing
    (nothing asked, nothing cached, everything locked) makes none.
    Mutant: ``free`` was called with an empty array."""
    cache = RadixCache(token_to_kv_pool_allocator=allocator)
    assert cache.evict(5).full_evicted == 0
    slots = allocator.alloc(2)
    node = cache.insert(RadixKey([1, 2]), slots).last_node
    assert cache.evict(0).full_evicted == 0
    cache.inc_lock_ref(node)
    assert cache.evict(5).full_evicted == 0
    assert allocator.free_calls == []
    cache.dec_lock_ref(node)
    assert cache.evict(5).full_evicted == 2
    assert allocator.freed_sequence == [slots.tolist()]
