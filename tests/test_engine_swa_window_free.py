"""A windowed engine frees the SWA KV of positions that left every window while a request
runs (``Engine._free_out_of_window``) and names them in its inserts (``swa_evicted_seqlen``).

The ``micro`` swa model (window 32) over split pools: a full pool of 1024 slots and an SWA
pool of 480, one pool shape for the module (it is part of every step's compile key). The
engine's behaviour before it freed (an SWA slot held for every position computed, until
the request ends) is the same engine with ``_swa_keep`` past any length: nothing is ever
out of the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from swa_engine import POOL, after_every_step, assert_same_outputs, cfg, live_swa
from swa_engine import make_engine as make_swa_engine

from pymllm.engine.scheduler import Engine
from pymllm.engine.workloads import RequestSpec, Workload, multi_turn
from pymllm.mem_cache import ChunkCache

SWA_POOL = 480
NEVER = 1 << 30  # an _swa_keep no request reaches: the engine before it freed


def make_engine(kind: str = "radix", keep: int | None = None) -> Engine:
    return make_swa_engine(kind, SWA_POOL, keep)


def exact_slots(engine: Engine) -> None:
    """check_slots, and the SWA side counted by hand: free + live in the tree + the live SWA
    sides of every running request's own slots == the SWA pool."""
    assert engine.check_slots()[2], f"check_slots failed after step {engine._steps}"
    alloc, cache = engine._alloc, engine.cache
    mine = sum(live_swa(engine, r.slots[r.cached_len :]) for r in engine._running)
    live_in_tree = cache.swa_evictable_size() + cache.swa_protected_size()
    assert alloc.swa_available_size() + live_in_tree + mine == SWA_POOL


def assert_settled(engine: Engine) -> None:
    free, in_cache, ok = engine.check_slots()
    assert ok and free + in_cache == POOL
    assert engine.cache.protected_size() == engine.cache.swa_protected_size() == 0
    engine._alloc._check_invariants()
    if not isinstance(engine.cache, ChunkCache):  # a ChunkCache holds nothing to check
        engine.cache._check_invariants()


def chats() -> Workload:
    """Two chats of three turns over a shared system prompt, 72 tokens generated per turn
    (over two windows): every turn's finish inserts a tombstone over most of its output, and
    the next turn's prompt runs through it."""
    return multi_turn(
        vocab_size=256, n_conversations=2, turns=3, system_len=40, user_len=(8, 16), output_len=72
    )


def spy_inserts(engine: Engine) -> list[tuple[int, int, int]]:
    """(key length, prev_prefix_len, swa_evicted_seqlen) of every insert of the engine."""
    seen: list[tuple[int, int, int]] = []
    real = engine.cache.insert

    def insert(key: Any, value: Any = None, **kw: Any) -> Any:
        seen.append((len(key), kw.get("prev_prefix_len", 0), kw.get("swa_evicted_seqlen", 0)))
        return real(key, value, **kw)

    engine.cache.insert = insert  # type: ignore[method-assign]
    return seen


def test_out_of_window_frees_keep_outputs_and_matches_through_tombstones() -> None:
    wl = chats()
    reference = make_engine("chunk").run(wl)
    old_engine = make_engine(keep=NEVER)
    old = old_engine.run(wl)
    engine = make_engine()
    inserts = spy_inserts(engine)
    after_every_step(engine, exact_slots)
    new = engine.run(wl)
    assert new.requests == 6 and new.leak_free and old.leak_free
    assert_same_outputs(new, reference)
    assert_same_outputs(old, reference)
    assert_settled(engine)
    window = cfg().sliding_window
    # every finish named the positions it freed: all of its output but the last window
    by_rid = {r.rid: r for r in new.results}
    finishes = [(n, ppl, es) for n, ppl, es in inserts if es > 0]
    assert len(finishes) == 6
    for n, ppl, es in finishes:
        assert es == n - window  # freed below prefilled - (W - 1) after the step before
        assert ppl < es  # past the locked prefix: the request's own slots
    # each later turn matched the previous turn's whole sequence, through its tombstone
    for c in range(2):
        for t in (1, 2):
            prev, nxt = by_rid[f"c{c}-t{t - 1}"], by_rid[f"c{c}-t{t}"]
            assert nxt.cached_tokens >= prev.prompt_len + len(prev.output) - 1
    # and the old engine, whose SWA pool was short, reused less
    assert new.cached_tokens >= old.cached_tokens


