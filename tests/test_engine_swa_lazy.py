"""A windowed engine (and a ``ChunkCache`` over split pools) takes the SWA side of a
position just before the step that writes it (``Engine._attach_swa``), within a per-request
reservation ``R`` (``Engine._swa_reserve``) that admission keeps within reach.

The ``micro`` swa model (window 32) over split pools: a full pool of 1024 slots, SWA pools
of 160 (small: a 16-token prompt with 300 generated tokens needs 315 positions) and 1024
(no pressure). Before every step, every position a row reads inside the window must have a
live SWA slot; after every step ``check_slots`` must hold and each request must hold at most
its ``R``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from swa_engine import POOL, after_every_step, assert_same_outputs, cfg, live_swa, make_engine

from pymllm.engine.scheduler import Engine, EngineError, _Req
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache
from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator

SMALL = 160
BIG = 1024


def swa_alloc(engine: Engine) -> SWATokenToKVPoolAllocator:
    alloc = engine._alloc
    assert isinstance(alloc, SWATokenToKVPoolAllocator)
    return alloc


def reads_are_live(engine: Engine, rows: list[tuple[_Req, int]]) -> None:
    """Before a step: every position a row reads through the window (positions
    ``a - W + 1 .. a + n - 1`` for a chunk of ``n`` at ``a``) has a live SWA slot, and no
    position past what the step writes has one yet (nothing is taken early)."""
    w = cfg().sliding_window
    to_swa = swa_alloc(engine).translate_loc_from_full_to_swa
    for r, n in rows:
        a = r.prefilled
        read = r.slots[max(0, a - w + 1) : a + n]
        assert np.all(to_swa(read) != 0), (r.spec.rid, a, n)
        assert not np.any(to_swa(r.slots[a + n :])), (r.spec.rid, a, n)


def held_within_reserve(engine: Engine) -> None:
    """check_slots, and each running request's live SWA (its own slots) within its R."""
    assert engine.check_slots()[2], f"check_slots failed after step {engine._steps}"
    for r in engine._running:
        mine = live_swa(engine, r.slots[r.cached_len :])
        assert mine == max(0, r.swa_upto - max(r.cached_len, r.swa_evicted))
        assert 0 <= r.swa_net <= r.swa_reserve, (r.spec.rid, r.swa_net, r.swa_reserve)
        assert mine <= r.swa_net
    outstanding = sum(r.swa_reserve - r.swa_net for r in engine._running)
    room = swa_alloc(engine).swa_available_size()
    if not isinstance(engine.cache, ChunkCache):
        room += engine.cache.swa_evictable_size()
    assert outstanding <= room, (outstanding, room)


def watch(engine: Engine, after: Callable[[Engine], None] = held_within_reserve) -> dict[str, int]:
    """Check every step before (reads_are_live) and after (``after``); returns the peak
    number of requests running at once, filled in as the run goes."""
    peaks = {"running": 0}
    run_step = engine._run_step

    def checked_run_step(rows: list[tuple[_Req, int]], decode: bool) -> Any:
        reads_are_live(engine, rows)
        peaks["running"] = max(peaks["running"], len(engine._running))
        return run_step(rows, decode)

    engine._run_step = checked_run_step  # type: ignore[method-assign]
    after_every_step(engine, after)
    return peaks


def assert_settled(engine: Engine, swa: int) -> None:
    free, in_cache, ok = engine.check_slots()
    assert ok and free + in_cache == POOL
    alloc = swa_alloc(engine)
    swa_in_tree = 0
    if isinstance(engine.cache, RadixCache):
        swa_in_tree = engine.cache.swa_evictable_size()
        engine.cache._check_invariants()
    assert alloc.swa_available_size() + swa_in_tree == swa
    assert engine.cache.protected_size() == engine.cache.swa_protected_size() == 0
    alloc._check_invariants()


def long_outputs(n: int, new_tokens: int, seed: int = 3, shared: int = 0) -> Workload:
    """n requests of 16-token prompts (the first ``shared`` tokens common to all)."""
    rng = np.random.default_rng(seed)
    head = rng.integers(1, 250, shared).astype(np.int32)
    specs = [
        RequestSpec(
            f"r{i}",
            np.concatenate([head, rng.integers(1, 250, 16 - shared).astype(np.int32)]),
            new_tokens,
        )
        for i in range(n)
    ]
    return Workload("long", f"{n} requests, {new_tokens} tokens generated each", specs)


@pytest.mark.parametrize("kind", ["radix", "chunk"])
def test_a_request_longer_than_the_swa_pool_is_served(kind: str) -> None:
    """315 positions on a 160-slot SWA pool (refused before: every SWA slot was taken at
    admission): outputs equal the same request on a 1024-slot SWA pool and the
    ChunkCache's; the request never holds more than about a window of SWA slots."""
    wl = long_outputs(1, 300)
    assert wl.requests[0].max_new_tokens + 15 > SMALL
    reference = make_engine("chunk", BIG).run(wl)
    roomy = make_engine(kind, BIG).run(wl)
    engine = make_engine(kind, SMALL)
    watch(engine)
    got = engine.run(wl)
    assert got.leak_free and got.requests == 1
    assert_same_outputs(got, reference)
    assert_same_outputs(roomy, reference)
    assert_settled(engine, SMALL)


