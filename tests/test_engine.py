"""The reference engine: model vs a dense reference, cache exactness, slot accounting.

Every test uses the ``micro`` preset and the same step shapes (prefill: 2 rows of 32 tokens,
decode: 4 rows; slot tables of 128), so each variant compiles two step shapes for the whole
module: compiling dominates the module's run time.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.engine import model as M
from pymllm.engine.config import get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import (
    Engine,
    EngineError,
    RunStats,
    SchedulerConfig,
    ideal_cached_tokens,
)
from pymllm.engine.workloads import RequestSpec, Workload, multi_turn, shared_prefix
from pymllm.mem_cache import ChunkCache, RadixCache
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache

SCHED = SchedulerConfig(
    max_running=4, max_prefill_batch=2, pad_prefill_batch=True, chunk_tokens=32, record_logits=True
)
LOGIT_ATOL = 1e-4
# One pool size for the module: the buffers' shapes are part of every step's compile key.
POOL = 512
STATE_SLOTS = 12  # 4 running requests plus states the MambaRadixCache keeps
SWA_POOL = 480  # the swa variant's sliding-window layers keep their KV in a smaller pool


@functools.cache
def cfg_of(variant: str):
    return get_config("micro", variant)


@functools.cache
def params_of(variant: str):
    return M.init_params(cfg_of(variant))


def small_shared(seed: int = 0, n_groups: int = 3, per_group: int = 4) -> Workload:
    return shared_prefix(
        vocab_size=256,
        n_groups=n_groups,
        per_group=per_group,
        prefix_len=96,
        suffix_len=(8, 24),
        output_len=6,
        seed=seed,
    )


def serve(
    variant: str, kind: str, workload: Workload, pool: int, sched: SchedulerConfig | None = None
) -> tuple[RunStats, Engine]:
    cfg = cfg_of(variant)
    sched = sched or SCHED
    swa = SWA_POOL if variant == "swa" else None
    mem = EngineMemory(cfg, pool, state_size=STATE_SLOTS, swa_size=swa)
    alloc = mem.token_to_kv_pool_allocator
    if kind == "chunk":
        cache = ChunkCache(alloc)
    elif cfg.rec_layer_ids:
        cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=mem.state_pool)
    elif swa:
        cache = RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=cfg.sliding_window)
    else:
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
    engine = Engine(cfg, mem, cache, params=params_of(variant), sched=sched)
    return engine.run(workload), engine


def assert_same_generation(a: RunStats, b: RunStats) -> None:
    assert [r.rid for r in a.results] == [r.rid for r in b.results]
    for x, y in zip(a.results, b.results, strict=True):
        np.testing.assert_array_equal(x.output, y.output, err_msg=x.rid)
        np.testing.assert_allclose(x.first_logits, y.first_logits, rtol=0, atol=LOGIT_ATOL)


def assert_slots_accounted(engine: Engine) -> None:
    """Every KV slot is free or in the tree, exactly once; nothing locked."""
    cache, mem = engine.cache, engine.memory
    free, in_cache, ok = engine.check_slots()
    assert ok
    assert free + in_cache == mem.kv_size
    assert cache.protected_size() == 0
    mem.token_to_kv_pool_allocator._check_invariants()
    if isinstance(cache, RadixCache):
        cache._check_invariants()
        vals = [np.asarray(n.value) for n in cache._nodes() if len(n.key)]
        tree = np.concatenate(vals) if vals else np.zeros(0, np.int32)
        assert len(tree) == in_cache
        assert len(np.unique(tree)) == len(tree)
        assert tree.min(initial=1) >= 1 and tree.max(initial=1) <= mem.kv_size
    if isinstance(cache, MambaRadixCache):
        cache._check_invariants()
        assert cache.mamba_protected_size() == 0
        in_tree = [int(n.mamba_value[0]) for n in cache._nodes() if n.mamba_value is not None]
        assert len(set(in_tree)) == len(in_tree) == cache.mamba_evictable_size()
        assert mem.state_available() + len(in_tree) == mem.state_size
    elif mem.state_pool is not None:
        assert mem.state_available() == mem.state_size


# -- the model ----------------------------------------------------------------------------


def dense_logits(variant: str, tokens: np.ndarray) -> np.ndarray:
    """A plain float64 numpy forward over the whole sequence: no pool, no paging, no chunks."""
    cfg = cfg_of(variant)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params_of(variant))
    h, kvh, hd, n = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, len(tokens)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    half = hd // 2
    ang = np.arange(n)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def silu(x):
        return x / (1 + np.exp(-x))

    x = params["embed"][tokens]
    pattern = cfg.pattern
    for layer, kind in enumerate(cfg.layer_kinds):
        p = {k: v[layer // len(pattern)] for k, v in params["blocks"][layer % len(pattern)].items()}
        hn = rms(x, p["norm1"])
        if kind == "rec":
            u = hn @ p["w_u"]
            pad = np.concatenate([np.zeros((cfg.conv_width - 1, u.shape[1])), u])
            u = sum(pad[j : j + n] * p["conv"][j] for j in range(cfg.conv_width))
            a = 1 / (1 + np.exp(-(hn @ p["w_a"] + p["b_a"])))
            s, seq = np.zeros(u.shape[1]), []
            for t in range(n):
                s = a[t] * s + (1 - a[t]) * u[t]
                seq.append(s)
            y = (np.stack(seq) * silu(hn @ p["w_g"])) @ p["w_o"]
        else:
            q = rope((hn @ p["wq"]).reshape(n, h, hd))
            k = np.repeat(rope((hn @ p["wk"]).reshape(n, kvh, hd)), h // kvh, axis=1)
            v = np.repeat((hn @ p["wv"]).reshape(n, kvh, hd), h // kvh, axis=1)
            sc = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            qi, ki = np.arange(n)[:, None], np.arange(n)[None, :]
            vis = ki <= qi
            if kind == "swa":
                vis &= ki > qi - cfg.sliding_window
            sc = np.where(vis, sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            y = np.einsum("hqk,khd->qhd", pr, v).reshape(n, h * hd) @ p["wo"]
        x = x + y
        hn = rms(x, p["norm2"])
        x = x + (silu(hn @ p["w_gate"]) * (hn @ p["w_up"])) @ p["w_down"]
    return rms(x, params["norm_f"]) @ params["lm_head"]


def step_batch(tokens, positions, new_slots, table, state_slot, fresh):
    """A prefill-shaped batch (2 rows of 32, slot tables of 128) whose second row is padding."""
    n = len(tokens)
    b = {
        "tokens": np.zeros((2, 32), np.int32),
        "positions": np.zeros((2, 32), np.int32),
        "new_slots": np.zeros((2, 32), np.int32),
        "kv_slots": np.zeros((2, 128), np.int32),
        "chunk_lens": np.array([n, 0], np.int32),
        "last_idx": np.array([n - 1, 0], np.int32),
        "state_slots": np.array([state_slot, 0], np.int32),
        "state_read": np.array([state_slot, 0], np.int32),
        "state_fresh": np.array([fresh, False]),
    }
    b["tokens"][0, :n] = tokens
    b["positions"][0, :n] = positions
    b["new_slots"][0, :n] = new_slots
    b["kv_slots"][0, : len(table)] = table
    return b


@pytest.mark.parametrize("variant", ["full", "swa", "hybrid"])
def test_paged_chunked_steps_match_dense_reference(variant):
    """Chunked prefill then decode, KV at scattered slots, equals one dense pass."""
    cfg = cfg_of(variant)
    n = 100
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, cfg.vocab_size, n).astype(np.int32)
    slots = rng.permutation(np.arange(1, 301, dtype=np.int32))[:n]  # not contiguous
    want = dense_logits(variant, tokens)
    mem = EngineMemory(cfg, POOL, state_size=STATE_SLOTS)
    bounds = [(0, 32), (32, 64), (64, 90)] + [(i, i + 1) for i in range(90, n)]
    for a, e in bounds:
        # Decode steps (one token) reuse the prefill shape: one compilation per variant.
        batch = step_batch(tokens[a:e], np.arange(a, e), slots[a:e], slots[:e], 2, a == 0)
        _, logits, kv, swa_kv, state = M.extend_step(
            params_of(variant), mem.kv, mem.swa_kv, mem.state, batch, cfg
        )
        mem.rebind(kv, swa_kv, state)
        np.testing.assert_allclose(np.asarray(logits)[0], want[e - 1], rtol=0, atol=2e-3)


def test_step_donates_the_pool_buffers():
    cfg = cfg_of("hybrid")
    mem = EngineMemory(cfg, POOL, state_size=STATE_SLOTS)
    old_kv, old_state = mem.kv, mem.state
    batch = step_batch(np.array([5, 6]), np.arange(2), np.array([1, 2]), np.array([1, 2]), 1, True)
    _, _, kv, swa_kv, state = M.extend_step(
        params_of("hybrid"), old_kv, None, old_state, batch, cfg
    )
    mem.rebind(kv, swa_kv, state)
    assert old_kv.k.is_deleted() and old_kv.v.is_deleted()
    assert old_state.conv.is_deleted() and old_state.temporal.is_deleted()
    assert not mem.kv.k.is_deleted()


# -- the engine: exactness and accounting ---------------------------------------------------


@pytest.mark.parametrize("variant", ["full", "swa", "hybrid"])
def test_radix_matches_chunk_under_eviction_and_chunked_prefill(variant):
    wl = small_shared(n_groups=4, per_group=4)
    # 4 prefixes of 96 tokens, 16 requests of up to 125 slots, 4 running, 512 slots: the
    # cache must evict to admit.
    radix, radix_engine = serve(variant, "radix", wl, pool=POOL)
    chunk, chunk_engine = serve(variant, "chunk", wl, pool=POOL)
    assert_same_generation(radix, chunk)
    assert radix.requests == chunk.requests == 16
    assert radix.evicted_tokens > 0
    assert radix.cached_tokens > 0 and chunk.cached_tokens == 0
    assert radix.prefill_tokens == radix.prompt_tokens - radix.cached_tokens
    assert chunk.prefill_tokens == chunk.prompt_tokens
    assert radix.prefill_steps < chunk.prefill_steps
    if variant == "swa":  # the windowed tree freed SWA KV that no window needs any more
        assert radix_engine.cache.swa_evictable_size() < radix_engine.cache.evictable_size()
    for engine in (radix_engine, chunk_engine):
        assert_slots_accounted(engine)


def _tombstone_crossing_workload() -> Workload:
    """R1 caches its prompt S+Z through [S], which SWA pressure (R4's admission) tombstoned
    while R3, still decoding, holds it locked: the tree cannot revive it, frees R1's copies
    there, and the windowed re-match of R1's prompt comes back short."""
    rng = np.random.default_rng(0)

    def tok(n: int) -> np.ndarray:
        return rng.integers(1, 250, n).astype(np.int32)

    s, q2, q3, p5, z = tok(24), tok(40), tok(40), tok(40), tok(8)
    specs = {
        "R2": RequestSpec("R2", np.concatenate([s, q2]), 2),
        "R5": RequestSpec("R5", p5, 4),
        "R3": RequestSpec("R3", np.concatenate([s, q3]), 60),
        "R4": RequestSpec("R4", tok(60), 3),
        "R1": RequestSpec("R1", np.concatenate([s, z]), 2),
    }
    nxt = {"R2": "R3", "R5": "R4", "R4": "R1"}
    return Workload(
        "tombstone-crossing",
        "a prompt cached across a locked tombstone",
        [specs["R2"], specs["R5"]],
        follow_up=lambda spec, out: specs.get(nxt.get(spec.rid, "")),
        total_requests=5,
    )


def swa_engine(swa_size: int) -> Engine:
    """An engine of the swa model over split pools, the SWA one of *swa_size* slots, with
    the windowed tree (the tombstone-crossing tests)."""
    cfg = cfg_of("swa")
    sched = SchedulerConfig(max_running=4, max_prefill_batch=2, chunk_tokens=32)
    mem = EngineMemory(cfg, POOL, swa_size=swa_size)
    alloc = mem.token_to_kv_pool_allocator
    cache = RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=cfg.sliding_window)
    return Engine(cfg, mem, cache, params=params_of("swa"), sched=sched)


