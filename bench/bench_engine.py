"""End-to-end serving: the reference engine with the radix cache against ChunkCache.

Two ways to run it:

* ``pytest bench/bench_engine.py``: a pytest-benchmark suite on the CPU (``tiny`` model, a
  reduced shared-prefix workload); every round serves the workload on a fresh engine after
  one warm-up run has compiled the step shapes, and the summary prints ChunkCache's median
  over RadixCache's (one run, one machine).
* ``python bench/bench_engine.py --model 1b --workload gpu-shared-prefix --json out.json``:
  one warm-up and one timed run per cache on the default device (the H200 run); ``--render
  out.json`` prints the Markdown table for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np
import pytest
from conftest import note, record

from pymllm.engine.config import ModelConfig, get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.model import init_params
from pymllm.engine.scheduler import Engine, RunStats, SchedulerConfig, ideal_cached_tokens
from pymllm.engine.workloads import Workload, multi_turn, shared_prefix
from pymllm.mem_cache import ChunkCache, RadixCache

#: Workloads by name: (builder keyword arguments, scheduler limits, KV pool slots).
WORKLOADS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "cpu-shared-prefix": (
        {"n_groups": 4, "per_group": 6, "prefix_len": 512, "suffix_len": (32, 96)},
        {"max_running": 16, "chunk_tokens": 256},
        16384,
    ),
    "gpu-shared-prefix": (
        {
            "n_groups": 16,
            "per_group": 16,
            "prefix_len": 4096,
            "suffix_len": (128, 512),
            "output_len": 128,
        },
        {"max_running": 64, "max_prefill_batch": 4, "chunk_tokens": 1024},
        262144,
    ),
    "gpu-multi-turn": (
        {
            "n_conversations": 32,
            "turns": 6,
            "system_len": 2048,
            "user_len": (128, 512),
            "output_len": 128,
        },
        {"max_running": 32, "max_prefill_batch": 4, "chunk_tokens": 1024},
        262144,
    ),
}


def make_workload(name: str, vocab_size: int) -> Workload:
    kwargs = dict(WORKLOADS[name][0])
    builder = multi_turn if "multi-turn" in name else shared_prefix
    return builder(vocab_size=vocab_size, **kwargs)


def serve(
    cfg: ModelConfig, params: Any, kind: str, wl: Workload, sched: SchedulerConfig, pool: int
) -> RunStats:
    mem = EngineMemory(cfg, pool, state_size=sched.max_running + 1)
    alloc = mem.token_to_kv_pool_allocator
    cache = ChunkCache(alloc) if kind == "chunk" else RadixCache(token_to_kv_pool_allocator=alloc)
    return Engine(cfg, mem, cache, params=params, sched=sched).run(wl, name=type(cache).__name__)


# -- pytest-benchmark suite (CPU) ---------------------------------------------------------


def _suite_setup():
    cfg = get_config("tiny")
    _, limits, pool = WORKLOADS["cpu-shared-prefix"]
    return cfg, init_params(cfg), make_workload("cpu-shared-prefix", cfg.vocab_size), limits, pool


@pytest.fixture(scope="module")
def engine_setup():
    return _suite_setup()


@pytest.mark.parametrize("kind", ["chunk", "radix"])
def test_serve_shared_prefix(benchmark, engine_setup, kind):
    cfg, params, wl, limits, pool = engine_setup
    sched = SchedulerConfig(**limits)
    serve(cfg, params, kind, wl, sched, pool)  # warm-up: compiles this run's shapes
    result: list[RunStats] = []
    benchmark.pedantic(
        lambda: result.append(serve(cfg, params, kind, wl, sched, pool)), rounds=3, iterations=1
    )
    stats = result[-1]
    assert stats.leak_free and stats.compiles == 0
    group = "engine: shared-prefix, tiny model"
    record(benchmark, group, kind, baseline=kind == "chunk")
    note(group, f"{kind}: hit rate {stats.hit_rate:.1%}, prefill {stats.prefill_tokens:,} tokens")


# -- script (GPU) -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = get_config(args.model, args.variant, **overrides)
    _, limits, pool = WORKLOADS[args.workload]
    sched = SchedulerConfig(**limits, record_logits=True)
    pool = args.pool_size or pool
    wl = make_workload(args.workload, cfg.vocab_size)
    t0 = time.perf_counter()
    params = init_params(cfg)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    runs: dict[str, RunStats] = {}
    for kind in ("radix", "chunk"):
        serve(cfg, params, kind, wl, sched, pool)  # warm-up: compiles every shape it meets
        runs[kind] = serve(cfg, params, kind, wl, sched, pool)
        print(f"{kind}: {runs[kind].summary()}", file=sys.stderr)
    a, b = runs["radix"], runs["chunk"]
    diffs = [
        float(np.max(np.abs(x.first_logits - y.first_logits)))
        for x, y in zip(a.results, b.results, strict=True)
    ]
    dev = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{dev.device_kind} ({dev.platform})",
        "jax": jax.__version__,
        "host": platform.node(),
        "model": {
            "preset": cfg.name,
            "variant": cfg.variant,
            "params": cfg.num_params(),
            "dtype": cfg.dtype,
            "layers": cfg.n_layers,
        },
        "workload": {"name": args.workload, "description": wl.description},
        "sched": limits,
        "pool_size": pool,
        "init_s": round(init_s, 2),
        "ideal_hit_rate": round(ideal_cached_tokens(a.results) / a.prompt_tokens, 4),
        "runs": {k: v.summary() for k, v in runs.items()},
        "speedup": round(b.wall_s / a.wall_s, 3),
        "identical_outputs": sum(
            np.array_equal(x.output, y.output) for x, y in zip(a.results, b.results, strict=True)
        ),
        "first_token_logits_max_abs_diff": max(diffs),
    }


def render(res: dict[str, Any]) -> str:
    m, w = res["model"], res["workload"]
    a, b = res["runs"]["radix"], res["runs"]["chunk"]
    lines = [
        f"Device: {res['device']}, jax {res['jax']}, {res['date']}. Model: `{m['preset']}` "
        f"({m['variant']}, {m['layers']} layers, {m['params'] / 1e9:.2f}B params, {m['dtype']}, "
        f"random weights). Workload `{w['name']}`: {w['description']}. KV pool "
        f"{res['pool_size']:,} slots; limits {res['sched']}. Timed run after a warm-up run "
        "(no compilation inside the timed run).",
        "",
        "| | RadixCache | ChunkCache |",
        "|---|---:|---:|",
    ]
    rows = [
        ("requests", "requests", "{:,}"),
        ("prompt tokens", "prompt_tokens", "{:,}"),
        ("cached tokens", "cached_tokens", "{:,}"),
        ("hit rate", "hit_rate", "{:.1%}"),
        ("prefill tokens computed", "prefill_tokens", "{:,}"),
        ("wall time (s)", "wall_s", "{:.2f}"),
        ("tokens/s (prompt+generated)", "tokens_per_s", "{:,.0f}"),
        ("TTFT p50 (ms)", "ttft_p50_ms", "{:,.0f}"),
        ("TTFT p99 (ms)", "ttft_p99_ms", "{:,.0f}"),
        ("tokens evicted", "evicted_tokens", "{:,}"),
        ("no slot leaks", "leak_free", "{}"),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} |")
    lines += [
        "",
        f"Speedup (ChunkCache wall / RadixCache wall): **{res['speedup']:.2f}x**; ideal hit "
        f"rate {res['ideal_hit_rate']:.1%}; greedy outputs identical for "
        f"{res['identical_outputs']}/{a['requests']} requests, first-token logits max |diff| "
        f"{res['first_token_logits_max_abs_diff']:.2e}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--dtype", help="override the preset's dtype (e.g. float32)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="gpu-shared-prefix")
    ap.add_argument("--pool-size", type=int, help="KV slots (default: the workload's)")
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--render", metavar="FILE", help="print the Markdown table of a results file")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(render(res))


if __name__ == "__main__":
    main()