@pytest.mark.parametrize("kind", ["radix", "chunk"])
def test_many_long_outputs_on_a_small_swa_pool_finish(kind: str) -> None:
    """Eight requests of 216 positions each on a 160-slot SWA pool, sharing an 8-token
    prefix: several run at once, each attach finds its slots (the reservations guarantee
    it), nothing deadlocks, and outputs equal a roomy run's."""
    wl = long_outputs(8, 200, seed=4, shared=8)
    reference = make_engine("chunk", BIG).run(wl)
    engine = make_engine(kind, SMALL)
    peaks = watch(engine)
    got = engine.run(wl)
    assert got.leak_free and got.requests == 8
    assert_same_outputs(got, reference)
    assert_settled(engine, SMALL)
    assert peaks["running"] >= 3  # R is 48 (tree) or 47 (ChunkCache): three in 160


def test_a_windowed_attach_evicts_the_trees_swa_kv_when_short() -> None:
    """With the SWA pool full of the tree's cached KV, the attach before a step evicts SWA
    KV alone (``evict(0, n)``), and the run still matches the roomy one."""
    wl = long_outputs(6, 120, seed=6)
    reference = make_engine("chunk", BIG).run(wl)
    engine = make_engine("radix", SMALL)
    calls: list[tuple[int, int]] = []
    real = engine.cache.evict

    def evict(num: int, swa_num: int = 0) -> Any:
        calls.append((num, swa_num))
        return real(num, swa_num)

    engine.cache.evict = evict  # type: ignore[method-assign, assignment]
    watch(engine)
    got = engine.run(wl)
    assert_same_outputs(got, reference)
    assert any(num == 0 and swa > 0 for num, swa in calls)
    assert_settled(engine, SMALL)


@pytest.mark.parametrize("kind", ["radix", "chunk"])
def test_an_error_mid_run_gives_back_attached_and_unattached_slots(kind: str) -> None:
    """A callback raising mid-decode, with requests holding full slots whose SWA side is
    attached, freed out of the window, or not attached yet: every slot comes back, the
    counts add up, and the engine serves again exactly."""
    wl = long_outputs(6, 120, seed=7)
    engine = make_engine(kind, SMALL)
    raised: list[int] = []

    def boom(engine: Engine) -> None:
        held_within_reserve(engine)
        states = [
            (r.swa_evicted > r.cached_len, r.swa_upto < len(r.slots)) for r in engine._running
        ]
        if engine._steps > 60 and any(a and b for a, b in states) and not raised:
            raised.append(engine._steps)
            raise RuntimeError("stop")

    watch(engine, boom)
    with pytest.raises(RuntimeError, match="stop"):
        engine.run(wl)
    assert raised and engine.check_slots()[2]
    assert_settled(engine, SMALL)
    again = engine.run(wl)
    assert_same_outputs(again, make_engine("chunk", BIG).run(wl))
    assert_settled(engine, SMALL)


def test_an_error_between_attach_and_step_gives_back_the_attached_slots() -> None:
    """A step that raises after its SWA sides were attached (before the model ran): the
    release frees them with the full slots."""
    wl = long_outputs(2, 40, seed=8)
    engine = make_engine("radix", SMALL)
    real = engine._run_step
    count = {"n": 0}

    def failing(rows: list[tuple[_Req, int]], decode: bool) -> Any:
        count["n"] += 1
        if count["n"] == 5:
            assert all(r.swa_upto == r.prefilled + n for r, n in rows)
            raise RuntimeError("device lost")
        return real(rows, decode)

    engine._run_step = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="device lost"):
        engine.run(wl)
    assert_settled(engine, SMALL)


@pytest.mark.parametrize(
    "kind, prompt, new, reserve",
    [
        ("radix", 200, 10, 209),  # refused: the prompt is held whole (kv_len 209 > 160)
        ("radix", 140, 30, 169),  # refused: 140 + 31 + 1 = 172, capped at kv_len 169
        ("radix", 100, 60, 132),
        ("chunk", 200, 60, 63),  # a 200-token prompt on a 160-slot SWA pool
        ("radix", 10, 5, 14),
    ],
)
def test_refusal_when_the_reservation_exceeds_the_swa_pool(
    kind: str, prompt: int, new: int, reserve: int
) -> None:
    """R: a windowed tree holds the prompt and W (K + 1 = 32) more; a ChunkCache K + a chunk
    (31 + 32); never more than kv_len. Refused up front (nothing allocated, the queue not
    started) only when R exceeds the SWA pool."""
    spec = RequestSpec("x", (np.arange(prompt) % 250 + 1).astype(np.int32), new)
    engine = make_engine(kind, SMALL)
    r = _Req(spec=spec, seq=0, order=(0, 0), arrival=0.0, prompt=spec.prompt)
    assert engine._swa_reserve(r, 0) == reserve
    if reserve > SMALL:
        with pytest.raises(EngineError, match=f"needs {reserve} SWA slots at once"):
            engine.run(Workload("w", "w", [spec]))
        assert_settled(engine, SMALL)
    else:
        assert engine.run(Workload("w", "w", [spec])).leak_free


def test_the_full_pool_still_bounds_kv_len() -> None:
    spec = RequestSpec("x", (np.arange(100) % 250 + 1).astype(np.int32), POOL)
    engine = make_engine("chunk", SMALL)
    with pytest.raises(EngineError, match=f"needs {100 + POOL - 1} KV slots; the pool has"):
        engine.run(Workload("w", "w", [spec]))


def test_a_cached_prefix_lowers_the_reservation() -> None:
    """R counts the prompt positions past the match only."""
    spec = RequestSpec("x", (np.arange(40) % 250 + 1).astype(np.int32), 100)
    engine = make_engine("radix", SMALL)
    r = _Req(spec=spec, seq=0, order=(0, 0), arrival=0.0, prompt=spec.prompt)
    k = cfg().sliding_window - 1
    assert engine._swa_reserve(r, 0) == 40 + k + 1
    assert engine._swa_reserve(r, 24) == 16 + k + 1
    assert engine._swa_reserve(r, 39) == 1 + k + 1
