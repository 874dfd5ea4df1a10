"""A refused call changes nothing observable, measured on the whole state (session 24).

Each case builds two caches (and allocators) by the same history, makes the refused call
on one of them, then compares a snapshot of everything observable (every node's fields and
cached page hashes, the evicted flag of every handle held, the sizes, the allocator's books,
the on_node_evict log), and then runs the same continuation on both (a match, an insert
that hands out a fresh node id, evict one token at a time, SWA/Mamba-only evicts, then
an alloc of everything left) comparing every result: a clock tick, a hit count, an LRU
order, a node id, a hash or a free-list order moved by the refused call shows there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import (
    ChunkCache,
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import (
    AllocatorStateError,
    AlreadyInitializedError,
    InvalidFreeError,
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    ReentrantCallError,
    StaleNodeError,
)

# --------------------------------------------------------------------------- the stacks


class _Failing:
    """A mix-in for an allocator subclass: the tree books nothing for a subclass and calls
    its Python frees, which raise while ``fail`` is set."""

    fail = False

    def free(self, indices: Any) -> None:
        if self.fail:
            raise RuntimeError("free refused (test)")
        super().free(indices)  # type: ignore[misc]

    def free_swa(self, indices: Any) -> None:
        if self.fail:
            raise RuntimeError("free_swa refused (test)")
        super().free_swa(indices)  # type: ignore[misc]


class _PyAlloc(_Failing, TokenToKVPoolAllocator):
    pass


class _PySWAAlloc(_Failing, SWATokenToKVPoolAllocator):
    pass


class _PyStates(_Failing, TokenToKVPoolAllocator):
    """A state pool of another type: the tree books no states and calls its free."""


KINDS = [
    # (name, page_size, swa, mamba, python allocator)
    ("plain", 1),
    ("plain", 2),
    ("plain-py", 1),
    ("plain-py", 2),
    ("swa", 1),
    ("swa", 2),
    ("swa-py", 1),
    ("mamba", 1),
    ("mamba-py", 1),
    ("mamba", 2),
]
KIND_IDS = [f"{k}-p{p}" for k, p in KINDS]


class Stack:
    def __init__(self, kind: str, page_size: int = 1, policy: str = "lru") -> None:
        self.kind = kind
        self.ps = page_size
        self.evicted: list[int] = []
        self.swa = kind.startswith("swa")
        self.mamba = kind.startswith("mamba")
        py = kind.endswith("-py")
        self.callback_hook: Callable[[int], None] | None = None

        def on_evict(uid: int) -> None:
            self.evicted.append(uid)
            if self.callback_hook is not None:
                self.callback_hook(uid)

        self.on_evict = on_evict
        if self.swa:
            cls = _PySWAAlloc if py else SWATokenToKVPoolAllocator
            self.alloc: Any = cls(96, 96, page_size=page_size, need_sort=False)
            self.cache: Any = RadixCache(
                page_size=page_size,
                sliding_window_size=2 * page_size,
                token_to_kv_pool_allocator=self.alloc,
                on_node_evict=on_evict,
                eviction_policy=policy,
            )
            self.states: Any = None
        else:
            cls2 = _PyAlloc if py else TokenToKVPoolAllocator
            self.alloc = cls2(96, page_size=page_size, need_sort=False)
            if self.mamba:
                self.states = (_PyStates if py else TokenToKVPoolAllocator)(16)
                self.cache = MambaRadixCache(
                    page_size=page_size,
                    token_to_kv_pool_allocator=self.alloc,
                    mamba_pool=self.states,
                    on_node_evict=on_evict,
                    eviction_policy=policy,
                )
            else:
                self.states = None
                self.cache = RadixCache(
                    page_size=page_size,
                    token_to_kv_pool_allocator=self.alloc,
                    on_node_evict=on_evict,
                    eviction_policy=policy,
                )
        self.handles: dict[str, Any] = {}
        self.ctx: dict[str, Any] = {}

    # -- helpers
    def toks(self, *xs: int) -> list[int]:
        """Each listed token stands for a page of page_size tokens."""
        out: list[int] = []
        for x in xs:
            out += [x] if self.ps == 1 else [x * 10 + j for j in range(self.ps)]
        return out

    def state(self) -> dict[str, Any]:
        if not self.mamba:
            return {}
        return {"mamba_value": int(self.states.alloc(1)[0])}

    def insert(self, key: RadixKey, value: Any, **kw: Any) -> Any:
        if self.mamba and "mamba_value" not in kw:
            kw.update(self.state())
        return self.cache.insert(key, value, **kw)

    # -- the history
    def history(self) -> None:
        c, a, t = self.cache, self.alloc, self.toks
        # E first (the first to go under every policy): locked then unlocked (own_lock back
        # to 0), then evicted -> a stale handle
        E = RadixKey(t(60, 61))
        vE = a.alloc(len(E))
        self.handles["E_end"] = self.insert(E, vE).last_node
        tok = c.inc_lock_ref(self.handles["E_end"])
        c.dec_lock_ref(self.handles["E_end"], tok)
        A = RadixKey(t(1, 2, 3, 4, 5, 6, 7, 8))
        vA = a.alloc(len(A))
        if self.swa:
            a.free_swa(vA[: 2 * self.ps])
            r = c.insert(A, vA, swa_evicted_seqlen=2 * self.ps)
        else:
            r = self.insert(A, vA)
        self.handles["A_end"] = r.last_node
        self.ctx["vA"] = vA
        # B diverges inside A's node (a split)
        B = RadixKey(t(1, 2, 3, 4, 30, 31, 32))
        mB = c.match_prefix(B)
        vB = a.alloc(len(B) - mB.prefix_len, prefix=mB.indices)
        r = self.insert(B, vB)
        if not self.swa:
            dup = vB[mB.prefix_len : r.prefix_len]
            if len(dup):
                a.free(dup)
        self.handles["B_end"] = r.last_node
        # C in its own branch, and the same tokens in a namespace
        C = RadixKey(t(40, 41, 42, 43))
        vC = a.alloc(len(C))
        self.handles["C_end"] = self.insert(C, vC, priority=2).last_node
        Cn = RadixKey(t(40, 41, 42, 43), "ns1")
        vCn = a.alloc(len(Cn))
        self.handles["Cn_end"] = self.insert(Cn, vCn).last_node
        # a match that splits inside A (no split for Mamba)
        m = c.match_prefix(RadixKey(t(1, 2, 3, 4, 5, 6, 99)))
        self.handles["A6"] = m.last_node
        # D: locked by a running request (ancestor of the lock holds descendants' locks)
        D = RadixKey(t(50, 51, 52, 53, 54, 55))
        vD = a.alloc(len(D))
        self.handles["D_end"] = self.insert(D, vD, priority=-1).last_node
        mD = c.match_prefix(RadixKey(t(50, 51, 52, 53, 54, 55, 56)))
        self.handles["D_locked"] = mD.last_node
        self.ctx["D_token"] = c.inc_lock_ref(mD.last_node)
        # the ancestor [50..53] (split off by an insert of that prefix, which in Mamba also
        # gives it a state) holds only its descendant's lock
        r = self.insert(RadixKey(t(50, 51, 52, 53)), mD.indices[: 4 * self.ps].copy())
        assert r.prefix_len == 4 * self.ps
        self.handles["D_anc"] = r.last_node
        assert r.last_node.lock_ref == 1
        # A's end: locked and unlocked again
        tok = c.inc_lock_ref(self.handles["A_end"])
        c.dec_lock_ref(self.handles["A_end"], tok)
        # hashes cached on a few nodes (kept valid across splits)
        for name in ("A_end", "B_end", "C_end", "D_end"):
            c.compute_node_hash(self.handles[name])
        # recency: touch C, then evict the LRU leaf (E or another) one token's worth
        c.match_prefix(C)
        c.match_prefix(RadixKey(t(1, 2, 3, 4, 5, 6, 7, 8)))
        c.evict(1)
        assert self.handles["E_end"].evicted
        assert not any(
            self.handles[k].evicted for k in ("A_end", "B_end", "C_end", "Cn_end", "D_end")
        )
        # a held caller slot (the 'running request's' own fresh slots)
        self.ctx["held"] = a.alloc(2 * self.ps)
        if self.mamba:
            self.ctx["held_state"] = int(self.states.alloc(1)[0])
        self.cache._check_invariants()

    # -- the snapshot
    def snapshot(self) -> dict[str, Any]:
        c, a = self.cache, self.alloc
        rows = []
        for n in sorted(c._nodes(), key=lambda n: n.id):
            row: list[Any] = [
                n.id,
                n.parent.id,
                [int(x) for x in n.key.token_ids],
                n.key.extra_key,
                np.asarray(n.value).tolist(),
                n.lock_ref,
                n.last_access_time,
                n.hit_count,
                n.swa_tombstone,
                n.swa_lock_ref,
                c.compute_node_hash(n),
                sorted(ch.id for ch in c.children(n)),
            ]
            if self.mamba:
                mv = n.mamba_value
                row += [None if mv is None else mv.tolist(), n.mamba_lock_ref, n.full_lock_ref]
            rows.append(tuple(row))
        sizes = [
            c.evictable_size(),
            c.protected_size(),
            c.total_size(),
            c.swa_evictable_size(),
            c.swa_protected_size(),
        ]
        if self.mamba:
            sizes += [c.mamba_evictable_size(), c.mamba_protected_size()]
        every = np.arange(a.size + 2 * a.page_size)
        books: list[Any] = [a.is_allocated(every).tolist(), a.is_cached(every).tolist()]
        if self.swa:
            books += [
                a.full_to_swa_index_mapping.tolist(),
                a.full_available_size(),
                a.swa_available_size(),
            ]
        else:
            books.append(a.available_size())
        if self.states is not None:
            e2 = np.arange(self.states.size + 2)
            books += [
                self.states.is_allocated(e2).tolist(),
                self.states.is_cached(e2).tolist(),
                self.states.available_size(),
            ]
        handles = {k: h.evicted for k, h in self.handles.items()}
        st = c._storage_state()
        return {
            "nodes": rows,
            "sizes": sizes,
            "books": books,
            "handles": handles,
            "evicted_log": list(self.evicted),
            "live": st["live"],
        }

    # -- the continuation
    def continuation(self) -> list[Any]:
        """The same later operations on both twins; every result recorded."""
        c, a, t = self.cache, self.alloc, self.toks
        out: list[Any] = []
        m = c.match_prefix(RadixKey(t(1, 2, 3, 4, 5)))
        out.append(("match", m.prefix_len, m.last_node.id, m.indices.tolist()))
        F = RadixKey(t(70, 71, 72))
        vF = a.alloc(len(F))
        r = self.insert(F, vF)
        out.append(("insert", r.prefix_len, r.last_node.id, r.last_node.last_access_time))
        out.append(("snap", self.snapshot()))
        if self.swa:
            for _ in range(40):
                er = c.evict(0, swa_num_tokens=1)
                out.append(("swa-evict", er.full_evicted, er.swa_evicted, self.snapshot()["nodes"]))
                if er.swa_evicted == 0 and er.full_evicted == 0:
                    break
        if self.mamba:
            for _ in range(20):
                er = c.evict(0, mamba_num=1)
                out.append(("mamba-evict", er.full_evicted, er.mamba_evicted, list(self.evicted)))
                if er.mamba_evicted == 0:
                    break
        for _ in range(60):
            er = c.evict(1)
            out.append(("evict", er.full_evicted, list(self.evicted)))
            if er.full_evicted == 0:
                break
        out.append(("snap", self.snapshot()))
        n = a.available_size()
        out.append(("alloc-all", n, a.alloc(n).tolist() if n else []))
        if self.states is not None:
            k = self.states.available_size()
            out.append(("states-all", k, self.states.alloc(k).tolist() if k else []))
        return out


POLICIES = ["lru", "lfu", "fifo", "priority", "slru"]


def _twins(kind: str, ps: int, policy: str = "lru") -> tuple[Stack, Stack]:
    hit, twin = Stack(kind, ps, policy), Stack(kind, ps, policy)
    hit.history()
    twin.history()
    assert hit.snapshot() == twin.snapshot()
    return hit, twin


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = []
    for k in a:
        if a[k] != b[k]:
            if k == "nodes":
                ra = {r[0]: r for r in a[k]}
                rb = {r[0]: r for r in b[k]}
                for i in sorted(set(ra) | set(rb)):
                    if ra.get(i) != rb.get(i):
                        lines.append(f"node {i}: refused-side {ra.get(i)} != twin {rb.get(i)}")
            else:
                lines.append(f"{k}: refused-side {a[k]!r:.300} != twin {b[k]!r:.300}")
    return "\n".join(lines)


def check_refused(
    hit: Stack,
    twin: Stack,
    make_call: Callable[[Stack], Callable[[], object]],
    expected: type[BaseException] | tuple[type[BaseException], ...],
) -> None:
    call = make_call(hit)
    make_call(twin)  # allocates what the call needs on the twin too
    before = hit.snapshot()
    assert before == twin.snapshot()
    with pytest.raises(expected):
        call()
    after = hit.snapshot()
    assert after == before, "the refused call changed the state:\n" + _diff(after, before)
    hit.cache._check_invariants()
    hit.alloc._check_invariants()
    ca, cb = hit.continuation(), twin.continuation()
    assert len(ca) == len(cb)
    for i, (x, y) in enumerate(zip(ca, cb, strict=True)):
        if x != y:
            if x[0] == "snap":
                pytest.fail(f"continuation step {i} differs:\n" + _diff(x[1], y[1]))
            pytest.fail(
                f"continuation step {i} differs: refused-side {x!r:.600} != twin {y!r:.600}"
            )


# --------------------------------------------------------------------------- the refusals


class _BadHash:
    def __hash__(self) -> int:
        raise RuntimeError("hash refused (test)")


class _BadEq:
    """Hash equal to 'ns1''s, __eq__ raises: the namespace lookup compares it."""

    def __hash__(self) -> int:
        return hash("ns1")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq refused (test)")


