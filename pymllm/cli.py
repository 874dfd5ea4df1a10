"""``pymllm-cache``: command-line entry point.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)),
so later ones (``replay``, ``gen-trace``) plug in without touching ``main``.

``pymllm-cache demo`` serves a workload with a small JAX transformer twice, with the radix
prefix cache and with ``ChunkCache`` (no reuse), and prints what the cache saved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: ``radix`` is the radix cache matched to the model (RadixCache, or MambaRadixCache for the
#: hybrid model); ``chunk`` is ChunkCache, the no-reuse baseline.
CACHES = ("radix", "chunk")

#: Slot counts and token ids are int32 on the host and on the device.
_INT32_LIMIT = 1 << 31


def _int_option(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high)``; argparse names the option in
    its error (exit status 2)."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < low or (high is not None and val >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high:,})"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text}")
        return val

    parse.__name__ = "integer"  # argparse's fallback message names the type
    return parse


def _float_option(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            val = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= val <= high:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected a number in [{low}, {high}], got {text}")
        return val

    parse.__name__ = "number"
    return parse


_positive = _int_option(1)
_slots = _int_option(1, _INT32_LIMIT)
_seed = _int_option(0)


# -- demo ---------------------------------------------------------------------------------


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from pymllm.engine.config import PRESETS, VARIANTS
    from pymllm.engine.workloads import WORKLOADS

    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="shared-prefix",
        help="built-in workload (default: %(default)s); ignored with --trace",
    )
    p.add_argument("--trace", metavar="FILE", help="replay a Mooncake-format JSONL trace")
    p.add_argument(
        "--cache",
        choices=(*CACHES, "both"),
        default="both",
        help="which prefix cache to run (default: both, and compare)",
    )
    p.add_argument(
        "--model", choices=sorted(PRESETS), default="tiny", help="model preset (default: tiny)"
    )
    p.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default="full",
        help="layer pattern: full attention, alternating sliding window, or hybrid "
        "recurrent (default: full)",
    )
    p.add_argument(
        "--pool-size",
        type=_slots,
        default=16384,
        metavar="N",
        help="KV slots in the pool; smaller than the workload forces eviction (default: 16384)",
    )
    p.add_argument(
        "--swa-pool-size",
        type=_slots,
        metavar="N",
        help="slots of the sliding-window layers' KV pool (swa model; default: --pool-size). "
        "A request takes a window-layer slot for a position just before the step that "
        "writes it, and the engine frees those that left the window after each step (the "
        "radix cache once the prompt is cached, ChunkCache from the first prefill chunk "
        "on); admission reserves what a request can hold at once (its prompt plus the "
        "window with the radix cache, the window plus a prefill chunk with ChunkCache). A "
        "pool smaller than the running requests' windows makes the tree drop the window "
        "KV of cached prefixes, and hits fall",
    )
    p.add_argument(
        "--max-running",
        type=_slots,
        default=16,
        metavar="N",
        help="decode batch: requests running at once (default: %(default)s)",
    )
    p.add_argument(
        "--state-slots",
        type=_slots,
        metavar="N",
        help="recurrent-state slots (hybrid model): running requests plus the states "
        "MambaRadixCache saves (default: 64)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=_slots,
        default=256,
        metavar="N",
        help="prefill tokens per step (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-batch",
        type=_slots,
        default=4,
        metavar="N",
        help="requests per prefill step (default: %(default)s)",
    )
    p.add_argument(
        "--pad-prefill-batch",
        action="store_true",
        help="pad every prefill step to --prefill-batch rows (fewer compilations)",
    )
    p.add_argument(
        "--max-requests", type=_positive, metavar="N", help="with --trace: replay only the first N"
    )
    p.add_argument(
        "--block-tokens",
        type=_positive,
        metavar="N",
        help="with --trace: prompt tokens per hash id (default: 512, Mooncake's)",
    )
    p.add_argument(
        "--time-scale",
        type=_float_option(0.0, 1e6),
        metavar="X",
        help="with --trace: arrivals at timestamp * X (default 0: all at once, in order)",
    )
    p.add_argument(
        "--jit-cache",
        metavar="DIR",
        default=_default_jit_cache(),
        help="JAX persistent compilation cache, so later runs skip compiling "
        "(default: %(default)s; '' turns it off)",
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="workload and weight seed (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _default_jit_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pymllm", "jax")


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, every 25% otherwise."""

    def __init__(self, label: str, stream: TextIO, enabled: bool) -> None:
        self.label, self.stream, self.enabled = label, stream, enabled
        self.tty = enabled and stream.isatty()
        self._next_pct = 25

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if not self.enabled:
            return
        total = max(total, done, 1)
        pct = 100 * done // total
        bar = "#" * (20 * done // total)
        line = f"  {self.label:<11} [{bar:<20}] {done}/{total} requests  {elapsed:6.1f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
            self.stream.flush()
        elif pct >= self._next_pct:
            self.stream.write(line + "\n")
            self._next_pct = (pct // 25 + 1) * 25


def _make_cache(kind: str, cfg: Any, memory: Any) -> Any:
    from pymllm.mem_cache import ChunkCache, RadixCache

    alloc = memory.token_to_kv_pool_allocator
    if kind == "chunk":
        return ChunkCache(alloc)
    if cfg.rec_layer_ids:
        from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache

        return MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=memory.state_pool)
    if memory.swa_pool is not None:
        # Sliding-window layers keep their KV in a pool of their own; the windowed tree frees
        # what left every window (tombstones) and keeps the full-attention KV.
        return RadixCache(token_to_kv_pool_allocator=alloc, sliding_window_size=cfg.sliding_window)
    return RadixCache(page_size=1, token_to_kv_pool_allocator=alloc)


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.1f} s"


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        right = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *right]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _run_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from pymllm.engine.config import get_config
    from pymllm.engine.memory import EngineMemory
    from pymllm.engine.model import init_params
    from pymllm.engine.scheduler import Engine, EngineError, SchedulerConfig, ideal_cached_tokens
    from pymllm.engine.workloads import load_mooncake_trace, make_workload
    from pymllm.replay.traces import MOONCAKE_BLOCK_TOKENS

    t_start = time.perf_counter()
    err = sys.stderr
    try:
        cfg = get_config(args.model, args.variant, seed=args.seed)
        sched = SchedulerConfig(
            max_running=args.max_running,
            max_prefill_batch=args.prefill_batch,
            pad_prefill_batch=args.pad_prefill_batch,
            chunk_tokens=args.chunk_tokens,
            record_logits=True,
        )
    except ValueError as exc:
        err.write(f"pymllm-cache: error: {exc}\n")
        return 2
    state_slots = 64 if args.state_slots is None else args.state_slots
    if cfg.rec_layer_ids and state_slots <= args.max_running:
        err.write("pymllm-cache: error: --state-slots must exceed --max-running\n")
        return 2
    # options that would otherwise be ignored without a word
    for flag, given, applies, needs in (
        ("--max-requests", args.max_requests, args.trace, "--trace"),
        ("--block-tokens", args.block_tokens, args.trace, "--trace"),
        ("--time-scale", args.time_scale, args.trace, "--trace"),
        ("--swa-pool-size", args.swa_pool_size, cfg.variant == "swa", "--variant swa"),
        ("--state-slots", args.state_slots, cfg.rec_layer_ids, "--variant hybrid"),
    ):
        if given is not None and not applies:
            err.write(f"pymllm-cache: error: {flag} only applies with {needs}\n")
            return 2
    try:
        if args.trace:
            workload = load_mooncake_trace(
                args.trace,
                vocab_size=cfg.vocab_size,
                time_scale=args.time_scale or 0.0,
                max_requests=args.max_requests,
                block_size=args.block_tokens or MOONCAKE_BLOCK_TOKENS,
                seed=args.seed,
            )
        else:
            workload = make_workload(args.workload, vocab_size=cfg.vocab_size, seed=args.seed)
    except ValueError as exc:  # TraceError is one: a bad line, named with its number
        err.write(f"pymllm-cache: error: {exc}\n")
        return 2

    import jax

    if args.jit_cache:
        jax.config.update("jax_compilation_cache_dir", args.jit_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    kinds = list(CACHES) if args.cache == "both" else [args.cache]
    show = not args.quiet and not args.json
    if show:
        err.write(
            f"pymllm-cache demo: {cfg.name} model ({cfg.variant}, {cfg.n_layers} layers, "
            f"{cfg.num_params() / 1e6:.1f}M params, {cfg.dtype}) on "
            f"{jax.devices()[0].platform}\n  workload: {workload.description}\n"
        )
    params = init_params(cfg)
    runs = {}
    for kind in kinds:
        swa_size = args.pool_size if args.swa_pool_size is None else args.swa_pool_size
        try:
            memory = EngineMemory(
                cfg,
                args.pool_size,
                state_size=state_slots,
                swa_size=swa_size if cfg.variant == "swa" else None,
            )
        except ValueError as exc:  # a size past what a pool's int32 slots can address
            err.write(f"pymllm-cache: error: the pools refuse these sizes: {exc}\n")
            return 2
        except (MemoryError, jax.errors.JaxRuntimeError) as exc:
            err.write(
                f"pymllm-cache: error: the KV pools ({args.pool_size:,} slots) do not fit "
                f"in memory: {str(exc).splitlines()[0]}\n"
            )
            return 1
        cache = _make_cache(kind, cfg, memory)
        engine = Engine(cfg, memory, cache, params=params, sched=sched)
        name = type(cache).__name__
        progress = _Progress(name, err, enabled=not args.quiet)
        try:
            runs[kind] = engine.run(workload, name=name, progress=progress)
        except EngineError as exc:
            err.write(f"\npymllm-cache: error: {exc}\n")
            return 1
        except MemoryError as exc:  # the step's host arrays are sized by the batch options
            err.write(
                f"\npymllm-cache: error: out of host memory while serving "
                f"({str(exc) or 'no detail'}):"
                f" --max-running {sched.max_running} and --prefill-batch "
                f"{sched.max_prefill_batch} size every step's arrays\n"
            )
            return 1

    first = next(iter(runs.values()))
    ideal = ideal_cached_tokens(first.results) / max(first.prompt_tokens, 1)
    report: dict[str, Any] = {
        "model": {
            "preset": cfg.name,
            "variant": cfg.variant,
            "layers": cfg.n_layers,
            "params": cfg.num_params(),
            "dtype": cfg.dtype,
            "device": jax.devices()[0].platform,
        },
        "workload": {"name": workload.name, "description": workload.description},
        "pool_size": args.pool_size,
        "ideal_hit_rate": round(ideal, 4),
        "runs": [r.summary() for r in runs.values()],
    }
    if "radix" in runs and "chunk" in runs:
        a, b = runs["radix"], runs["chunk"]
        same = sum(
            np.array_equal(x.output, y.output) for x, y in zip(a.results, b.results, strict=True)
        )
        diff = max(
            float(np.max(np.abs(x.first_logits - y.first_logits)))
            for x, y in zip(a.results, b.results, strict=True)
            if x.first_logits is not None and y.first_logits is not None  # record_logits=True
        )
        report["speedup"] = round(b.wall_s / a.wall_s, 3) if a.wall_s else None
        report["exact"] = {
            "identical_outputs": int(same),
            "requests": a.requests,
            "first_token_logits_max_abs_diff": diff,
        }
    report["total_wall_s"] = round(time.perf_counter() - t_start, 2)

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_render(report, runs))
    ok = all(r.leak_free for r in runs.values())
    if "exact" in report:
        ok = ok and report["exact"]["identical_outputs"] == report["exact"]["requests"]
    return 0 if ok else 1