def test_swa_prompt_cached_across_a_locked_tombstone_is_recomputed(monkeypatch):
    """The windowed re-match of a cached prompt stops short at a tombstone that another
    running request holds locked: the request prefills those positions again in new slots
    and generates what it does with no memory pressure (the engine raised EngineError)."""
    refills = []
    real = Engine._refill

    def spy(self, r, matched, covered):
        refills.append((r.spec.rid, len(matched), covered))
        return real(self, r, matched, covered)

    monkeypatch.setattr(Engine, "_refill", spy)
    runs = {}
    for swa in (150, SWA_POOL):
        engine = swa_engine(swa)
        runs[swa] = engine.run(_tombstone_crossing_workload())
        assert_slots_accounted(engine)
        if swa == 150:
            assert refills and refills[0][0] == "R1" and refills[0][1] < refills[0][2]
            n_refills = len(refills)
    assert len(refills) == n_refills  # none without the pressure
    # the recomputed tokens are work done, not tokens the cache missed twice
    for stats in runs.values():
        assert all(0 <= r.cached_tokens <= r.prompt_len for r in stats.results)
        assert stats.cached_tokens == sum(r.cached_tokens for r in stats.results) >= 0
    r1 = {r.rid: r for r in runs[150].results}["R1"]
    redone = sum(covered - got for _, got, covered in refills)
    assert runs[150].prefill_tokens == runs[150].prompt_tokens - runs[150].cached_tokens + redone
    assert r1.cached_tokens == 0
    pressed, free = runs[150].outputs(), runs[SWA_POOL].outputs()
    assert pressed.keys() == free.keys() == {"R1", "R2", "R3", "R4", "R5"}
    for rid, out in free.items():
        np.testing.assert_array_equal(pressed[rid], out, err_msg=rid)