class _Reenter:
    """An extra_key whose __hash__ calls back into the cache (evict everything)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.caught: list[BaseException] = []

    def __hash__(self) -> int:
        try:
            self.cache.evict(10**6)
        except ReentrantCallError as exc:
            self.caught.append(exc)
            raise
        return 7


def _key_refusals(s: Stack) -> dict[str, tuple[Callable[[], Any], Any]]:
    """Bad keys, as (key maker, expected error)."""
    t = s.toks
    return {
        "not a RadixKey": (lambda: t(1, 2, 3), TypeError),
        "negative token": (lambda: RadixKey([*t(1, 2), -1]), InvalidKeyError),
        "token 2**32": (lambda: RadixKey([*t(1, 2), 2**32]), InvalidKeyError),
        "bool token": (lambda: RadixKey([*t(1, 2), True]), (InvalidKeyError, TypeError)),
        "float array": (lambda: RadixKey(np.array(t(1, 2), dtype=float)), InvalidKeyError),
        "2-D array": (lambda: RadixKey(np.array([t(1, 2)], dtype=np.int64)), InvalidKeyError),
        "negative int32 array": (
            lambda: RadixKey(np.array([*t(1, 2), -5], dtype=np.int32)),
            InvalidKeyError,
        ),
        "int64 array past 2**32": (
            lambda: RadixKey(np.array([*t(1, 2), 2**33], dtype=np.int64)),
            InvalidKeyError,
        ),
        "tuple then int": (lambda: RadixKey([(1, 2), 3]), InvalidKeyError),
        "int then tuple": (lambda: RadixKey([*t(1, 2), (1, 2)]), InvalidKeyError),
        "ragged tuples": (lambda: RadixKey([(1, 2), (3,)]), InvalidKeyError),
        "empty tuple": (lambda: RadixKey([()]), InvalidKeyError),
        "float token": (lambda: RadixKey([*t(1, 2), 1.5]), (InvalidKeyError, TypeError)),
        "unhashable extra_key": (lambda: RadixKey(t(1, 2, 3, 4), ["list"]), TypeError),
        "extra_key hash raises": (lambda: RadixKey(t(1, 2, 3, 4), _BadHash()), RuntimeError),
        "extra_key eq raises": (lambda: RadixKey(t(40, 41, 42, 43), _BadEq()), RuntimeError),
        "extra_key re-enters": (
            lambda: RadixKey(t(1, 2, 3, 4), _Reenter(s.cache)),
            ReentrantCallError,
        ),
    }


KEY_CASES = list(_key_refusals(Stack("plain")).keys())


@pytest.mark.parametrize("case", KEY_CASES)
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_refused_match(kind: str, ps: int, case: str, policy: str) -> None:
    hit, twin = _twins(kind, ps, policy)

    def make(s: Stack) -> Callable[[], object]:
        key_of, _ = _key_refusals(s)[case]
        return lambda: s.cache.match_prefix(key_of())

    check_refused(hit, twin, make, _key_refusals(hit)[case][1])


@pytest.mark.parametrize("case", KEY_CASES)
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_refused_insert_bad_key(kind: str, ps: int, case: str, policy: str) -> None:
    hit, twin = _twins(kind, ps, policy)

    def make(s: Stack) -> Callable[[], object]:
        key_of, _ = _key_refusals(s)[case]
        n = len(s.toks(1, 2, 3, 4))
        value = s.alloc.alloc(n)
        kw = s.state()

        def call() -> object:
            k = key_of()
            v = value
            if isinstance(k, RadixKey) and len(k) != n:
                v = np.concatenate([value, s.alloc.alloc(0)])[: len(k)]
                if len(v) < len(k):
                    v = np.pad(v, (0, len(k) - len(v)), constant_values=int(value[-1]))
            return s.cache.insert(k, v, **kw)

        return call

    check_refused(hit, twin, make, _key_refusals(hit)[case][1])


def _value_refusals(s: Stack) -> dict[str, tuple[Callable[[], tuple[Any, Any, dict]], Any]]:
    """(key, value, kwargs) makers for refused inserts, with the expected error. The key
    shares A's first two pages and diverges inside A's node (a split if it went through)."""
    t = s.toks
    key = RadixKey(t(1, 2, 80, 81))
    vA = s.ctx["vA"]
    n = len(key)
    P = s.ps
    booked = not s.kind.endswith("-py")

    def fresh(k: int) -> np.ndarray:
        return s.alloc.alloc(k)

    cases: dict[str, tuple[Callable[[], tuple[Any, Any, dict]], Any]] = {
        "value too short": (lambda: (key, fresh(n)[:-1], {}), InvalidValueError),
        "value too long": (
            lambda: (key, np.concatenate([fresh(n), fresh(P)]), {}),
            InvalidValueError,
        ),
        "value 2-D": (lambda: (key, fresh(n).reshape(1, -1), {}), InvalidValueError),
        "value float": (lambda: (key, fresh(n).astype(float), {}), InvalidValueError),
        "value negative": (
            lambda: (key, np.array([*vA[: 2 * P], *([-1] * (n - 2 * P))], np.int32), {}),
            InvalidValueError,
        ),
        "value int64 past 2**31": (
            lambda: (key, np.array([*vA[: 2 * P], *([2**31] * (n - 2 * P))], np.int64), {}),
            InvalidValueError,
        ),
        "value list with a float": (
            lambda: (key, [*vA[: 2 * P].tolist(), *fresh(n - 2 * P).tolist()[:-1], 1.5], {}),
            (InvalidValueError, TypeError),
        ),
        "value None with tuple tokens": (
            lambda: (RadixKey([(1, 2)] * P), None, {}),
            InvalidValueError,
        ),
        "value None with token past 2**31": (
            lambda: (RadixKey([2**31 + 5] * P), None, {}),
            InvalidValueError,
        ),
        "priority float": (
            lambda: (key, np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]), {"priority": 1.0}),
            TypeError,
        ),
        "priority 2**63": (
            lambda: (key, np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]), {"priority": 2**63}),
            InvalidValueError,
        ),
        "priority bool": (
            lambda: (key, np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]), {"priority": True}),
            TypeError,
        ),
        "unknown kwarg": (
            lambda: (key, np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]), {"bogus": 1}),
            TypeError,
        ),
    }
    if booked:
        cases.update(
            {
                "value: a slot the tree owns past the prefix": (
                    lambda: (key, np.concatenate([vA[: 2 * P], fresh(P), vA[6 * P : 7 * P]]), {}),
                    InvalidValueError,
                ),
                "value: a free slot": (
                    lambda: (key, np.concatenate([vA[: 2 * P], fresh(P), _a_free_page(s)]), {}),
                    InvalidValueError,
                ),
                "value: padding slot 0": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(P), np.arange(P, dtype=np.int32)]),
                        {},
                    ),
                    InvalidValueError,
                ),
                "value: out of the pool": (
                    lambda: (
                        key,
                        np.concatenate(
                            [vA[: 2 * P], fresh(P), np.arange(5000, 5000 + P, dtype=np.int32)]
                        ),
                        {},
                    ),
                    InvalidValueError,
                ),
                "value: a page listed twice": (
                    lambda: (lambda f: (key, np.concatenate([vA[: 2 * P], f, f]), {}))(fresh(P)),
                    InvalidValueError,
                ),
                "value: another request's held slot listed twice via new ns": (
                    lambda: (
                        lambda f: (RadixKey(t(1, 2), "brand-new"), np.concatenate([f, f]), {})
                    )(fresh(P)),
                    InvalidValueError,
                ),
                "value: a tree slot in a new namespace": (
                    lambda: (RadixKey(t(1, 2), "brand-new"), vA[: 2 * P].copy(), {}),
                    InvalidValueError,
                ),
            }
        )
        if P > 1:
            cases["value: a page out of order"] = (
                lambda: (lambda f: (key, np.concatenate([vA[: 2 * P], f[::-1], fresh(P)]), {}))(
                    fresh(P)
                ),
                InvalidValueError,
            )
            cases["value: a page split over two runs"] = (
                lambda: (key, np.concatenate([vA[: 2 * P], np.roll(fresh(2 * P), 1)]), {}),
                InvalidValueError,
            )
    if s.swa:
        cases.update(
            {
                "swa: prev_prefix_len not a page multiple": (
                    lambda: (
                        (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                            {"prev_prefix_len": 1},
                        )
                        if P > 1
                        else (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                            {"prev_prefix_len": -1},
                        )
                    ),
                    (InvalidValueError, TypeError),
                ),
                "swa: prev_prefix_len past the key": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"prev_prefix_len": n + P},
                    ),
                    InvalidValueError,
                ),
                "swa: prev_prefix_len past the cached prefix": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"prev_prefix_len": 3 * P},
                    ),
                    InvalidValueError,
                ),
                "swa: prev_prefix_len in a new namespace": (
                    lambda: (RadixKey(t(1, 2, 80, 81), "other"), fresh(n), {"prev_prefix_len": P}),
                    InvalidValueError,
                ),
                "swa: swa_evicted_seqlen negative": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"swa_evicted_seqlen": -1},
                    ),
                    InvalidValueError,
                ),
                "swa: swa_evicted_seqlen float": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"swa_evicted_seqlen": 1.0},
                    ),
                    TypeError,
                ),
                "swa: prev_prefix_len bool": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"prev_prefix_len": True},
                    ),
                    TypeError,
                ),
            }
        )
    if s.swa and not s.kind.endswith("-py"):
        K = RadixKey(t(1, 2, 3, 4, 5, 6, 80))

        def swa_val(bad: np.ndarray, at: int) -> np.ndarray:
            v = np.concatenate([vA[: 2 * P], fresh(5 * P)])
            v[at * P : (at + 1) * P] = bad
            return v

        cases.update(
            {
                "swa: a duplicate that is free": (
                    lambda: (K, swa_val(_a_free_page(s), 3), {"prev_prefix_len": 2 * P}),
                    (InvalidFreeError, InvalidValueError),
                ),
                "swa: a duplicate that is another node's slot": (
                    lambda: (K, swa_val(vA[7 * P : 8 * P], 3), {"prev_prefix_len": 2 * P}),
                    (InvalidFreeError, InvalidValueError),
                ),
                "swa: a new-leaf slot that is free": (
                    lambda: (K, swa_val(_a_free_page(s), 6), {"prev_prefix_len": 2 * P}),
                    (InvalidFreeError, InvalidValueError),
                ),
                "swa: reviving the tombstone with a free slot": (
                    lambda: (K, np.concatenate([_a_free_page(s), fresh(6 * P)]), {}),
                    (InvalidFreeError, InvalidValueError),
                ),
                "swa: reviving the tombstone with a slot of its own node": (
                    lambda: (K, np.concatenate([vA[P : 2 * P], fresh(6 * P)]), {}),
                    (InvalidFreeError, InvalidValueError),
                ),
                "swa: a tombstone below es, duplicate is the tree's": (
                    lambda: (
                        K,
                        np.concatenate([vA[4 * P : 5 * P], fresh(6 * P)]),
                        {"swa_evicted_seqlen": 2 * P},
                    ),
                    (InvalidFreeError, InvalidValueError),
                ),
            }
        )
        if P == 1:
            cases["swa: a duplicate listed twice"] = (
                lambda: (
                    lambda f: (K, np.concatenate([vA[:2], f, f, fresh(3)]), {"prev_prefix_len": 2})
                )(fresh(1)),
                (InvalidFreeError, InvalidValueError),
            )
    if s.swa and s.kind.endswith("-py"):
        cases.update(
            {
                "swa-py: the free of the duplicates raises": (
                    lambda: (
                        RadixKey(t(1, 2, 3, 4, 5, 6, 80)),
                        np.concatenate([vA[: 2 * P], fresh(5 * P)]),
                        {"prev_prefix_len": 2 * P, "_fail": True},
                    ),
                    RuntimeError,
                ),
                "swa-py: the free of a suffix below the window raises": (
                    lambda: (
                        RadixKey(t(1, 2, 3, 4, 5, 6, 7, 8, 85)),
                        np.concatenate([vA, fresh(P)]),
                        {"prev_prefix_len": 8 * P, "swa_evicted_seqlen": 9 * P, "_fail": True},
                    ),
                    RuntimeError,
                ),
                "swa-py: new namespace below the window, free raises": (
                    lambda: (
                        RadixKey(t(1, 2, 3), "fresh-ns"),
                        fresh(3 * P),
                        {"swa_evicted_seqlen": 3 * P, "_fail": True},
                    ),
                    RuntimeError,
                ),
            }
        )
    if s.mamba:
        cases.update(
            {
                "mamba: state bool": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"mamba_value": True},
                    ),
                    TypeError,
                ),
                "mamba: state negative": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"mamba_value": -1},
                    ),
                    InvalidValueError,
                ),
                "mamba: state two slots": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"mamba_value": np.array([1, 2])},
                    ),
                    InvalidValueError,
                ),
                "mamba: state float array": (
                    lambda: (
                        key,
                        np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                        {"mamba_value": np.array([1.0])},
                    ),
                    InvalidValueError,
                ),
                "mamba: state on an empty key": (
                    lambda: (
                        RadixKey([]),
                        np.zeros(0, np.int32),
                        {"mamba_value": s.state()["mamba_value"]},
                    ),
                    InvalidValueError,
                ),
            }
        )
        if P > 1:
            cases["mamba: state on a partial page"] = (
                lambda: (
                    RadixKey([*t(1, 2), 5]),
                    np.concatenate([vA[: 2 * P], fresh(P)[:1]]),
                    {"mamba_value": s.state()["mamba_value"]},
                ),
                InvalidValueError,
            )
        if not s.kind.endswith("-py"):
            cases.update(
                {
                    "mamba: state free in the pool": (
                        lambda: (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                            {"mamba_value": 15},
                        ),
                        InvalidValueError,
                    ),
                    "mamba: another node's state": (
                        lambda: (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                            {"mamba_value": int(s.handles["C_end"].mamba_value[0])},
                        ),
                        InvalidValueError,
                    ),
                    "mamba: state out of the pool": (
                        lambda: (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(n - 2 * P)]),
                            {"mamba_value": 999},
                        ),
                        InvalidValueError,
                    ),
                    "mamba: good state, KV slot the tree owns": (
                        lambda: (
                            key,
                            np.concatenate([vA[: 2 * P], fresh(P), vA[6 * P : 7 * P]]),
                            {"mamba_value": s.state()["mamba_value"]},
                        ),
                        InvalidValueError,
                    ),
                }
            )
    return cases


def _a_free_page(s: Stack) -> np.ndarray:
    """The slots of a page that is free in the allocator (taken and given back)."""
    f = s.alloc.alloc(s.ps)
    s.alloc.free(f)
    return f


def _case_names(refusals: Callable[[Stack], dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(kind, page size, case) for every case `refusals` lists on each kind's history."""
    out = []
    for kind, ps in KINDS:
        s = Stack(kind, ps)
        s.history()
        for name in refusals(s):
            out.append((kind, ps, name))
    return out


