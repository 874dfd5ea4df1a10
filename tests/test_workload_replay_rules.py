"""Workload and replay behaviours the tests did not pin (found by mutation testing)."""

from __future__ import annotations

import numpy as np

from pymllm.engine.workloads import multi_turn
from pymllm.replay import default_capacities
from pymllm.replay.traces import trace_from_records


def test_multi_turn_follow_ups_stay_in_the_conversations_cache_namespace() -> None:
    """Pins: a multi-turn follow-up keeps the extra_key (cache namespace: a tenant, a LoRA
    adapter) of the turn it follows. A user who sets extra_key on the first turns (the
    specs are mutable) would otherwise get every later turn in the None namespace: it
    could never reuse its own conversation's cached prefix, and would share prefixes with
    other tenants', the isolation extra_key exists for."""
    wl = multi_turn(vocab_size=256, n_conversations=2, turns=3, system_len=16, user_len=(4, 8))
    for i, spec in enumerate(wl.requests):
        spec.extra_key = f"tenant-{i}"
    assert wl.follow_up is not None
    spec = wl.requests[1]
    for _ in range(2):
        out = np.arange(1, 1 + spec.max_new_tokens, dtype=np.int32)
        nxt = wl.follow_up(spec, out)
        assert nxt is not None
        assert nxt.extra_key == "tenant-1"
        np.testing.assert_array_equal(nxt.prompt[: len(spec.prompt)], spec.prompt)
        spec = nxt
    assert wl.follow_up(spec, out) is None  # turns=3: t0, t1, t2


def test_default_capacities_start_at_a_64th_of_the_distinct_units() -> None:
    """Pins the documented low end of the default sweep: a 64th of the trace's distinct
    units (when that holds the longest request). Starting higher drops the small-capacity
    end of the hit-rate curve, where the eviction policies differ most, from the default
    `pymllm-cache replay` report and plot."""
    rng = np.random.default_rng(0)
    recs = [rng.integers(0, 10**6, size=10).tolist() for _ in range(300)]  # ~3000 distinct
    t = trace_from_records(recs, "wide")
    top = t.distinct_units()
    assert top // 64 > 10  # a 64th holds the longest request (10 tokens)
    caps = default_capacities(t)
    assert caps[0] == top // 64
    assert caps[-2:] == [top, None]
    assert len(caps) == 9  # 8 log-spaced steps, then unbounded
