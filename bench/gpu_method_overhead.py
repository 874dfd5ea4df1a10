"""What the KV pool's public methods cost a caller on an accelerator, against the jitted
module functions they wrap; prints a markdown table for bench/RESULTS.md.

The methods check every argument on the host (slot range and distinctness, shapes, dtypes,
deleted or traced arrays, the pool's own buffers passed back in) before they dispatch the
same jitted scatter/gather that ``write_kv_all``/``read_kv``/``read_kv_all``/``copy_kv``
run for a caller who pads the slots itself. Per case and batch size:

* ``dispatch``: host time per call with ``--reps`` calls dispatched back to back (the
  donated writes chain their buffers), then one ``block_until_ready`` (not included): what
  a serving loop's thread spends per call while the device works;
* ``latency``: the same calls each waited for (dispatch, device work and the wait);
* K/V as device arrays: at the bucket size for the functions, the caller's ``n`` rows for
  the methods (which pad them on the device);
* slots given as host ``np.int32`` (the allocator's output) and, for the methods, as a
  device ``jax.Array`` (the methods read them back to the host to check them).

Usage: python bench/gpu_method_overhead.py [--small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gpu_kv_bandwidth import pool_arguments  # bench/ is the script's directory

from pymllm.mem_cache import memory_pool as mp


def _per_call(fn: Any, reps: int, wait_each: bool) -> float:
    """Median over 5 repeats of seconds per call (2 warm-up calls first). Without
    ``wait_each`` the clock stops before the final wait: dispatch time only."""
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(5):
        out = None
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
            if wait_each:
                jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
        jax.block_until_ready(out)
    return statistics.median(times)


def _batch(pool: mp.KVPool, n: int, rng: np.random.Generator, reps: int) -> list[dict[str, Any]]:
    """Every case at one batch size of *n* tokens: a row each."""
    L, H, D, S = pool.layer_num, pool.head_num, pool.head_dim, pool.size
    dtype = pool.dtype
    key = jax.random.PRNGKey(n)
    rows = []
    m = mp.bucket_size(n)
    # distinct random slots, increasing (the allocator hands them out sorted)
    loc = np.sort(rng.choice(np.arange(1, S, dtype=np.int32), size=n, replace=False))
    dst = np.sort(rng.choice(np.arange(1, S, dtype=np.int32), size=n, replace=False))
    loc_dev = jax.device_put(loc)
    padded = jax.device_put(mp.pad_slots(loc, m))
    padded_dst = jax.device_put(mp.pad_slots(dst, m))
    k = jax.random.normal(key, (L, m, H, D), dtype)  # at the bucket size: no padding
    v = jax.random.normal(jax.random.fold_in(key, 1), (L, m, H, D), dtype)
    k1, v1 = k[0], v[0]
    # the methods take the caller's n rows and pad them to the bucket themselves
    kn, vn, k1n, v1n = k[:, :n], v[:, :n], k1[:n], v1[:n]
    layer = pool._layer_ids[L // 2]

    def w_fn() -> Any:
        pool.buffers = mp.write_kv_all(pool.buffers, padded, k, v)
        return pool.buffers.k

    def w_method(s: Any = loc) -> Any:
        pool.set_kv_all(s, kn, vn)
        return pool.buffers.k

    def w1_fn() -> Any:
        pool.buffers = mp.write_kv(pool.buffers, layer, padded, k1, v1)
        return pool.buffers.k

    def w1_method(s: Any = loc) -> Any:
        pool.set_kv_buffer(L // 2, s, k1n, v1n)
        return pool.buffers.k

    def r1_fn() -> Any:
        return mp.read_kv(pool.buffers, layer, padded)

    def r1_method(s: Any = loc) -> Any:
        return pool.get_kv(L // 2, s)

    def r_fn() -> Any:
        return mp.read_kv_all(pool.buffers, padded)

    def r_method(s: Any = loc) -> Any:
        return pool.get_kv_all(s)

    def c_fn() -> Any:
        pool.buffers = mp.copy_kv(pool.buffers, padded, padded_dst)
        return pool.buffers.k

    def c_method() -> Any:
        pool.copy(loc, dst)
        return pool.buffers.k

    cases = {
        "write, all layers": (w_fn, w_method),
        "write, one layer": (w1_fn, w1_method),
        "read, one layer": (r1_fn, r1_method),
        "read, all layers": (r_fn, r_method),
        "copy, all layers": (c_fn, c_method),
    }
    for name, (fn, method) in cases.items():
        row: dict[str, Any] = {"case": name, "tokens": n, "bucket": m}
        for wait_each, mode in ((False, "dispatch"), (True, "latency")):
            row[f"{mode}_fn_us"] = _per_call(fn, reps, wait_each) * 1e6
            row[f"{mode}_method_us"] = _per_call(method, reps, wait_each) * 1e6
            if name != "copy, all layers":
                row[f"{mode}_method_devslots_us"] = (
                    _per_call(lambda method=method: method(loc_dev), reps, wait_each) * 1e6
                )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = jax.devices()[0]
    dtype = jnp.dtype(args.dtype)
    L, H, D, S = args.layers, args.heads, args.dim, args.slots
    pool = mp.KVPool(S, L, H, D, dtype=dtype)
    res: dict[str, Any] = {
        "device": f"{dev.device_kind} ({dev.platform})",
        "jax": jax.__version__,
        "pool": repr(pool),
        "reps": args.reps,
        "rows": [],
    }
    print(f"# {res['device']}, jax {jax.__version__}; {pool}", flush=True)
    rng = np.random.default_rng(0)
    for n in args.batches:
        res["rows"] += _batch(pool, n, rng, args.reps)
    return res


def render(res: dict[str, Any]) -> str:
    lines = [
        f"Device: {res['device']}, jax {res['jax']}. Pool: {res['pool']}. Medians of 5 repeats "
        f"of {res['reps']} calls. Microseconds a call: host time with calls dispatched back to "
        "back (dispatch) and with each call waited for (latency); the jitted module function "
        "on pre-padded device slots, the public method on host np.int32 slots, and the "
        "method on device slots.",
        "",
        "| case | tokens | dispatch: function | method | method, device slots "
        "| latency: function | method | method, device slots |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:,.1f}"

    for r in res["rows"]:
        lines.append(
            f"| {r['case']} | {r['tokens']:,} | {f(r['dispatch_fn_us'])} "
            f"| {f(r['dispatch_method_us'])} | {f(r.get('dispatch_method_devslots_us'))} "
            f"| {f(r['latency_fn_us'])} | {f(r['latency_method_us'])} "
            f"| {f(r.get('latency_method_devslots_us'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = pool_arguments(__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096, 32_768])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    if args.small:
        args.layers, args.heads, args.dim, args.slots = 2, 2, 16, 4096
        args.dtype, args.batches, args.reps = "float32", [1, 16, 256], 5
    res = run(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(render(res))


if __name__ == "__main__":
    main()