def test_radix_reaches_the_ideal_hit_rate():
    wl = small_shared()
    radix, engine = serve("full", "radix", wl, pool=POOL)
    # Requests sharing a prompt still in prefill wait for it instead of recomputing it.
    assert radix.cached_tokens == ideal_cached_tokens(radix.results)
    assert_slots_accounted(engine)


def test_multi_turn_reuses_the_conversation_and_stays_exact():
    wl = multi_turn(
        vocab_size=256, n_conversations=3, turns=3, system_len=48, user_len=(8, 16), output_len=6
    )
    radix, radix_engine = serve("full", "radix", wl, pool=POOL)
    chunk, chunk_engine = serve("full", "chunk", wl, pool=POOL)
    assert radix.requests == 9
    assert_same_generation(radix, chunk)
    by_rid = {r.rid: r for r in radix.results}
    # A later turn reuses the previous turn's prompt and all but its last generated token.
    prev, nxt = by_rid["c0-t0"], by_rid["c0-t1"]
    assert nxt.cached_tokens >= prev.prompt_len + len(prev.output) - 1
    assert_slots_accounted(radix_engine)
    assert_slots_accounted(chunk_engine)


@pytest.mark.parametrize("variant", ["full", "swa", "hybrid"])
def test_served_generation_matches_dense_greedy_decoding(variant):
    """Batched, chunked, paged serving generates what a dense forward pass would."""
    wl = small_shared(seed=5)
    stats, engine = serve(variant, "chunk", wl, pool=POOL)
    for r in stats.results[:3]:
        seq = list(r.prompt)
        for i in range(len(r.output)):
            logits = dense_logits(variant, np.asarray(seq))[-1]
            if i == 0:
                np.testing.assert_allclose(r.first_logits, logits, rtol=0, atol=2e-3)
            seq.append(int(np.argmax(logits)))
        np.testing.assert_array_equal(r.output, seq[len(r.prompt) :], err_msg=r.rid)
    assert_slots_accounted(engine)