@pytest.mark.parametrize("kind,ps,case", _case_names(_value_refusals))
@pytest.mark.parametrize("policy", POLICIES)
def test_refused_insert_bad_value(kind: str, ps: int, case: str, policy: str) -> None:
    hit, twin = _twins(kind, ps, policy)

    def make(s: Stack) -> Callable[[], object]:
        maker, _ = _value_refusals(s)[case]
        key, value, kw = maker()
        if s.mamba and "mamba_value" not in kw and len(key) and len(key) % s.ps == 0:
            kw = {**kw, **s.state()}
        fail = kw.pop("_fail", False)

        def call() -> object:
            if not fail:
                return s.cache.insert(key, value, **kw)
            s.alloc.fail = True
            try:
                return s.cache.insert(key, value, **kw)
            finally:
                s.alloc.fail = False

        return call

    check_refused(hit, twin, make, _value_refusals(hit)[case][1])


# -- evict -----------------------------------------------------------------------------


EVICT_CASES: dict[str, tuple[Callable[[Stack], Callable[[], object]], Any]] = {
    "num_tokens float": (lambda s: lambda: s.cache.evict(1.0), TypeError),
    "num_tokens bool": (lambda s: lambda: s.cache.evict(True), TypeError),
    "num_tokens str": (lambda s: lambda: s.cache.evict("3"), TypeError),
    "num_tokens None": (lambda s: lambda: s.cache.evict(None), TypeError),
    "swa_num_tokens float": (lambda s: lambda: s.cache.evict(1, 1.5), TypeError),
    "unknown kwarg": (lambda s: lambda: s.cache.evict(1, bogus=1), TypeError),
}


