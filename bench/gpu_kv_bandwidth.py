"""KV pool write/read bandwidth on an accelerator; prints markdown tables for bench/RESULTS.md.

Default sweep (issue 5): a 32-layer, 8-head, 128-dim bf16 pool of 262,144 slots (K and V:
34.4 GB), batches of 1 to 64K tokens at random distinct slots (and contiguous runs), every
layer written / read in one jitted call (``write_kv_all`` donated, ``read_kv_all``), one
call per layer beside it, and the whole-cache copy that a write without donation costs.

Bytes: ``rows`` = tokens x layers x (Hk*Dk + Hv*Dv) x itemsize, the K/V payload. A scatter
reads its input rows and writes pool rows, a gather reads pool rows and writes its output:
``moved`` = 2 x rows, the DRAM traffic, compared with the datasheet peak (H200: 4.8 TB/s)
and with a plain device copy measured in the same run (read + write bytes).

Timing: each case is compiled and run twice first, then ``--reps`` calls are dispatched
back to back (donated writes chain their buffers) and the wall time to
``block_until_ready`` is divided by ``--reps``. Small batches therefore show the per-call
dispatch cost.

Usage: python bench/gpu_kv_bandwidth.py [--small] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PEAKS_GBPS = {"H200": 4800.0, "H100": 3350.0}  # HBM datasheet figures


def _import_memory_pool() -> Any:
    try:
        from pymllm.mem_cache import memory_pool

        return memory_pool
    except ImportError:
        # The package __init__ imports every compiled module; this run needs only one.
        root = Path(__file__).resolve().parents[1] / "pymllm"
        for name in [m for m in sys.modules if m == "pymllm" or m.startswith("pymllm.")]:
            del sys.modules[name]
        for name, path in (("pymllm", root), ("pymllm.mem_cache", root / "mem_cache")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
        try:
            importlib.import_module("pymllm.mem_cache._allocator")
        except ImportError:  # not built here: the bandwidth run never allocates slots
            stub = types.ModuleType("pymllm.mem_cache._allocator")
            stub.TokenToKVPoolAllocator = stub.SWATokenToKVPoolAllocator = None
            sys.modules[stub.__name__] = stub
            print("# note: pymllm.mem_cache._allocator not built; stubbed", flush=True)
        return importlib.import_module("pymllm.mem_cache.memory_pool")


mp = _import_memory_pool()


def timeit(fn: Any, reps: int) -> float:
    """Seconds per call: 2 warm-up calls, then `reps` calls back to back."""
    for _ in range(2):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def measure_copy_peak(nbytes: int, reps: int, op: str = "add") -> float:
    """GB/s (read + write bytes) of one pass over a bf16 buffer of `nbytes`: an elementwise
    add (``add``) or a plain copy into a fresh buffer (``copy``)."""
    if op == "add":
        f = jax.jit(lambda x: x + jnp.ones((), x.dtype))
    else:
        f = jax.jit(lambda x: jnp.array(x, copy=True))
    t = timeit(functools.partial(f, jnp.zeros((nbytes // 2,), jnp.bfloat16)), reps)
    return 2 * nbytes / t / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    dtype = jnp.dtype(args.dtype)
    L, H, D, S = args.layers, args.heads, args.dim, args.slots
    peak = next((v for k, v in PEAKS_GBPS.items() if k in kind), None)
    res: dict[str, Any] = {
        "device": kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "pool": {"layers": L, "heads": H, "dim": D, "slots": S, "dtype": str(dtype)},
        "datasheet_peak_gbps": peak,
        "rows": [],
    }
    res["copy_gbps"] = measure_copy_peak(args.copy_bytes, args.reps)
    res["memcpy_gbps"] = measure_copy_peak(args.copy_bytes, args.reps, "copy")
    print(f"# device {kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    print(f"# plain device pass: {res['copy_gbps']:.0f} GB/s read+write", flush=True)
    print(f"# copy into a fresh buffer: {res['memcpy_gbps']:.0f} GB/s read+write", flush=True)

    pool = mp.KVPool(S, L, H, D, dtype=dtype)
    res["pool"]["bytes"] = pool.mem_bytes()
    print(f"# {pool}", flush=True)
    row_bytes_per_token = L * 2 * H * D * dtype.itemsize
    write_all = mp.write_kv_all
    read_all = mp.read_kv_all
    write_one = mp.write_kv
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(0)
    state = {"buffers": pool.buffers}
    batches = [n for n in args.batches if n <= min(args.max_batch, S)]

    for pattern in ("random", "contiguous"):
        for n in batches:
            m = mp.bucket_size(n)
            if pattern == "random":
                slots = rng.choice(np.arange(1, S + 1, dtype=np.int32), size=n, replace=False)
            else:
                start = int(rng.integers(1, S - n + 2))
                slots = np.arange(start, start + n, dtype=np.int32)
            loc = jax.device_put(mp.pad_slots(slots, m))
            k = jax.random.normal(key, (L, m, H, D), dtype)
            v = jax.random.normal(jax.random.fold_in(key, 1), (L, m, H, D), dtype)
            row = {"pattern": pattern, "tokens": n, "bucket": m}
            try:

                def w(loc: Any = loc, k: Any = k, v: Any = v) -> Any:
                    state["buffers"] = write_all(state["buffers"], loc, k, v)
                    return state["buffers"].k

                def r(loc: Any = loc) -> Any:
                    return read_all(state["buffers"], loc)

                row["write_s"] = timeit(w, args.reps)
                row["read_s"] = timeit(r, args.reps)
                if pattern == "random" and n == batches[len(batches) // 2]:
                    got_k, got_v = read_all(state["buffers"], loc)
                    ok = bool(jnp.array_equal(got_k[:, :n], k[:, :n]))
                    ok &= bool(jnp.array_equal(got_v[:, :n], v[:, :n]))
                    res["round_trip_ok"] = ok
                    del got_k, got_v
                if pattern == "random":

                    def w_layers(
                        loc: Any = loc, k1: Any = k[0], v1: Any = v[0], ids: Any = pool._layer_ids
                    ) -> Any:
                        b = state["buffers"]
                        for layer in range(L):
                            b = write_one(b, ids[layer], loc, k1, v1)
                        state["buffers"] = b
                        return b.k

                    row["write_per_layer_s"] = timeit(w_layers, max(2, args.reps // 4))
                    if n in (1, 8192):  # the same with a host scalar layer id per call
                        host_ids = [np.int32(i) for i in range(L)]
                        row["write_per_layer_host_ids_s"] = timeit(
                            functools.partial(w_layers, ids=host_ids), max(2, args.reps // 4)
                        )
            except Exception as e:  # keep the sweep going; report the failure in the row
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rb = n * row_bytes_per_token
            for op in ("write", "read"):
                if f"{op}_s" in row:
                    row[f"{op}_rows_gbps"] = rb / row[f"{op}_s"] / 1e9
            res["rows"].append(row)
            print(json.dumps(row), flush=True)

    # What donation saves: the same 1-token and 8K-token writes without donation.
    nodonate = jax.jit(mp._write_kv_all)
    res["no_donation"] = []
    for n in [b for b in (1, 8192) if b in batches]:
        m = mp.bucket_size(n)
        loc = jax.device_put(mp.pad_slots(np.arange(1, n + 1, dtype=np.int32), m))
        k = jax.random.normal(key, (L, m, H, D), dtype)
        entry = {"tokens": n}
        try:

            def wn(loc: Any = loc, k: Any = k) -> Any:
                state["buffers"] = nodonate(state["buffers"], loc, k, k)
                return state["buffers"].k

            entry["write_s"] = timeit(wn, max(3, args.reps // 4))
            entry["write_donated_s"] = next(
                r["write_s"]
                for r in res["rows"]
                if r["tokens"] == n and r["pattern"] == "contiguous" and "write_s" in r
            )
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["no_donation"].append(entry)
        print(json.dumps(entry), flush=True)
    pool.buffers = state["buffers"]
    return res


def pallas_write_all(interpret: bool = False) -> Any:
    """Experimental (not used by KVPool): a Pallas row-scatter, one program per (token,
    layer) copying that token's K and V rows. Offsets are int32 in the kernel, so keep
    the pool under 2**31 elements per buffer."""
    from jax.experimental import pallas as pl

    def kernel(loc_ref, k_ref, v_ref, kin_ref, vin_ref, kout_ref, vout_ref):
        i = pl.program_id(0)
        layer = pl.program_id(1)
        row = loc_ref[i]
        kout_ref[layer, row] = k_ref[layer, i]
        vout_ref[layer, row] = v_ref[layer, i]

    def write(buffers: Any, loc: Any, k: Any, v: Any) -> Any:
        bk, bv = buffers
        out = pl.pallas_call(
            kernel,
            out_shape=(
                jax.ShapeDtypeStruct(bk.shape, bk.dtype),
                jax.ShapeDtypeStruct(bv.shape, bv.dtype),
            ),
            grid=(loc.shape[0], k.shape[0]),
            input_output_aliases={3: 0, 4: 1},
            interpret=interpret,
        )(loc, k, v, bk, bv)
        return mp.KVBuffers(*out)

    return jax.jit(write, donate_argnums=0)


def run_pallas(args: argparse.Namespace) -> dict[str, Any]:
    """XLA scatter vs the Pallas row-scatter on the same (smaller) pool."""
    dtype = jnp.dtype(args.dtype)
    L, H, D, S = args.layers, args.heads, args.dim, args.slots
    pool = mp.KVPool(S, L, H, D, dtype=dtype)
    fns = {"xla": mp.write_kv_all, "pallas": pallas_write_all(jax.devices()[0].platform == "cpu")}
    rng = np.random.default_rng(1)
    key = jax.random.PRNGKey(1)
    state = {"buffers": pool.buffers}
    out: dict[str, Any] = {"pool": f"{pool}", "rows": []}
    for n in [b for b in args.batches if b <= min(args.max_batch, S)]:
        m = mp.bucket_size(n)
        slots = rng.choice(np.arange(1, S + 1, dtype=np.int32), size=n, replace=False)
        loc = jax.device_put(mp.pad_slots(slots, m))
        k = jax.random.normal(key, (L, m, H, D), dtype)
        v = jax.random.normal(jax.random.fold_in(key, 1), (L, m, H, D), dtype)
        row: dict[str, Any] = {"tokens": n}
        for name, fn in fns.items():
            try:

                def w(fn: Any = fn, loc: Any = loc, k: Any = k, v: Any = v) -> Any:
                    state["buffers"] = fn(state["buffers"], loc, k, v)
                    return state["buffers"].k

                row[f"{name}_s"] = timeit(w, args.reps)
                got_k, got_v = mp.read_kv_all(state["buffers"], loc)
                row[f"{name}_ok"] = bool(
                    jnp.array_equal(got_k[:, :n], k[:, :n])
                    & jnp.array_equal(got_v[:, :n], v[:, :n])
                )
                row[f"{name}_rows_gbps"] = (
                    n * L * 2 * H * D * dtype.itemsize / row[f"{name}_s"] / 1e9
                )
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    peak = res["datasheet_peak_gbps"]
    copy = res.get("memcpy_gbps") or res["copy_gbps"]
    p = res["pool"]
    lines = [
        f"Device: {res['device']} ({res['platform']}), jax {res['jax']}. Pool: {p['layers']} "
        f"layers x {p['slots']:,} slots x {p['heads']} heads x {p['dim']} dim, {p['dtype']}, "
        f"K+V {p.get('bytes', 0) / 1e9:.1f} GB. Measured in the same run (read+write bytes): "
        f"copy into a fresh buffer {copy:,.0f} GB/s, elementwise pass "
        f"{res['copy_gbps']:,.0f} GB/s" + (f"; datasheet peak {peak:,.0f} GB/s." if peak else "."),
        "",
        "'rows' = K/V payload bytes per second; 'moved' = 2 x rows (read + write traffic), "
        "as % of the datasheet peak / % of the measured copy.",
        "",
    ]
    ref = peak or copy
    for pattern in ("random", "contiguous"):
        rows = [r for r in res["rows"] if r["pattern"] == pattern]
        if not rows:
            continue
        lines += [
            f"Slots: {pattern}.",
            "",
            "| tokens | write (all layers, 1 call) | write rows GB/s | moved % peak / % copy "
            "| read (all layers) | read rows GB/s | moved % peak / % copy | write, 1 call/layer |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if "error" in r and "write_s" not in r:
                lines.append(f"| {r['tokens']:,} | {r['error']} | | | | | | |")
                continue

            def pct(g: float) -> str:
                return f"{200 * g / ref:.0f}% / {200 * g / copy:.0f}%"

            per_layer = r.get("write_per_layer_s")
            lines.append(
                f"| {r['tokens']:,} | {_us(r['write_s'])} | {r['write_rows_gbps']:,.0f} | "
                f"{pct(r['write_rows_gbps'])} | {_us(r.get('read_s'))} | "
                f"{r.get('read_rows_gbps', 0):,.0f} | {pct(r.get('read_rows_gbps', 0))} | "
                f"{_us(per_layer) if per_layer else '-'} |"
            )
        lines.append("")
    if res.get("no_donation"):
        lines += [
            "What donation saves (contiguous slots, all layers, one call):",
            "",
            "| tokens | donated write | no donation (whole-cache copy) | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for e in res["no_donation"]:
            if "error" in e:
                lines.append(f"| {e['tokens']:,} | {e['error']} | | |")
                continue
            lines.append(
                f"| {e['tokens']:,} | {_us(e['write_donated_s'])} | {_us(e['write_s'])} | "
                f"{e['write_s'] / e['write_donated_s']:,.0f}x |"
            )
    host = [r for r in res["rows"] if "write_per_layer_host_ids_s" in r]
    if host:
        lines += [
            "",
            f"Per-layer writes ({p['layers']} calls), layer id on device vs a host scalar:",
        ]
        for r in host:
            lines.append(
                f"- {r['tokens']:,} tokens: {_us(r['write_per_layer_s'])} vs "
                f"{_us(r['write_per_layer_host_ids_s'])}"
            )
    if "round_trip_ok" in res:
        lines += ["", f"Round trip (write then read equal): {res['round_trip_ok']}."]
    return "\n".join(lines)


def _us(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:,.2f} ms" if s >= 1e-3 else f"{s * 1e6:,.0f} us"


def pool_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line both GPU pool scripts share: the pool (issue 5's by default), a CPU
    smoke run, the JSON to write and the JSON to render."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--slots", type=int, default=262_144)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny pool, float32")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--render", type=Path, help="print the tables of a saved --json and exit")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = pool_arguments(__doc__)
    ap.add_argument("--max-batch", type=int, default=65_536)
    ap.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 128, 1024, 4096, 8192, 16384, 32768, 65536],
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--copy-bytes", type=int, default=4 << 30)
    ap.add_argument("--pallas", action="store_true", help="XLA vs Pallas row-scatter only")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return
    if args.small:
        args.layers, args.slots, args.max_batch, args.dtype = 2, 4096, 1024, "float32"
        args.reps, args.copy_bytes = 3, 64 << 20
    if args.pallas:
        res = run_pallas(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    res = run(args)
    md = markdown(res)
    print()
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