def test_no_recompilation_across_request_sizes():
    serve("full", "radix", small_shared(seed=0), pool=POOL)
    before = M.compile_count()
    stats, _ = serve("full", "radix", small_shared(seed=7), pool=POOL)
    assert M.compile_count() == before
    assert stats.compiles == 0


def test_every_compilation_of_a_run_is_inside_the_timed_step():
    """Only extend_step's compilations are taken off the clock, so any other one lands in
    the requests' latencies: the batch's jnp.asarray compiled a staging kernel per new shape
    (8 in a fresh process), and the hybrid model's state snapshot copy one more. A fresh
    process, so that no earlier test has compiled them already."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import jax
from pymllm.engine import model as M
from pymllm.engine.scheduler import Engine
import test_engine as T
inside, outside = [False], []
def listener(name, *args, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration" and not inside[0]:
        outside.append(1)
jax.monitoring.register_event_duration_secs_listener(listener)
step = M.extend_step
def timed(*args, **kwargs):
    inside[0] = True
    try:
        return step(*args, **kwargs)
    finally:
        inside[0] = False
M.extend_step = timed
run = Engine.run
def counted(self, *args, **kwargs):
    outside.clear()
    return run(self, *args, **kwargs)
Engine.run = counted
for variant in ("full", "hybrid"):
    stats, _ = T.serve(variant, "radix", T.small_shared(seed=3), pool=T.POOL)
    assert stats.compiles > 0, variant
    print(variant, len(outside))
"""
    assert run_child(code).split() == ["full", "0", "hybrid", "0"]


