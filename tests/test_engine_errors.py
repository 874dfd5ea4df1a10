"""The engine's error paths: bad configurations refused up front, bad requests refused before
anything is allocated, and a run that fails midway gives every slot back.

The runs reuse ``test_engine``'s pool sizes and scheduler, so they compile no new step shape.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_engine import (
    POOL,
    SCHED,
    STATE_SLOTS,
    SWA_POOL,
    assert_slots_accounted,
    cfg_of,
    params_of,
    serve,
    small_shared,
    step_batch,
)

from pymllm.engine import model as M
from pymllm.engine.config import ModelConfig, get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import (
    Engine,
    EngineError,
    RequestResult,
    SchedulerConfig,
    ideal_cached_tokens,
)
from pymllm.engine.workloads import RequestSpec, Workload
from pymllm.mem_cache import ChunkCache, RadixCache
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache
from pymllm.mem_cache.memory_pool import (
    MambaPool,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)


def make_engine(variant: str, cache_cls: type = RadixCache, **cache_args: Any) -> Engine:
    cfg = cfg_of(variant)
    swa = SWA_POOL if variant == "swa" else None
    mem = EngineMemory(cfg, POOL, state_size=STATE_SLOTS, swa_size=swa)
    alloc = mem.token_to_kv_pool_allocator
    if cache_cls is ChunkCache:
        cache = ChunkCache(alloc)
    elif cache_cls is MambaRadixCache or issubclass(cache_cls, MambaRadixCache):
        cache = cache_cls(token_to_kv_pool_allocator=alloc, mamba_pool=mem.state_pool)
    else:
        cache = cache_cls(token_to_kv_pool_allocator=alloc, **cache_args)
    return Engine(cfg, mem, cache, params=params_of(variant), sched=SCHED)


def ramp(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) % 250 + 1).astype(np.int32)


def run_after_error(engine: Engine) -> None:
    """The engine accounts for every slot and serves the next run as if nothing happened."""
    assert_slots_accounted(engine)
    wl = Workload("again", "again", [RequestSpec("x", ramp(3, 40), 3)])
    stats = engine.run(wl)
    assert stats.leak_free and stats.requests == 1
    assert_slots_accounted(engine)


# -- a run that fails midway releases every running request -------------------------------


def decoding_with_follow_up(follow: Any) -> Workload:
    """r0 finishes first (its follow-up is created) while r1 and r2 still decode."""
    specs = [
        RequestSpec("r0", ramp(0, 19), 3),
        RequestSpec("r1", ramp(30, 30), 20),
        RequestSpec("r2", ramp(70, 30), 20),
    ]
    return Workload("w", "w", specs, follow_up=lambda s, out: follow(s) if s.rid == "r0" else None)


@pytest.mark.parametrize(
    ("follow", "error", "match"),
    [
        (lambda s: RequestSpec("big", ramp(0, 600), 4), EngineError, "needs 603 KV slots"),
        (lambda s: RequestSpec("oov", np.r_[ramp(0, 9), 256], 2), ValueError, "vocab_size"),
        (lambda s: "not a spec", TypeError, "follow_up"),
        (lambda s: 1 / 0, ZeroDivisionError, None),
    ],
    ids=["too-large", "out-of-vocab", "not-a-spec", "raises"],
)
def test_a_bad_follow_up_releases_the_running_requests(follow, error, match):
    engine = make_engine("full")
    with pytest.raises(error, match=match):
        engine.run(decoding_with_follow_up(follow))
    run_after_error(engine)


def test_a_failing_progress_callback_releases_the_running_requests():
    engine = make_engine("full")

    def progress(done: int, total: int, now: float) -> None:
        raise KeyboardInterrupt  # not even an Exception: the slots still come back

    with pytest.raises(KeyboardInterrupt):
        engine.run(decoding_with_follow_up(lambda s: None), progress=progress)
    run_after_error(engine)


class FailingRadix(RadixCache):
    """Raises from ``match_prefix`` (on a prompt starting with token 250) or ``evict`` once
    told to (``fail`` is ``"match"`` or ``"evict"``)."""

    fail: str | None = None

    def match_prefix(self, key: Any) -> Any:
        if self.fail == "match" and len(key) and int(key.token_ids[0]) == 250:
            raise RuntimeError("match failed")
        return super().match_prefix(key)

    def evict(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail == "evict":
            raise RuntimeError("evict failed")
        return super().evict(*args, **kwargs)


def test_a_failing_match_while_others_run_releases_them():
    engine = make_engine("full", FailingRadix)
    engine.cache.fail = "match"
    specs = [
        RequestSpec("good", ramp(0, 40), 8),
        RequestSpec("bad", np.r_[250, ramp(0, 40)], 2),  # admitted right after "good"
    ]
    with pytest.raises(RuntimeError, match="match failed"):
        engine.run(Workload("w", "w", specs))
    engine.cache.fail = None
    run_after_error(engine)


def test_a_failing_evict_during_admission_releases_the_locked_prefix():
    engine = make_engine("full", FailingRadix)
    engine.run(small_shared(n_groups=4, per_group=1))  # fills the tree: the next run evicts
    engine.cache.fail = "evict"
    with pytest.raises(RuntimeError, match="evict failed"):
        engine.run(small_shared(n_groups=4, per_group=4))
    engine.cache.fail = None
    run_after_error(engine)


def refused_after_mutation(rid: str, mutate: Any, error: type, match: str) -> None:
    """A spec changed after RequestSpec checked it at construction is checked again by the
    engine before anything is allocated, and the engine runs on."""
    engine = make_engine("full")
    bad = RequestSpec(rid, ramp(0, 10), 2)
    mutate(bad)
    with pytest.raises(error, match=match):
        engine.run(Workload("w", "w", [RequestSpec("ok", ramp(0, 20), 2), bad]))
    assert engine.memory.kv_available() == POOL
    run_after_error(engine)


def test_a_mutated_spec_with_a_negative_token_is_refused_before_allocation():
    def mutate(spec: RequestSpec) -> None:
        spec.prompt[3] = -3

    refused_after_mutation("bad", mutate, ValueError, "request bad: prompt token -3 at position 3")


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-3, ValueError), (41.5, TypeError)])
def test_a_mutated_spec_with_a_bad_output_length_is_refused_before_allocation(n, error):
    """max_new_tokens was not checked again: 0 failed mid-run with a broadcast error."""
    refused_after_mutation(
        "bad",
        lambda spec: setattr(spec, "max_new_tokens", n),
        error,
        "request bad: max_new_tokens must be",
    )


@pytest.mark.parametrize(
    ("arrival", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (10**400, ValueError),
        (-1.0, ValueError),
        ("1", TypeError),
    ],
    ids=["nan", "inf", "int-past-float", "negative", "str"],
)
def test_an_arrival_that_never_comes_is_refused(arrival, error):
    """A NaN arrival made the run's wait a busy spin forever (nan - now is never <= 0), an
    infinite one a 50 ms poll forever; both are refused, at construction and (a spec's
    fields can be reassigned) again before anything is allocated."""
    with pytest.raises(error, match="request late: arrival must be"):
        RequestSpec("late", ramp(0, 10), 2, arrival=arrival)
    refused_after_mutation(
        "late",
        lambda spec: setattr(spec, "arrival", arrival),
        error,
        "request late: arrival must be",
    )


def test_a_request_id_used_twice_in_a_run_is_refused():
    """RunStats.outputs() is keyed by request id: the first of two requests named alike
    was dropped from it without a word."""
    engine = make_engine("full")
    wl = Workload("w", "w", [RequestSpec("dup", ramp(0, 20), 2), RequestSpec("dup", ramp(5, 9), 2)])
    with pytest.raises(ValueError, match="request id 'dup' is used twice"):
        engine.run(wl)
    assert engine.memory.kv_available() == POOL
    run_after_error(engine)  # a later run may use the ids again


def test_a_workload_request_that_is_not_a_spec_is_refused():
    engine = make_engine("full")
    wl = Workload("w", "w", [RequestSpec("ok", ramp(0, 20), 2), ("x", [1, 2], 2)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="workload requests must be RequestSpec, got tuple"):
        engine.run(wl)
    assert engine.memory.kv_available() == POOL


def test_out_of_vocab_tokens_are_refused_before_allocation():
    engine = make_engine("full")  # a tree would keep a served request's tokens
    wl = Workload("w", "w", [RequestSpec("oov", np.r_[ramp(0, 29), 256], 3)])
    with pytest.raises(ValueError, match=r"request oov: prompt token 256 at position 29 .*256"):
        engine.run(wl)
    assert engine.memory.kv_available() == POOL


# -- configurations that cannot work are refused at construction -----------------------------


def engine_with(variant: str, make_cache: Any, swa: int | None = None) -> Engine:
    cfg = get_config("micro", variant)
    mem = EngineMemory(cfg, 64, state_size=4, swa_size=swa)
    return Engine(cfg, mem, make_cache(mem), params=params_of(variant))


@pytest.mark.parametrize(
    ("variant", "swa", "make_cache", "match"),
    [
        (
            "full",
            None,
            lambda m: MambaRadixCache(token_to_kv_pool_allocator=m.token_to_kv_pool_allocator),
            "no recurrent layers",
        ),
        (
            "swa",
            48,
            lambda m: RadixCache(
                token_to_kv_pool_allocator=m.token_to_kv_pool_allocator,
                sliding_window_size=32,
                page_size=4,
            ),
            "page_size 4",
        ),
        (
            "hybrid",
            None,
            lambda m: MambaRadixCache(
                token_to_kv_pool_allocator=m.token_to_kv_pool_allocator,
                mamba_pool=m.state_pool,
                page_size=4,
            ),
            "page_size 4",
        ),
        ("full", None, lambda m: RadixCache(), "token_to_kv_pool_allocator"),
        (
            "full",
            None,
            lambda m: RadixCache(token_to_kv_pool_allocator=TokenToKVPoolAllocator(64)),
            "token_to_kv_pool_allocator",
        ),
        (
            "full",
            None,
            lambda m: ChunkCache(TokenToKVPoolAllocator(64)),
            "token_to_kv_pool_allocator",
        ),
        (
            "hybrid",
            None,
            lambda m: MambaRadixCache(token_to_kv_pool_allocator=m.token_to_kv_pool_allocator),
            "mamba_pool",
        ),
        (
            "hybrid",
            None,
            lambda m: MambaRadixCache(
                token_to_kv_pool_allocator=m.token_to_kv_pool_allocator,
                mamba_pool=MambaPool(4, 1, (3, 64), (4, 16)),
            ),
            "mamba_pool",
        ),
    ],
    ids=[
        "mamba-on-full",
        "windowed-paged",
        "mamba-paged",
        "no-allocator",
        "other-allocator",
        "chunk-other-allocator",
        "no-state-pool",
        "other-state-pool",
    ],
)
def test_caches_that_cannot_serve_this_memory_are_refused(variant, swa, make_cache, match):
    with pytest.raises(ValueError, match=match):
        engine_with(variant, make_cache, swa)


def test_caches_that_can_serve_are_accepted():
    engine_with("full", lambda m: ChunkCache())  # frees nothing: it needs no allocator
    engine_with("full", lambda m: ChunkCache(m.token_to_kv_pool_allocator))
    engine_with(
        "full", lambda m: RadixCache(token_to_kv_pool_allocator=m.token_to_kv_pool_allocator)
    )
    engine_with(  # a tree without a window keeps every token: any page size works
        "full",
        lambda m: RadixCache(token_to_kv_pool_allocator=m.token_to_kv_pool_allocator, page_size=4),
    )


def test_split_pools_with_pages_are_refused_where_swa_goes_position_by_position():
    """The engine attaches and frees SWA sides a position at a time (its reservation counts
    them so): over split pools with pages of 4 (not EngineMemory's own) it refuses at
    construction, with a ChunkCache as with a windowed tree; pages of 1 are served."""

    def swapped(ps: int):
        def make(m: EngineMemory) -> Any:
            m.token_to_kv_pool_allocator = SWATokenToKVPoolAllocator(64, 48, page_size=ps)
            return ChunkCache(m.token_to_kv_pool_allocator)

        return make

    with pytest.raises(ValueError, match="SWA allocator with page_size 4"):
        engine_with("swa", swapped(4), 48)
    engine_with("swa", swapped(1), 48)


# -- capacity and accounting ----------------------------------------------------------------


def test_a_request_larger_than_the_swa_pool_is_refused_up_front():
    wl = Workload(
        "w",
        "w",
        [RequestSpec("small", ramp(0, 30), 4), RequestSpec("big", ramp(0, 490), 4)],
    )
    engine = make_engine("swa", RadixCache, sliding_window_size=cfg_of("swa").sliding_window)
    msg = r"request big needs 493 SWA slots at once \(of its 493 KV slots\); the SWA pool has 480"
    with pytest.raises(EngineError, match=msg):
        engine.run(wl)
    alloc = engine.memory.token_to_kv_pool_allocator  # "small" was not served either
    assert alloc.full_available_size() == POOL and alloc.swa_available_size() == SWA_POOL


class CountingMamba(MambaRadixCache):
    """Counts the KV tokens every ``evict`` call frees, whoever asked."""

    evicted = 0

    def evict(self, *args: Any, **kwargs: Any) -> Any:
        res = super().evict(*args, **kwargs)
        CountingMamba.evicted += res.full_evicted
        return res


def test_evicted_tokens_include_the_kv_that_state_evictions_drop():
    CountingMamba.evicted = 0
    engine = make_engine("hybrid", CountingMamba)
    stats = engine.run(small_shared(n_groups=4, per_group=4))
    assert CountingMamba.evicted > 0
    assert stats.evicted_tokens == CountingMamba.evicted
    assert_slots_accounted(engine)


# -- the ideal hit rate and the order of results ------------------------------------------------


def result(prompt: np.ndarray, extra_key: Any) -> RequestResult:
    out = np.array([7, 8], np.int32)
    return RequestResult("r", prompt, len(prompt), 0, out, 0.0, 0.0, 0.0, extra_key=extra_key)


def test_ideal_cached_tokens_keeps_extra_keys_apart():
    p = ramp(0, 40)
    assert ideal_cached_tokens([result(p, "lora-1"), result(p, "lora-2")]) == 0
    assert ideal_cached_tokens([result(p, "lora-1"), result(p, "lora-1")]) == 39
    specs = [RequestSpec("a", p, 2, extra_key="lora-1"), RequestSpec("b", p, 2, extra_key="lora-2")]
    stats, engine = serve("full", "radix", Workload("w", "w", specs), pool=POOL)
    assert [r.extra_key for r in stats.results] == ["lora-1", "lora-2"]
    assert stats.cached_tokens == ideal_cached_tokens(stats.results) == 0
    assert_slots_accounted(engine)


def test_results_come_in_workload_order_whatever_the_cache():
    """Follow-ups finish in a cache-dependent order (a cache hit prefills faster); results
    are ordered by generation, then by the initial request they descend from."""
    rng = np.random.default_rng(0)
    shared = rng.integers(1, 256, 64).astype(np.int32)
    specs = [
        RequestSpec("A", np.r_[shared, 1, 2], 4),
        RequestSpec("B", np.r_[shared, 3, 4], 4),
        RequestSpec("C", rng.integers(1, 256, 66).astype(np.int32), 4),
    ]

    def follow(spec: RequestSpec, out: np.ndarray) -> RequestSpec | None:
        if spec.rid.endswith("next"):
            return None
        return RequestSpec(spec.rid + "-next", np.r_[spec.prompt, out], 2)

    def wl() -> Workload:
        return Workload("w", "w", specs, follow_up=follow)

    radix, _ = serve("full", "radix", wl(), pool=POOL)
    chunk, _ = serve("full", "chunk", wl(), pool=POOL)
    want = ["A", "B", "C", "A-next", "B-next", "C-next"]
    assert [r.rid for r in radix.results] == [r.rid for r in chunk.results] == want
    for x, y in zip(radix.results, chunk.results, strict=True):
        np.testing.assert_array_equal(x.output, y.output, err_msg=x.rid)


# -- configuration checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("n_kv_heads", 0, ValueError),
        ("n_layers", 0, ValueError),
        ("vocab_size", 0, ValueError),
        ("d_model", -4, ValueError),
        ("n_heads", 0, ValueError),
        ("head_dim", 0, ValueError),
        ("ffn_dim", 0, ValueError),
        ("norm_eps", 0.0, ValueError),
        ("rope_theta", -1.0, ValueError),
        ("dtype", "float33", ValueError),
        ("d_model", 64.0, TypeError),
    ],
)
def test_model_config_names_the_bad_field(field, value, error):
    with pytest.raises(error, match=field):
        get_config("micro", **{field: value})


def test_model_config_accepts_the_presets_dtypes():
    for dtype in ("float32", "bfloat16", "float16"):
        assert ModelConfig(dtype=dtype).dtype == dtype


@pytest.mark.parametrize("field", ["share_min_tokens", "min_seq_bucket"])
def test_scheduler_config_names_the_bad_field(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        SchedulerConfig(**{field: 0})


# -- the step: padding writes nothing -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["full", "hybrid"])
def test_padding_tokens_leave_the_trash_row_alone(variant):
    """Padded tokens and rows are routed past the buffers' end and dropped, so every scatter
    index is unique (the promise ``unique_indices=True`` makes) and row 0 stays zero."""
    cfg = cfg_of(variant)
    mem = EngineMemory(cfg, POOL, state_size=STATE_SLOTS)
    batch = step_batch(np.array([5, 6, 7]), np.arange(3), np.array([4, 9, 2]), [4, 9, 2], 3, True)
    _, _, kv, swa_kv, state = M.extend_step(params_of(variant), mem.kv, None, mem.state, batch, cfg)
    mem.rebind(kv, swa_kv, state)
    k = np.asarray(mem.kv.k)
    assert not k[:, 0].any() and not np.asarray(mem.kv.v)[:, 0].any()
    assert k[:, [4, 9, 2]].any(axis=(2, 3)).all()  # the real tokens were written
    if variant == "hybrid":
        assert not np.asarray(mem.state.conv)[:, 0].any()
        assert not np.asarray(mem.state.temporal)[:, 0].any()
        assert np.asarray(mem.state.temporal)[:, 3].any()


# -- an interrupt at any cache call leaves every slot accounted for (session 17's review) --


class _Interrupted(Exception):
    """Stands for a KeyboardInterrupt (which pytest would take as the user's)."""


def _planned_calls(base: type, act: Callable[[str, int], None], after: bool = False) -> type:
    """A cache class that counts its calls of match_prefix, insert, inc_lock_ref and
    dec_lock_ref (``seen``) and, at the planned call of a method (``plan[name] == n``),
    runs ``act(name, n)``: before the call does its work or, with ``after``, once it has."""

    class Planned(base):  # type: ignore[misc, valid-type]
        __slots__ = ()
        plan: dict[str, int] = {}  # method -> the call that acts (1-based)
        seen: dict[str, int] = {}

        def _call(self, name: str, method: Callable[..., Any], a: Any, k: Any) -> Any:
            n = Planned.seen[name] = Planned.seen.get(name, 0) + 1
            planned = Planned.plan.get(name) == n
            if planned and not after:
                act(name, n)
            out = method(*a, **k)
            if planned and after:
                act(name, n)
            return out

        def match_prefix(self, *a: Any, **k: Any) -> Any:
            return self._call("match_prefix", super().match_prefix, a, k)

        def insert(self, *a: Any, **k: Any) -> Any:
            return self._call("insert", super().insert, a, k)

        def inc_lock_ref(self, *a: Any, **k: Any) -> Any:
            return self._call("inc_lock_ref", super().inc_lock_ref, a, k)

        def dec_lock_ref(self, *a: Any, **k: Any) -> Any:
            return self._call("dec_lock_ref", super().dec_lock_ref, a, k)

    return Planned


def _interrupt(name: str, n: int) -> None:
    raise _Interrupted(f"{name} call {n}")


def _ctrl_c(name: str, n: int) -> None:
    """A real SIGINT: a Ctrl-C landing there."""
    signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("variant", ["full", "hybrid"])
@pytest.mark.parametrize("method", ["match_prefix", "insert", "inc_lock_ref", "dec_lock_ref"])
def test_an_interrupt_at_any_cache_call_releases_everything(variant: str, method: str) -> None:
    """A cache call that raises anywhere in a run (an interrupt, say) must leave every slot
    free or the tree's and no lock held. It did not after the insert that caches a prefilled
    prompt: the request's records still claimed the slots the tree had just taken, so the
    release after a failing re-match, lock or unlock tried to free the tree's slots, failed,
    and stopped there, leaving every other running request's slots and locks; and a finish
    whose unlock failed lost the request's unshared slots."""
    flaky = _planned_calls(MambaRadixCache if variant == "hybrid" else RadixCache, _interrupt)
    engine = make_engine(variant, flaky)
    wl = small_shared(n_groups=2, per_group=3)
    flaky.plan, flaky.seen = {}, {}
    engine.run(wl)  # a clean run from an empty tree counts the calls
    total = flaky.seen[method]
    for at in sorted({1, 2, 3, 5, total // 2, total}):
        engine.cache.reset()  # the same run again, failing at call `at` of `method`
        flaky.plan, flaky.seen = {method: at}, {}
        with pytest.raises(_Interrupted):
            engine.run(wl)
        flaky.plan = {}
        assert_slots_accounted(engine)
    run_after_error(engine)


class _FailFirstFree:
    """Wraps a pool: its first free raises before freeing anything, as an interrupt at the
    call would; everything else goes to the pool."""

    def __init__(self, inner: Any) -> None:
        self.__dict__.update(inner=inner, armed=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:  # a step rebinds pool.buffers
        setattr(self.__dict__["inner"], name, value)

    def free(self, slots: Any) -> None:
        if self.__dict__["armed"]:
            self.__dict__["armed"] = False
            raise _Interrupted("free")
        self.__dict__["inner"].free(slots)


@pytest.mark.parametrize(("variant", "pool"), [("full", "kv"), ("hybrid", "state")])
def test_a_free_that_fails_in_caching_a_prompt_loses_nothing(variant: str, pool: str) -> None:
    """Caching a prefilled prompt frees the request's duplicates (and, over a Mamba cache,
    the state snapshot the tree already had). Those frees went to the pools with no record
    kept, so one that failed lost its slots for good; they are now the request's until
    freed, and the release after the error frees them."""
    engine = make_engine(variant, MambaRadixCache if variant == "hybrid" else RadixCache)
    if pool == "kv":
        engine._alloc = _FailFirstFree(engine._alloc)
    else:
        engine.memory.state_pool = _FailFirstFree(engine.memory.state_pool)
    same = [RequestSpec(rid, ramp(0, 30), 4) for rid in "abc"]  # duplicates to free
    with pytest.raises(_Interrupted):
        engine.run(Workload("w", "w", same))
    if pool == "kv":
        engine._alloc = engine._alloc.inner
    else:
        engine.memory.state_pool = engine.memory.state_pool.inner
    run_after_error(engine)


@pytest.mark.parametrize("variant", ["full", "hybrid"])
@pytest.mark.parametrize("where", ["extend_step", "match_prefix", "insert", "inc_lock_ref"])
def test_a_ctrl_c_as_a_call_returns_is_raised_where_nothing_is_lost(
    monkeypatch: pytest.MonkeyPatch, variant: str, where: str
) -> None:
    """A real SIGINT right after a call did its work. Raised there, it lost what the call
    did: after the donated step, the step's new buffers (the pools kept the deleted ones,
    check_slots still said ok, and every later run failed inside JAX); after an insert or a
    lock, the slots or the lock it recorded nowhere. The run now holds it and raises
    KeyboardInterrupt at the top of the serving loop: the run's release gives everything
    back and the engine serves again."""
    cache_cls = MambaRadixCache if variant == "hybrid" else RadixCache
    ctrl_c = _planned_calls(cache_cls, _ctrl_c, after=True)  # as the call returns
    engine = make_engine(variant, ctrl_c)
    steps = {"n": 0, "at": 0}
    step = M.extend_step

    def step_then_ctrl_c(*a: Any, **k: Any) -> Any:
        out = step(*a, **k)
        steps["n"] += 1
        if steps["n"] == steps["at"]:
            _ctrl_c("extend_step", steps["n"])
        return out

    monkeypatch.setattr(M, "extend_step", step_then_ctrl_c)
    wl = small_shared(n_groups=2, per_group=3)
    ctrl_c.plan, ctrl_c.seen = {}, {}
    engine.run(wl)  # a clean run from an empty tree counts the calls
    total = steps["n"] if where == "extend_step" else ctrl_c.seen[where]
    for at in sorted({1, 3, total // 2, total}):
        engine.cache.reset()
        steps["n"], ctrl_c.seen = 0, {}
        if where == "extend_step":
            steps["at"] = at
        else:
            ctrl_c.plan = {where: at}
        with pytest.raises(KeyboardInterrupt):
            engine.run(wl)
        steps["at"], ctrl_c.plan = 0, {}
        assert engine.memory.buffers_alive()
        assert_slots_accounted(engine)
    run_after_error(engine)


def test_lost_pool_buffers_are_reported_not_served_through() -> None:
    """Buffers donated to an update whose result was never stored (an interrupt outside a
    run) left check_slots ok and made the next run fail deep inside JAX."""
    engine = make_engine("full")
    engine.run(small_shared(n_groups=1, per_group=2))
    for b in engine.memory.kv:
        b.delete()  # what a donation whose result is dropped leaves
    assert not engine.check_slots()[2]
    with pytest.raises(EngineError, match="make a new EngineMemory"):
        engine.run(small_shared(n_groups=1, per_group=2))


def test_a_held_sigint_reaches_the_handler_that_was_in_place() -> None:
    """The run's own handler only defers: the handler in place before the run (here a
    counting one, then SIG_IGN) gets the signal at the safe point, or when the run ends."""
    from pymllm.engine.scheduler import _HeldSigint

    seen: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with _HeldSigint() as held:
            signal.raise_signal(signal.SIGINT)
            assert seen == []
            held.deliver()
            assert seen == [signal.SIGINT]
            signal.raise_signal(signal.SIGINT)
        assert seen == [signal.SIGINT] * 2  # still held at the end: delivered on the way out
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _HeldSigint() as held:
            signal.raise_signal(signal.SIGINT)
            held.deliver()  # ignored, as it would have been
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_ctrl_c_in_a_callback_goes_through_at_once() -> None:
    """Callbacks are the user's code, which may block: a SIGINT there is raised there (held
    to the loop's next turn, a progress callback that slept went on sleeping), and the run
    releases everything as for any error a callback raises."""
    engine = make_engine("full")
    after: list[int] = []

    def progress(done: int, total: int, now: float) -> None:
        signal.raise_signal(signal.SIGINT)
        after.append(done)  # not reached: the KeyboardInterrupt comes out of raise_signal

    with pytest.raises(KeyboardInterrupt):
        engine.run(small_shared(n_groups=1, per_group=3), progress=progress)
    assert after == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run_after_error(engine)


def test_runs_inside_runs_put_back_the_handler_they_found() -> None:
    """A run started from another run's callback: a SIGINT in the inner run reaches the
    outer one's callback and both release; a run of the same engine from its own callback
    (refused, as before) no longer left the run's handler in place, swallowing every later
    Ctrl-C of the process."""
    outer, inner = make_engine("full"), make_engine("full")

    def run_inner(done: int, total: int, now: float) -> None:
        def ctrl_c(done: int, total: int, now: float) -> None:
            signal.raise_signal(signal.SIGINT)

        inner.run(small_shared(n_groups=1, per_group=2), progress=ctrl_c)

    with pytest.raises(KeyboardInterrupt):
        outer.run(small_shared(n_groups=1, per_group=2), progress=run_inner)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run_after_error(inner)
    run_after_error(outer)

    def run_again(done: int, total: int, now: float) -> None:
        outer.run(small_shared(n_groups=1, per_group=2))

    with pytest.raises(Exception):  # noqa: B017 - whatever the re-entered engine raises
        outer.run(small_shared(n_groups=1, per_group=2), progress=run_again)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