@pytest.mark.parametrize("case", list(EVICT_CASES))
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_refused_evict(kind: str, ps: int, case: str, policy: str) -> None:
    hit, twin = _twins(kind, ps, policy)
    make, exp = EVICT_CASES[case]
    check_refused(hit, twin, make, exp)


@pytest.mark.parametrize("kind,ps", [k for k in KINDS if k[0].startswith("mamba")])
def test_refused_mamba_evict_count_twice(kind: str, ps: int) -> None:
    hit, twin = _twins(kind, ps)
    check_refused(hit, twin, lambda s: lambda: s.cache.evict(5, 1, mamba_num=1), TypeError)
    hit, twin = _twins(kind, ps)
    check_refused(hit, twin, lambda s: lambda: s.cache.evict(5, mamba_num=1.0), TypeError)


# -- locks -----------------------------------------------------------------------------


def _lock_refusals(s: Stack) -> dict[str, tuple[Callable[[], object], Any]]:
    c, h = s.cache, s.handles
    other = Stack(s.kind, s.ps)
    other.history()
    cases: dict[str, tuple[Callable[[], object], Any]] = {
        "inc: stale handle": (lambda: c.inc_lock_ref(h["E_end"]), StaleNodeError),
        "inc: another cache's handle": (
            lambda: c.inc_lock_ref(other.handles["C_end"]),
            StaleNodeError,
        ),
        "inc: not a node": (lambda: c.inc_lock_ref(3), TypeError),
        "inc: None": (lambda: c.inc_lock_ref(None), TypeError),
        "dec: stale handle": (lambda: c.dec_lock_ref(h["E_end"]), StaleNodeError),
        "dec: another cache's handle": (
            lambda: c.dec_lock_ref(other.handles["D_locked"]),
            StaleNodeError,
        ),
        "dec: unlocked node": (lambda: c.dec_lock_ref(h["C_end"]), LockStateError),
        "dec: unlocked node that was locked before": (
            lambda: c.dec_lock_ref(h["A_end"]),
            LockStateError,
        ),
        "dec: ancestor holding only a descendant's lock": (
            lambda: c.dec_lock_ref(h["D_anc"], s.ctx["D_token"]),
            LockStateError,
        ),
        "dec: not a node": (lambda: c.dec_lock_ref("x"), TypeError),
        "dec: unknown kwarg": (lambda: c.dec_lock_ref(h["D_locked"], bogus=1), TypeError),
        "hash: stale handle": (lambda: c.compute_node_hash(h["E_end"]), StaleNodeError),
        "hash: another cache's handle": (
            lambda: c.compute_node_hash(other.handles["A_end"]),
            StaleNodeError,
        ),
        "hash: not a node": (lambda: c.compute_node_hash(1), TypeError),
        "children: stale handle": (lambda: c.children(h["E_end"]), StaleNodeError),
        "inc: a blank handle": (
            lambda: c.inc_lock_ref(type(c.root_node).__new__(type(c.root_node))),
            StaleNodeError,
        ),
        "dec: a blank handle": (
            lambda: c.dec_lock_ref(type(c.root_node).__new__(type(c.root_node))),
            StaleNodeError,
        ),
        "init again": (lambda: c.__init__(), AlreadyInitializedError),
        "init again with args": (
            lambda: c.__init__(page_size=s.ps, token_to_kv_pool_allocator=s.alloc),
            (AlreadyInitializedError, TypeError),
        ),
    }
    if s.mamba:
        cases.update(
            {
                "mamba dec: token True without a state lock": (
                    lambda: c.dec_lock_ref(_locked_without_state(s), True),
                    LockStateError,
                ),
                "mamba dec: token not a bool": (
                    lambda: c.dec_lock_ref(h["D_locked"], 1),
                    TypeError,
                ),
                "mamba dec: token False when every lock holds the state": (
                    lambda: c.dec_lock_ref(h["D_locked"], False),
                    LockStateError,
                ),
                "mamba dec: root with token True": (
                    lambda: c.dec_lock_ref(c.root_node, True),
                    LockStateError,
                ),
            }
        )
    if s.swa:
        cases.update(
            {
                "swa dec: wrong boundary": (
                    lambda: c.dec_lock_ref(h["D_locked"], (s.ctx["D_token"] or 0) + s.ps),
                    LockStateError,
                ),
                "swa dec: negative boundary": (
                    lambda: c.dec_lock_ref(h["D_locked"], -1),
                    InvalidValueError,
                ),
                "swa dec: float boundary": (lambda: c.dec_lock_ref(h["D_locked"], 1.0), TypeError),
                "swa dec: root with a boundary": (
                    lambda: c.dec_lock_ref(c.root_node, s.ps),
                    LockStateError,
                ),
                "swa dec: boundary of another node's lock": (
                    lambda: c.dec_lock_ref(h["D_anc"], s.ctx["D_token"]),
                    LockStateError,
                ),
            }
        )
    return cases