def test_hybrid_reuses_saved_states():
    """A prefix is reusable where a state was saved: the second request of a group saves
    one where it branches from the first, so the third and fourth reuse the whole prefix."""
    wl = small_shared()
    radix, engine = serve("hybrid", "radix", wl, pool=POOL)
    by_group: dict[int, list[int]] = {}
    for spec, r in zip(wl.requests, radix.results, strict=True):
        by_group.setdefault(spec.meta["group"], []).append(r.cached_tokens)
    for hits in by_group.values():
        assert hits[:2] == [0, 0] and min(hits[2:]) >= 96
    assert engine.cache.mamba_evictable_size() > 0
    assert_slots_accounted(engine)


@pytest.mark.parametrize("state_slots", [1, 2])
def test_hybrid_admits_with_the_fewest_state_slots(state_slots):
    """One request at a time needs one state slot: with the pool full of the state the
    cache saved, admission drops a saved state for the request's own before locking its
    match (it locked the match, and with it the only state, then found no slot to take:
    EngineError with nothing running). With one slot the hit is lost; with two it stays.
    Either way the generation is the ChunkCache's."""
    cfg = cfg_of("hybrid")
    sched = SchedulerConfig(max_running=1, max_prefill_batch=1, chunk_tokens=32)
    wl = functools.partial(
        multi_turn,
        vocab_size=256,
        n_conversations=1,
        turns=3,
        system_len=40,
        user_len=(3, 9),
        output_len=5,
        seed=1,
    )
    runs = {}
    for kind in ("chunk", "radix"):
        mem = EngineMemory(cfg, POOL, state_size=state_slots)
        alloc = mem.token_to_kv_pool_allocator
        cache = (
            ChunkCache(alloc)
            if kind == "chunk"
            else MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=mem.state_pool)
        )
        engine = Engine(cfg, mem, cache, params=params_of("hybrid"), sched=sched)
        runs[kind] = engine.run(wl())
        assert_slots_accounted(engine)
    assert runs["radix"].requests == runs["chunk"].requests == 3
    for rid, out in runs["chunk"].outputs().items():
        np.testing.assert_array_equal(runs["radix"].outputs()[rid], out, err_msg=rid)
    hits = [r.cached_tokens for r in runs["radix"].results]
    assert (sum(hits) > 0) == (state_slots > 1), hits


def test_hybrid_refuses_a_cache_without_state_snapshots():
    cfg = cfg_of("hybrid")
    mem = EngineMemory(cfg, 64, state_size=2)
    cache = RadixCache(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator)
    with pytest.raises(ValueError, match="recurrent state"):
        Engine(cfg, mem, cache, params=params_of("hybrid"))


def test_request_larger_than_the_pool_is_refused():
    prompt = np.arange(599) % 255 + 1  # ids inside the micro vocabulary
    wl = Workload("one", "one long request", [RequestSpec("big", prompt, 8)])
    with pytest.raises(EngineError, match="needs 606 KV slots; the pool has 512"):
        serve("full", "radix", wl, pool=POOL)


def test_memory_for_another_config_is_refused():
    mem = EngineMemory(cfg_of("full"), 64)
    cache = ChunkCache(mem.token_to_kv_pool_allocator)
    with pytest.raises(ValueError, match="another model config"):
        Engine(cfg_of("swa"), mem, cache)


def test_requests_wait_for_their_arrival():
    prompt = np.arange(1, 41, dtype=np.int32)
    specs = [RequestSpec(f"r{i}", prompt + i, 4, arrival=0.3 * i) for i in range(3)]
    stats, engine = serve("full", "radix", Workload("timed", "timed", specs), pool=POOL)
    arrivals = [r.arrival for r in stats.results]
    assert arrivals == pytest.approx([0.0, 0.3, 0.6])
    assert stats.wall_s >= 0.6
    assert all(r.ttft >= 0 and r.latency >= r.ttft for r in stats.results)
    assert_slots_accounted(engine)
