"""A review of untested paths (session 24): the engine's configuration checks, its rarely
taken error paths and the SIGINT handling outside the main thread or under SIG_DFL.

Every run uses the micro model, a 256-slot pool and one scheduler config, so the file
compiles a handful of step shapes once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Any

import numpy as np
import pytest
from conftest import child_env

from pymllm.engine import model as M
from pymllm.engine.config import get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import Engine, EngineError, SchedulerConfig
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache, RadixKey

POOL = 256
SCHED = SchedulerConfig(max_running=4, max_prefill_batch=2, chunk_tokens=32)
_PARAMS: dict[str, Any] = {}


def params(variant: str) -> Any:
    if variant not in _PARAMS:
        _PARAMS[variant] = M.init_params(get_config("micro", variant))
    return _PARAMS[variant]


def ramp(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) % 250 + 1).astype(np.int32)


def workload(n: int = 3, length: int = 20, out: int = 3, shared: int = 0) -> Workload:
    head = ramp(200, shared)
    specs = [RequestSpec(f"r{i}", np.r_[head, ramp(10 * i, length)], out) for i in range(n)]
    return Workload("w", "w", specs)


def engine_with(cache_factory: Any, variant: str = "full", state: int = 0) -> Engine:
    cfg = get_config("micro", variant)
    mem = EngineMemory(cfg, POOL, state_size=state)
    return Engine(cfg, mem, cache_factory(mem), params=params(variant), sched=SCHED)


def radix(mem: EngineMemory, cls: type = RadixCache) -> Any:
    return cls(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator)


def assert_accounted(engine: Engine) -> None:
    free, in_cache, ok = engine.check_slots()
    assert ok, (free, in_cache)
    assert free + in_cache == engine.memory.kv_size
    assert engine.cache.protected_size() == 0


def serves_again(engine: Engine) -> None:
    stats = engine.run(workload(n=2))
    assert stats.leak_free and stats.requests == 2
    assert_accounted(engine)


# -- ModelConfig: each documented check names the field ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"variant": "moe"}, r"variant must be one of \['full', 'hybrid', 'swa'\], got 'moe'"),
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
        ({"head_dim": 15}, "head_dim must be even for RoPE, got 15"),
        ({"variant": "swa", "n_layers": 3}, r"n_layers \(3\) must be a multiple of the 'swa'"),
        (
            {"variant": "hybrid", "n_layers": 1},
            r"n_layers \(1\) must be a multiple of the 'hybrid'",
        ),
        ({"conv_width": 1}, "conv_width must be >= 2, got 1"),
        ({"sliding_window": 0}, "sliding_window must be >= 1, got 0"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"rope_theta": float("nan")}, "rope_theta must be a positive number"),
    ],
)
def test_model_config_refuses_with_a_message_naming_the_field(overrides, match):
    variant = overrides.pop("variant", "full")
    with pytest.raises(ValueError, match=match):
        get_config("micro", variant, **overrides)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conv_width", 2.5),  # accepted; a hybrid engine then fails deep in MambaPool
        ("conv_width", "4"),  # a bare "'<' not supported" TypeError that names nothing
        ("sliding_window", 2.5),  # accepted, and served with a fractional window
        ("sliding_window", True),
        ("seed", -1),  # accepted; init_params then raises numpy's "expected non-negative"
        ("seed", "x"),
    ],
)
def test_model_config_refuses_non_integer_sizes_and_seeds(field, value):
    """``conv_width``, ``sliding_window`` and ``seed`` were not type-checked (until session
    24): a bad one was accepted (or failed with a message naming nothing), and the failure
    came later, from the pools or from numpy."""
    with pytest.raises((TypeError, ValueError), match=field):
        get_config("micro", "hybrid" if field == "conv_width" else "full", **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_running", 2.5),
        ("max_running", "4"),
        ("chunk_tokens", None),
        ("max_prefill_batch", float("nan")),
    ],
)
def test_scheduler_config_refuses_non_integers(field, value):
    """SchedulerConfig checked only ``< 1`` (until session 24): max_running=2.5 was
    accepted and a run died with IndexError in the decode step; "4" or None gave a bare
    "'<' not supported" TypeError naming no field; NaN passed."""
    with pytest.raises((TypeError, ValueError), match=field):
        SchedulerConfig(**{field: value})


# -- Engine: a windowed cache narrower than the model ------------------------------------------


def test_a_cache_window_shorter_than_the_models_is_refused():
    cfg = get_config("micro", "swa")
    mem = EngineMemory(cfg, POOL, swa_size=POOL)
    alloc = mem.token_to_kv_pool_allocator
    short = RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=cfg.sliding_window - 1)
    with pytest.raises(
        ValueError, match=r"the cache's window \(31\) is shorter than the model's \(32\)"
    ):
        Engine(cfg, mem, short, params=params("swa"), sched=SCHED)
    Engine(  # the model's own window (or a wider one) is accepted over the same memory
        cfg,
        mem,
        RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=cfg.sliding_window),
        params=params("swa"),
        sched=SCHED,
    )


# -- admission: no state slot for now, nothing can run at all ------------------------------------


def test_hybrid_with_fewer_state_slots_than_running_waits_for_one():
    """ChunkCache over a hybrid model with 2 state slots and max_running 4: the third
    request finds no state slot ('nomem') and waits for one instead of failing."""
    engine = engine_with(lambda m: ChunkCache(m.token_to_kv_pool_allocator), "hybrid", state=2)
    stats = engine.run(workload(n=5))
    assert stats.requests == 5 and stats.leak_free
    assert [r.rid for r in stats.results] == [f"r{i}" for i in range(5)]
    assert engine.memory.state_available() == 2
    assert_accounted(engine)


def test_nothing_running_and_no_room_raises_engine_error_and_keeps_the_users_lock():
    """A prefix the caller locked in the cache before the run is not evictable: a request
    that fits the pool but not the rest cannot be admitted with nothing running."""
    engine = engine_with(radix)
    alloc, cache = engine.memory.token_to_kv_pool_allocator, engine.cache
    held = ramp(100, 200)
    slots = alloc.alloc(200)
    cache.insert(RadixKey(held), slots)
    node = cache.match_prefix(RadixKey(held)).last_node
    cache.inc_lock_ref(node)
    wl = Workload("w", "w", [RequestSpec("big", ramp(0, 100), 4)])
    with pytest.raises(
        EngineError,
        match=r"request big needs 103 KV slots and cannot be admitted "
        r"with nothing running: 56 free after evicting, 200 locked in the cache",
    ):
        engine.run(wl)
    assert cache.protected_size() == 200 and alloc.available_size() == 56  # as it was
    cache.dec_lock_ref(node)
    assert_accounted(engine)
    assert engine.run(wl).leak_free  # evicts the unlocked prefix now
    assert_accounted(engine)


# -- a cache that reports the impossible: EngineError, and nothing of ours is lost ----------------


class ShortInsert(RadixCache):
    """Reports prefix_len 0 for a prompt whose prefix the request has locked."""

    def insert(self, key: Any, value: Any = None, **kwargs: Any) -> Any:
        res = super().insert(key, value, **kwargs)
        res.prefix_len = 0
        return res


def test_an_insert_reporting_less_than_the_locked_prefix_raises_engine_error():
    """At the finish the request holds its whole prompt locked (adopted after caching it):
    an insert that reports less is a broken cache, refused by name rather than served on."""
    engine = engine_with(lambda m: radix(m, ShortInsert))
    with pytest.raises(
        EngineError,
        match=r"cache reported prefix_len 0 below the locked prefix "
        r"20 of request r0",
    ):
        engine.run(workload(n=1))


class ShortRematch(RadixCache):
    """Once armed, the match after an insert comes back one token short."""

    armed = False
    after_insert = False

    def insert(self, key: Any, value: Any = None, **kwargs: Any) -> Any:
        self.after_insert = True
        return super().insert(key, value, **kwargs)

    def match_prefix(self, key: Any) -> Any:
        m = super().match_prefix(key)
        if self.armed and self.after_insert and len(m.indices):
            self.after_insert = False
            m.indices = m.indices[:-1]
        return m


def test_a_short_rematch_of_a_cached_prompt_raises_and_gives_back_our_slots():
    engine = engine_with(lambda m: radix(m, ShortRematch))
    engine.cache.armed = True
    with pytest.raises(
        EngineError,
        match=r"re-matching the cached prompt of r0 found 19 tokens, "
        r"fewer than the 20 the cache holds",
    ):
        engine.run(workload(n=3))
    assert_accounted(engine)
    engine.cache.armed = False
    serves_again(engine)


class BadBranch:
    """A MatchResult whose mamba_branching_seqlen raises when read."""

    def __init__(self, m: Any) -> None:
        self.indices, self.last_node, self.prefix_len = m.indices, m.last_node, m.prefix_len

    @property
    def mamba_branching_seqlen(self) -> int:
        raise RuntimeError("branch lookup failed")


class FailAfterLock(RadixCache):
    armed = False

    def match_prefix(self, key: Any) -> Any:
        m = super().match_prefix(key)
        return BadBranch(m) if self.armed and len(key) == 39 else m


def test_a_failure_after_the_admission_locked_and_allocated_gives_it_all_back():
    """The admission has locked the prefix and allocated every slot when reading the match
    result raises: the request (not yet running) gives back its lock and its slots."""
    engine = engine_with(lambda m: radix(m, FailAfterLock))
    engine.run(workload(n=1, shared=20))
    engine.cache.armed = True
    with pytest.raises(RuntimeError, match="branch lookup failed"):
        engine.run(Workload("w", "w", [RequestSpec("x", np.r_[ramp(200, 20), ramp(0, 20)], 5)]))
    assert_accounted(engine)
    engine.cache.armed = False
    serves_again(engine)


class FailingCleanup(RadixCache):
    """The second request's match raises; the unlock in the cleanup that follows raises
    too (once)."""

    matches = 0
    unlock_fails = 0

    def match_prefix(self, key: Any) -> Any:
        FailingCleanup.matches += 1
        if FailingCleanup.matches == 2:
            raise RuntimeError("match failed")
        return super().match_prefix(key)

    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        if FailingCleanup.unlock_fails:
            FailingCleanup.unlock_fails -= 1
            raise RuntimeError("unlock failed")
        super().dec_lock_ref(node, **kwargs)


def test_a_failing_cleanup_keeps_the_original_error_and_notes_the_second():
    FailingCleanup.matches, FailingCleanup.unlock_fails = 0, 1
    engine = engine_with(lambda m: radix(m, FailingCleanup))
    with pytest.raises(RuntimeError, match="match failed") as info:
        engine.run(workload(n=2))
    notes = getattr(info.value, "__notes__", [])
    assert notes == ["releasing the unfinished requests failed too: RuntimeError('unlock failed')"]
    # the running request's slots were freed all the same (its lock is the cache's problem)
    free, in_cache, _ = engine.check_slots()
    assert free + in_cache == POOL


# -- SIGINT outside the main thread, and with SIG_DFL in place ---------------------------------


def test_a_run_in_another_thread_leaves_the_signal_handler_alone():
    engine = engine_with(radix)
    before = signal.getsignal(signal.SIGINT)
    seen: list[Any] = []

    def progress(done: int, total: int, now: float) -> None:
        seen.append(signal.getsignal(signal.SIGINT))

    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.setdefault("s", engine.run(workload(), progress=progress))
    )
    t.start()
    t.join(60)
    assert out["s"].leak_free and out["s"].requests == 3
    assert seen and all(h is before for h in seen)  # never replaced from the worker thread
    assert signal.getsignal(signal.SIGINT) is before
    assert_accounted(engine)


def _child_rc(code: str) -> tuple[int, str]:
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
        env=child_env(),
    )
    return run.returncode, run.stdout + run.stderr


_CHILD = """
    import signal, numpy as np
    from pymllm.engine.config import get_config
    from pymllm.engine.memory import EngineMemory
    from pymllm.engine.scheduler import Engine, SchedulerConfig
    from pymllm.engine.workloads import RequestSpec, Workload
    from pymllm.mem_cache import RadixCache

    class Sig(RadixCache):
        fire = False

        def match_prefix(self, key):
            if self.fire:
                signal.raise_signal(signal.SIGINT)
            return super().match_prefix(key)

    cfg = get_config("micro")
    mem = EngineMemory(cfg, 128)
    cache = Sig(token_to_kv_pool_allocator=mem.token_to_kv_pool_allocator)
    engine = Engine(cfg, mem, cache, sched=SchedulerConfig(max_running=2, chunk_tokens=32))
    wl = Workload("w", "w", [RequestSpec(f"r{i}", np.arange(1, 20, dtype=np.int32) + i, 3)
                             for i in range(3)])
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    {body}
    print("survived", flush=True)
"""


@pytest.mark.parametrize(
    "body",
    [
        # in a callback: the default action at once
        "engine.run(wl, progress=lambda *a: signal.raise_signal(signal.SIGINT))",
        # held in the loop (raised inside a cache call), then the default action
        "cache.fire = True; engine.run(wl)",
    ],
    ids=["callback", "held"],
)
def test_a_sigint_under_sig_dfl_terminates_the_process_as_without_the_engine(body):
    rc, out = _child_rc(_CHILD.replace("{body}", body))
    assert rc == -signal.SIGINT, out[-2000:]
    assert "survived" not in out