def _locked_without_state(s: Stack) -> Any:
    """The D branch's deepest node is locked with its state (True token); lock A6, which
    in Mamba is A's end node or an ancestor holding no state... use D_anc's KV lock."""
    return s.ctx.setdefault("nostate", s.handles["D_locked"])


@pytest.mark.parametrize("kind,ps,case", _case_names(_lock_refusals))
@pytest.mark.parametrize("policy", POLICIES)
def test_refused_lock_and_handle_calls(kind: str, ps: int, case: str, policy: str) -> None:
    hit, twin = _twins(kind, ps, policy)
    if kind.startswith("mamba") and case == "mamba dec: token True without a state lock":
        # a node locked by a lock that took no state: lock a stateless inner node
        for s in (hit, twin):
            m = s.cache.match_prefix(RadixKey(s.toks(40, 41, 42, 43)))
            node = m.last_node
            # C_end holds a state: lock, and find a node without one (D's inner part)
            inner = [n for n in s.cache._nodes() if n.mamba_value is None]
            if inner:
                s.ctx["nostate"] = inner[0]
                tok = s.cache.inc_lock_ref(inner[0])
                assert tok is False
            else:
                pytest.skip("no stateless node")
            del node
    exp = _lock_refusals(hit)[case][1]
    check_refused(hit, twin, lambda s: _lock_refusals(s)[case][0], exp)


