"""The engine's admission rules and self-checks, each shown by what it does to a run: first
come first served under memory pressure, no wait for a shared prefix with ChunkCache, the
request-size limit at its boundary, check_slots seeing a node left locked, and the reported
latency percentiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_engine import POOL, assert_slots_accounted
from test_engine_errors import make_engine, ramp

from pymllm.engine.config import get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.model import init_params
from pymllm.engine.scheduler import Engine, EngineError, SchedulerConfig, _Req
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache, RadixKey
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache


def _admissions(monkeypatch: Any) -> list[tuple[str, str]]:
    """Record every admission verdict, as (request id, verdict), in the order made."""
    seen: list[tuple[str, str]] = []
    try_admit = Engine._try_admit

    def spy(self: Engine, r: Any) -> str:
        verdict = try_admit(self, r)
        seen.append((r.spec.rid, verdict))
        return verdict

    monkeypatch.setattr(Engine, "_try_admit", spy)
    return seen


def test_a_request_short_of_memory_is_not_overtaken(monkeypatch: Any) -> None:
    """r1 cannot fit while r0 runs; r2 could, but waits behind r1 (a large request must
    not starve behind a stream of small ones)."""
    seen = _admissions(monkeypatch)
    engine = make_engine("full", ChunkCache)
    specs = [
        RequestSpec("r0", ramp(0, 100), 40),  # 139 slots, decoding for a while
        RequestSpec("r1", ramp(1, 400), 2),  # 401 slots: 540 > 512 while r0 runs
        RequestSpec("r2", ramp(2, 20), 2),  # 21 slots: would fit beside r0
    ]
    stats = engine.run(Workload("w", "w", specs))
    assert stats.requests == 3
    admitted = [rid for rid, verdict in seen if verdict == "ok"]
    assert admitted == ["r0", "r1", "r2"]
    assert ("r1", "ok") in seen and seen.index(("r1", "ok")) > 0  # r1 was short first
    assert_slots_accounted(engine)


@pytest.mark.parametrize(("cache_cls", "waits"), [(ChunkCache, False), (RadixCache, True)])
def test_only_a_reusing_cache_holds_a_request_back_for_a_shared_prefix(
    monkeypatch: Any, cache_cls: type, waits: bool
) -> None:
    """wait_for_shared_prefix=None means on unless the cache is a ChunkCache, which would
    only delay the request for nothing."""
    seen = _admissions(monkeypatch)
    engine = make_engine("full", cache_cls)
    shared = ramp(0, 96)
    specs = [RequestSpec(f"s{i}", np.r_[shared, ramp(200 + 10 * i, 8)], 2) for i in range(2)]
    engine.run(Workload("w", "w", specs))
    assert (("s1", "wait") in seen) is waits
    assert_slots_accounted(engine)


def test_the_request_size_limit_at_its_boundary() -> None:
    """A request needs prompt + max_new_tokens - 1 slots: one more than the pool is refused
    up front, the pool's size is served."""
    engine = make_engine("full", ChunkCache)
    with pytest.raises(EngineError, match=f"needs {POOL + 1} KV slots; the pool has {POOL}"):
        engine.run(Workload("w", "w", [RequestSpec("big", ramp(0, POOL - 2), 4)]))
    stats = engine.run(Workload("w", "w", [RequestSpec("fits", ramp(0, POOL - 3), 4)]))
    assert stats.requests == 1 and stats.leak_free


def test_check_slots_sees_a_node_left_locked() -> None:
    engine = make_engine("full", RadixCache)
    prompt = ramp(0, 40)
    engine.run(Workload("w", "w", [RequestSpec("a", prompt, 2)]))
    assert engine.check_slots()[2]
    node = engine.cache.match_prefix(RadixKey(prompt)).last_node
    engine.cache.inc_lock_ref(node)
    assert not engine.check_slots()[2]
    engine.cache.dec_lock_ref(node)
    assert engine.check_slots()[2]