def _render(report: dict[str, Any], runs: dict[str, Any]) -> str:
    stats = list(runs.values())

    def row(label: str, fn: Callable[[Any], str]) -> tuple[str, ...]:
        return (label, *(fn(s) for s in stats))

    rows = [
        row("requests", lambda s: f"{s.requests:,}"),
        row("prompt tokens", lambda s: f"{s.prompt_tokens:,}"),
        row("cached tokens (hit rate)", lambda s: f"{s.cached_tokens:,} ({s.hit_rate:.1%})"),
        row("prefill tokens computed", lambda s: f"{s.prefill_tokens:,}"),
        row("generated tokens", lambda s: f"{s.generated_tokens:,}"),
        row("wall time", lambda s: _fmt_s(s.wall_s)),
        row("tokens/s (prompt+generated)", lambda s: f"{s.tokens_per_s:,.0f}"),
        row("TTFT p50", lambda s: _fmt_s(s.ttft_p50)),
        row("TTFT p99", lambda s: _fmt_s(s.ttft_p99)),
        row("tokens evicted", lambda s: f"{s.evicted_tokens:,}"),
        row("KV slots free + in cache", lambda s: f"{s.kv_free:,} + {s.kv_in_cache:,}"),
        row("no slot leaks", lambda s: "yes" if s.leak_free else "NO"),
        row("JIT compile (not in wall)", lambda s: f"{s.compile_s:.1f} s ({s.compiles})"),
    ]
    lines = [
        "",
        _table(rows, ("", *(s.cache for s in stats))),
        "",
        f"ideal hit rate (unbounded cache, one request at a time): {report['ideal_hit_rate']:.1%}",
    ]
    if "speedup" in report:
        ex = report["exact"]
        names = f"{stats[1].cache} wall / {stats[0].cache} wall"
        lines.append(f"speedup ({names}): {report['speedup']:.2f}x")
        lines.append(
            f"greedy tokens identical: {ex['identical_outputs']}/{ex['requests']} requests; "
            f"first-token logits max |diff| {ex['first_token_logits_max_abs_diff']:.1e}"
        )
    lines.append(f"total time including JIT compilation: {report['total_wall_s']:.1f} s")
    return "\n".join(lines)