# -- a key array resized by Python code the call runs ------------------------------------


class _Resizer:
    """An extra_key whose __hash__ shrinks the key's int32 array (read in place)."""

    def __init__(self) -> None:
        self.arr: Any = None

    def __hash__(self) -> int:
        if self.arr is not None:
            self.arr.resize(1, refcheck=False)
        return 11

    def __eq__(self, other: object) -> bool:
        return self is other


@pytest.mark.parametrize("call", ["match", "insert"])
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
def test_refused_key_resized_by_extra_key(kind: str, ps: int, call: str) -> None:
    hit, twin = _twins(kind, ps)

    def make(s: Stack) -> Callable[[], object]:
        ek = _Resizer()
        toks = s.toks(1, 2, 3, 4, 5)
        value = s.alloc.alloc(len(toks))
        kw = s.state()

        def go() -> object:
            arr = np.array(toks, dtype=np.int32)
            ek.arr = arr
            key = RadixKey(arr, ek)
            if call == "match":
                return s.cache.match_prefix(key)
            return s.cache.insert(key, value, **kw)

        return go

    check_refused(hit, twin, make, InvalidKeyError)


# -- re-entrant calls from callbacks (refused inside; the outer call goes on) ---------------

REENTRY = {
    "insert": lambda s: s.cache.insert(RadixKey(s.toks(88)), s.ctx["held"][: s.ps]),
    "match": lambda s: s.cache.match_prefix(RadixKey(s.toks(1, 2, 3))),
    "evict": lambda s: s.cache.evict(100),
    "inc_lock_ref": lambda s: s.cache.inc_lock_ref(s.handles["C_end"]),
    "dec_lock_ref": lambda s: s.cache.dec_lock_ref(s.handles["D_locked"], s.ctx["D_token"]),
    "reset": lambda s: s.cache.reset(),
    "compute_node_hash": lambda s: s.cache.compute_node_hash(s.handles["C_end"]),
}


@pytest.mark.parametrize("what", list(REENTRY))
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
def test_reentry_from_on_node_evict_is_refused_and_changes_nothing(
    kind: str, ps: int, what: str
) -> None:
    """The callback's call into its own cache raises ReentrantCallError (caught by the
    callback): the evict and everything after it is as on a twin whose callback does not
    call back."""
    hit, twin = _twins(kind, ps)
    caught: list[BaseException] = []

    def hook(uid: int) -> None:
        try:
            REENTRY[what](hit)
        except ReentrantCallError as exc:
            caught.append(exc)

    hit.callback_hook = hook
    r1 = hit.cache.evict(3 * ps)
    r2 = twin.cache.evict(3 * ps)
    hit.callback_hook = None
    assert caught, "the callback never ran"
    assert hit.evicted == twin.evicted
    assert (r1.full_evicted, r1.swa_evicted, r1.mamba_evicted) == (
        r2.full_evicted,
        r2.swa_evicted,
        r2.mamba_evicted,
    )
    a, b = hit.snapshot(), twin.snapshot()
    assert a == b, _diff(a, b)
    ca, cb = hit.continuation(), twin.continuation()
    assert ca == cb


@pytest.mark.parametrize("what", list(REENTRY))
@pytest.mark.parametrize(
    "kind,ps", [k for k in KINDS if k[0].endswith("-py")], ids=lambda x: str(x)
)
def test_reentry_from_allocator_free_is_refused_and_changes_nothing(
    kind: str, ps: int, what: str
) -> None:
    hit, twin = _twins(kind, ps)
    caught: list[BaseException] = []
    orig = type(hit.alloc).free

    def free(self: Any, indices: Any) -> None:
        try:
            REENTRY[what](hit)
        except ReentrantCallError as exc:
            caught.append(exc)
        orig(self, indices)

    type(hit.alloc).free = free  # type: ignore[method-assign]
    try:
        r1 = hit.cache.evict(3 * ps)
    finally:
        type(hit.alloc).free = orig  # type: ignore[method-assign]
    r2 = twin.cache.evict(3 * ps)
    assert caught, "free never ran"
    assert (r1.full_evicted, r1.swa_evicted, r1.mamba_evicted) == (
        r2.full_evicted,
        r2.swa_evicted,
        r2.mamba_evicted,
    )
    a, b = hit.snapshot(), twin.snapshot()
    assert a == b, _diff(a, b)
    assert hit.continuation() == twin.continuation()


# -- callbacks and frees that raise (documented: the evict/reset finishes, then raises) -----


def _tree_part(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k != "books"}


@pytest.mark.parametrize("call", ["evict", "evict-swa", "evict-mamba", "reset"])
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
def test_raising_on_node_evict_finishes_the_work(kind: str, ps: int, call: str) -> None:
    if call == "evict-swa" and not kind.startswith("swa"):
        pytest.skip("no window")
    if call == "evict-mamba" and not kind.startswith("mamba"):
        pytest.skip("no states")
    hit, twin = _twins(kind, ps)

    def boom(uid: int) -> None:
        raise RuntimeError(f"callback refused {uid}")

    def run(s: Stack) -> Any:
        if call == "evict":
            return s.cache.evict(3 * ps)
        if call == "evict-swa":
            return s.cache.evict(0, swa_num_tokens=3 * ps)
        if call == "evict-mamba":
            return s.cache.evict(0, mamba_num=2)
        return s.cache.reset()

    hit.callback_hook = boom
    try:
        run(hit)
    except RuntimeError:
        pass
    hit.callback_hook = None
    run(twin)
    a, b = hit.snapshot(), twin.snapshot()
    assert a == b, _diff(a, b)
    hit.cache._check_invariants()
    hit.alloc._check_invariants()
    assert hit.continuation() == twin.continuation()


@pytest.mark.parametrize("call", ["evict", "evict-swa", "evict-mamba", "reset"])
@pytest.mark.parametrize(
    "kind,ps", [k for k in KINDS if k[0].endswith("-py")], ids=lambda x: str(x)
)
def test_raising_python_free_finishes_the_work(kind: str, ps: int, call: str) -> None:
    """The tree side equals the twin's (whose free went through); the allocator that
    raised kept or lost the slots as it chose (not compared)."""
    if call == "evict-swa" and not kind.startswith("swa"):
        pytest.skip("no window")
    if call == "evict-mamba" and not kind.startswith("mamba"):
        pytest.skip("no states")
    hit, twin = _twins(kind, ps)

    def run(s: Stack) -> Any:
        if call == "evict":
            return s.cache.evict(3 * ps)
        if call == "evict-swa":
            return s.cache.evict(0, swa_num_tokens=3 * ps)
        if call == "evict-mamba":
            return s.cache.evict(0, mamba_num=2)
        return s.cache.reset()

    n_hit, n_twin = len(hit.evicted), len(twin.evicted)
    pool = hit.states if call == "evict-mamba" else hit.alloc
    pool.fail = True
    try:
        with pytest.raises(RuntimeError):
            run(hit)
    finally:
        pool.fail = False
    run(twin)
    a, b = hit.snapshot(), twin.snapshot()
    assert _tree_part(a) == _tree_part(b), _diff(_tree_part(a), _tree_part(b))
    assert len(hit.evicted) - n_hit == len(twin.evicted) - n_twin
    hit.cache._check_invariants()


# -- ChunkCache ------------------------------------------------------------------------


