"""RunStats figures, the refill path's finish, and EngineMemory's pools: behaviours the
engine's tests did not pin (found by mutation testing).

Lives in tests/ (imports the helpers of test_engine and test_engine_errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import test_engine as TE
from test_engine import POOL, SWA_POOL, assert_slots_accounted, cfg_of
from test_engine_errors import make_engine, ramp

from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import Engine, EngineError
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache


def test_tokens_per_s_counts_prompt_and_generated_tokens() -> None:
    """Pins RunStats.tokens_per_s = (prompt + generated tokens) / wall time, as documented
    and as the demo's table labels it ("tokens/s (prompt+generated)"). Counting only
    generated tokens would understate a prefill-heavy run's throughput by the
    prompt/output ratio (30x here) and make the cache look useless in the demo's table."""
    engine = make_engine("full", ChunkCache)
    specs = [RequestSpec(f"r{i}", ramp(10 * i, 60), 2) for i in range(3)]
    stats = engine.run(Workload("w", "w", specs))
    assert stats.prompt_tokens == 180 and stats.generated_tokens == 6
    assert stats.wall_s > 0
    assert stats.tokens_per_s == pytest.approx(186 / stats.wall_s)
    assert stats.summary()["tokens_per_s"] == round(186 / stats.wall_s, 1)


def test_a_one_token_request_recomputed_past_a_locked_tombstone_finishes() -> None:
    """Pins: a request whose windowed re-match comes back short (its prompt runs through a
    tombstone another request holds locked) prefills the positions past it again; when it
    asked for one token only, that token is already out, and the request must be retired as
    soon as the refill is done. Without it the request decodes on past max_new_tokens into
    slots it never allocated (a crash or a run that never ends). The existing test of the
    refill only covers a two-token request, which decodes once more anyway."""
    base = TE._tombstone_crossing_workload()
    follow = base.follow_up
    assert follow is not None

    def one_token_r1(spec, out):  # R1 (the request that gets refilled) wants 1 token
        nxt = follow(spec, out)
        if nxt is not None and nxt.rid == "R1":
            nxt = RequestSpec("R1", nxt.prompt, 1)
        return nxt

    refills = []
    real = Engine._refill

    def spy(self, r, matched, covered):
        refills.append(r.spec.rid)
        return real(self, r, matched, covered)

    outs = {}
    for swa in (150, SWA_POOL):
        engine = TE.swa_engine(swa)
        engine._refill = spy.__get__(engine)
        wl = Workload(base.name, base.description, base.requests, one_token_r1, 5)
        stats = engine.run(wl)
        assert stats.requests == 5 and stats.leak_free
        assert_slots_accounted(engine)
        outs[swa] = stats.outputs()
        if swa == 150:
            assert "R1" in refills  # the refill path was taken
    assert len(outs[150]["R1"]) == 1
    for rid, out in outs[SWA_POOL].items():
        np.testing.assert_array_equal(outs[150][rid], out, err_msg=rid)


def test_split_pools_put_each_layer_kind_in_its_own_pool_only() -> None:
    """Pins EngineMemory's sizing for the sliding-window model: the full pool holds the
    full-attention layers only, the SWA pool the sliding-window layers only. Giving the full
    pool every KV layer still runs (the extra layers are never written) but doubles the full
    pool's device memory for nothing, which is what the split exists to save."""
    cfg = cfg_of("swa")
    n_swa = sum(k == "swa" for k in cfg.layer_kinds)
    n_attn = sum(k == "attn" for k in cfg.layer_kinds)
    mem = EngineMemory(cfg, POOL, swa_size=SWA_POOL)
    assert mem.swa_pool is not None
    assert (mem.kv_pool.layer_num, mem.swa_pool.layer_num) == (n_attn, n_swa)
    full = EngineMemory(cfg, POOL)  # one pool: every KV layer
    assert full.kv_pool.layer_num == n_attn + n_swa
    assert mem.mem_bytes() < full.mem_bytes() + mem.swa_pool.mem_bytes()


@pytest.mark.parametrize("pool", ["swa_kv", "state"])
def test_lost_buffers_of_any_pool_are_reported_not_served_through(pool: str) -> None:
    """Pins: buffers_alive()/check_slots() and the check at the start of a run look at every
    pool, the SWA and the recurrent-state pools included, not only the full KV pool (the
    only one the existing test deletes). A state or SWA buffer lost to a donation whose
    result was never stored would otherwise pass the check and fail the next run deep
    inside JAX ("Array has been deleted") instead of the clear EngineError."""
    variant = "swa" if pool == "swa_kv" else "hybrid"
    if variant == "swa":
        w = cfg_of("swa").sliding_window
        engine = make_engine("swa", RadixCache, sliding_window_size=w)
    else:
        from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache

        engine = make_engine("hybrid", MambaRadixCache)
    wl = Workload("w", "w", [RequestSpec("a", ramp(0, 40), 2)])
    engine.run(wl)
    assert engine.check_slots()[2]
    for b in getattr(engine.memory, pool):
        b.delete()
    assert not engine.memory.buffers_alive()
    assert not engine.check_slots()[2]
    with pytest.raises(EngineError, match="make a new EngineMemory"):
        engine.run(Workload("w2", "w2", [RequestSpec("b", ramp(5, 40), 2)]))
