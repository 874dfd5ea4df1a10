"""What each form of a K/V (or state) input costs the pools' write methods on an accelerator:
compilations on first use and host time per call, for one or more versions of the module.

A jitted call is keyed on its arguments' committed-ness and weak types as well as their
shapes and dtypes. A caller's K/V reach the pools as host numpy arrays, committed device
arrays (a jitted step's output over committed parameters, ``jax.device_put``), uncommitted
ones (``jnp.ones``, a step over uncommitted inputs) or weakly typed ones
(``jnp.full(shape, 2.0)``). Per method, form and batch size of *n* tokens this prints:

* ``compiles``: XLA compilations during the form's first two calls, the forms taken in the
  order of the table on one pool (so a form that compiles nothing reuses what an earlier
  form compiled);
* ``dispatch``: host time per call with ``--reps`` calls back to back, then one wait (not
  included), each call given new arrays (as a serving loop's steps do);
* ``latency``: the same calls each waited for.

The pool holds float32 (the only dtype a weakly typed float array can have with x64 off).

Usage::

    python bench/gpu_input_forms.py [--module PATH ...] [--sizes 1,16,256] [--reps N]
        [--slots N] [--json out.json]

Each ``--module`` is another copy of ``pymllm/mem_cache/memory_pool.py`` (an earlier
version, say ``git show REV:pymllm/mem_cache/memory_pool.py > /tmp/old.py``), loaded beside
the installed one and measured on the same device in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pymllm.mem_cache import memory_pool as installed

FORMS = ("numpy", "committed", "uncommitted", "weak")
_COMPILES = [0]


def _count(name: str, *_: Any, **__: Any) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def _load(path: str, index: int) -> Any:
    spec = importlib.util.spec_from_file_location(f"_memory_pool_{index}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make(form: str, shape: tuple[int, ...], fill: float) -> Any:
    """One array of *shape* (float32) in *form*, made (and finished) before any timing."""
    if form == "numpy":
        return np.full(shape, fill, np.float32)
    if form == "committed":
        x = jax.device_put(np.full(shape, fill, np.float32), jax.devices()[0])
    elif form == "uncommitted":
        x = jnp.full(shape, fill, jnp.float32)
    else:
        x = jnp.full(shape, float(fill))
        assert x.weak_type and x.dtype == jnp.float32
    return jax.block_until_ready(x)


def _per_call(
    call: Callable[[Any, Any], None], pairs: list[tuple[Any, Any]], pool: Any, wait: bool
) -> float:
    """Median over 5 repeats of seconds per call, each call given the next of *pairs*: a
    serving loop hands a pool new arrays every step, and JAX does work on an array the
    first time it is dispatched that later calls with it skip."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for a, b in pairs:
            call(a, b)
            if wait:
                jax.block_until_ready(pool.buffers)
        times.append((time.perf_counter() - t0) / len(pairs))
        jax.block_until_ready(pool.buffers)
    return statistics.median(times)


def _cases(
    mp: Any, n: int, size: int
) -> list[tuple[str, Any, Callable[[Any, Any], None], tuple, tuple]]:
    """(method, pool, call(a, b), a's shape, b's shape) for each write method: a KV pool of
    *size* slots (8 layers, 8 heads of 128) and a state pool of up to 4,096."""
    states = min(size, 4_096)
    kv = mp.KVPool(size, 8, 8, 128, dtype=jnp.float32)
    ms = mp.MambaPool(states, 8, (4, 1_024), (16, 128), conv_dtype=jnp.float32)
    loc = np.arange(1, n + 1, dtype=np.int32)
    slots = np.arange(1, min(n, states - 1) + 1, dtype=np.int32)
    m = len(slots)
    return [
        (
            "set_kv_buffer",
            kv,
            lambda a, b: kv.set_kv_buffer(3, loc, a, b),
            (n, 8, 128),
            (n, 8, 128),
        ),
        ("set_kv_all", kv, lambda a, b: kv.set_kv_all(loc, a, b), (8, n, 8, 128), (8, n, 8, 128)),
        (
            "MambaPool.set_states",
            ms,
            lambda a, b: ms.set_states(slots, a, b),
            (8, m, 4, 1_024),
            (8, m, 16, 128),
        ),
    ]


def measure(mp: Any, label: str, sizes: list[int], reps: int, slots: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for method, pool, call, a_shape, b_shape in _cases(mp, n, slots):
            for form in FORMS:
                pairs = [
                    (_make(form, a_shape, i), _make(form, b_shape, i)) for i in range(reps + 2)
                ]
                before = _COMPILES[0]
                for a, b in pairs[-2:]:
                    call(a, b)
                jax.block_until_ready(pool.buffers)
                compiles = _COMPILES[0] - before
                dispatch = _per_call(call, pairs[:reps], pool, False)
                latency = _per_call(call, pairs[:reps], pool, True)
                rows.append(
                    {
                        "module": label,
                        "method": method,
                        "n": n,
                        "form": form,
                        "compiles": compiles,
                        "dispatch_us": dispatch * 1e6,
                        "latency_us": latency * 1e6,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(r["module"] for r in rows))
    head = "| method | n | form | " + " | ".join(
        f"{lab}: compiles | dispatch us | latency us" for lab in labels
    )
    out = [head + " |", "|---|---:|---|" + "---:|---:|---:|" * len(labels)]
    keyed = {(r["module"], r["method"], r["n"], r["form"]): r for r in rows}
    for method, n, form in dict.fromkeys((r["method"], r["n"], r["form"]) for r in rows):
        cells = []
        for lab in labels:
            r = keyed.get((lab, method, n, form))
            cells.append(
                "- | - | -"
                if r is None
                else f"{r['compiles']} | {r['dispatch_us']:.0f} | {r['latency_us']:.0f}"
            )
        out.append(f"| {method} | {n} | {form} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[], help="another memory_pool.py")
    ap.add_argument("--sizes", default="1,16,256", help="tokens per call (default 1,16,256)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--slots", type=int, default=65_536, help="KV pool size (default 65,536)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    jax.monitoring.register_event_duration_secs_listener(_count)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}; JAX {jax.__version__}", flush=True)
    rows = measure(installed, "this", sizes, args.reps, args.slots)
    for i, path in enumerate(args.module):
        rows += measure(_load(path, i), path.rsplit("/", 1)[-1], sizes, args.reps, args.slots)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
