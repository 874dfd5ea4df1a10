"""Stateful property test of a whole serving stack, against the reference models.

One hypothesis ``RuleBasedStateMachine`` plays a scheduler over a cache, its real allocators
and a real :class:`~pymllm.mem_cache.memory_pool.ReqToTokenPool`, and runs for four stacks
(one test class each):

* ``radix``: ``RadixCache`` over a ``TokenToKVPoolAllocator``;
* ``swa``: ``RadixCache(sliding_window_size=W)`` over a ``SWATokenToKVPoolAllocator``
  (the window W drawn per run);
* ``mamba``: ``MambaRadixCache`` over a ``TokenToKVPoolAllocator`` and a ``MambaPool``;
* ``chunk``: ``ChunkCache`` (caches nothing) over a ``TokenToKVPoolAllocator``.

The eviction policy (``lru``, ``lfu``, ``fifo``, ``priority`` with drawn insert
priorities, ``slru``) is drawn per run and given to both caches.

The compiled cache frees into the real allocators; the reference model
(``RefRadixCache``/``RefSWARadixCache``/``RefMambaRadixCache``; for ``chunk`` a second
``ChunkCache``) frees into :class:`SlotBooks`, which keeps the same books the real allocator
keeps. Every call goes to both with the same input, and the results must agree.

Operations, the way ``pymllm.engine.scheduler`` makes them: admit a request (match, lock,
allocate its uncached tokens, evicting when short; no memory: unlock, give everything back),
chunked prefill (insert the prefix computed so far, free the duplicates, re-match, move the
lock), decode (allocate slots for new tokens), finish (SWA: free the window's SWA side;
insert, free duplicates, unlock; Mamba: hand the state over), a short request admitted and
finished in one step (it fills the tree, so that later admissions hit), abort (unlock,
free), evict, flush (abort all, reset), plain lookups; and bad calls (double frees in the
KV, state and request pools, unlocks of nodes holding no lock, stale handles, values of the
wrong length, lock tokens matching no lock) that must raise their
``pymllm.mem_cache.errors`` type and change nothing (trees, counters and every pool
compared before and after).

After every step: both caches pass ``_check_invariants()`` and are the same node for node;
the real allocators pass theirs and agree slot by slot with the books; and the ownership
ledger holds for KV slots, state slots and request slots: each is exactly one of free, in
the tree, or held by exactly one live request. A live request's locked prefix still maps to
the same slots in the tree, and its ``req_to_token`` row holds its slots. After the final
flush every slot is free.

Page size 1 for all four stacks, and the three trees again at page size 2 or 4 (drawn per
run; ``RadixServingPaged``, ``SWAServingPaged``, ``MambaServingPaged``), where the real
KV allocators hand out whole pages: a request holds whole pages (its last one partly used),
inserts cut its key to whole pages and leave the partial page its own, it frees the SWA
side of whole pages, and it hands a Mamba state over only where its tokens end a page (a
chunked prefill stops at a page's end). Tuple keys and bad keys are the other state machines'
(``test_radix_stateful.py``, ``test_swa_stateful.py``, ``test_mamba_stateful.py``). Step
counts are printed at the end ("stateful steps").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from conftest import (  # tests/ is on sys.path (rootdir conftest)
    MAMBA_FIELDS,
    MAMBA_SIZES,
    SIZES,
    SWA_FIELDS,
    PairedCaches,
    assert_same_trees,
    assert_slot_ledger,
    count_run,
    count_step,
    describe_node,
    draw_key_maker,
    outcome,
)
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from reference_mamba import RefMambaRadixCache
from reference_model import RefRadixCache
from reference_swa import RefSWARadixCache

from pymllm.mem_cache import (
    EVICTION_POLICIES,
    ChunkCache,
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import (
    AllocatorStateError,
    InvalidFreeError,
    InvalidValueError,
    LockStateError,
    StaleNodeError,
)
from pymllm.mem_cache.memory_pool import MambaPool, ReqToTokenPool

# Small pools (in slots; a page size P > 1 keeps the page counts of page size 2):
# admissions evict and fail often.
KV_SIZE = 40
SWA_SIZE = 24
STATES = 6
MAX_REQS = 5
CONTEXT = 32  # ReqToTokenPool row length; the longest request

TOKEN = st.sampled_from([0, 1, 2, 0, 1, 2, 3])
EVICT_TOKENS = st.sampled_from([0, 0, 1, 2, 3, 5, 8, 13])
EVICT_SECOND = st.sampled_from([0, 0, 1, 2, 4])


class SlotBooks:
    """The reference side's allocator: the books the real allocator keeps, without handing
    anything out (the test takes slots from the real allocator and registers them here
    with :meth:`take`). ``free``/``free_swa`` check every slot first and raise
    ``InvalidFreeError``, recording nothing, on a slot that is not held or is listed twice.
    With *swa*, ``swa_held`` is the set of held full slots whose SWA side is held too;
    ``free_swa`` skips SWA sides already gone, as ``SWATokenToKVPoolAllocator`` does.

    With *page* P > 1 the slots are ``P..size+P-1`` (page 0 pads), and a free must list
    whole pages: the real allocator frees a page when any of its slots is listed, so a
    partial page freed by the tree, the reference model or this test would be a bug that
    the books would otherwise hide."""

    def __init__(self, size: int, swa: bool = False, page: int = 1) -> None:
        self.page = page
        self.slots = range(page, size + page)
        self.free_set = set(self.slots)
        self.swa_held: set[int] | None = set() if swa else None

    def take(self, slots: Any) -> None:
        slots = [int(s) for s in slots]
        assert self.free_set.issuperset(slots), f"the real pool handed out held slots {slots}"
        self.free_set.difference_update(slots)
        if self.swa_held is not None:
            self.swa_held.update(slots)

    def _held(self, indices: Any) -> list[int]:
        slots = np.asarray(indices).reshape(-1).tolist()
        for i, s in enumerate(slots):
            if s not in self.slots or s in self.free_set or s in slots[:i]:
                raise InvalidFreeError(f"indices: slot {s} is not held (double free?)")
        pages = {s // self.page for s in slots}
        assert len(slots) == len(pages) * self.page, f"a free of part of a page: {slots}"
        return slots

    def free(self, indices: Any) -> None:
        slots = self._held(indices)
        self.free_set.update(slots)
        if self.swa_held is not None:
            self.swa_held.difference_update(slots)

    def free_swa(self, indices: Any) -> None:
        slots = self._held(indices)
        assert self.swa_held is not None
        self.swa_held.difference_update(slots)

    def translate_loc_from_full_to_swa(self, full_indices: Any) -> np.ndarray:
        """Nonzero where the full slot's SWA side is held (which SWA slot, the books do not
        keep): the reference model reads it as the compiled cache reads the real
        allocator's mapping, to free what a new tombstone still holds."""
        assert self.swa_held is not None
        slots = np.asarray(full_indices)
        return np.isin(slots, sorted(self.swa_held)).astype(np.int32)