def test_chunk_cache_refusals_touch_nothing() -> None:
    a = TokenToKVPoolAllocator(32)
    held = a.alloc(5)
    c = ChunkCache(a)
    every = np.arange(40)
    before = (a.is_allocated(every).tolist(), a.available_size())
    calls = [
        (lambda: c.match_prefix([1, 2]), TypeError),
        (lambda: c.insert([1, 2], held), TypeError),
        (lambda: c.insert(RadixKey([1]), held, priority=1.5), TypeError),
        (lambda: c.insert(RadixKey([1]), held, priority=2**63), InvalidValueError),
        (lambda: c.insert(RadixKey([1]), held, bogus=1), TypeError),
        (lambda: c.evict(1.0), TypeError),
        (lambda: c.evict(1, 1, mamba_num=1), TypeError),
        (lambda: c.inc_lock_ref(object()), TypeError),
        (lambda: c.dec_lock_ref(None, bogus=1), TypeError),
    ]
    for fn, exp in calls:
        with pytest.raises(exp):
            fn()
        assert (a.is_allocated(every).tolist(), a.available_size()) == before


# -- the allocators ----------------------------------------------------------------------

ALLOCS = [
    (swa, ps, need_sort, group)
    for swa in (False, True)
    for ps in (1, 4)
    for need_sort in (False, True)
    for group in (False, True)
]


class AllocStack:
    def __init__(self, swa: bool, ps: int, need_sort: bool, group: bool) -> None:
        self.swa, self.ps = swa, ps
        if swa:
            self.a: Any = SWATokenToKVPoolAllocator(
                64 * ps, 48 * ps, page_size=ps, need_sort=need_sort
            )
            self.cache = RadixCache(
                page_size=ps, sliding_window_size=ps, token_to_kv_pool_allocator=self.a
            )
        else:
            self.a = TokenToKVPoolAllocator(64 * ps, page_size=ps, need_sort=need_sort)
            self.cache = RadixCache(page_size=ps, token_to_kv_pool_allocator=self.a)
        a, P = self.a, ps
        x1 = a.alloc(6 * P)
        x2 = a.alloc(5 * P)
        x3 = a.alloc(7 * P)
        a.free(x2[P : 3 * P])
        a.free(x1[::-1][: 2 * P][::-1] if P == 1 else x1[4 * P :])
        x4 = a.alloc(3 * P)
        # the cache takes some slots (booked: is_cached)
        self.cache.insert(RadixKey(list(range(1, 4 * P + 1))), x3[: 4 * P])
        if swa:
            a.free_swa(x4[:P])
        if group:
            a.free_group_begin()
            a.free(x3[4 * P : 5 * P])
        self.held = {
            "x1": x1[: 4 * P],
            "x2": np.concatenate([x2[:P], x2[3 * P :]]),
            "x3": x3[5 * P :] if group else x3[4 * P :],
            "x4": x4,
        }
        self.cached = x3[: 4 * P]
        self.freed = x2[P : 3 * P]
        self.group = group

    def snapshot(self) -> Any:
        a = self.a
        every = np.arange(a.size + 2 * a.page_size)
        out: list[Any] = [
            a.is_allocated(every).tolist(),
            a.is_cached(every).tolist(),
            a.available_size(),
        ]
        if self.swa:
            out += [
                a.full_available_size(),
                a.swa_available_size(),
                a.full_to_swa_index_mapping.tolist(),
                a.translate_loc_from_full_to_swa(
                    np.arange(len(a.full_to_swa_index_mapping))
                ).tolist(),
            ]
        return out

    def continuation(self) -> list[Any]:
        a = self.a
        out: list[Any] = []
        # the group closes the same way (or is refused the same way)
        try:
            a.free_group_end()
            out.append("group closed")
        except AllocatorStateError:
            out.append("no group")
        out.append(self.snapshot())
        # the free list's order: allocate in small pieces, then everything
        for _ in range(3):
            r = a.alloc(self.ps)
            out.append(None if r is None else r.tolist())
        a.merge_and_sort_free()
        n = a.available_size()
        r = a.alloc(n)
        out.append(r.tolist() if r is not None else None)
        out.append(self.snapshot())
        a._check_invariants()
        return out


def _alloc_refusals(s: AllocStack) -> dict[str, tuple[Callable[[], object], Any]]:
    a, P = s.a, s.ps
    h = s.held
    good = np.concatenate([h["x1"], h["x4"]])
    cases: dict[str, tuple[Callable[[], object], Any]] = {
        "alloc: negative": (lambda: a.alloc(-P), InvalidValueError),
        "alloc: bool": (lambda: a.alloc(True), TypeError),
        "alloc: float": (lambda: a.alloc(1.0 * P), TypeError),
        "alloc: str": (lambda: a.alloc("4"), TypeError),
        "alloc: prefix out of the pool": (
            lambda: a.alloc(P, prefix=np.array([10**6], np.int32)),
            InvalidValueError,
        ),
        "alloc: prefix padding slot": (
            lambda: a.alloc(P, prefix=np.array([0], np.int32)),
            InvalidValueError,
        ),
        "alloc: prefix negative": (lambda: a.alloc(P, prefix=[-1]), InvalidValueError),
        "alloc: prefix float": (lambda: a.alloc(P, prefix=np.array([1.0])), InvalidValueError),
        "alloc: prefix 2-D": (
            lambda: a.alloc(P, prefix=np.ones((2, 2), np.int32) * P),
            InvalidValueError,
        ),
        "alloc: prefix bool list": (lambda: a.alloc(P, prefix=[True]), InvalidValueError),
        "free: padding slot after good ones": (
            lambda: a.free(np.concatenate([good, [0]]).astype(np.int32)),
            InvalidFreeError,
        ),
        "free: out of range after good ones": (
            lambda: a.free(np.concatenate([good, [a.size + 5 * P]]).astype(np.int32)),
            InvalidFreeError,
        ),
        "free: a free slot after good ones": (
            lambda: a.free(np.concatenate([good, s.freed[:1]]).astype(np.int32)),
            InvalidFreeError,
        ),
        "free: a cached slot after good ones": (
            lambda: a.free(np.concatenate([good, s.cached[:1]]).astype(np.int32)),
            InvalidFreeError,
        ),
        # (with pages the same slot twice is one page freed once: accepted, not a refusal)
        "free: a slot listed twice": (
            lambda: (
                a.free(np.concatenate([good, good[-1:]]).astype(np.int32))
                if P == 1
                else a.free(np.concatenate([good, s.freed[:1]]).astype(np.int32))
            ),
            InvalidFreeError,
        ),
        "free: negative (int64)": (
            lambda: a.free(np.concatenate([good, [-3]]).astype(np.int64)),
            InvalidFreeError,
        ),
        "free: float array": (lambda: a.free(good.astype(float)), InvalidValueError),
        "free: bool in list": (lambda: a.free([*good.tolist(), True]), InvalidValueError),
        "free: 2-D": (lambda: a.free(good.reshape(1, -1)), InvalidValueError),
        "free: ragged": (lambda: a.free([[1], [2, 3]]), InvalidValueError),
        "free: huge int": (lambda: a.free([*good.tolist(), 2**70]), InvalidFreeError),
        "free: a long run then a bad one": (
            lambda: a.free(
                np.concatenate([h["x1"], h["x2"], h["x3"], h["x4"], s.freed[:1]]).astype(np.int32)
            ),
            InvalidFreeError,
        ),
        "clear while cached": (lambda: a.clear(), AllocatorStateError),
        "init again": (
            lambda: a.__init__(8, 8) if s.swa else a.__init__(8),
            AlreadyInitializedError,
        ),
    }
    if not s.group:
        cases["free_group_end without a group"] = (lambda: a.free_group_end(), AllocatorStateError)
    if s.swa:
        cases.update(
            {
                "free_swa: a cached slot": (
                    lambda: a.free_swa(np.concatenate([good, s.cached[:1]]).astype(np.int32)),
                    InvalidFreeError,
                ),
                "free_swa: a free slot": (
                    lambda: a.free_swa(np.concatenate([good, s.freed[:1]]).astype(np.int32)),
                    InvalidFreeError,
                ),
                "free_swa: padding": (
                    lambda: a.free_swa(np.concatenate([good, [0]]).astype(np.int32)),
                    InvalidFreeError,
                ),
                "free_swa: listed twice": (
                    lambda: (
                        a.free_swa(np.concatenate([good, good[-1:]]).astype(np.int32))
                        if P == 1
                        else a.free_swa(np.concatenate([good, [a.size + 9 * P]]).astype(np.int32))
                    ),
                    InvalidFreeError,
                ),
                "free_swa: float": (lambda: a.free_swa(good.astype(float)), InvalidValueError),
                "translate: negative": (
                    lambda: a.translate_loc_from_full_to_swa([-1]),
                    InvalidValueError,
                ),
                "translate: float": (
                    lambda: a.translate_loc_from_full_to_swa([1.5]),
                    InvalidValueError,
                ),
            }
        )
    return cases


