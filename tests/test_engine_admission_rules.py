"""Admission rules the engine's tests did not pin (found by mutation testing).

Lives in tests/ (imports the helpers of test_engine, test_engine_errors, test_engine_admission).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from test_engine import POOL, SCHED, assert_slots_accounted, cfg_of, params_of
from test_engine_admission import _admissions
from test_engine_errors import make_engine, ramp

from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import Engine
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import RadixCache


def test_a_request_held_back_for_a_shared_prefix_does_not_hold_back_those_behind_it(
    monkeypatch: Any,
) -> None:
    """Pins: a request told to "wait" (it shares a prefix still being prefilled) is passed
    over, and the requests queued behind it are still admitted in the same step, so they are
    prefilled together with the first one. Without it, one waiting request would stall the
    whole queue (head-of-line blocking: every other tenant's TTFT grows by the length of
    someone else's prefill), or admission would take one request per step and prefill
    batches would never fill."""
    seen = _admissions(monkeypatch)
    engine = make_engine("full", RadixCache)
    shared = ramp(0, 96)
    specs = [
        RequestSpec("s0", np.r_[shared, ramp(200, 8)], 2),
        RequestSpec("s1", np.r_[shared, ramp(210, 8)], 2),  # waits for s0's prefill
        RequestSpec("other", ramp(120, 20), 2),  # shares nothing: admitted at once
    ]
    stats = engine.run(Workload("w", "w", specs))
    assert seen[:3] == [("s0", "ok"), ("s1", "wait"), ("other", "ok")]
    assert stats.requests == 3
    assert_slots_accounted(engine)


def test_requests_of_other_cache_namespaces_never_wait_for_each_others_prefill(
    monkeypatch: Any,
) -> None:
    """Pins: the wait-for-a-shared-prefix rule only applies within one extra_key (cache
    namespace): a request can never reuse another namespace's prefix, so holding it back only
    delays it. Without it, a multi-tenant / multi-LoRA server would serialise tenants whose
    prompts happen to share a system prompt, for no reuse at all."""
    seen = _admissions(monkeypatch)
    engine = make_engine("full", RadixCache)
    shared = ramp(0, 96)
    specs = [
        RequestSpec("a", np.r_[shared, ramp(200, 8)], 2, extra_key="tenant-a"),
        RequestSpec("b", np.r_[shared, ramp(210, 8)], 2, extra_key="tenant-b"),
    ]
    stats = engine.run(Workload("w", "w", specs))
    assert ("b", "wait") not in seen
    assert seen[:2] == [("a", "ok"), ("b", "ok")]
    assert stats.cached_tokens == 0  # indeed nothing was shareable
    assert_slots_accounted(engine)


def test_the_shared_prefix_wait_starts_at_exactly_share_min_tokens(monkeypatch: Any) -> None:
    """Pins the documented boundary of SchedulerConfig.share_min_tokens ("at least
    share_min_tokens uncached tokens"): 32 shared tokens wait (default 32), 31 do not. An
    off-by-one makes requests that share exactly the threshold recompute the prefix."""
    assert SCHED.share_min_tokens == 32
    for n_shared, waits in ((32, True), (31, False)):
        seen = _admissions(monkeypatch)
        engine = make_engine("full", RadixCache)
        shared = ramp(0, n_shared)
        specs = [
            RequestSpec("x0", np.r_[shared, ramp(200, 8)], 2),
            RequestSpec("x1", np.r_[shared, ramp(210, 8)], 2),
        ]
        engine.run(Workload("w", "w", specs))
        assert (("x1", "wait") in seen) is waits, (n_shared, seen)
        assert_slots_accounted(engine)
        monkeypatch.undo()


def test_a_plain_radix_tree_on_split_pools_evicts_for_the_smaller_swa_pool() -> None:
    """Pins: with a sliding-window model on split pools (full + smaller SWA pool) served by a
    tree without a window (which the engine accepts), admission evicts as many tokens as the
    *shorter* of the two pools lacks (freeing a token frees both of its slots). Evicting
    only for the full pool left the SWA pool short with the full one roomy: the engine
    raised EngineError "cannot be admitted with nothing running" on a workload that fits."""
    cfg = cfg_of("swa")
    mem = EngineMemory(cfg, POOL, swa_size=160)
    cache = RadixCache(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator)
    engine = Engine(cfg, mem, cache, params=params_of("swa"), sched=SCHED)
    # 5 distinct requests of 63 slots each: the SWA pool (160) holds two at a time, the tree
    # keeps each finished one, so later admissions must evict for the SWA side alone.
    specs = [RequestSpec(f"r{i}", ramp(40 * i, 60), 4) for i in range(5)]
    stats = engine.run(Workload("w", "w", specs))
    assert stats.requests == 5 and stats.leak_free
    assert stats.evicted_tokens > 0
    alloc = mem.token_to_kv_pool_allocator
    assert alloc.full_available_size() + cache.total_size() == POOL
    assert alloc.swa_available_size() + cache.total_size() == 160