@dataclass(eq=False)
class Request:
    rid: int
    ns: Any  # extra_key
    tokens: list[int]  # prompt and decoded tokens; slots[i] holds the KV of tokens[i]
    rslot: int  # ReqToTokenPool row
    # int32, whole pages (the last one's slots past len(tokens) unused yet);
    # slots[:cached] are the tree's (locked), the rest ours
    slots: np.ndarray
    cached: int
    node: int  # id of the node locked for slots[:cached] (0: the root; -1: ChunkCache)
    token: Any  # the lock token inc_lock_ref returned
    state: int = 0  # Mamba: the request's own state slot
    branch: int = 0  # Mamba: where the next chunked prefill stops to save a state


def _free_slots(universe: range, is_allocated: Any) -> set[int]:
    held = is_allocated(np.arange(universe.start, universe.stop))
    return set((np.flatnonzero(~held) + universe.start).tolist())


class ServingStack(PairedCaches, RuleBasedStateMachine):
    KIND: ClassVar[str] = "radix"
    NAMESPACES: ClassVar[list[tuple[Any, int]]] = [(None, 0), (None, 0), ("a", 0)]
    MAX_KEY_LEN = 14
    MAX_SUFFIX = 6
    PAGES: ClassVar[tuple[int, ...]] = (1,)  # the page sizes a run draws from
    _mamba_pools: ClassVar[dict[str, MambaPool]] = {}  # one per process: JAX buffers

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    def _token(self, ns: tuple[Any, int]) -> Any:
        return TOKEN

    # ------------------------------------------------------------------ setup

    @initialize(
        window=st.integers(1, 6),
        policy=st.sampled_from(EVICTION_POLICIES),
        page=st.integers(0, 3),
    )
    def setup(self, window: int, policy: str, page: int) -> None:
        count_run(type(self).__name__)
        kind = self.KIND
        self.policy = policy
        P = self.page = self.PAGES[page % len(self.PAGES)]
        if P > 1:
            event(f"page size {P}")
        # page size 1 keeps the sizes; a larger page keeps their page counts at size 2
        self.kv_size = KV_SIZE if P == 1 else KV_SIZE // 2 * P
        self.swa_size = SWA_SIZE if P == 1 else SWA_SIZE // 2 * P
        self.universe = range(P, self.kv_size + P)  # the slots the KV allocator hands out
        self.evicted_ref: list[int] = []
        self.evicted_c: list[int] = []
        hooks_r = {"on_node_evict": self.evicted_ref.append, "eviction_policy": policy}
        hooks_c = {"on_node_evict": self.evicted_c.append, "eviction_policy": policy}
        self.req_pool = ReqToTokenPool(MAX_REQS, CONTEXT)
        self.states: MambaPool | None = None
        if kind == "swa":
            self.kv: Any = SWATokenToKVPoolAllocator(self.kv_size, self.swa_size, P)
            self.books = SlotBooks(self.kv_size, swa=True, page=P)
            self.ref: Any = RefSWARadixCache(
                P, sliding_window_size=window, token_to_kv_pool_allocator=self.books, **hooks_r
            )
            self.c: Any = RadixCache(
                P, sliding_window_size=window, token_to_kv_pool_allocator=self.kv, **hooks_c
            )
        else:
            self.kv = TokenToKVPoolAllocator(self.kv_size, P)
            self.books = SlotBooks(self.kv_size, page=P)
        if kind == "radix":
            self.ref = RefRadixCache(P, token_to_kv_pool_allocator=self.books, **hooks_r)
            self.c = RadixCache(P, token_to_kv_pool_allocator=self.kv, **hooks_c)
        elif kind == "mamba":
            if "pool" not in self._mamba_pools:
                self._mamba_pools["pool"] = MambaPool(STATES, 1, (1,), (1,))
            self.states = self._mamba_pools["pool"]
            try:
                self.states.clear()
            except AllocatorStateError:  # an earlier run failed with its tree's states booked
                self.states = self._mamba_pools["pool"] = MambaPool(STATES, 1, (1,), (1,))
            self.state_books = SlotBooks(STATES)
            self.ref = RefMambaRadixCache(
                P, token_to_kv_pool_allocator=self.books, mamba_pool=self.state_books, **hooks_r
            )
            self.c = MambaRadixCache(
                P, token_to_kv_pool_allocator=self.kv, mamba_pool=self.states, **hooks_c
            )
        elif kind == "chunk":
            self.ref = ChunkCache(self.books)
            self.c = ChunkCache(self.kv)
        self.tree = kind != "chunk"
        self.fields = {"swa": SWA_FIELDS, "mamba": MAMBA_FIELDS}.get(kind, ())
        self.keys = []
        self.handles = {0: (self.ref.root_node, self.c.root_node)} if self.tree else {}
        self.reqs: list[Request] = []
        self.next_rid = 0
        self.ready = True

    # ------------------------------------------------------------------ the stack's calls

    def _whole_pages(self, n: int) -> int:
        """The slots n tokens take: n rounded up to whole pages."""
        return -(-n // self.page) * self.page

    def _pages_below(self, n: int) -> int:
        """n rounded down to whole pages: the tokens of the pages wholly below position n."""
        return n // self.page * self.page

    def _evict(self, *args: int, **kwargs: int) -> Any:
        rr = self.ref.evict(*args, **kwargs)
        rc = self.c.evict(*args, **kwargs)
        assert rr == rc, f"evict{args}{kwargs}: ref {rr} != compiled {rc}"
        assert self.evicted_ref == self.evicted_c
        return rr

    def _alloc_kv(self, n: int, prefix: np.ndarray | None = None) -> np.ndarray | None:
        """n KV slots (whole pages), evicting first when short (as the scheduler does), after
        the prefix's (copied: ``alloc(n, prefix=)``) when given; None: no memory."""
        if n == 0 and prefix is None:
            return np.zeros(0, dtype=np.int32)
        if self.KIND == "swa":
            full_short = n - self.kv.full_available_size()
            swa_short = n - self.kv.swa_available_size()
            if full_short > 0 or swa_short > 0:
                self._evict(max(full_short, 0), max(swa_short, 0))
        elif n > self.kv.available_size():
            self._evict(n - self.kv.available_size())
        got = self.kv.alloc(n, prefix=prefix)
        if got is not None:
            self.books.take(got[0 if prefix is None else len(prefix) :])
        return got

    def _alloc_state(self) -> int:
        """One Mamba state slot, evicting a state first when none is free; 0: none."""
        assert self.states is not None
        if self.states.available_size() < 1:
            self._evict(0, mamba_num=1)
        got = self.states.alloc(1)
        if got is None:
            return 0
        self.state_books.take(got)
        return int(got[0])

    def _free_kv(self, slots: np.ndarray) -> None:
        if len(slots):
            self.kv.free(slots.astype(np.int32))
            self.books.free(slots)

    def _free_state(self, slot: int) -> None:
        assert self.states is not None
        self.states.free(np.array([slot], dtype=np.int32))
        self.state_books.free([slot])

    def _pair(self, node_id: int) -> tuple[Any, Any]:
        return self.handles[node_id] if self.tree else (None, None)

    def _lock(self, node_id: int) -> Any:
        h_r, h_c = self._pair(node_id)
        tr, tc = self.ref.inc_lock_ref(h_r), self.c.inc_lock_ref(h_c)
        assert tr == tc, f"inc_lock_ref({node_id}): token ref {tr!r} != compiled {tc!r}"
        return tr

    def _unlock(self, node_id: int, token: Any) -> None:
        h_r, h_c = self._pair(node_id)
        self.ref.dec_lock_ref(h_r, swa_boundary_id=token)
        self.c.dec_lock_ref(h_c, swa_boundary_id=token)

    def _match(
        self, data: st.DataObject, ns: Any, tokens: list[int]
    ) -> tuple[np.ndarray, int, Any]:
        """match_prefix on both: (indices, node id, mamba_branching_seqlen)."""
        make = draw_key_maker(data, (ns, 0), tokens)
        key_r, key_c = make(), make()
        mr, mc = self.ref.match_prefix(key_r), self.c.match_prefix(key_c)
        assert isinstance(mc.indices, np.ndarray) and mc.indices.dtype == np.int32
        assert mr.indices.tolist() == mc.indices.tolist()
        assert mr.prefix_len == mc.prefix_len == len(mc.indices)
        assert mr.mamba_branching_seqlen == mc.mamba_branching_seqlen
        indices = mc.indices.copy()
        self._scribble(key_c, mc.indices)
        if not self.tree:
            assert mc.last_node is None and mr.last_node is None and not len(indices)
            return indices, -1, None
        self._register(mr.last_node, mc.last_node)
        return indices, mc.last_node.id, mc.mamba_branching_seqlen

    def _insert(
        self,
        data: st.DataObject,
        req: Request,
        n: int,
        state: int = 0,
        ppl: int | None = None,
        es: int = 0,
    ) -> tuple[np.ndarray, int, bool]:
        """Insert the request's first n tokens with its slots on both. Returns (duplicates
        the request frees, how many leading slots the tree settled, mamba_exist); every slot
        past that stays the request's (the tree settles whole pages: a partial last page
        stays the request's). A windowed tree settles everything past the locked prefix
        itself (keeps or frees it), so it leaves no duplicates to the caller."""
        make = draw_key_maker(data, (req.ns, 0), req.tokens[:n])
        kwargs: dict[str, Any] = {}
        if state:
            kwargs["mamba_value"] = state
        if self.KIND == "swa":
            kwargs["prev_prefix_len"] = req.cached if ppl is None else ppl
            kwargs["swa_evicted_seqlen"] = es
        if self.tree and self.policy == "priority":
            kwargs["priority"] = data.draw(st.integers(0, 3), label="priority")
        before = self.c.total_size()
        as_list = data.draw(st.booleans(), label="value as a list")
        value = req.slots[:n]
        rr = self.ref.insert(make(), value.tolist() if as_list else value.copy(), **kwargs)
        val_c = value.tolist() if as_list else value.copy()
        rc = self.c.insert(make(), val_c, **kwargs)
        self._scribble(RadixKey([]), val_c)
        assert (rr.prefix_len, rr.mamba_exist) == (rc.prefix_len, rc.mamba_exist), (rr, rc)
        if not self.tree:
            assert rc.prefix_len == 0 and rc.last_node is None
            return req.slots[:0], 0, False
        self._register(rr.last_node, rc.last_node)
        assert rc.prefix_len >= req.cached, f"prefix_len {rc.prefix_len} < locked {req.cached}"
        aligned = self._pages_below(n)
        if self.KIND == "swa":
            return req.slots[:0], aligned, False
        covered = rc.prefix_len + self.c.total_size() - before
        assert covered == aligned, f"the tree settled {covered} of {n} slots ({aligned} paged)"
        if rc.prefix_len > req.cached:
            event("insert: duplicates to free")
        return req.slots[req.cached : rc.prefix_len].copy(), aligned, bool(rc.mamba_exist)

    def _write_row(self, req: Request) -> None:
        self.req_pool.write((req.rslot, slice(0, len(req.slots))), req.slots)

    def _pick_request(self, data: st.DataObject) -> Request:
        return self.reqs[data.draw(st.integers(0, len(self.reqs) - 1), label="request")]

    def _end(self, req: Request, kv: np.ndarray) -> None:
        """Give back what a leaving request still holds: KV slots kv, its state, its row."""
        self.reqs.remove(req)
        self._free_kv(kv)
        if req.state:
            self._free_state(req.state)
        self.req_pool.free(np.array([req.rslot], dtype=np.int32))

    def _abort(self, req: Request) -> None:
        self._unlock(req.node, req.token)
        self._end(req, req.slots[req.cached :])

    # ------------------------------------------------------------------ request life

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        space, tokens = self._draw_key(data, data.draw(st.booleans(), label="extend"), 1)
        ns = space[0]  # the extra_key
        got = self.req_pool.alloc(1)
        if got is None:
            event("admit: no request slot")
            return
        indices, node_id, branch = self._match(data, ns, tokens)
        token = self._lock(node_id)
        need = self._whole_pages(len(tokens)) - len(indices)
        # the value in one array from the allocator, or the new slots concatenated to it
        if data.draw(st.booleans(), label="alloc(prefix=)"):
            slots = self._alloc_kv(need, indices)
        else:
            new = self._alloc_kv(need)
            slots = None if new is None else np.concatenate([indices, new]).astype(np.int32)
        state = 0
        if slots is not None and self.states is not None:
            state = self._alloc_state()
            if not state:
                self._free_kv(slots[len(indices) :])
                slots = None
        if slots is None:
            event("admit: no memory")
            self._unlock(node_id, token)
            self.req_pool.free(got)
            return
        event(f"admit: {'hit' if len(indices) else 'miss'}")
        req = Request(
            self.next_rid,
            ns,
            tokens,
            int(got[0]),
            slots,
            len(indices),
            node_id,
            token,
            state,
            branch if branch is not None else 0,
        )
        self.next_rid += 1
        self.reqs.append(req)
        self.keys.append((space, tokens))
        self._write_row(req)

    @precondition(lambda self: self.ready and self.reqs)
    @rule(data=st.data())
    def chunked_prefill(self, data: st.DataObject) -> None:
        """Cache what the request computed so far (the scheduler's _cache_prompt): insert,
        re-match, move the lock to the new node, free the duplicates."""
        req = self._pick_request(data)
        if req.cached >= len(req.tokens):
            return
        upto = req.branch if req.branch > req.cached else None
        if upto is None:
            upto = data.draw(st.integers(req.cached + 1, len(req.tokens)), label="upto")
        else:
            event("chunked prefill: stop at the branching point")
        snap = 0
        if self.states is not None:
            # the tree's own copy of the state at upto: a state follows a page's last token,
            # and a chunk cached without one would not match back (the re-match below)
            upto = self._pages_below(upto)
            if upto <= req.cached:
                return
            snap = self._alloc_state()
            if not snap:
                event("chunked prefill: no state slot")
                return
        req.branch = 0
        dups, covered, exist = self._insert(data, req, upto, snap)
        if snap and exist:
            self._free_state(snap)
        indices, node_id, _ = self._match(data, req.ns, req.tokens[:upto])
        token = self._lock(node_id)
        self._unlock(req.node, req.token)
        refill = covered - len(indices)
        # A windowed re-match stops short where the path has too few live tokens after a
        # tombstone: those positions are the tree's now, so the request computes them anew.
        assert refill <= 0 or self.KIND == "swa", f"re-match found {len(indices)} < {covered}"
        ours = req.slots[max(covered, len(indices)) :]
        req.node, req.token, req.cached = node_id, token, len(indices)
        self._free_kv(dups)
        new = self._alloc_kv(refill) if refill > 0 else req.slots[:0]
        if new is None:
            event("chunked prefill: no memory to recompute, abort")
            self._unlock(req.node, req.token)
            self._end(req, ours)
            return
        if refill > 0:
            event("chunked prefill: recompute past a tombstone")
        req.slots = np.concatenate([indices, new, ours]).astype(np.int32)
        self._write_row(req)

    @precondition(lambda self: self.ready and self.reqs)
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        req = self._pick_request(data)
        new_tokens = data.draw(st.lists(TOKEN, min_size=1, max_size=3), label="decoded")
        if len(req.tokens) + len(new_tokens) > CONTEXT:
            return
        new = self._alloc_kv(self._whole_pages(len(req.tokens) + len(new_tokens)) - len(req.slots))
        if new is None:
            event("decode: no memory")
            return
        req.tokens = req.tokens + new_tokens
        req.slots = np.concatenate([req.slots, new]).astype(np.int32)
        self._write_row(req)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def admit_and_finish(self, data: st.DataObject) -> None:
        """A whole request in one step, as a short one is served: admit, then finish. Half
        the steps of a run may have no finish (hypothesis turns rules off per run), and a
        tree filled only by finishes stays nearly empty; this one fills it, so that later
        admissions hit, share pages and leave duplicates."""
        rid = self.next_rid
        self.admit(data)
        if self.next_rid > rid:
            self._finish(data, self.reqs[-1])

    @precondition(lambda self: self.ready and self.reqs)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finish(data, self._pick_request(data))

    def _finish(self, data: st.DataObject, req: Request) -> None:
        n = len(req.tokens)
        ppl, es = None, 0
        if self.KIND == "swa":
            if data.draw(st.integers(0, 2), label="SWA evicted?") == 0:
                es = data.draw(st.integers(0, n + 3), label="swa_evicted_seqlen")
            # the request already freed the SWA side of its own slots below the window, of
            # whole pages: of every page holding one of them, or of the pages wholly below
            # (the tree frees what the page holding position es still has)
            below = min(es, n)
            if data.draw(st.booleans(), label="free the page holding es too"):
                end = self._whole_pages(below)
            else:
                end = self._pages_below(below)
            own = req.slots[req.cached : max(req.cached, end)]
            if len(own):
                self.kv.free_swa(own)
                self.books.free_swa(own)
            ppl = self._draw_short_ppl(data, req)
        # the request's state goes to the tree when its tokens end a page (else it frees it)
        state = req.state if n % self.page == 0 else 0
        dups, covered, exist = self._insert(data, req, n, state, ppl, es)
        if state and not exist:
            req.state = 0  # the tree's now
        self._unlock(req.node, req.token)
        self._end(req, np.concatenate([dups, req.slots[covered:]]))
        self.keys.append(((req.ns, 0), req.tokens))

    def _draw_short_ppl(self, data: st.DataObject, req: Request) -> int:
        """SWA: a prev_prefix_len shorter than the locked prefix (whole pages) hands the tree
        its own slots back (compared, not freed). Sound because the locked prefix still
        names the path's slots (checked after every step: a locked tombstone is never
        revived)."""
        choice = data.draw(st.integers(0, 3), label="prev_prefix_len choice")
        if choice >= 2:
            return req.cached
        ppl = 0 if choice == 0 else data.draw(st.integers(0, req.cached), label="ppl")
        return self._pages_below(ppl)

    # Named so that it sorts last: hypothesis draws the first rules (by name) most often.
    @precondition(lambda self: self.ready and self.reqs)
    @rule(data=st.data())
    def user_abort(self, data: st.DataObject) -> None:
        self._abort(self._pick_request(data))

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        space, tokens = self._draw_key(data, extend=True)
        self._match(data, space[0], tokens)

    @precondition(lambda self: self.ready)
    @rule(num_tokens=EVICT_TOKENS, second=EVICT_SECOND)
    def evict(self, num_tokens: int, second: int) -> None:
        if self.KIND == "swa":
            self._evict(num_tokens, second)
        elif self.KIND == "mamba":
            self._evict(num_tokens, mamba_num=second)
        else:
            self._evict(num_tokens)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        """Abort every request and reset the cache (the scheduler's flush_cache)."""
        if data.draw(st.integers(0, 3), label="flush?"):
            return
        self._flush()

    def _flush(self) -> None:
        for req in list(self.reqs):
            self._abort(req)
        self.ref.reset()
        self.c.reset()
        event("flush")

    # ------------------------------------------------------------------ bad calls

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        """One call that must raise its typed error in both and change nothing."""
        kinds = ["double free", "double free request slot"]
        if self.states is not None:
            kinds += ["double free state", "free cached state"]
        if self.tree:
            kinds += ["unlock unheld", "stale handle", "value length"]
        if self.tree:  # over our allocators, which book the tree's slots
            kinds.append("free cached slot")
        if self.KIND in ("swa", "mamba"):
            kinds.append("lock token")
        kind = kinds[data.draw(st.integers(0, len(kinds) - 1), label="bad call")]
        before = self._snapshot()
        raised = getattr(self, "_bad_" + kind.replace(" ", "_"))(data)
        if raised is not None:
            event(f"bad call: {kind}")
        assert self._snapshot() == before, f"bad call {kind!r} changed the stack"

    def _bad_kv_free(
        self, data: st.DataObject, pool: list[int], label: str, method: str = "free"
    ) -> np.ndarray:
        """A KV free (`method`: free or free_swa) of one slot drawn from `pool` (alone, or
        beside a slot a request holds: the call must still free nothing) that the allocator
        must refuse. Returns it."""
        slots = [pool[data.draw(st.integers(0, len(pool) - 1), label=label)]]
        owned = [s for r in self.reqs for s in r.slots[r.cached :].tolist()]
        if owned and data.draw(st.booleans(), label="with a held slot"):
            slots.insert(data.draw(st.integers(0, 1)), owned[0])
        arr = np.array(slots, dtype=np.int32)
        assert outcome(lambda: getattr(self.kv, method)(arr)) == ("raised", InvalidFreeError)
        return arr

    def _bad_double_free(self, data: st.DataObject) -> Any:
        free = sorted(self.books.free_set)
        if not free:
            return None
        arr = self._bad_kv_free(data, free, "free slot")
        assert outcome(lambda: self.books.free(arr)) == ("raised", InvalidFreeError)
        return InvalidFreeError

    def _bad_free_cached_slot(self, data: st.DataObject) -> Any:
        """A caller's free of a slot the tree holds (with a window, of its SWA side too)."""
        tree_kv = [s for n in self.c._nodes() for s in np.asarray(n.value).tolist()]
        if not tree_kv:
            return None
        methods = ["free", "free_swa"] if self.KIND == "swa" else ["free"]
        self._bad_kv_free(data, tree_kv, "tree slot", data.draw(st.sampled_from(methods)))
        return InvalidFreeError

    def _bad_double_free_request_slot(self, data: st.DataObject) -> Any:
        live = {r.rslot for r in self.reqs}
        free = [s for s in range(1, MAX_REQS + 1) if s not in live]
        if not free:
            return None
        arr = np.array([free[data.draw(st.integers(0, len(free) - 1))]], dtype=np.int32)
        assert outcome(lambda: self.req_pool.free(arr)) == ("raised", InvalidFreeError)
        return InvalidFreeError

    def _bad_double_free_state(self, data: st.DataObject) -> Any:
        assert self.states is not None
        free = sorted(self.state_books.free_set)
        if not free:
            return None
        arr = np.array([free[data.draw(st.integers(0, len(free) - 1))]], dtype=np.int32)
        assert outcome(lambda: self.states.free(arr)) == ("raised", InvalidFreeError)
        return InvalidFreeError

    def _bad_free_cached_state(self, data: st.DataObject) -> Any:
        """A caller's free of a state the tree holds: the pool books it as the cache's."""
        assert self.states is not None
        tree = [int(n.mamba_value[0]) for n in self.c._nodes() if n.mamba_value is not None]
        if not tree:
            return None
        arr = np.array([tree[data.draw(st.integers(0, len(tree) - 1), label="state")]])
        assert outcome(lambda: self.states.free(arr)) == ("raised", InvalidFreeError)
        return InvalidFreeError

    def _both_raise(self, what: str, call: Any, expected: tuple[type, ...]) -> Any:
        out_r = outcome(lambda: call(self.ref, 0))
        out_c = outcome(lambda: call(self.c, 1))
        assert out_r[0] == "raised" and out_r[1] in expected, f"{what}: ref {out_r}"
        assert out_c == out_r, f"{what}: ref {out_r} != compiled {out_c}"
        return out_r[1]

    def _bad_unlock_unheld(self, data: st.DataObject) -> Any:
        # Stale handles and nodes nobody locked (an unlock owed by nobody: a double unlock).
        pool = [i for i, (r, _) in self.handles.items() if i and (r.evicted or r.lock_ref == 0)]
        if not pool:
            return None
        pair = self._pick_handle(data, pool)
        token = None if self.KIND == "radix" else data.draw(st.sampled_from([None, 0, 2, True]))
        if self.KIND == "mamba" and token not in (None, True):
            token = False
        return self._both_raise(
            f"dec_lock_ref({pair[0].id}, {token!r})",
            lambda cache, side: cache.dec_lock_ref(pair[side], swa_boundary_id=token),
            (LockStateError, StaleNodeError),
        )

    def _bad_stale_handle(self, data: st.DataObject) -> Any:
        pool = [i for i, (r, _) in self.handles.items() if r.evicted]
        if not pool:
            return None
        pair = self._pick_handle(data, pool)
        call = data.draw(st.sampled_from(["inc_lock_ref", "compute_node_hash"]), label="call")
        return self._both_raise(
            f"{call}(stale {pair[0].id})",
            lambda cache, side: getattr(cache, call)(pair[side]),
            (StaleNodeError,),
        )

    def _bad_value_length(self, data: st.DataObject) -> Any:
        ns, tokens = self._draw_key(data, extend=True)
        n = len(tokens) + data.draw(st.sampled_from([-1, 1]), label="length off by")
        if n < 0:
            return None
        value = np.arange(1, n + 1, dtype=np.int32)
        return self._both_raise(
            f"insert({len(tokens)} tokens, {n} indices)",
            lambda cache, side: cache.insert(RadixKey(list(tokens), ns[0]), value.copy()),
            (InvalidValueError,),
        )

    def _bad_lock_token(self, data: st.DataObject) -> Any:
        """A token that matches no lock the node holds: with SWA a boundary claiming SWA
        locks nobody holds; with Mamba True on a node whose state holds no lock."""
        nodes = {n.id: n for n in self.ref._iter_nodes()}
        if self.KIND == "mamba":
            pool = [i for i, n in nodes.items() if n.lock_ref and not n.mamba_lock_ref]
            if not pool:
                return None
            pair = self._pick_handle(data, pool)
            token: Any = True
        else:
            pool = [i for i, n in nodes.items() if n.lock_ref]
            if not pool:
                return None
            pair = self._pick_handle(data, pool)
            path = self.ref._path(pair[0])
            ends = np.cumsum([len(n.tokens) for n in path]).tolist()
            token = data.draw(st.integers(0, ends[-1]), label="boundary")
            if all(n.swa_lock_ref > 0 for n, e in zip(path, ends, strict=True) if e > token):
                return None  # this unlock would succeed: not a bad call
        return self._both_raise(
            f"dec_lock_ref({pair[0].id}, {token!r})",
            lambda cache, side: cache.dec_lock_ref(pair[side], swa_boundary_id=token),
            (LockStateError,),
        )

    def _snapshot(self) -> tuple[Any, ...]:
        """Everything a bad call must leave as it was: both trees and counters, every pool."""
        out: list[Any] = [self._pools_state()]
        if self.tree:
            sizes = MAMBA_SIZES if self.KIND == "mamba" else SIZES
            for cache, nodes in ((self.ref, self.ref._iter_nodes()), (self.c, self.c._nodes())):
                out.append(sorted((n.id, describe_node(n, self.fields)) for n in nodes))
                out.append([getattr(cache, name)() for name in sizes])
        return tuple(out)

    def _pools_state(self) -> tuple[Any, ...]:
        everything = np.arange(0, self.universe.stop + 1)
        out: list[Any] = [
            self.kv.is_allocated(everything).tolist(),
            self.kv.is_cached(everything).tolist() if self.tree else None,
            sorted(self.books.free_set),
            self.req_pool.available_size(),
            self.req_pool._slots.is_allocated(np.arange(0, MAX_REQS + 2)).tolist(),
        ]
        if self.KIND == "swa":
            out += [self.kv.full_to_swa_index_mapping.tolist(), self.kv.swa_available_size()]
            out.append(sorted(self.books.swa_held or ()))
        if self.states is not None:
            cached = self.states.slot_allocator.is_cached(np.arange(0, STATES + 2)).tolist()
            out += [self.states.available_size(), sorted(self.state_books.free_set), cached]
        return tuple(out)

    # ------------------------------------------------------------------ invariants

    def _path_values(self, node_id: int) -> list[int]:
        """The KV slots from the root down to the compiled node *node_id*."""
        if not self.tree:
            return []
        node = self.handles[node_id][1]
        values: list[int] = []
        while node.parent is not None:
            values[:0] = np.asarray(node.value).tolist()
            node = node.parent
        return values

    @invariant()
    def consistent(self) -> None:
        if self.ready:
            count_step(type(self).__name__)
            self._check()

    def _check(self) -> None:
        tree_kv: list[int] = []
        tree_states: list[int] = []
        if self.tree:
            sizes = MAMBA_SIZES if self.KIND == "mamba" else SIZES
            assert_same_trees(
                self.ref, self.c, lambda n: describe_node(n, self.fields), self.handles, sizes
            )
            assert self.evicted_ref == self.evicted_c
            for node in self.c._nodes():
                tree_kv += np.asarray(node.value).tolist()
                if self.KIND == "mamba" and node.mamba_value is not None:
                    tree_states += node.mamba_value.tolist()
        self.kv._check_invariants()
        free = _free_slots(self.universe, self.kv.is_allocated)
        assert free == self.books.free_set, (
            f"free: compiled side {sorted(free ^ self.books.free_set)} differs from the books"
        )
        places: dict[str, Any] = {"free": free, "tree": tree_kv}
        for r in self.reqs:
            places[f"request {r.rid}"] = r.slots[r.cached :].tolist()
            # its locked prefix still names the same slots, and its row holds its slots
            assert self._path_values(r.node) == r.slots[: r.cached].tolist(), f"request {r.rid}"
            row = self.req_pool.req_to_token[r.rslot, : len(r.slots)]
            assert row.tolist() == r.slots.tolist()
            assert len(r.slots) == self._whole_pages(len(r.tokens))
        assert_slot_ledger("KV", self.universe, places)
        if self.tree:
            # the allocator books as the cache's exactly the slots the tree holds
            cached = self.kv.is_cached(np.arange(self.universe.start, self.universe.stop))
            assert set((np.flatnonzero(cached) + self.universe.start).tolist()) == set(tree_kv)
        if self.tree:
            self._check_locks()
        rslots = self.req_pool._slots
        rslots._check_invariants()
        assert_slot_ledger(
            "request",
            range(1, MAX_REQS + 1),
            {
                "free": _free_slots(range(1, MAX_REQS + 1), rslots.is_allocated),
                **{f"request {r.rid}": [r.rslot] for r in self.reqs},
            },
        )
        if self.KIND == "swa":
            self._check_swa_side(free)
        if self.states is not None:
            self.states._allocator._check_invariants()
            free_states = _free_slots(range(1, STATES + 1), self.states._allocator.is_allocated)
            assert free_states == self.state_books.free_set
            assert_slot_ledger(
                "state",
                range(1, STATES + 1),
                {
                    "free": free_states,
                    "tree": tree_states,
                    **{f"request {r.rid}": [r.state] for r in self.reqs if r.state},
                },
            )
            # the pool books as the cache's exactly the states the tree holds
            cached = self.states.slot_allocator.is_cached(np.arange(1, STATES + 1))
            assert set((np.flatnonzero(cached) + 1).tolist()) == set(tree_states)

    def _check_locks(self) -> None:
        """Every lock in the tree is a live request's: a node's lock_ref counts the requests
        locked at or below it; a Mamba state's lock, those locked on it with token True."""
        want: dict[int, int] = {}
        want_state: dict[int, int] = {}
        for r in self.reqs:
            node = self.handles[r.node][0]
            if r.token is True:
                want_state[node.id] = want_state.get(node.id, 0) + 1
            while node.parent is not None:
                want[node.id] = want.get(node.id, 0) + 1
                node = node.parent
        for node in self.ref._iter_nodes():
            assert node.lock_ref == want.get(node.id, 0), f"{node!r}: lock_ref"
            if self.KIND == "mamba":
                assert node.mamba_lock_ref == want_state.get(node.id, 0), f"{node!r}: state"
        if not self.reqs:
            assert self.c.protected_size() == self.c.swa_protected_size() == 0

    def _check_swa_side(self, free: set[int]) -> None:
        """SWA slots: a live node's slots hold their SWA side, a tombstone's do not, a
        request's own slots do (they give it up only on finishing), a free slot does not."""
        mapping = self.kv.full_to_swa_index_mapping
        held = {s for s in self.universe if mapping[s]}
        assert held == self.books.swa_held, "SWA sides: compiled side differs from the books"
        assert not held & free
        for node in self.c._nodes():
            values = set(np.asarray(node.value).tolist())
            expected = set() if node.swa_tombstone else values
            assert values & held == expected, f"{node!r}: SWA sides {sorted(values & held)}"
        for r in self.reqs:
            assert held.issuperset(r.slots[r.cached :].tolist()), f"request {r.rid}: SWA side"
        swa_in_use = len({int(mapping[s]) for s in held})
        assert swa_in_use == len(held) == self.swa_size - self.kv.swa_available_size()

    def teardown(self) -> None:
        if not self.ready:
            return
        self._flush()
        self._check()
        assert len(self.books.free_set) == self.kv_size, "slots leaked past the final flush"
        if self.KIND == "swa":
            assert self.kv.swa_available_size() == self.swa_size
        assert self.req_pool.available_size() == MAX_REQS
        if self.states is not None:
            assert self.states.available_size() == STATES


# The CI profile runs each stack a quarter of the profile's examples: four stacks in about
# the time one of the older machines takes. The long profile scales the same way.
_SETTINGS = settings(max_examples=max(5, settings.default.max_examples // 4))


class RadixServing(ServingStack):
    KIND = "radix"


class SWAServing(ServingStack):
    KIND = "swa"


class RadixServingPaged(ServingStack):
    KIND = "radix"
    PAGES = (2, 4)


class SWAServingPaged(ServingStack):
    KIND = "swa"
    PAGES = (2, 4)


class MambaServing(ServingStack):
    KIND = "mamba"


class MambaServingPaged(ServingStack):
    KIND = "mamba"
    PAGES = (2, 4)


class ChunkServing(ServingStack):
    KIND = "chunk"


TestRadixServing = RadixServing.TestCase
TestSWAServing = SWAServing.TestCase
TestMambaServing = MambaServing.TestCase
TestChunkServing = ChunkServing.TestCase
TestRadixServingPaged = RadixServingPaged.TestCase
TestSWAServingPaged = SWAServingPaged.TestCase
TestMambaServingPaged = MambaServingPaged.TestCase
for _case in (
    TestRadixServing,
    TestSWAServing,
    TestMambaServing,
    TestChunkServing,
    TestRadixServingPaged,
    TestSWAServingPaged,
    TestMambaServingPaged,
):
    _case.settings = _SETTINGS
del _case
