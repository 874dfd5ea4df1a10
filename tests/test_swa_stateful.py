"""Stateful property test: the compiled ``RadixCache(sliding_window_size=W)`` against the
reference model ``RefSWARadixCache``.

A hypothesis ``RuleBasedStateMachine`` drives both caches with the same random sequence of
calls, the way a scheduler makes them:

* requests: ``match_prefix`` + ``inc_lock_ref`` (keeping the returned boundary); later,
  with other steps in between, the request (its key possibly grown by decoding) frees the
  SWA side of its own slots below a random ``swa_evicted_seqlen``, calls ``insert`` with
  ``prev_prefix_len`` from its match (or a shorter page multiple) and unlocks with its
  boundary;
* inserts of fresh slots without a match, plain matches, locks/unlocks of any node,
  ``evict(num_tokens, swa_num_tokens)``, ``reset``;
* bad calls (bad ``prev_prefix_len``/``swa_evicted_seqlen``, unlocks that hold no lock or
  whose boundary claims SWA locks nobody holds, bad boundary types, bad counts) that must
  raise the same error in both and change nothing.

After every step: every result agreed (indices, prefix_len, last_node id, boundary,
EvictResult, error type); both trees are the same node for node (id, parent, tokens,
namespace, value, lock_ref, swa_lock_ref, tombstone, clock stamp, hit count) and pass
``_check_invariants()``; both allocators saw the same ``free``/``free_swa`` calls in the same
order (``reset``'s single call compared as a set); and a ledger holds over both pools: every
full slot is free, tree-owned or caller-owned, exactly once; a tree node's slots have their
SWA side exactly when the node is not a tombstone. The ``RecordingSWAAllocator`` raises on
any double free of either side, and after the final ``reset()`` every full and every SWA
slot is free.

Keys come from a tiny alphabet (plain ints and pairs) and usually extend an earlier key; the
page size (1 or 2) and the window (1 to 6 tokens) are drawn once per run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import (  # tests/ is on sys.path (rootdir conftest)
    SIZES,
    SWA_FIELDS,
    PairedCaches,
    RecordingSWAAllocator,
    assert_same_trees,
    assert_slot_ledger,
    count_run,
    count_step,
    describe_node,
    draw_key_maker,
    outcome,
)
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from reference_swa import RefSWARadixCache

from pymllm.mem_cache.errors import InvalidValueError, LockStateError
from pymllm.mem_cache.radix_cache import RadixCache

# (extra_key, tuple width); width 0 is plain int tokens.
NAMESPACES = [(None, 0), ("a", 0), (None, 2)]
MAX_KEY_LEN = 24
MAX_REQUESTS = 4


class SWACacheComparison(PairedCaches, RuleBasedStateMachine):
    NAMESPACES = NAMESPACES
    MAX_KEY_LEN = MAX_KEY_LEN

    def __init__(self) -> None:
        super().__init__()
        self.ref: RefSWARadixCache | None = None

    @initialize(page_size=st.sampled_from([1, 2]), window=st.integers(1, 6))
    def setup(self, page_size: int, window: int) -> None:
        count_run(type(self).__name__)
        self.page = page_size
        self.alloc_ref = RecordingSWAAllocator()
        self.alloc_c = RecordingSWAAllocator()
        self.evicted_ref: list[int] = []
        self.evicted_c: list[int] = []
        self.ref = RefSWARadixCache(
            page_size,
            sliding_window_size=window,
            token_to_kv_pool_allocator=self.alloc_ref,
            on_node_evict=self.evicted_ref.append,
        )
        self.c = RadixCache(
            page_size,
            sliding_window_size=window,
            token_to_kv_pool_allocator=self.alloc_c,
            on_node_evict=self.evicted_c.append,
        )
        self.caller_owned: set[int] = set()
        self.keys: list[tuple[tuple[Any, int], list[Any]]] = []
        # id -> (ref handle, compiled handle); stale handles stay here on purpose.
        self.handles: dict[int, tuple[Any, Any]] = {0: (self.ref.root_node, self.c.root_node)}
        self.locks: list[tuple[int, Any]] = []  # (node id, boundary) per lock the test holds
        # pending requests: (ns, tokens, prefix_len, indices, node id, boundary)
        self.requests: list[tuple[Any, list[Any], int, np.ndarray, int, Any]] = []
        self.calls_seen = 0

    # ------------------------------------------------------------------ helpers

    def _alloc(self, n: int) -> np.ndarray:
        a = self.alloc_ref.alloc(n)
        b = self.alloc_c.alloc(n)
        assert a.tolist() == b.tolist()
        return a

    def _free_swa_both(self, slots: np.ndarray) -> None:
        if len(slots):
            self.alloc_ref.free_swa(slots.astype(np.int32))
            self.alloc_c.free_swa(slots.astype(np.int32))

    def _values(self, data: st.DataObject, slots: np.ndarray) -> tuple[Any, Any]:
        vform = data.draw(st.sampled_from(["list", "int32", "int64"]), label="value form")
        if vform == "list":
            return slots.tolist(), slots.tolist()
        return slots.astype(vform), slots.astype(vform)

    def _draw_evicted_seqlen(self, data: st.DataObject, tokens: list[Any]) -> int:
        if data.draw(st.integers(0, 2), label="SWA evicted?") == 0:
            return 0
        return data.draw(st.integers(0, len(tokens) + 3), label="swa_evicted_seqlen")

    def _check_new_calls(self, ordered: bool = True) -> None:
        new_ref = self.alloc_ref.calls[self.calls_seen :]
        new_c = self.alloc_c.calls[self.calls_seen :]
        if not ordered:
            new_ref = [(k, sorted(s)) for k, s in new_ref]
            new_c = [(k, sorted(s)) for k, s in new_c]
        assert new_ref == new_c, f"allocator calls: ref {new_ref} != compiled {new_c}"
        self.calls_seen = len(self.alloc_ref.calls)

    def _match_both(self, data: st.DataObject, extend: bool) -> tuple[Any, list[Any], Any]:
        ns, tokens = self._draw_key(data, extend)
        make = draw_key_maker(data, ns, tokens)
        key_r, key_c = make(), make()
        mr = self.ref.match_prefix(key_r)
        mc = self.c.match_prefix(key_c)
        assert isinstance(mc.indices, np.ndarray) and mc.indices.dtype == np.int32
        assert mc.indices.ndim == 1
        assert mr.indices.tolist() == mc.indices.tolist()
        assert mr.prefix_len == mc.prefix_len == len(mr.indices)
        touched = [n for n in self.ref._iter_nodes() if n.last_access_time == self.ref.clock]
        if max([0] + [self.ref._end(n) for n in touched]) > mr.prefix_len:
            event("match cut back at a tombstone")
        self._register(mr.last_node, mc.last_node)
        indices = mr.indices.copy()
        self._scribble(key_c, mc.indices)
        self._scribble(key_r, mr.indices)
        return ns, tokens, (mr, indices)

    def _insert_both(
        self,
        data: st.DataObject,
        ns: tuple[Any, int],
        tokens: list[Any],
        value: np.ndarray,
        ppl: int,
        evicted_seqlen: int,
    ) -> None:
        make = draw_key_maker(data, ns, tokens)
        key_r, key_c = make(), make()
        val_r, val_c = self._values(data, value)
        tombs = {n.id for n in self.ref._iter_nodes() if n.swa_tombstone}
        rr = self.ref.insert(key_r, val_r, prev_prefix_len=ppl, swa_evicted_seqlen=evicted_seqlen)
        live = {n.id for n in self.ref._iter_nodes() if not n.swa_tombstone}
        event(f"insert: prev_prefix_len {'> 0' if ppl else '0'}")
        if tombs & live:
            event("insert revived a tombstone")
        rc = self.c.insert(key_c, val_c, prev_prefix_len=ppl, swa_evicted_seqlen=evicted_seqlen)
        assert rr.prefix_len == rc.prefix_len
        self._register(rr.last_node, rc.last_node)
        self._check_new_calls()
        aligned = len(tokens) // self.page * self.page
        self.caller_owned.update(value[aligned:].tolist())
        self.keys.append((ns, tokens))
        self._scribble(key_c, val_c)
        self._scribble(key_r, val_r)

    def _swa_evict_own(self, slots: np.ndarray, first_pos: int, evicted_seqlen: int) -> None:
        """The request frees the SWA side of its own slots (positions first_pos, ...) below
        swa_evicted_seqlen rounded up to a page, as the cache rounds it."""
        upto = -(-evicted_seqlen // self.page) * self.page
        self._free_swa_both(slots[: max(0, upto - first_pos)])
        self.calls_seen = len(self.alloc_ref.calls)

    # ------------------------------------------------------------------ rules

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self._match_both(data, extend=data.draw(st.booleans(), label="extend"))

    @precondition(lambda self: self.ref is not None and len(self.requests) < MAX_REQUESTS)
    @rule(data=st.data())
    def begin_request(self, data: st.DataObject) -> None:
        """match_prefix, then lock the matched node, keeping the boundary."""
        ns, tokens, (mr, indices) = self._match_both(data, extend=True)
        h_r, h_c = self.handles[mr.last_node.id]
        br = self.ref.inc_lock_ref(h_r)
        bc = self.c.inc_lock_ref(h_c)
        assert br == bc, f"inc_lock_ref({h_r.id}): boundary ref {br} != compiled {bc}"
        self.requests.append((ns, tokens, mr.prefix_len, indices, mr.last_node.id, br))
        event(f"request matched {'some' if mr.prefix_len else 'no'} prefix")

    @precondition(lambda self: self.ref is not None and self.requests)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        """Insert the request's (possibly grown) key with prev_prefix_len from its match,
        then unlock with its boundary."""
        i = data.draw(st.integers(0, len(self.requests) - 1), label="request")
        ns, tokens, prefix_len, indices, node_id, boundary = self.requests.pop(i)
        if data.draw(st.integers(0, 4), label="insert?"):
            decoded = data.draw(st.lists(self._token(ns), max_size=6), label="decoded")
            tokens = (tokens + decoded)[: self.MAX_KEY_LEN]
            fresh = self._alloc(len(tokens) - prefix_len)
            choice = data.draw(st.integers(0, 3), label="prev_prefix_len choice")
            ppl = prefix_len
            # A shorter prev_prefix_len hands the matched slots back for comparison, which
            # is sound because they are still the tree's: the request's lock keeps every
            # node of its path from being evicted or revived with other slots (a tombstone
            # keeps its full KV), whatever other requests inserted or evicted meanwhile.
            node = self.handles[node_id][0]
            current = [v for n in self.ref._path(node) for v in n.value.tolist()]
            assert current == indices.tolist(), "a locked prefix's slots changed"
            if choice == 0:
                ppl = 0
            elif choice == 1:
                ppl = data.draw(st.integers(0, prefix_len // self.page)) * self.page
            es = self._draw_evicted_seqlen(data, tokens)
            self._swa_evict_own(fresh, prefix_len, es)
            value = np.concatenate([indices, fresh]).astype(np.int64)
            self._insert_both(data, ns, tokens, value, ppl, es)
        h_r, h_c = self.handles[node_id]
        self.ref.dec_lock_ref(h_r, boundary)
        self.c.dec_lock_ref(h_c, boundary)

    # Fresh inserts have two rules, so that trees grow deep enough between evictions; named
    # add_* because hypothesis draws the first rule of its (by name) list most often.

    @rule(data=st.data())
    def add_fresh_key(self, data: st.DataObject) -> None:
        self._insert_fresh(data, extend=False)

    @rule(data=st.data())
    def add_extending_key(self, data: st.DataObject) -> None:
        self._insert_fresh(data, extend=True)

    def _insert_fresh(self, data: st.DataObject, extend: bool) -> None:
        """Insert fresh slots for every position (no match before), prev_prefix_len 0."""
        ns, tokens = self._draw_key(data, extend, min_suffix=2)
        fresh = self._alloc(len(tokens))
        es = self._draw_evicted_seqlen(data, tokens)
        self._swa_evict_own(fresh, 0, es)
        self._insert_both(data, ns, tokens, fresh.astype(np.int64), 0, es)

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        h_r, h_c = self._pick_handle(data, list(self.handles))
        out_r = outcome(lambda: self.ref.inc_lock_ref(h_r))
        out_c = outcome(lambda: self.c.inc_lock_ref(h_c))
        assert out_r == out_c, f"inc_lock_ref({h_r.id}): ref {out_r} != compiled {out_c}"
        if out_r[0] == "ok" and h_r.id != 0:
            self.locks.append((h_r.id, out_r[1]))

    @precondition(lambda self: self.ref is not None and self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock")
        node_id, boundary = self.locks.pop(i)
        h_r, h_c = self.handles[node_id]
        self.ref.dec_lock_ref(h_r, boundary)
        self.c.dec_lock_ref(h_c, swa_boundary_id=boundary)

    @rule(num_tokens=st.integers(-2, 6), swa_num_tokens=st.integers(-2, 8))
    def evict(self, num_tokens: int, swa_num_tokens: int) -> None:
        rr = self.ref.evict(num_tokens, swa_num_tokens)
        rc = self.c.evict(num_tokens, swa_num_tokens)
        assert rr == rc, f"evict({num_tokens}, {swa_num_tokens}): ref {rr} != compiled {rc}"
        kinds = {kind for kind, _ in self.alloc_ref.calls[self.calls_seen :]}
        event(f"evict: {' + '.join(sorted(kinds)) or 'nothing'}")
        self._check_new_calls()
        assert self.evicted_ref == self.evicted_c

    @rule(swa_num_tokens=st.integers(1, 6))
    def evict_swa(self, swa_num_tokens: int) -> None:
        """What a scheduler short of SWA slots only does: evict(0, swa_need)."""
        self.evict(0, swa_num_tokens)

    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        """One call that must fail the same way in both caches and change nothing."""
        kind = data.draw(
            st.sampled_from(["insert", "unlock unheld", "unlock boundary", "evict"]),
            label="bad call",
        )
        if kind == "insert":
            self._bad_insert(data)
        elif kind == "unlock unheld":
            self._unlock_unheld(data)
        elif kind == "unlock boundary":
            self._unlock_wrong_boundary(data)
        else:
            bad = data.draw(st.sampled_from(["3", 3.0, True, None]), label="bad count")
            args = data.draw(st.sampled_from([(bad, 1), (1, bad), (0, bad)]), label="args")
            out_r = outcome(lambda: self.ref.evict(*args))
            out_c = outcome(lambda: self.c.evict(*args))
            assert out_r == ("raised", TypeError), out_r
            assert out_c == out_r, f"compiled: {out_c}"

    def _bad_insert(self, data: st.DataObject) -> None:
        ns, tokens = self._draw_key(data)
        n = len(tokens)
        bad_ppl = [n + self.page, -self.page, True, "0"]
        if self.page > 1 and n:
            bad_ppl.append(1)
        bad = data.draw(
            st.sampled_from(
                [("prev_prefix_len", v) for v in bad_ppl]
                + [("swa_evicted_seqlen", v) for v in (-1, False, 1.5, "1")]
            ),
            label="bad argument",
        )
        slots = self._alloc(n)
        self.caller_owned.update(slots.tolist())
        kwargs = {bad[0]: bad[1]}
        make = draw_key_maker(data, ns, tokens)
        out_r = outcome(lambda: self.ref.insert(make(), slots.copy(), **kwargs))
        out_c = outcome(lambda: self.c.insert(make(), slots.copy(), **kwargs))
        assert out_r[0] == "raised" and out_r[1] in (TypeError, InvalidValueError), out_r
        assert out_c == out_r, f"insert(**{kwargs}): compiled {out_c}"

    def _unlock_unheld(self, data: st.DataObject) -> None:
        # Stale handles, unlocked nodes and the root, with any boundary: never an unlock
        # that the test owes. (The root is a no-op with its token None; any other raises.)
        pool = [i for i, (r, _) in self.handles.items() if r.evicted or r.lock_ref == 0]
        h_r, h_c = self._pick_handle(data, pool)
        boundary = data.draw(st.sampled_from([None, 0, 1, 2, 5, -1, True, "0"]), label="b")
        out_r = outcome(lambda: self.ref.dec_lock_ref(h_r, boundary))
        out_c = outcome(lambda: self.c.dec_lock_ref(h_c, boundary))
        assert out_r == out_c, f"dec_lock_ref({h_r.id}, {boundary!r}): {out_r} != {out_c}"
        assert (out_r[0] == "ok") == (h_r.id == 0 and boundary is None)

    def _unlock_wrong_boundary(self, data: st.DataObject) -> None:
        """A locked node with a boundary that names no SWA lock of that node (though other
        locks may cover its nodes), or a boundary of the wrong type: LockStateError /
        TypeError / InvalidValueError, nothing changed."""
        locked = [n.id for n in self.ref._iter_nodes() if n.lock_ref > 0]
        if not locked:
            return
        h_r, h_c = self._pick_handle(data, locked)
        path = self.ref._path(h_r)
        ends = np.cumsum([len(n.tokens) for n in path]).tolist()
        if data.draw(st.booleans(), label="bad type"):
            boundary: Any = data.draw(st.sampled_from([-1, True, 1.0, "1"]))
        else:
            boundary = data.draw(st.integers(0, ends[-1]), label="boundary")
            # an unlock the test owes would succeed: not a bad call. Any other boundary is,
            # even where other locks cover the same nodes (they are not this lock's)
            held = {(i, b or 0) for i, b in self.locks}
            held |= {(r[4], r[5] or 0) for r in self.requests}
            if (h_r.id, boundary) in held:
                return
        out_r = outcome(lambda: self.ref.dec_lock_ref(h_r, boundary))
        out_c = outcome(lambda: self.c.dec_lock_ref(h_c, boundary))
        assert out_r[0] == "raised", f"dec_lock_ref({h_r.id}, {boundary!r}) did not raise"
        assert out_c == out_r, f"dec_lock_ref({h_r.id}, {boundary!r}): compiled {out_c}"
        if isinstance(boundary, int) and not isinstance(boundary, bool) and boundary >= 0:
            assert out_r[1] is LockStateError

    @rule(data=st.data())
    def housekeeping(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 5), label="reset?") == 0:
            self._reset()
        else:
            self._release_caller_owned()

    def _reset(self) -> None:
        self.ref.reset()
        self.c.reset()
        self._check_new_calls(ordered=False)  # one call each; its order is the impl's
        self.locks.clear()
        self.requests.clear()  # their locks went with the tree; their slots were the tree's

    def _release_caller_owned(self) -> None:
        if self.caller_owned:
            slots = np.array(sorted(self.caller_owned), dtype=np.int32)
            self.alloc_ref.free(slots)
            self.alloc_c.free(slots.copy())
            self.caller_owned.clear()
            self.calls_seen = len(self.alloc_ref.calls)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_state(self) -> None:
        if self.ref is None:
            return
        count_step(type(self).__name__)
        ref_nodes = assert_same_trees(
            self.ref, self.c, lambda n: describe_node(n, SWA_FIELDS), self.handles, SIZES
        )
        assert self.evicted_ref == self.evicted_c
        assert len(self.alloc_ref.calls) == len(self.alloc_c.calls) == self.calls_seen
        assert self.alloc_ref.freed == self.alloc_c.freed
        assert self.alloc_ref.swa_freed == self.alloc_c.swa_freed
        # The full ledger: every allocated slot is free, tree-owned or caller-owned, once.
        free = self.alloc_ref.freed
        assert_slot_ledger(
            "KV",
            self.alloc_ref.allocated,
            {"free": free, "tree": self.ref._tree_values().tolist(), "caller": self.caller_owned},
        )
        # The SWA ledger: a node holds its slots' SWA side exactly when it is live.
        swa_free = self.alloc_ref.swa_freed
        assert free <= swa_free, "a full slot was freed but its SWA side was not"
        for rn in ref_nodes.values():
            held = [s not in swa_free for s in rn.value.tolist()]
            if rn.swa_tombstone:
                assert not any(held), f"{rn!r}: a tombstone holds SWA slots"
            else:
                assert all(held), f"{rn!r}: a live node lost SWA slots"

    def teardown(self) -> None:
        if self.ref is None:
            return
        for _, _, _, _, node_id, boundary in self.requests:
            h_r, h_c = self.handles[node_id]
            self.ref.dec_lock_ref(h_r, boundary)
            self.c.dec_lock_ref(h_c, boundary)
        for node_id, boundary in self.locks:
            h_r, h_c = self.handles[node_id]
            self.ref.dec_lock_ref(h_r, boundary)
            self.c.dec_lock_ref(h_c, boundary)
        assert self.ref.protected_size() == self.ref.swa_protected_size() == 0
        assert self.c.protected_size() == self.c.swa_protected_size() == 0
        self.ref.reset()
        self.c.reset()
        self._check_new_calls(ordered=False)
        self._release_caller_owned()
        self.alloc_ref.assert_all_free()
        self.alloc_c.assert_all_free()


TestSWACacheComparison = SWACacheComparison.TestCase