def test_the_reported_latency_percentiles_are_the_requests() -> None:
    engine = make_engine("full", ChunkCache)
    specs = [RequestSpec(f"r{i}", ramp(7 * i, 20 + 9 * i), 2, arrival=0.01 * i) for i in range(9)]
    stats = engine.run(Workload("w", "w", specs))
    ttft = [r.ttft for r in stats.results]
    assert stats.ttft_p50 == pytest.approx(float(np.percentile(ttft, 50)))
    assert stats.ttft_p99 == pytest.approx(float(np.percentile(ttft, 99)))
    assert stats.ttft_p99 > stats.ttft_p50


def _serve_past_a_request_that_cannot_fit(
    variant: str, full: int, swa: int | None, window: int | None, x_len: int = 50
) -> None:
    """All at t=0: q (30 tokens) ends at once and leaves its prompt cached; a and b (one
    20-token prompt, 40 new tokens each) decode for 40 steps; x (``x_len + 5`` slots)
    cannot fit until they end; r extends q's prompt and must find it all cached, nothing
    evicted."""
    cfg = get_config("micro", variant)
    rng = np.random.default_rng(7)
    q, p, x, y = (rng.integers(1, 250, n).astype(np.int32) for n in (30, 20, x_len, 5))
    reqs = [
        RequestSpec(rid="q", prompt=q, max_new_tokens=1),
        RequestSpec(rid="a", prompt=p, max_new_tokens=40),
        RequestSpec(rid="b", prompt=p, max_new_tokens=40),
        RequestSpec(rid="x", prompt=x, max_new_tokens=6),
        RequestSpec(rid="r", prompt=np.concatenate([q, y]), max_new_tokens=1),
    ]
    mem = EngineMemory(cfg, full, swa_size=swa)
    cache = RadixCache(
        token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator, sliding_window_size=window
    )
    sched = SchedulerConfig(
        max_running=4,
        max_prefill_batch=2,
        pad_prefill_batch=True,
        chunk_tokens=32,
        wait_for_shared_prefix=False,
    )
    engine = Engine(cfg, mem, cache, params=init_params(cfg), sched=sched)
    stats = engine.run(Workload(name="w", description="", requests=reqs))
    assert stats.leak_free
    got = {res.rid: res.cached_tokens for res in stats.results}
    assert got["r"] == 30, got
    assert stats.evicted_tokens == 0


def test_an_admission_that_cannot_fit_does_not_flush_the_cache() -> None:
    """A pool of 150 slots: x needs 55, more than the free 22 plus the 30 evictable, so it
    waits until a and b end (then 61 slots are free). Its every failed admission used to
    evict first (q's prompt) and only then find the pool short: r found nothing cached
    and the run evicted 30 tokens that bought nothing."""
    _serve_past_a_request_that_cannot_fit("full", 150, None, None)


@pytest.mark.parametrize("window", [None, 32])
def test_an_admission_short_of_swa_slots_does_not_flush_the_cache(window: int | None) -> None:
    """The same with a large full pool and an SWA pool of 150: x is short of SWA slots by
    more than the tree can free, so it waits for a and b without evicting (or, windowed,
    tombstoning) q's prompt, which r then reuses whole.

    Windowed, a and b free the SWA KV that left their window as they decode (down to 32
    slots each: 7 output positions fall out of the window before the last step), so up to
    36 slots are free and q's 30 evictable: x is made 67 slots, still short by more than
    the tree can free until a and b end (then 68 are free: q 30, the prompt 20 and a's last 32
    positions live in the tree)."""
    _serve_past_a_request_that_cannot_fit("swa", 1000, 150, window, 50 if window is None else 62)


