"""Trace replay speed: the issue-7 case, 12,000 requests and ~300,000 block references.

The trace is the built-in synthetic one (``pymllm-cache gen-trace`` defaults: 12,000
Mooncake-format requests, 301,115 block references, 61,001 distinct blocks). Each round
replays it through a fresh ``RadixCache`` + ``TokenToKVPoolAllocator`` at one capacity and
one policy. The timed part is ``Replay.run()`` alone (``benchmark.pedantic`` builds the
fresh cache, the keys and any warmup in ``setup``); requests/s is the median over the rounds
of the loop's own clock (``ReplayResult.seconds``), so trace parsing is never included.

Cases per policy: a 16th, a quarter and all of the distinct blocks, unbounded (checked
equal to the ideal prefix hit rate), and a cache already holding 1,000,000 blocks (warmed
with 40,000 unrelated requests before the clock starts) at a capacity of 1,000,000, so the
trace's misses keep evicting from a million-block tree.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from conftest import note, record

from pymllm.mem_cache import EVICTION_POLICIES
from pymllm.replay import Replay, generate_trace, ideal
from pymllm.replay.traces import trace_from_records

POLICIES = EVICTION_POLICIES
CAPACITY_CASES = ("1/16", "1/4", "all", "inf", "1e6 warm")
WARM_BLOCKS = 1_000_000
ROUNDS = 5


@pytest.fixture(scope="module")
def trace():
    return trace_from_records(generate_trace(), "synthetic", format="mooncake")


@pytest.fixture(scope="module")
def warm_trace():
    # 40,000 requests of 25 fresh blocks each, ids above every id of the trace
    ids = np.arange(WARM_BLOCKS, dtype=np.int64).reshape(-1, 25) + (1 << 30)
    return trace_from_records([{"hash_ids": row} for row in ids.tolist()], "warm")


def _capacity(case: str, distinct: int) -> int | None:
    return {"1/16": distinct // 16, "1/4": distinct // 4, "all": distinct, "inf": None}.get(
        case, WARM_BLOCKS
    )


@pytest.mark.parametrize("case", CAPACITY_CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_replay_speed(benchmark, trace, warm_trace, policy, case):
    distinct = trace.distinct_units()
    cap = _capacity(case, distinct)
    warmup = warm_trace if case == "1e6 warm" else None
    results = []

    def setup():
        return (Replay(trace, cap, policy=policy, warmup=warmup),), {}

    def run(r):
        results.append(r.run())

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    group = f"replay {len(trace):,} requests / {trace.total_units:,} blocks"
    record(
        benchmark,
        group,
        f"{policy} {case}",
        baseline=(policy, case) == ("lru", "all"),
        per=len(trace),
    )
    res = results[-1]
    assert res.leak_free
    assert all(r.hit_blocks == res.hit_blocks for r in results)  # deterministic
    if case == "inf":
        assert res.block_hit_rate == ideal(trace).block_hit_rate
        assert res.evicted_units == 0
    if warmup is not None:
        assert res.warm_units == WARM_BLOCKS
    rate = statistics.median(r.requests_per_s for r in results)
    note(
        group,
        f"{policy:>8} {case:>8} (cap {res.pool_slots:>9,}): {rate:9,.0f} req/s, block hit "
        f"{res.block_hit_rate:.2%}, token hit {res.token_hit_rate:.2%}, reqs with hit "
        f"{res.request_hit_fraction:.1%}, evicted {res.evicted_units:,} blocks",
    )
