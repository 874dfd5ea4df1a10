"""Replay a trace through the real :class:`~pymllm.mem_cache.RadixCache` and allocator.

Each request runs exactly as a serving engine runs it, one at a time in trace order::

    match_prefix -> inc_lock_ref -> evict (only if the pool is short) -> alloc the uncached
    part -> insert -> free the duplicates and the unaligned tail -> dec_lock_ref

Units: a key is a sequence of trace units (a Mooncake hash id, which stands for one block of
``unit_tokens`` tokens, or a plain trace's token id), and the cache stores one KV slot per
unit. So ``capacity`` (the allocator's size) and ``page_size`` (the tree's page size) count
those units: with a Mooncake trace and the default ``page_size=1`` a capacity of 1,000 is a
thousand blocks and a block is a page; ``page_size=P`` matches and stores keys in whole
pages of P units (P blocks, or P tokens), and a request's last ``len % P`` units are
allocated but never cached, as in a paged engine. A *block* in the hit rates is one page.

Slot ownership during a request: the matched prefix's slots are the tree's (locked while the
request runs); the uncached part is allocated to the request; ``insert`` hands the tree
``value[prefix_len:aligned]``; the request frees what the tree did not take (duplicates
inserted meanwhile, and the unaligned tail) before unlocking. After a replay every slot is
either free or in the tree, which :attr:`ReplayResult.leak_free` reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pymllm.mem_cache import EVICTION_POLICIES, RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.replay.traces import Trace

#: ``progress(done, total, elapsed_seconds)``, called every few thousand requests.
Progress = Callable[[int, int, float], None]

PROGRESS_EVERY = 4096


def check_policy(policy: str) -> str:
    """*policy* if it is one of :data:`EVICTION_POLICIES`, else ``ValueError`` naming it."""
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"policy: expected one of {EVICTION_POLICIES}, got {policy!r}")
    return policy


def make_cache(policy: str, page_size: int, allocator: Any) -> RadixCache:
    """A :class:`RadixCache` with *policy* that frees evicted slots into *allocator*."""
    check_policy(policy)
    return RadixCache(
        page_size=page_size, token_to_kv_pool_allocator=allocator, eviction_policy=policy
    )


def parse_capacity(text: str | int | float | None) -> int | None:
    """A capacity in trace units: a positive integer (``1000``, ``1e6``, ``64k``, ``2M``),
    or ``inf``/``None``/``math.inf`` for an unbounded cache (a string that overflows,
    ``1e400`` or ``infk``, is refused). Raises ``ValueError`` naming the value."""
    if text is None:
        return None
    if isinstance(text, str):
        s = text.strip().lower()
        if s in ("inf", "infinity", "infinite", "unbounded"):
            return None
        scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(s[-1:], 1)
        try:
            val = float(s[:-1] if scale > 1 else s) * scale
        except ValueError:
            val = math.nan
    elif isinstance(text, bool):
        val = math.nan
    else:
        try:
            val = float(text)
        except OverflowError:  # an int past float's range, refused as a string's overflow
            val = math.nan
        if math.isinf(val) and val > 0:  # math.inf itself; a string's overflow is refused
            return None
    if not math.isfinite(val) or val < 1 or val != int(val):
        raise ValueError(
            f"capacity: expected a positive whole number of units or 'inf', got {text!r:.80}"
        )
    return int(val)


@dataclass(frozen=True)
class ReplayResult:
    """What one replay (one capacity, one policy) measured.

    ``capacity`` is ``None`` for an unbounded cache. ``pool_slots`` is the allocator's
    size: the capacity, or the trace's total units (with any warmup's) when fewer, which
    never runs short (see :func:`pool_slots`). ``blocks``/``hit_blocks`` count pages of
    ``page_size`` units (a request of n units is ``ceil(n / page_size)`` blocks);
    ``tokens``/``hit_tokens`` count prompt tokens (a hit of k units is
    ``min(k * unit_tokens, prompt tokens)``); ``evicted_tokens`` counts each evicted unit's
    own tokens (a Mooncake request's last block may be partial). ``seconds`` is the replay
    loop alone: trace parsing, key conversion and cache construction are excluded.
    """

    policy: str
    capacity: int | None
    pool_slots: int
    page_size: int
    unit: str
    requests: int
    blocks: int
    hit_blocks: int
    tokens: int
    hit_tokens: int
    requests_with_hit: int
    evicted_units: int
    evicted_tokens: int
    seconds: float
    leak_free: bool
    #: Units the tree held when the timed replay began (after any warmup).
    warm_units: int = 0
    #: Units hit by each request, in trace order (not part of :meth:`summary`).
    prefix_units: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False
    )

    @property
    def block_hit_rate(self) -> float:
        return self.hit_blocks / self.blocks if self.blocks else 0.0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.tokens if self.tokens else 0.0

    @property
    def request_hit_fraction(self) -> float:
        return self.requests_with_hit / self.requests if self.requests else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        """The fields plus the derived rates, as plain JSON-ready values."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prefix_units"}
        out["capacity"] = "inf" if self.capacity is None else self.capacity
        out["block_hit_rate"] = round(self.block_hit_rate, 6)
        out["token_hit_rate"] = round(self.token_hit_rate, 6)
        out["request_hit_fraction"] = round(self.request_hit_fraction, 6)
        out["requests_per_s"] = round(self.requests_per_s, 1)
        out["seconds"] = round(self.seconds, 6)
        return out