def test_swa_in_use_shrinks_to_the_window_while_decoding() -> None:
    """Two requests of 315 positions each: the old engine holds an SWA slot per position,
    so the second waits for the first to end (630 > 480 SWA slots); freeing what left the
    window, a decoding request holds the positions still to come plus W - 1, and the
    second is admitted while the first is still decoding."""
    rng = np.random.default_rng(3)
    specs = [RequestSpec(f"r{i}", rng.integers(1, 250, 16).astype(np.int32), 300) for i in range(2)]
    wl = Workload("long", "two long decodes", specs)
    keep = cfg().sliding_window - 1
    peaks: dict[str, int] = {}

    def count_running(engine: Engine) -> None:
        peaks["running"] = max(peaks.get("running", 0), len(engine._running))

    def sample(engine: Engine) -> None:
        exact_slots(engine)
        count_running(engine)
        for r in engine._running:
            if r.output:  # prompt cached: the request's own SWA is bounded
                live = live_swa(engine, r.slots[r.cached_len :])
                assert live <= r.kv_len - r.prefilled + keep, (r.spec.rid, r.prefilled, live)

    runs = {}
    for label, k in (("old", NEVER), ("new", None)):
        peaks.clear()
        engine = make_engine(keep=k)
        if label == "new":
            after_every_step(engine, sample)
        else:
            after_every_step(engine, count_running)
        runs[label] = (engine.run(wl), dict(peaks))
        assert_settled(engine)
    (old, old_peaks), (new, new_peaks) = runs["old"], runs["new"]
    assert_same_outputs(new, old)
    assert old_peaks["running"] == 1  # served one after the other
    assert new_peaks["running"] == 2  # the second started while the first decoded
    a, b = new.results
    assert b.ttft < a.latency  # its first token before the first request ended


@pytest.mark.parametrize("kind", ["radix", "chunk"])
@pytest.mark.parametrize("keep, same", [(31, True), (30, False)])
def test_the_window_reaches_back_w_minus_one_positions(keep: int, same: bool, kind: str) -> None:
    """The model's swa layers read positions p - W + 1 .. p for a token at p (model.py's
    mask: ``kv_pos > q_pos - sliding_window``): keeping W - 1 positions behind the next one
    changes nothing, keeping one fewer (freeing one position too many) changes outputs,
    with the tree and with ChunkCache (which frees from the first prefill chunk on)."""
    assert cfg().sliding_window - 1 == 31
    wl = chats()
    reference = make_engine("chunk", keep=NEVER).run(wl)
    engine = make_engine(kind, keep=keep)
    got = engine.run(wl)
    assert_settled(engine)
    identical = all(
        np.array_equal(x.output, y.output)
        for x, y in zip(got.results, reference.results, strict=True)
    )
    assert identical is same


def test_an_error_mid_decode_gives_back_full_slots_whose_swa_side_is_gone() -> None:
    """A callback raising while requests decode with SWA sides freed: the release frees the
    full slots (``free`` skips the SWA sides already gone) and every count adds up."""
    wl = chats()
    engine = make_engine()
    freed_some: list[bool] = []

    def boom(engine: Engine) -> None:
        exact_slots(engine)
        freed = any(r.swa_evicted > r.cached_len for r in engine._running)
        if freed and engine._steps > 150 and not freed_some:  # once, mid-decode
            freed_some.append(True)
            raise RuntimeError("stop")

    after_every_step(engine, boom)
    with pytest.raises(RuntimeError, match="stop"):
        engine.run(wl)
    assert freed_some
    assert_settled(engine)
    # and the engine serves again, exactly
    engine2 = make_engine("chunk")
    again = engine.run(wl)
    assert_same_outputs(again, engine2.run(wl))
    assert_settled(engine)


def test_chunk_cache_frees_out_of_window_swa_between_prefill_chunks() -> None:
    """A ChunkCache over split pools caches nothing, so every slot is the request's: it
    frees the SWA side of what left the model's window after every step, prompt positions
    included, between the chunks of a long prefill. Outputs equal the same engine that
    frees nothing; a request's live SWA is at most its positions still to come plus W - 1
    after every step, prefill included; and the pools add up after every step and after
    the run."""
    rng = np.random.default_rng(5)
    specs = [RequestSpec(f"p{i}", rng.integers(1, 250, 200).astype(np.int32), 40) for i in range(3)]
    wl = Workload("long-prompts", "three 200-token prompts, 40 generated", specs)
    keep = cfg().sliding_window - 1
    freed_in_prefill: list[str] = []

    def sample(engine: Engine) -> None:
        exact_slots(engine)
        for r in engine._running:
            live = live_swa(engine, r.slots)
            assert live <= r.kv_len - r.prefilled + keep, (r.spec.rid, r.prefilled, live)
            if r.in_prefill and r.swa_evicted > 0:
                freed_in_prefill.append(r.spec.rid)

    reference = make_engine("chunk", keep=NEVER).run(wl)
    engine = make_engine("chunk")
    after_every_step(engine, sample)
    got = engine.run(wl)
    assert got.leak_free and reference.leak_free
    assert_same_outputs(got, reference)
    assert_settled(engine)
    assert set(freed_in_prefill) == {"p0", "p1", "p2"}