def _alloc_case_names() -> list[tuple[Any, ...]]:
    out = []
    for cfg in ALLOCS:
        for name in _alloc_refusals(AllocStack(*cfg)):
            out.append((*cfg, name))
    return out


@pytest.mark.parametrize("swa,ps,need_sort,group,case", _alloc_case_names())
def test_refused_allocator_call(
    swa: bool, ps: int, need_sort: bool, group: bool, case: str
) -> None:
    hit, twin = AllocStack(swa, ps, need_sort, group), AllocStack(swa, ps, need_sort, group)
    before = hit.snapshot()
    assert before == twin.snapshot()
    call, exp = _alloc_refusals(hit)[case]
    with pytest.raises(exp):
        call()
    assert hit.snapshot() == before
    hit.a._check_invariants()
    assert hit.continuation() == twin.continuation()


@pytest.mark.parametrize("swa,ps,need_sort,group", ALLOCS)
def test_alloc_returning_none_changes_nothing(
    swa: bool, ps: int, need_sort: bool, group: bool
) -> None:
    hit, twin = AllocStack(swa, ps, need_sort, group), AllocStack(swa, ps, need_sort, group)
    before = hit.snapshot()
    assert hit.a.alloc(hit.a.available_size() + ps) is None
    assert hit.a.alloc(hit.a.available_size() + ps, prefix=hit.held["x1"]) is None
    if swa:
        assert hit.a.alloc(hit.a.full_available_size() + ps) is None
    assert hit.snapshot() == before
    assert hit.continuation() == twin.continuation()


# -- Python code the call runs (an __index__, a second __hash__) refuses it --------------


class _Idx:
    """A token/slot whose __index__ raises, or calls back into the cache first."""

    def __init__(self, v: int, cache: Any = None, boom: bool = False) -> None:
        self.v, self.cache, self.boom = v, cache, boom

    def __index__(self) -> int:
        if self.cache is not None:
            self.cache.evict(10**6)  # ReentrantCallError
        if self.boom:
            raise RuntimeError("__index__ refused (test)")
        return self.v


class _HashTwice:
    """An extra_key whose __hash__ works once (the look-up: not found), then raises or
    calls back into the cache (the namespace being taken)."""

    def __init__(self, cache: Any = None) -> None:
        self.calls = 0
        self.cache = cache

    def __hash__(self) -> int:
        self.calls += 1
        if self.calls >= 2:
            if self.cache is not None:
                self.cache.evict(10**6)
            raise RuntimeError("second hash refused (test)")
        return 12345

    def __eq__(self, other: object) -> bool:
        return self is other


PYCODE_CASES = [
    "key token __index__ raises",
    "key token __index__ re-enters",
    "value slot __index__ raises",
    "value slot __index__ re-enters",
    "new namespace: the second hash raises",
    "new namespace: the second hash re-enters",
    "mamba_value __index__ re-enters",
    "swa: new namespace below the window, a tree slot",
]


@pytest.mark.parametrize("case", PYCODE_CASES)
@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
def test_refused_by_python_code_the_call_runs(kind: str, ps: int, case: str) -> None:
    if case.startswith("mamba") and not kind.startswith("mamba"):
        pytest.skip("Mamba only")
    if case.startswith("swa:") and kind != "swa":
        pytest.skip("booked SWA only")
    hit, twin = _twins(kind, ps)
    exp: Any = (RuntimeError, ReentrantCallError, InvalidKeyError, InvalidValueError, TypeError)
    if case == "swa: new namespace below the window, a tree slot":
        exp = InvalidFreeError

    def make(s: Stack) -> Callable[[], object]:
        t, c = s.toks, s.cache
        toks = t(1, 2, 90, 91)
        value = s.alloc.alloc(len(toks))
        vA = s.ctx["vA"]
        value[: 2 * ps] = vA[: 2 * ps]
        kw = s.state()

        def go() -> object:
            key = RadixKey(list(toks))
            val: Any = value
            kw2 = dict(kw)
            if case.startswith("key token"):
                key = RadixKey(
                    [
                        *toks[:-1],
                        _Idx(toks[-1], c if "re-enters" in case else None, "raises" in case),
                    ]
                )
            elif case.startswith("value slot"):
                val = [
                    *value[:-1].tolist(),
                    _Idx(int(value[-1]), c if "re-enters" in case else None, "raises" in case),
                ]
            elif case.startswith("new namespace"):
                key = RadixKey(list(toks), _HashTwice(c if "re-enters" in case else None))
                val = value.copy()
                val[: 2 * ps] = s.ctx["held"][: 2 * ps]  # the caller's own slots
            elif case.startswith("mamba_value"):
                kw2["mamba_value"] = _Idx(kw["mamba_value"], c)
            elif case.startswith("swa:"):
                key = RadixKey(list(toks), "fresh-ns")
                val = value.copy()  # its first pages are the tree's: the free refuses them
                kw2["swa_evicted_seqlen"] = len(toks)
            return c.insert(key, val, **kw2)

        return go

    check_refused(hit, twin, make, exp)


@pytest.mark.parametrize("kind,ps", KINDS, ids=KIND_IDS)
def test_handles_locked_before_a_reset_are_refused_and_change_nothing(kind: str, ps: int) -> None:
    hit, twin = _twins(kind, ps)
    old = {k: h for k, h in hit.handles.items()}
    for s in (hit, twin):
        s.cache.reset()
        s.history()  # the same history again on the emptied caches (fresh node ids)
    before = hit.snapshot()
    assert before == twin.snapshot()
    for call in (
        lambda: hit.cache.dec_lock_ref(old["D_locked"], hit.ctx["D_token"]),
        lambda: hit.cache.inc_lock_ref(old["C_end"]),
        lambda: hit.cache.compute_node_hash(old["A_end"]),
    ):
        with pytest.raises(StaleNodeError):
            call()
    assert hit.snapshot() == before
    assert hit.continuation() == twin.continuation()