class _Delegating(BasePrefixCache):
    """A user's cache: the abstract API and total_size, forwarded to a RadixCache."""

    def __init__(self, inner: RadixCache) -> None:
        self.inner = inner
        self.token_to_kv_pool_allocator = inner.token_to_kv_pool_allocator

    def reset(self) -> None:
        self.inner.reset()

    def match_prefix(self, key: Any) -> Any:
        return self.inner.match_prefix(key)

    def insert(self, key: Any, value: Any = None, **kwargs: Any) -> Any:
        return self.inner.insert(key, value, **kwargs)

    def evict(self, num_tokens: int, swa_num_tokens: int = 0) -> Any:
        return self.inner.evict(num_tokens, swa_num_tokens)

    def inc_lock_ref(self, node: Any) -> Any:
        return self.inner.inc_lock_ref(node)

    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        self.inner.dec_lock_ref(node, **kwargs)

    def total_size(self) -> int:
        return self.inner.total_size()


def test_a_cache_without_evictable_size_is_still_asked_to_evict() -> None:
    """Pool 150, one request at a time: a (100-token prompt) finishes and stays cached,
    leaving 50 slots free; b (another 100-token prompt) fits only once a's prompt is
    evicted. With nothing running, the engine must evict and serve b; it now raises
    EngineError ("cannot be admitted with nothing running") without asking the cache."""
    cfg = get_config("micro", "full")
    mem = EngineMemory(cfg, 150)
    cache = _Delegating(RadixCache(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator))
    sched = SchedulerConfig(max_running=1, max_prefill_batch=1, chunk_tokens=64)
    engine = Engine(cfg, mem, cache, params=init_params(cfg), sched=sched)
    rng = np.random.default_rng(3)
    a, b = (rng.integers(1, 250, 100).astype(np.int32) for _ in range(2))
    reqs = [RequestSpec("a", a, 2), RequestSpec("b", b, 2)]
    stats = engine.run(Workload(name="w", description="", requests=reqs))
    assert stats.requests == 2 and stats.leak_free
    assert stats.evicted_tokens > 0


def _engine(full: int, swa: int) -> tuple[Engine, RadixCache, object]:
    cfg = get_config("micro", "swa")
    mem = EngineMemory(cfg, full, swa_size=swa)
    alloc = mem.token_to_kv_pool_allocator
    cache = RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=32)
    engine = Engine(cfg, mem, cache, params=init_params(cfg), sched=SchedulerConfig())
    engine._evicted = 0  # a run's counter, set by run()
    return engine, cache, alloc


def _insert(cache: RadixCache, alloc: object, tokens: np.ndarray, prev: int = 0) -> None:
    m = cache.match_prefix(RadixKey(tokens))
    slots = alloc.alloc(len(tokens) - len(m.indices), prefix=m.indices)  # type: ignore[attr-defined]
    cache.insert(RadixKey(tokens), slots, prev_prefix_len=len(m.indices))


def test_swa_slots_freed_by_tombstoning_locked_nodes_admit_a_request() -> None:
    """A locked 100-token path (two nodes; the lock's window covers the second) keeps 68
    live SWA tokens outside the window: nothing is evictable, 68 SWA tokens are. With the
    SWA pool exhausted, 10 new slots are served by tombstoning them (the windowed engine
    reserves them at admission and attaches them, tombstoning, just before a step: the
    reservation is what is checked here)."""
    engine, cache, alloc = _engine(1000, 150)
    toks = (np.arange(100) % 250 + 1).astype(np.int32)
    _insert(cache, alloc, toks[:68])
    _insert(cache, alloc, toks)
    m = cache.match_prefix(RadixKey(toks))
    token = cache.inc_lock_ref(m.last_node)
    assert cache.evictable_size() == 0 and cache.swa_evictable_size() == 68
    held = alloc.alloc(50)  # type: ignore[attr-defined]
    assert held is not None and alloc.swa_available_size() == 0  # type: ignore[attr-defined]
    got = engine._alloc_kv(10, np.empty(0, np.int32), swa_reserve=10)
    assert got is not None and len(got) == 10
    alloc.free(got)  # type: ignore[attr-defined]
    alloc.free(held)  # type: ignore[attr-defined]
    cache.dec_lock_ref(m.last_node, swa_boundary_id=token)
    cache._check_invariants()


