"""Shared by the engine's sliding-window tests (``test_engine_swa_window_free.py``,
``test_engine_swa_lazy.py``): the ``micro`` swa model (window 32) over split pools, an
engine over a windowed ``RadixCache`` or a ``ChunkCache``, per-step hooks, and output
comparison."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from pymllm.engine import model as M
from pymllm.engine.config import get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import Engine, RunStats, SchedulerConfig
from pymllm.mem_cache import ChunkCache, RadixCache

SCHED = SchedulerConfig(
    max_running=4, max_prefill_batch=2, pad_prefill_batch=True, chunk_tokens=32, record_logits=True
)
POOL = 1024  # full-attention KV slots


@functools.cache
def cfg() -> Any:
    return get_config("micro", "swa")


@functools.cache
def params() -> Any:
    return M.init_params(cfg())


def make_engine(kind: str, swa: int, keep: int | None = None) -> Engine:
    """An engine over a ``POOL``-slot full pool and a ``swa``-slot SWA pool, with a
    ``ChunkCache`` (``kind`` "chunk") or a ``RadixCache`` with the model's window;
    ``keep`` replaces the positions it keeps behind the window (``_swa_keep``)."""
    c = cfg()
    mem = EngineMemory(c, POOL, swa_size=swa)
    alloc = mem.token_to_kv_pool_allocator
    if kind == "chunk":
        cache: Any = ChunkCache(alloc)
    else:
        cache = RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=c.sliding_window)
    engine = Engine(c, mem, cache, params=params(), sched=SCHED)
    if keep is not None:
        engine._swa_keep = keep
    return engine


def after_every_step(engine: Engine, check: Callable[[Engine], None]) -> None:
    """Run ``check(engine)`` after every prefill and decode step (the out-of-window frees
    included)."""
    for name in ("_prefill_step", "_decode_step"):
        step = getattr(engine, name)

        def wrapped(step: Callable[[], None] = step) -> None:
            step()
            check(engine)

        setattr(engine, name, wrapped)


def live_swa(engine: Engine, slots: np.ndarray) -> int:
    """How many of the full ``slots`` have an SWA slot."""
    return int(np.count_nonzero(engine._alloc.translate_loc_from_full_to_swa(slots)))  # type: ignore[union-attr]


def assert_same_outputs(a: RunStats, b: RunStats) -> None:
    """Same requests, same greedy outputs, first-token logits within 1e-4."""
    assert [r.rid for r in a.results] == [r.rid for r in b.results]
    for x, y in zip(a.results, b.results, strict=True):
        np.testing.assert_array_equal(x.output, y.output, err_msg=x.rid)
        assert x.first_logits is not None and y.first_logits is not None
        np.testing.assert_allclose(x.first_logits, y.first_logits, rtol=0, atol=1e-4)