# -- replay -------------------------------------------------------------------------------


def _add_replay_arguments(p: argparse.ArgumentParser) -> None:
    from pymllm.mem_cache import EVICTION_POLICIES
    from pymllm.replay.generate import TraceSpec
    from pymllm.replay.traces import FORMATS, MOONCAKE_BLOCK_TOKENS

    policies = EVICTION_POLICIES
    p.add_argument(
        "trace",
        nargs="?",
        metavar="TRACE",
        help="trace file: Mooncake JSONL (hash_ids) or one JSON list of token ids per line "
        "(default: the built-in synthetic trace that gen-trace writes with the same "
        "--requests and --seed)",
    )
    p.add_argument(
        "--capacity",
        nargs="+",
        action="extend",
        metavar="N",
        help="cache capacities in trace units (Mooncake: blocks; plain: tokens), e.g. "
        "1000 64k 1e6 inf ('inf': unbounded, the ideal hit rate); default: 8 log-spaced "
        "steps up to the trace's distinct units, then inf",
    )
    p.add_argument(
        "--policy",
        nargs="+",
        action="extend",
        choices=policies,
        metavar="NAME",
        help=f"eviction policies to compare, of {', '.join(policies)} (default: all)",
    )
    p.add_argument(
        "--page-size",
        type=_positive,
        default=1,
        metavar="P",
        help="the tree's page size in trace units: keys are matched and cached in whole "
        "pages of P blocks (Mooncake) or P tokens (plain); a block in the hit rates is one "
        "page (default: 1)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="trace format (default: %(default)s, from the first non-blank line; the built-in "
        "trace is Mooncake's)",
    )
    p.add_argument(
        "--block-tokens",
        type=_slots,
        metavar="N",
        help="tokens per Mooncake hash id, for the token hit rate; also the built-in "
        f"trace's block size (default: {MOONCAKE_BLOCK_TOKENS})",
    )
    p.add_argument("--max-requests", type=_positive, metavar="N", help="replay only the first N")
    builtin = TraceSpec()
    for flag, val, kind in (
        ("--requests", builtin.requests, _positive),
        ("--seed", builtin.seed, _seed),
    ):
        p.add_argument(
            flag,
            type=kind,
            metavar="N",
            help=f"of the built-in trace, without TRACE (default {val})",
        )
    p.add_argument(
        "--plot", metavar="FILE.png", help="save hit rate vs capacity (needs matplotlib)"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _run_replay(args: argparse.Namespace) -> int:
    from pymllm.mem_cache import EVICTION_POLICIES
    from pymllm.replay import generate, plot, simulator
    from pymllm.replay.traces import MOONCAKE_BLOCK_TOKENS, read_trace, trace_from_records

    err = sys.stderr
    block_tokens = args.block_tokens or MOONCAKE_BLOCK_TOKENS
    try:
        if args.plot:
            plot.check_plot_path(args.plot)
        if args.trace:
            for flag, given in (("--requests", args.requests), ("--seed", args.seed)):
                if given is not None:  # would be ignored without a word
                    raise ValueError(f"{flag} only applies to the built-in trace (no TRACE)")
            trace = read_trace(
                args.trace,
                format=args.format,
                block_tokens=block_tokens,
                max_requests=args.max_requests,
            )
            if args.block_tokens is not None and trace.format != "mooncake":
                raise ValueError(  # a plain trace counts tokens: it would be ignored
                    f"--block-tokens only applies to a Mooncake trace; {args.trace} is "
                    f"{trace.format!r}"
                )
        else:
            if args.format not in ("auto", "mooncake"):
                raise ValueError(f"--format {args.format}: the built-in trace is Mooncake's")
            builtin = generate.TraceSpec()
            spec = generate.TraceSpec(
                requests=builtin.requests if args.requests is None else args.requests,
                seed=builtin.seed if args.seed is None else args.seed,
                block_tokens=block_tokens,
            )
            records = generate.generate_trace(spec)[: args.max_requests]
            name = f"synthetic(requests={spec.requests}, seed={spec.seed})"
            trace = trace_from_records(
                records, name, format="mooncake", block_tokens=spec.block_tokens
            )
        caps = (
            [simulator.parse_capacity(c) for c in args.capacity]
            if args.capacity
            else simulator.default_capacities(trace)
        )
        policies = list(dict.fromkeys(args.policy or EVICTION_POLICIES))
        ideal = simulator.ideal(trace, args.page_size)
        progress = _Progress("replay", err, enabled=not args.quiet)
        results = simulator.sweep(
            trace, caps, policies, page_size=args.page_size, progress=progress
        )
    except (ValueError, ImportError) as exc:  # TraceError is a ValueError
        err.write(f"pymllm-cache: error: {exc}\n")
        return 2
    report: dict[str, Any] = {
        "trace": {
            "name": trace.name,
            "format": trace.format,
            "requests": len(trace),
            "unit": trace.unit,
            "unit_tokens": trace.unit_tokens,
            "units": trace.total_units,
            "distinct_units": ideal.distinct_units,
            "tokens": trace.total_tokens,
        },
        "page_size": args.page_size,
        "ideal": {
            "block_hit_rate": round(ideal.block_hit_rate, 6),
            "token_hit_rate": round(ideal.token_hit_rate, 6),
            "request_hit_fraction": round(ideal.request_hit_fraction, 6),
        },
        "runs": [r.summary() for r in results],
        "plot": args.plot,
    }
    plot_error = None
    if args.plot:
        try:
            plot.plot_hit_rates(
                results,
                args.plot,
                title=f"{trace.name}: {len(trace):,} requests, {trace.total_units:,} {trace.unit}s",
                ideal=ideal,
            )
        except (OSError, ValueError) as exc:  # checked up front; the file system may differ now
            plot_error = exc
            report["plot"] = None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_render_replay(report))
    if plot_error is not None:
        err.write(f"pymllm-cache: error: --plot {args.plot}: {plot_error}\n")
        return 2
    return 0 if all(r.leak_free for r in results) else 1


def _render_replay(report: dict[str, Any]) -> str:
    t, ideal, unit = report["trace"], report["ideal"], report["trace"]["unit"]
    rows = [
        (
            f"{r['capacity']:,}" if isinstance(r["capacity"], int) else str(r["capacity"]),
            r["policy"],
            f"{r['block_hit_rate']:.2%}",
            f"{r['token_hit_rate']:.2%}",
            f"{r['request_hit_fraction']:.2%}",
            f"{r['evicted_tokens']:,}",
            f"{r['requests_per_s']:,.0f}",
            "" if r["leak_free"] else "SLOT LEAK",
        )
        for r in report["runs"]
    ]
    header = (
        f"capacity ({unit}s)",
        "policy",
        "block hit",
        "token hit",
        "reqs with hit",
        "evicted tokens",
        "requests/s",
        "",
    )
    lines = [
        f"trace {t['name']} ({t['format']}): {t['requests']:,} requests, {t['units']:,} "
        f"{unit}s ({t['distinct_units']:,} distinct), {t['tokens']:,} tokens; "
        f"page size {report['page_size']} {unit}(s)",
        f"ideal (unbounded cache): block hit {ideal['block_hit_rate']:.2%}, token hit "
        f"{ideal['token_hit_rate']:.2%}, requests with a hit {ideal['request_hit_fraction']:.2%}",
        "",
        _table(rows, header),
        "",
        "requests/s: the replay loop alone (match, lock, evict, alloc, insert, free, unlock);"
        " trace parsing excluded",
    ]
    if report["plot"]:
        lines.append(f"plot saved to {report['plot']}")
    return "\n".join(lines)


# -- gen-trace ----------------------------------------------------------------------------


#: gen-trace's options: flag, type, metavar, help; each sets the TraceSpec field of its name.
#: TraceSpec checks the values' ranges (a ValueError naming the field, exit status 2).
_GEN_TRACE_OPTIONS = (
    ("--requests", _positive, "N", "lines to write"),
    ("--seed", _seed, "S", "the same seed, the same file"),
    ("--groups", _positive, "G", "shared system prompts"),
    ("--mean-turns", float, "T", "mean turns per conversation; a turn extends the last one"),
    ("--no-prefix", float, "F", "fraction of conversations without a shared system prompt"),
    ("--regenerate", float, "F", "fraction of turns sent twice (a regenerated answer)"),
    ("--block-tokens", _positive, "N", "tokens per block"),
)


def _add_gen_trace_arguments(p: argparse.ArgumentParser) -> None:
    from pymllm.replay.generate import TraceSpec

    spec = TraceSpec()
    p.add_argument("out", metavar="OUT.jsonl", help="where to write the Mooncake-format trace")
    for flag, kind, metavar, text in _GEN_TRACE_OPTIONS:
        default = getattr(spec, flag[2:].replace("-", "_"))
        p.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} ({default})"
        )


