"""Stateful property test: the compiled ``MambaRadixCache`` against ``RefMambaRadixCache``.

A hypothesis ``RuleBasedStateMachine`` drives both caches with one random sequence of
match / insert (with and without a state slot) / match-then-save-the-state / lock / unlock /
evict(num_tokens, mamba_num) / reset calls, bad calls included (they must raise the same
error in both and change nothing), and after every step checks that

* every result agrees (indices, prefix_len, last_node id, mamba_branching_seqlen,
  mamba_exist, EvictResult, the error type raised),
* both trees are the same node for node (id, parent, tokens, namespace, KV value, state slot,
  lock_ref, mamba_lock_ref, last_access_time, hit_count), all seven size counters agree and
  both pass ``_check_invariants()``,
* both KV allocators and both state pools saw the same ``free`` calls (in order; for
  ``reset`` as sets) and ``on_node_evict`` reported the same ids,
* two ledgers hold: every KV slot and every state slot ever handed out is in exactly one
  place -- free, owned by the tree, or owned by the test as the caller -- and after the
  final ``reset()`` all of them are free.

Keys come from a tiny alphabet and usually extend an earlier key, so splits, shared pages,
state-less split points and eviction cascades happen within a few steps. The page size is
drawn once per run.

Profiles (tests/conftest.py): ``ci`` (default, 100 examples x up to 50 steps, about 4,000
steps) takes about 20 s; ``--hypothesis-profile=long`` (3000 x 150) is the soak run. The
step count is printed at the end ("stateful steps"); ``--hypothesis-show-statistics`` lists
how many examples reached the interesting events (state hits, branching, drops, locked
states).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from conftest import (  # tests/ is on sys.path (rootdir conftest)
    MAMBA_FIELDS,
    MAMBA_SIZES,
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
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from reference_mamba import RefMambaRadixCache

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache

# (extra_key, tuple width); width 0 is plain int tokens.
NAMESPACES = [(None, 0), (None, 0), ("a", 0), (None, 2)]
MAX_KEY_LEN = 24


class MambaCacheComparison(PairedCaches, RuleBasedStateMachine):
    NAMESPACES = NAMESPACES
    MAX_KEY_LEN = MAX_KEY_LEN
    BAD_KEY_INSERT_KWARGS = {"mamba_value": 1}

    def __init__(self) -> None:
        super().__init__()
        self.ref: RefMambaRadixCache | None = None

    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size: int) -> None:
        count_run(type(self).__name__)
        self.kv_ref, self.kv_c = RecordingAllocator(), RecordingAllocator()
        self.st_ref, self.st_c = RecordingAllocator(), RecordingAllocator()
        self.evicted_ref: list[int] = []
        self.evicted_c: list[int] = []
        self.ref = RefMambaRadixCache(
            page_size,
            token_to_kv_pool_allocator=self.kv_ref,
            mamba_pool=self.st_ref,
            on_node_evict=self.evicted_ref.append,
        )
        self.c = MambaRadixCache(
            page_size,
            token_to_kv_pool_allocator=self.kv_c,
            mamba_pool=self.st_c,
            on_node_evict=self.evicted_c.append,
        )
        self.caller_kv: set[int] = set()
        self.caller_states: set[int] = set()
        self.keys: list[tuple[tuple[Any, int], list[Any]]] = []
        # id -> (ref handle, compiled handle); stale handles stay here on purpose.
        self.handles: dict[int, tuple[Any, Any]] = {0: (self.ref.root_node, self.c.root_node)}
        self.locks: list[int] = []  # ids locked by the test, one entry per lock
        self.lock_tokens: list[Any] = []  # inc_lock_ref's token for each entry of locks
        self.seen = {"kv": 0, "st": 0}  # free calls already compared

    # ------------------------------------------------------------------ helpers

    def _alloc_kv(self, n: int) -> np.ndarray:
        a, b = self.kv_ref.alloc(n), self.kv_c.alloc(n)
        assert a.tolist() == b.tolist()
        return a

    def _caller_slots(self, n: int) -> np.ndarray:
        slots = self._alloc_kv(n)
        self.caller_kv.update(slots.tolist())
        return slots

    def _bad_value_insert_kwargs(self) -> dict[str, Any]:
        state = self._alloc_state()
        self.caller_states.add(state)
        return {"mamba_value": state}

    def _alloc_state(self) -> int:
        a, b = self.st_ref.alloc(1), self.st_c.alloc(1)
        assert a.tolist() == b.tolist()
        return int(a[0])

    @staticmethod
    def _state_forms(data: st.DataObject, slot: int) -> Callable[[], Any]:
        form = data.draw(st.sampled_from(["int", "np.int64", "list", "array", "0-d"]))
        return {
            "int": lambda: slot,
            "np.int64": lambda: np.int64(slot),
            "list": lambda: [slot],
            "array": lambda: np.array([slot], dtype=np.int32),
            "0-d": lambda: np.array(slot, dtype=np.int64),
        }[form]

    def _check_new_free_calls(self, ordered: bool) -> None:
        for name, r, c in (("kv", self.kv_ref, self.kv_c), ("st", self.st_ref, self.st_c)):
            new_r = r.freed_sequence[self.seen[name] :]
            new_c = c.freed_sequence[self.seen[name] :]
            assert len(new_r) == len(new_c), f"{name} free calls: ref {new_r} != compiled {new_c}"
            if not ordered:
                new_r = [sorted(x) for x in new_r]
                new_c = [sorted(x) for x in new_c]
            assert new_r == new_c, f"{name} freed: ref {new_r} != compiled {new_c}"
            self.seen[name] = len(r.free_calls)

    # ------------------------------------------------------------------ match / insert

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self._match(data, extend=False)

    @rule(data=st.data())
    def match_earlier_key(self, data: st.DataObject) -> None:
        self._match(data, extend=True)

    @rule(data=st.data())
    def match_then_save_state(self, data: st.DataObject) -> None:
        """What a serving loop does: match, and where the KV match outruns the last state,
        save a state at mamba_branching_seqlen (KV of the matched prefix + fresh slots)."""
        ns, tokens, mr = self._match(data, extend=True)
        branch = mr.mamba_branching_seqlen
        if branch is None:
            return
        fresh = self._alloc_kv(branch - mr.prefix_len)
        value = np.concatenate([mr.indices, fresh]).astype(np.int32)
        self._insert_tokens(data, ns, tokens[:branch], value, "fresh", owned=fresh)

    def _match(self, data: st.DataObject, extend: bool) -> tuple[Any, list[Any], Any]:
        ns, tokens = self._draw_key(data, extend)
        make = draw_key_maker(data, ns, tokens)
        mr = self.ref.match_prefix(make())
        mc = self.c.match_prefix(make())
        assert isinstance(mc.indices, np.ndarray) and mc.indices.dtype == np.int32
        assert mc.indices.ndim == 1
        assert mr.indices.tolist() == mc.indices.tolist()
        assert mr.prefix_len == mc.prefix_len == len(mr.indices)
        assert mr.mamba_branching_seqlen == mc.mamba_branching_seqlen
        event("match: state hit" if mr.prefix_len else "match: no state hit")
        if mr.mamba_branching_seqlen is not None:
            event("match: branching seqlen reported")
            assert mr.prefix_len < mr.mamba_branching_seqlen <= len(tokens)
            assert mr.mamba_branching_seqlen % self.ref.page_size == 0
        self._register(mr.last_node, mc.last_node)
        assert mr.last_node.id == 0 or mr.last_node.mamba_value is not None
        return ns, tokens, mr

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        ns, tokens = self._draw_key(data, extend=False)
        self._insert(data, ns, tokens)

    @rule(data=st.data())
    def insert_extending(self, data: st.DataObject) -> None:
        ns, tokens = self._draw_key(data, extend=True)
        self._insert(data, ns, tokens)

    @rule(data=st.data())
    def insert_extending_2(self, data: st.DataObject) -> None:
        # a second copy: inserts get 3 of 13 rule draws, enough for deep trees
        self.insert_extending(data)

    def _insert(self, data: st.DataObject, ns: tuple[Any, int], tokens: list[Any]) -> None:
        slots = self._alloc_kv(len(tokens))
        # a state is the one after the key's last token: keys of whole pages only (an
        # unaligned key with a state is refused, tests/test_mamba_radix_cache.py)
        page = self.ref.page_size
        with_state = "fresh" if tokens and len(tokens) % page == 0 else "none"
        with_state = data.draw(st.sampled_from([with_state, with_state, "none"]))
        self._insert_tokens(data, ns, tokens, slots, with_state, owned=slots)

    def _insert_tokens(
        self,
        data: st.DataObject,
        ns: tuple[Any, int],
        tokens: list[Any],
        slots: np.ndarray,
        with_state: str,
        owned: np.ndarray,
    ) -> None:
        """Insert tokens/slots into both; *owned* are the test's slots among *slots* (the
        rest, from a match, are the tree's)."""
        make = draw_key_maker(data, ns, tokens)
        vform = data.draw(st.sampled_from(["list", "int32", "int64"]), label="value form")

        def value() -> Any:
            return slots.tolist() if vform == "list" else slots.astype(vform)

        state = self._alloc_state() if with_state == "fresh" else None
        mamba = self._state_forms(data, state) if state is not None else (lambda: None)
        rr = self.ref.insert(make(), value(), mamba_value=mamba())
        rc = self.c.insert(make(), value(), mamba_value=mamba())
        assert (rr.prefix_len, rr.mamba_exist) == (rc.prefix_len, rc.mamba_exist), (rr, rc)
        self._register(rr.last_node, rc.last_node)
        aligned = len(tokens) // self.ref.page_size * self.ref.page_size
        owned_set = set(owned.tolist())
        self.caller_kv.update(s for s in slots[: rr.prefix_len].tolist() if s in owned_set)
        self.caller_kv.update(slots[aligned:].tolist())
        if state is not None:
            assert rr.last_node.mamba_value is not None
            event(f"insert with state: mamba_exist={rr.mamba_exist}")
            if rr.mamba_exist:
                self.caller_states.add(state)
                assert int(rr.last_node.mamba_value[0]) != state
            else:
                assert int(rr.last_node.mamba_value[0]) == state
        else:
            # no state passed: the flag says whether one is stored at the key's end (a key
            # that ends inside a page has none there)
            stored = rr.last_node.mamba_value is not None and len(tokens) == aligned
            assert rr.mamba_exist == stored
        self.keys.append((ns, tokens))

    @precondition(lambda self: self.ref is not None and self.locks)
    @rule(data=st.data())
    def save_state_on_locked_node(self, data: st.DataObject) -> None:
        """A request that holds a lock on its prefix saves the state at the prefix's end: the
        state arrives unlocked on a KV-locked node (droppable, but the node is not)."""
        h_r, _ = self.handles[data.draw(st.sampled_from(self.locks), label="locked node")]
        path: list[Any] = []
        node = h_r
        while node.id != 0:
            path[:0] = node.tokens
            node = node.parent
        ns = (h_r.extra_key, h_r.width)
        slots = self._alloc_kv(len(path))
        event(f"save state on a locked node: has one already={h_r.mamba_value is not None}")
        self._insert_tokens(data, ns, path, slots, "fresh", owned=slots)

    # ------------------------------------------------------------------ bad calls

    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        """One call that must fail the same way in both caches and change nothing."""
        kinds = ["state", "value", "key", "unlock", "evict args"]
        kind = data.draw(st.sampled_from(kinds), label="bad call")
        if kind == "state":
            self._insert_bad_state(data)
        elif kind == "value":
            self._insert_bad_value(data)
        elif kind == "key":
            self._bad_key(data)
        elif kind == "unlock":
            self._unlock_unheld(data)
        else:
            n, s, m = data.draw(st.tuples(st.integers(-1, 9), st.integers(1, 3), st.integers(0, 3)))
            out_r = outcome(lambda: self.ref.evict(n, s, mamba_num=m))
            out_c = outcome(lambda: self.c.evict(n, s, mamba_num=m))
            assert out_r == out_c == ("raised", TypeError), (out_r, out_c)

    def _insert_bad_state(self, data: st.DataObject) -> None:
        ns, tokens = self._draw_key(data)
        slots = self._alloc_kv(len(tokens))
        self.caller_kv.update(slots.tolist())
        state = self._alloc_state()
        self.caller_states.add(state)
        choices: list[tuple[Any, type]] = [
            (True, TypeError),
            (-1, InvalidValueError),
            (2**31, InvalidValueError),
            ([state, state], InvalidValueError),
            (float(state), InvalidValueError),
            (np.array([[state]]), InvalidValueError),
        ]
        if len(tokens) < self.ref.page_size:  # a good slot, but no whole page to hold it
            choices.append((state, InvalidValueError))
        bad, exc = data.draw(st.sampled_from(choices), label="bad state")
        make = draw_key_maker(data, ns, tokens)
        out_r = outcome(lambda: self.ref.insert(make(), slots.copy(), mamba_value=bad))
        out_c = outcome(lambda: self.c.insert(make(), slots.copy(), mamba_value=bad))
        assert out_r == ("raised", exc), out_r
        assert out_c == out_r, f"compiled: {out_c}"

    # ------------------------------------------------------------------ locks / evict

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        live = [i for i, (r, _) in self.handles.items() if not r.evicted and i != 0]
        stale_too = not live or data.draw(st.integers(0, 3), label="any handle?") == 0
        h_r, h_c = self._pick_handle(data, list(self.handles) if stale_too else live)
        if h_r.id and not h_r.evicted and h_r.mamba_value is not None:
            event("lock: a node holding a state")
        out_r = outcome(lambda: self.ref.inc_lock_ref(h_r))
        out_c = outcome(lambda: self.c.inc_lock_ref(h_c))
        assert out_r == out_c, f"inc_lock_ref({h_r.id}): ref {out_r} != compiled {out_c}"
        if out_r[0] == "ok" and h_r.id != 0:
            self.locks.append(h_r.id)
            self.lock_tokens.append(out_r[1])

    @precondition(lambda self: self.ref is not None and self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock")
        h_r, h_c = self.handles[self.locks.pop(i)]
        token = self.lock_tokens.pop(i)
        self.ref.dec_lock_ref(h_r, swa_boundary_id=token)
        self.c.dec_lock_ref(h_c, swa_boundary_id=token)

    @rule(data=st.data())
    def unlock_any(self, data: st.DataObject) -> None:
        """An unlock of any handle with any token, as a buggy caller might make it: both
        caches accept or refuse it alike. An accepted one undoes one of the node's own
        locks whose token it named (True: one holding the state; False: one without;
        None: a state lock if the node holds one), as the per-step comparison then checks."""
        h_r, h_c = self._pick_handle(data, list(self.handles))
        token = data.draw(st.sampled_from([None, True, False]), label="token")
        live = h_r.id != 0 and not h_r.evicted
        release = token if token is not None else live and h_r.mamba_lock_ref > 0
        out_r = outcome(lambda: self.ref.dec_lock_ref(h_r, swa_boundary_id=token))
        out_c = outcome(lambda: self.c.dec_lock_ref(h_c, swa_boundary_id=token))
        assert out_r == out_c, f"dec_lock_ref({h_r.id}, {token}): ref {out_r} != compiled {out_c}"
        if out_r[0] == "ok" and h_r.id != 0:
            event("unlock_any: accepted")
            held = [
                i
                for i, (n, t) in enumerate(zip(self.locks, self.lock_tokens, strict=True))
                if n == h_r.id and t == release
            ]
            assert held, f"node {h_r.id} unlocked ({token}) with no such lock held"
            self.locks.pop(held[0])
            self.lock_tokens.pop(held[0])
        elif out_r[0] == "raised":
            event("unlock_any: refused")

    @rule(
        # mostly small: evictions that leave most of the tree, and Mamba-only ones (0 tokens)
        num_tokens=st.sampled_from([0, 0, 0, 0, -1, 1, 2, 3, 5, 8, 30]),
        mamba_num=st.sampled_from([0, 1, 1, 1, 2, 3, 6, -1]),
        form=st.sampled_from(["positional", "keyword", "full only"]),
    )
    def evict(self, num_tokens: int, mamba_num: int, form: str) -> None:
        def call(cache: Any) -> Any:
            if form == "positional":
                return cache.evict(num_tokens, mamba_num)
            if form == "keyword":
                return cache.evict(num_tokens, mamba_num=mamba_num)
            return cache.evict(num_tokens)

        with_state = {n.id for n in self.ref._iter_nodes() if n.mamba_value is not None}
        n_evicted = len(self.evicted_ref)
        rr, rc = call(self.ref), call(self.c)
        assert rr == rc, f"evict({num_tokens}, {mamba_num}, {form}): ref {rr} != compiled {rc}"
        after = {n.id: n for n in self.ref._iter_nodes()}
        if any(i in after and after[i].mamba_value is None for i in with_state):
            event("evict: a state dropped, its node kept")
        if rr.mamba_evicted < mamba_num and self.ref.mamba_protected_size():
            event("evict: a locked state outlived a Mamba eviction")
        if num_tokens <= 0 and len(self.evicted_ref) > n_evicted:
            event("evict: Mamba-only eviction removed a leaf")
        self._check_new_free_calls(ordered=True)
        assert self.evicted_ref == self.evicted_c

    @rule(data=st.data())
    def housekeeping(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 3), label="reset?") == 0:
            self.ref.reset()
            self.c.reset()
            self._check_new_free_calls(ordered=False)  # one call per pool, order unspecified
            self.locks.clear()
            self.lock_tokens.clear()
        else:
            self._release_caller_owned()

    def _release_caller_owned(self) -> None:
        for name, owned, pools in (
            ("kv", self.caller_kv, (self.kv_ref, self.kv_c)),
            ("st", self.caller_states, (self.st_ref, self.st_c)),
        ):
            if owned:
                slots = np.array(sorted(owned), dtype=np.int32)
                for pool in pools:
                    pool.free(slots.copy())
                owned.clear()
                self.seen[name] += 1

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_state(self) -> None:
        if self.ref is None:
            return
        count_step(type(self).__name__)
        assert_same_trees(
            self.ref, self.c, lambda n: describe_node(n, MAMBA_FIELDS), self.handles, MAMBA_SIZES
        )
        assert self.evicted_ref == self.evicted_c
        for r, c in ((self.kv_ref, self.kv_c), (self.st_ref, self.st_c)):
            assert len(r.free_calls) == len(c.free_calls) and r.freed == c.freed
        # The ledgers: every slot handed out is free, tree-owned or caller-owned, exactly once.
        for what, tree, pool, caller in (
            ("KV", self.ref._tree_values().tolist(), self.kv_ref, self.caller_kv),
            ("state", self.ref._tree_states().tolist(), self.st_ref, self.caller_states),
        ):
            assert_slot_ledger(
                what, pool.allocated, {"free": pool.freed, "tree": tree, "caller": caller}
            )

    def teardown(self) -> None:
        if self.ref is None:
            return
        self.ref.reset()
        self.c.reset()
        self._check_new_free_calls(ordered=False)
        self._release_caller_owned()
        for pool in (self.kv_ref, self.kv_c, self.st_ref, self.st_c):
            pool.assert_all_free()


TestMambaCacheComparison = MambaCacheComparison.TestCase
