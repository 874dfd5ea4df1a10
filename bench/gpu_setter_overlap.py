"""Does handing a pool the buffers of a step that is still running block the host?

A serving loop dispatches a donated step and goes on with host work (the prefix cache's
bookkeeping for the next batch) while the device computes. The pools' buffer setters
(``KVPool.buffers = ...``, ``MambaPool.buffers = ...``) check that the two arrays they are
handed are distinct device buffers, which reads each array's device address
(``unsafe_buffer_pointer``). If reading the address waited for the step, every setter would
stall the loop for a whole step. This times, for a step of about ``--step-ms`` of device
work:

* ``dispatch``: the jitted, donated step call returning;
* ``pointer``: ``unsafe_buffer_pointer()`` of one output, right after dispatch;
* ``setter``: ``pool.buffers = outputs`` right after dispatch (KVPool and MambaPool);
* ``wait``: ``block_until_ready`` after that (what is left of the step).

If the setter waits, ``setter`` is about the step time and ``wait`` about zero. Medians of
``--reps`` steps. Usage (on the GPU lease, compiled modules built in place)::

    PYTHONPATH=$PWD python3 bench/gpu_setter_overlap.py [--json out.json]

Not a pytest-benchmark suite: it needs an accelerator (on CPU, dispatch is synchronous for
small arrays and the question does not arise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from pymllm.mem_cache.memory_pool import KVBuffers, KVPool, MambaBuffers, MambaPool


def _busy(a: jax.Array, n: int) -> jax.Array:
    """n dependent matmuls: device time without touching the pool's buffers."""
    for _ in range(n):
        a = jnp.tanh(a @ a)
    return a[0, 0]


def _time(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(reps: int, matmuls: int) -> dict[str, Any]:
    kv = KVPool(4096, 4, 8, 128, dtype=jnp.bfloat16)
    # conv and temporal of one shape: the setter compares device addresses only then
    mamba = MambaPool(64, 4, (64, 64), (64, 64))
    seed = jax.random.normal(jax.random.PRNGKey(0), (4096, 4096), jnp.bfloat16) / 64

    @partial(jax.jit, donate_argnums=0)
    def kv_step(bufs: KVBuffers, a: jax.Array) -> KVBuffers:
        s = _busy(a, matmuls).astype(bufs.k.dtype)
        return KVBuffers(bufs.k.at[0, 1, 0, 0].add(s), bufs.v.at[0, 1, 0, 0].add(s))

    @partial(jax.jit, donate_argnums=0)
    def mamba_step(bufs: MambaBuffers, a: jax.Array) -> MambaBuffers:
        s = _busy(a, matmuls)
        return MambaBuffers(*(b.at[0, 1].add(s.astype(b.dtype)) for b in bufs))

    rows: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    for pool, step, label in ((kv, kv_step, "KVPool"), (mamba, mamba_step, "MambaPool")):
        for i in range(reps + 2):  # two warm-ups (compilation)
            warm = i < 2
            out, t_dispatch = _time(lambda: step(pool.buffers, seed))  # noqa: B023
            first = out[0]
            _, t_pointer = _time(lambda: first.addressable_shards[0].data.unsafe_buffer_pointer())  # noqa: B023
            _, t_setter = _time(lambda: setattr(pool, "buffers", out))  # noqa: B023
            _, t_wait = _time(lambda: jax.block_until_ready(pool.buffers))  # noqa: B023
            if not warm:
                add(f"{label} dispatch", t_dispatch)
                add(f"{label} pointer", t_pointer)
                add(f"{label} setter", t_setter)
                add(f"{label} wait", t_wait)
        # the step alone, synchronously: its device time
        for _ in range(reps):
            out, t = _time(lambda: jax.block_until_ready(step(pool.buffers, seed)))  # noqa: B023
            add(f"{label} step (blocking)", t)
            pool.buffers = out
    dev = jax.devices()[0]
    return {
        "device": f"{dev.device_kind} ({dev.platform})",
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "reps": reps,
        "matmuls": matmuls,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in rows.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--matmuls", type=int, default=64, help="4096^2 bf16 matmuls a step")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    res = measure(args.reps, args.matmuls)
    print(f"{res['device']}, jax {res['jax']}, {res['date']}: medians of {res['reps']} steps")
    for k, v in res["median_ms"].items():
        print(f"  {k:<28} {v:9.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