def _run_gen_trace(args: argparse.Namespace) -> int:
    from pymllm.replay.generate import TraceSpec, generate_trace, write_trace

    fields = [flag[2:].replace("-", "_") for flag, *_ in _GEN_TRACE_OPTIONS]
    try:
        spec = TraceSpec(**{f: getattr(args, f) for f in fields})
        records = generate_trace(spec)
        write_trace(args.out, records)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"pymllm-cache: error: {exc}\n")
        return 2
    refs = sum(len(r["hash_ids"]) for r in records)
    distinct = len({h for r in records for h in r["hash_ids"]})
    print(
        f"wrote {len(records):,} requests ({refs:,} block references, {distinct:,} distinct "
        f"blocks of {spec.block_tokens} tokens) to {args.out}"
    )
    return 0


# -- entry point --------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "demo": (
        "serve a workload with and without the prefix cache and print what it saved",
        _add_demo_arguments,
        _run_demo,
    ),
    "replay": (
        "replay a trace through the real prefix cache: hit rate per capacity and policy",
        _add_replay_arguments,
        _run_replay,
    ),
    "gen-trace": (
        "write a synthetic Mooncake-format trace (shared prefixes, multi-turn chats)",
        _add_gen_trace_arguments,
        _run_gen_trace,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymllm-cache", description="Prefix (KV) cache for JAX LLM inference."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
    return parser


#: The exit status after the reader of stdout went away (``pymllm-cache ... | head``):
#: 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command][2](args)
        sys.stdout.flush()  # a buffered report meets a closed pipe here, not at exit
        return status
    except BrokenPipeError:
        # Stop quietly, as other command-line tools do. Python flushes stdout again at
        # exit and would report the same error there: stdout is pointed at devnull first.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout replaced (tests): no fd
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