def pool_slots(trace: Trace, capacity: int | None, warmup: Trace | None = None) -> int:
    """The allocator size a replay of *trace* (after *warmup*) at *capacity* uses:
    *capacity*, or the total units of both traces when that is less, which is also the
    size for ``None`` (unbounded). No replay ever holds more slots than its traces' units
    at once (the tree holds units of earlier requests, the running request its own), so a
    larger pool would change no result, only cost memory. Raises ``ValueError`` naming
    ``capacity`` when it is not a positive integer or cannot hold the longest request."""
    traces = (trace,) if warmup is None else (trace, warmup)
    units = max(sum(t.total_units for t in traces), 1)
    if capacity is None:
        return units
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a positive integer or None, got {capacity!r}")
    for t, what in zip(traces, ("the trace", "the warmup"), strict=False):
        longest = max(int(k.size) for k in t.keys)
        if capacity < longest:
            raise ValueError(
                f"capacity: {capacity} {t.unit}s cannot hold {what}'s longest request "
                f"({longest} {t.unit}s)"
            )
    return min(capacity, units)


def _check_page_size(page_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: expected a positive integer, got {page_size!r}")
    return page_size


def _hits(trace: Trace, prefix: np.ndarray, page_size: int) -> tuple[int, int, int, int]:
    """(blocks, hit blocks, hit tokens, requests with a hit) for per-request hit units."""
    sizes = np.fromiter((k.size for k in trace.keys), dtype=np.int64, count=len(trace.keys))
    blocks = int((-(-sizes // page_size)).sum())
    hit_tokens = int(np.minimum(prefix * trace.unit_tokens, trace.tokens).sum())
    return blocks, int((prefix // page_size).sum()), hit_tokens, int(np.count_nonzero(prefix))


def replay(
    trace: Trace,
    capacity: int | None,
    *,
    policy: str = "lru",
    page_size: int = 1,
    progress: Progress | None = None,
    warmup: Trace | None = None,
) -> ReplayResult:
    """Run every request of *trace* through a fresh cache of *capacity* units: the same as
    ``Replay(trace, capacity, ...).run(progress)``; see :class:`Replay`."""
    return Replay(trace, capacity, policy=policy, page_size=page_size, warmup=warmup).run(progress)


class Replay:
    """One replay, set up: a fresh cache and allocator, the trace's keys as
    :class:`RadixKey` objects, and any warmup already served. :meth:`run` serves the trace
    once (a second call raises: the cache is no longer fresh).

    ``capacity=None`` is unbounded (a pool of the trace's total units: nothing is ever
    evicted, so the hit rates are the ideal ones, :func:`ideal_prefix_units`). A finite
    capacity must hold the longest request, since a request keeps its whole key's slots
    while it runs. *warmup*, a trace in the same unit, is replayed first through the same
    cache, untimed and uncounted (the result's ``warm_units`` says what the tree then held).
    Raises ``ValueError`` naming the argument for a bad capacity, page size, policy or
    warmup; the traces are not modified.
    """

    def __init__(
        self,
        trace: Trace,
        capacity: int | None,
        *,
        policy: str = "lru",
        page_size: int = 1,
        warmup: Trace | None = None,
    ) -> None:
        page_size = _check_page_size(page_size)
        if warmup is not None and warmup.unit != trace.unit:
            raise ValueError(f"warmup: expected a trace of {trace.unit}s, got {warmup.unit}s")
        pool = pool_slots(trace, capacity, warmup)
        self.trace, self.capacity, self.policy, self.page_size = trace, capacity, policy, page_size
        self.pool = pool
        self.allocator = TokenToKVPoolAllocator(pool)
        self.cache = make_cache(policy, page_size, self.allocator)
        # A Mooncake request's last block may hold fewer than unit_tokens tokens. To count
        # evicted tokens exactly, every such block the tree takes is recorded with the node
        # that ends with it and the tokens it lacks: while that node is not evicted, the
        # block is in the tree (a node keeps its last slot through splits, and a block
        # inserted again after an eviction gets a new node).
        self._partials: list[tuple[Any, int]] = []
        if warmup is not None:
            self._serve(self._requests(warmup), None)
        self.warm_units = self.cache.total_size()
        self._short_at_start = self._short_in_tree()
        self._todo: tuple[Any, ...] | None = self._requests(trace)

    def _requests(self, trace: Trace) -> tuple[Any, ...]:
        """What the loop reads: keys, sizes, aligned sizes, priorities (or None)."""
        sizes = [int(k.size) for k in trace.keys]
        keys = [
            RadixKey(k, e)
            for k, e in zip(trace.keys, trace.extra_keys or [None] * len(trace.keys), strict=True)
        ]
        aligned = [n - n % self.page_size for n in sizes]
        prios = trace.priorities if self.policy == "priority" else None
        return keys, sizes, aligned, prios, _shortfall(trace)

    def _short_in_tree(self) -> int:
        """Tokens the partial blocks now in the tree lack (reading a handle's ``evicted``
        changes nothing in the cache)."""
        return sum(lacks for node, lacks in self._partials if not node.evicted)

    def run(self, progress: Progress | None = None) -> ReplayResult:
        """Serve the trace; ``progress(done, total, seconds)`` every few thousand requests."""
        if self._todo is None:
            raise RuntimeError("Replay.run: this replay has run; set up a new one")
        todo, self._todo = self._todo, None
        prefix, evicted, seconds, short_taken = self._serve(todo, progress)
        trace, cache, pool = self.trace, self.cache, self.pool
        # tokens evicted: whole units, less what the evicted partial blocks lacked
        short_evicted = self._short_at_start + short_taken - self._short_in_tree()
        blocks, hit_blocks, hit_tokens, with_hit = _hits(trace, prefix, self.page_size)
        return ReplayResult(
            policy=self.policy,
            capacity=self.capacity,
            pool_slots=pool,
            page_size=self.page_size,
            unit=trace.unit,
            requests=len(trace),
            blocks=blocks,
            hit_blocks=hit_blocks,
            tokens=trace.total_tokens,
            hit_tokens=hit_tokens,
            requests_with_hit=with_hit,
            evicted_units=evicted,
            evicted_tokens=evicted * trace.unit_tokens - short_evicted,
            seconds=seconds,
            leak_free=cache.total_size() + self.allocator.available_size() == pool,
            warm_units=self.warm_units,
            prefix_units=prefix,
        )

    def _serve(
        self, todo: tuple[Any, ...], progress: Progress | None
    ) -> tuple[np.ndarray, int, float, int]:
        """The request loop (see the module docstring). Returns each request's hit units,
        the units evicted, the loop's seconds and the tokens lacked by the partial blocks
        the tree took."""
        keys, sizes, aligned, prios, shortfall = todo
        cache, alloc = self.cache, self.allocator
        partials, short_taken = self._partials, 0
        prefix = np.zeros(len(keys), dtype=np.int64)
        # One scratch row for every request's value (prefix slots + new slots): the tree
        # copies what it takes, so the row is free again once insert returns.
        row = np.zeros(max(sizes), dtype=np.int32)
        match, insert = cache.match_prefix, cache.insert
        lock, unlock, evict = cache.inc_lock_ref, cache.dec_lock_ref, cache.evict
        available, take, give = alloc.available_size, alloc.alloc, alloc.free
        evicted = 0
        total = len(keys)
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            m = match(key)
            node = m.last_node
            lock(node)
            p = m.prefix_len
            n = sizes[i]
            need = n - p
            short = need - available()
            if short > 0:
                evicted += evict(short).full_evicted
            new = take(need)
            if new is None:  # cannot happen while capacity >= n: all but our prefix is evictable
                raise RuntimeError(f"request {i}: the pool could not supply {need} slots")
            row[:p] = m.indices
            row[p:n] = new
            value = row[:n]
            r = insert(key, value) if prios is None else insert(key, value, priority=prios[i])
            if r.prefix_len > p:  # cached by someone else meanwhile: our copies are duplicates
                give(value[p : r.prefix_len])
            if aligned[i] < n:  # the unaligned tail is never cached
                give(value[aligned[i] : n])
            elif shortfall is not None and shortfall[i] and r.prefix_len < n:
                # the tree took the partial last block: r.last_node ends with it
                partials.append((r.last_node, shortfall[i]))
                short_taken += shortfall[i]
            unlock(node)
            prefix[i] = p
            if progress is not None and (i + 1) % PROGRESS_EVERY == 0:
                progress(i + 1, total, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        if progress is not None:
            progress(total, total, seconds)
        return prefix, evicted, seconds, short_taken


def _shortfall(trace: Trace) -> list[int] | None:
    """Per request, the tokens its last unit lacks (units times unit_tokens minus its
    prompt tokens), or ``None`` when every request fills its units."""
    sizes = np.fromiter((k.size for k in trace.keys), dtype=np.int64, count=len(trace.keys))
    short = sizes * trace.unit_tokens - trace.tokens
    return short.tolist() if short.any() else None


def ideal_prefix_units(trace: Trace, page_size: int = 1) -> np.ndarray:
    """Per request, the units an unbounded cache would hit: the longest prefix (in whole
    pages) that the request shares with the page-aligned key of an earlier request in the
    same namespace. Computed with a plain trie of dicts, independently of the cache."""
    page_size = _check_page_size(page_size)
    roots: dict[Any, dict[int, Any]] = {}
    out = np.zeros(len(trace.keys), dtype=np.int64)
    extra = trace.extra_keys or [None] * len(trace.keys)
    for i, (key, ns) in enumerate(zip(trace.keys, extra, strict=True)):
        node = roots.setdefault(ns, {})
        units = key.tolist()
        depth = 0
        for u in units:
            nxt = node.get(u)
            if nxt is None:
                break
            node, depth = nxt, depth + 1
        out[i] = depth - depth % page_size
        for u in units[depth : len(units) - len(units) % page_size]:
            node = node.setdefault(u, {})
    return out


@dataclass(frozen=True)
class Ideal:
    """The unbounded cache's hit rates, from :func:`ideal_prefix_units`."""

    block_hit_rate: float
    token_hit_rate: float
    request_hit_fraction: float
    distinct_units: int


def ideal(trace: Trace, page_size: int = 1) -> Ideal:
    prefix = ideal_prefix_units(trace, page_size)
    blocks, hit_blocks, hit_tokens, with_hit = _hits(trace, prefix, page_size)
    return Ideal(
        block_hit_rate=hit_blocks / blocks,
        token_hit_rate=hit_tokens / trace.total_tokens,
        request_hit_fraction=with_hit / len(trace.keys),
        distinct_units=trace.distinct_units(),
    )


def default_capacities(trace: Trace, steps: int = 8) -> list[int | None]:
    """A log-spaced sweep for a hit-rate curve: ``steps`` capacities from a 64th of the
    trace's distinct units (at least its longest request) up to all of them, then ``None``
    (unbounded)."""
    top = max(trace.distinct_units(), 1)
    low = max(top // 64, max(int(k.size) for k in trace.keys))
    if low >= top:
        return [top, None]
    caps = np.unique(np.geomspace(low, top, steps).round().astype(np.int64)).tolist()
    return [*caps, None]


def sweep(
    trace: Trace,
    capacities: Sequence[int | None],
    policies: Sequence[str],
    *,
    page_size: int = 1,
    progress: Progress | None = None,
) -> list[ReplayResult]:
    """:func:`replay` for every (capacity, policy) pair, capacity-major. Every capacity and
    policy is checked before the first replay starts. *progress* sees the requests of all
    the runs as one count."""
    for cap in capacities:
        pool_slots(trace, cap)
    for pol in policies:
        check_policy(pol)
    total = len(trace) * len(capacities) * len(policies)
    out: list[ReplayResult] = []
    spent = 0.0
    for cap in capacities:
        for pol in policies:
            cb = None
            if progress is not None:
                base, before = len(trace) * len(out), spent

                def cb(done: int, _: int, elapsed: float, base=base, before=before) -> None:
                    progress(base + done, total, before + elapsed)

            res = replay(trace, cap, policy=pol, page_size=page_size, progress=cb)
            spent += res.seconds
            out.append(res)
    return out


__all__ = [
    "Ideal",
    "Progress",
    "Replay",
    "ReplayResult",
    "check_policy",
    "default_capacities",
    "ideal",
    "ideal_prefix_units",
    "make_cache",
    "parse_capacity",
    "pool_slots",
    "replay",
    "sweep",
]
