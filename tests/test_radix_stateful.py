"""Stateful property test: the compiled ``RadixCache`` against the reference model.

A hypothesis ``RuleBasedStateMachine`` drives both caches with the same random sequence of
match / insert / lock / unlock / evict / reset / hash calls, bad calls included, and after
every step checks that

* every result agrees (indices, prefix_len, last_node id, EvictResult, raised error type),
* both trees are the same node for node (id, parent, tokens, namespace, value, lock_ref,
  last_access_time, hit_count) and both pass ``_check_invariants()``,
* the allocators saw the same ``free`` calls and the same ``on_node_evict`` ids,
* a ledger holds: every slot ever allocated is in exactly one place -- free in the
  allocator, owned by the tree, or owned by the test as the caller -- and after the final
  ``reset()`` every slot is free.

Keys come from a tiny alphabet and usually extend an earlier key, so splits, shared pages
and eviction cascades happen within a few steps. The page size is drawn once per run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import (  # tests/ is on sys.path (rootdir conftest)
    SIZES,
    PairedCaches,
    RecordingAllocator,
    assert_same_trees,
    assert_slot_ledger,
    count_run,
    count_step,
    describe_node,
    draw_key_maker,
    outcome,
)
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from reference_model import RefRadixCache

from pymllm.mem_cache.radix_cache import RadixCache

# (extra_key, tuple width); width 0 is plain int tokens.
NAMESPACES = [(None, 0), ("a", 0), (7, 0), (None, 2), ("a", 2)]
# Strategies are built once: building them per draw costs more than the caches' work.
VALUE_FORM = st.sampled_from(["list", "int32", "int64"])
BAD_CALL = st.sampled_from(["value", "key", "unlock", "hash"])
MAX_KEY_LEN = 24


class RadixCacheComparison(PairedCaches, RuleBasedStateMachine):
    NAMESPACES = NAMESPACES
    MAX_KEY_LEN = MAX_KEY_LEN

    def __init__(self) -> None:
        super().__init__()
        self.ref: RefRadixCache | None = None

    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size: int) -> None:
        count_run(type(self).__name__)
        self.alloc_ref = RecordingAllocator()
        self.alloc_c = RecordingAllocator()
        self.evicted_ref: list[int] = []
        self.evicted_c: list[int] = []
        self.ref = RefRadixCache(
            page_size,
            token_to_kv_pool_allocator=self.alloc_ref,
            on_node_evict=self.evicted_ref.append,
        )
        self.c = RadixCache(
            page_size,
            token_to_kv_pool_allocator=self.alloc_c,
            on_node_evict=self.evicted_c.append,
        )
        self.caller_owned: set[int] = set()
        self.keys: list[tuple[tuple[Any, int], list[Any]]] = []  # every key inserted so far
        # id -> (ref handle, compiled handle); stale handles stay here on purpose.
        self.handles: dict[int, tuple[Any, Any]] = {0: (self.ref.root_node, self.c.root_node)}
        self.locks: list[int] = []  # ids locked by the test, one entry per lock
        self.free_calls_seen = 0

    # ------------------------------------------------------------------ helpers

    def _alloc(self, n: int) -> np.ndarray:
        a = self.alloc_ref.alloc(n)
        b = self.alloc_c.alloc(n)
        assert a.tolist() == b.tolist()
        return a

    def _caller_slots(self, n: int) -> np.ndarray:
        slots = self._alloc(n)
        self.caller_owned.update(slots.tolist())
        return slots

    def _check_new_free_calls(self, ordered: bool) -> None:
        new_ref = self.alloc_ref.freed_sequence[self.free_calls_seen :]
        new_c = self.alloc_c.freed_sequence[self.free_calls_seen :]
        assert len(new_ref) == len(new_c), f"free calls: ref {new_ref} != compiled {new_c}"
        if not ordered:
            new_ref = [sorted(x) for x in new_ref]
            new_c = [sorted(x) for x in new_c]
        assert new_ref == new_c, f"freed: ref {new_ref} != compiled {new_c}"
        self.free_calls_seen = len(self.alloc_ref.free_calls)

    # ------------------------------------------------------------------ rules

    # Inserts and matches have two rules each, so that they make up half of all steps.

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self._match(data, extend=False)

    @rule(data=st.data())
    def match_earlier_key(self, data: st.DataObject) -> None:
        self._match(data, extend=True)

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        self._insert(data, extend=False)

    @rule(data=st.data())
    def insert_extending(self, data: st.DataObject) -> None:
        self._insert(data, extend=True)

    def _match(self, data: st.DataObject, extend: bool) -> None:
        ns, tokens = self._draw_key(data, extend)
        make = draw_key_maker(data, ns, tokens)
        key_r, key_c = make(), make()
        mr = self.ref.match_prefix(key_r)
        mc = self.c.match_prefix(key_c)
        assert isinstance(mc.indices, np.ndarray) and mc.indices.dtype == np.int32
        assert mc.indices.ndim == 1
        assert mr.indices.tolist() == mc.indices.tolist()
        assert mr.prefix_len == mc.prefix_len == len(mr.indices)
        self._register(mr.last_node, mc.last_node)
        self._scribble(key_c, mc.indices)
        self._scribble(key_r, mr.indices)

    def _insert(self, data: st.DataObject, extend: bool) -> None:
        ns, tokens = self._draw_key(data, extend)
        make = draw_key_maker(data, ns, tokens)
        slots = self._alloc(len(tokens))
        vform = data.draw(VALUE_FORM, label="value form")

        def value() -> Any:
            return slots.tolist() if vform == "list" else slots.astype(vform)

        key_r, key_c, val_r, val_c = make(), make(), value(), value()
        rr = self.ref.insert(key_r, val_r)
        rc = self.c.insert(key_c, val_c)
        assert rr.prefix_len == rc.prefix_len
        self._register(rr.last_node, rc.last_node)
        aligned = len(tokens) // self.ref.page_size * self.ref.page_size
        self.caller_owned.update(slots[: rr.prefix_len].tolist())
        self.caller_owned.update(slots[aligned:].tolist())
        self.keys.append((ns, tokens))
        self._scribble(key_c, val_c)
        self._scribble(key_r, val_r)

    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        """One call that must fail the same way in both caches and change nothing."""
        kind = data.draw(BAD_CALL, label="bad call")
        if kind == "value":
            self._insert_bad_value(data)
        elif kind == "key":
            self._bad_key(data)
        elif kind == "unlock":
            self._unlock_unheld(data)
        else:
            self._node_hash(data)

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        h_r, h_c = self._pick_handle(data, list(self.handles))
        out_r = outcome(lambda: self.ref.inc_lock_ref(h_r))
        out_c = outcome(lambda: self.c.inc_lock_ref(h_c))
        assert out_r == out_c, f"inc_lock_ref({h_r.id}): ref {out_r} != compiled {out_c}"
        if out_r[0] == "ok" and h_r.id != 0:
            self.locks.append(h_r.id)

    @precondition(lambda self: self.ref is not None and self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock")
        h_r, h_c = self.handles[self.locks.pop(i)]
        self.ref.dec_lock_ref(h_r)
        self.c.dec_lock_ref(h_c)

    @rule(num_tokens=st.integers(-2, 30))
    def evict(self, num_tokens: int) -> None:
        rr = self.ref.evict(num_tokens)
        rc = self.c.evict(num_tokens)
        assert rr == rc, f"evict({num_tokens}): ref {rr} != compiled {rc}"
        self._check_new_free_calls(ordered=True)
        assert self.evicted_ref == self.evicted_c

    @rule(data=st.data())
    def housekeeping(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 2), label="reset?") == 0:
            self._reset()
        else:
            self._release_caller_owned()

    def _reset(self) -> None:
        self.ref.reset()
        self.c.reset()
        # One free call each; the order within it is the implementation's.
        self._check_new_free_calls(ordered=False)
        self.locks.clear()

    def _release_caller_owned(self) -> None:
        if self.caller_owned:
            slots = np.array(sorted(self.caller_owned), dtype=np.int32)
            self.alloc_ref.free(slots)
            self.alloc_c.free(slots.copy())
            self.caller_owned.clear()
            self.free_calls_seen += 1

    def _node_hash(self, data: st.DataObject) -> None:
        h_r, h_c = self._pick_handle(data, list(self.handles))
        out_r = outcome(lambda: self.ref.compute_node_hash(h_r))
        out_c = outcome(lambda: self.c.compute_node_hash(h_c))
        assert out_r == out_c, f"compute_node_hash({h_r.id}): ref {out_r} != compiled {out_c}"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_state(self) -> None:
        if self.ref is None:
            return
        count_step(type(self).__name__)
        assert_same_trees(self.ref, self.c, describe_node, self.handles, SIZES)
        assert self.evicted_ref == self.evicted_c
        assert len(self.alloc_ref.free_calls) == len(self.alloc_c.free_calls)
        assert self.alloc_ref.freed == self.alloc_c.freed
        # The ledger: every allocated slot is free, tree-owned or caller-owned, exactly once.
        assert_slot_ledger(
            "KV",
            self.alloc_ref.allocated,
            {
                "free": self.alloc_ref.freed,
                "tree": self.ref._tree_values().tolist(),
                "caller": self.caller_owned,
            },
        )

    def teardown(self) -> None:
        if self.ref is None:
            return
        self.ref.reset()
        self.c.reset()
        self._check_new_free_calls(ordered=False)
        self._release_caller_owned()
        self.alloc_ref.assert_all_free()
        self.alloc_c.assert_all_free()


TestRadixCacheComparison = RadixCacheComparison.TestCase


class RadixCacheComparisonMidDrain(RadixCacheComparison):
    """The same comparison with the compiled cache's child map starting at 4 buckets and
    draining one bucket per reservation when it grows: the small trees of these runs then
    spend most steps with entries in two tables (tests/test_growth.py covers large ones)."""

    def __init__(self) -> None:
        from pymllm.mem_cache._radix_tree import _set_map_tuning

        self._tuning = _set_map_tuning(0, 1, 4)
        super().__init__()

    def teardown(self) -> None:
        from pymllm.mem_cache._radix_tree import _set_map_tuning

        try:
            super().teardown()
        finally:
            _set_map_tuning(*self._tuning)


TestRadixCacheComparisonMidDrain = RadixCacheComparisonMidDrain.TestCase