def test_a_full_pool_short_beyond_the_evictable_is_refused_without_evicting() -> None:
    """Full pool 150: 30 tokens cached (evictable), 110 slots held: 50 more cannot be served
    even by evicting all 30, so None, and the cache keeps its 30 tokens."""
    engine, cache, alloc = _engine(150, 1000)
    _insert(cache, alloc, (np.arange(30) + 1).astype(np.int32))
    held = alloc.alloc(110)  # type: ignore[attr-defined]
    assert held is not None
    assert engine._alloc_kv(50, np.empty(0, np.int32)) is None
    assert cache.total_size() == 30 and cache.evictable_size() == 30
    alloc.free(held)  # type: ignore[attr-defined]


def test_an_swa_shortage_beyond_the_live_swa_kv_is_refused_without_evicting() -> None:
    """The docstring: None, with nothing evicted, when even evicting all the tree may free
    would leave the pool short. A windowed tree of 100 tokens whose first 60 are a tombstone
    holds 40 live SWA tokens (all it can free for the SWA pool), yet 100 evictable ones: an
    SWA shortage of 50 passes the ``max(swa_evictable_size, evictable_size)`` bound, the
    whole tree is evicted, and the allocation still fails. The SWA side of a windowed
    engine's allocation is a reservation (``swa_reserve``, the SWA slots are attached step by
    step): the same shortage, reserved."""
    engine, cache, alloc = _engine(1000, 150)
    toks = (np.arange(100) % 250 + 1).astype(np.int32)
    slots = alloc.alloc(100)  # type: ignore[attr-defined]
    cache.insert(RadixKey(toks), slots, swa_evicted_seqlen=60)
    assert cache.evictable_size() == 100 and cache.swa_evictable_size() == 40
    held = alloc.alloc(alloc.swa_available_size())  # type: ignore[attr-defined]
    assert held is not None and alloc.swa_available_size() == 0  # type: ignore[attr-defined]
    assert engine._alloc_kv(50, np.empty(0, np.int32), swa_reserve=50) is None
    assert cache.total_size() == 100 and cache.swa_evictable_size() == 40
    alloc.free(held)  # type: ignore[attr-defined]


def test_a_hybrid_admission_short_of_kv_keeps_the_saved_states() -> None:
    """A hybrid model, its state pool all taken (one slot in the tree, one held) and its KV
    pool short by more than the tree can free: the request is refused before a state slot
    is sought, so the saved state and its 30 cached tokens stay. Taking the state slot
    first evicted them (the state's leaf goes with it) and then found the KV short anyway."""
    cfg = get_config("micro", "hybrid")
    mem = EngineMemory(cfg, 100, state_size=2)
    alloc, pool = mem.token_to_kv_pool_allocator, mem.state_pool
    assert pool is not None
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    engine = Engine(cfg, mem, cache, params=init_params(cfg), sched=SchedulerConfig())
    engine._evicted = 0  # a run's counter, set by run()
    toks = (np.arange(30) + 1).astype(np.int32)
    state = pool.alloc(1)
    slots = alloc.alloc(30)
    assert state is not None and slots is not None
    cache.insert(RadixKey(toks), slots, mamba_value=int(state[0]))
    held_state, held_kv = pool.alloc(pool.available_size()), alloc.alloc(60)
    assert held_state is not None and held_kv is not None and pool.available_size() == 0
    spec = RequestSpec(rid="x", prompt=(np.arange(45) + 100).astype(np.int32), max_new_tokens=5)
    r = _Req(spec=spec, seq=0, order=(0, 0), arrival=0.0, prompt=spec.prompt)
    assert r.kv_len > alloc.available_size() + cache.evictable_size()
    assert engine._try_admit(r) == "nomem"
    assert cache.total_size() == 30 and engine._evicted == 0
    assert len(cache.match_prefix(RadixKey(toks)).indices) == 30
    cache._check_invariants()
    alloc.free(held_kv)
    pool.free(held_state)
