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

from pymllm.engine.scheduler import Engine, EngineError
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache, RadixKey


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


def test_an_admission_that_cannot_fit_does_not_flush_the_cache() -> None:
    """A pool of 150 slots, all requests at t=0: q (30 tokens) ends at once and leaves its
    prompt cached (30 evictable slots); a and b (one 20-token prompt, 40 new tokens each)
    decode for 40 steps; x needs 55 slots, more than the free 22 plus the 30 evictable, so
    it waits until a and b end (then 61 slots are free). Its every failed admission used to
    evict first (q's prompt) and only then find the pool short: r, which extends q's
    prompt, found nothing cached and the run evicted 30 tokens that bought nothing."""
    from pymllm.engine.config import get_config
    from pymllm.engine.memory import EngineMemory
    from pymllm.engine.model import init_params
    from pymllm.engine.scheduler import SchedulerConfig

    cfg = get_config("micro", "full")
    rng = np.random.default_rng(7)
    q, p, x, y = (rng.integers(1, 250, n).astype(np.int32) for n in (30, 20, 50, 5))
    reqs = [
        RequestSpec(rid="q", prompt=q, max_new_tokens=1),
        RequestSpec(rid="a", prompt=p, max_new_tokens=40),
        RequestSpec(rid="b", prompt=p, max_new_tokens=40),
        RequestSpec(rid="x", prompt=x, max_new_tokens=6),
        RequestSpec(rid="r", prompt=np.concatenate([q, y]), max_new_tokens=1),
    ]
    mem = EngineMemory(cfg, 150)
    cache = RadixCache(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator)
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
