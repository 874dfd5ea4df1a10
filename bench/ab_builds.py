"""Compare builds of the compiled tree on the issue-2 serving workload, round by round.

On a shared machine one build's time per request drifts by up to 2x between runs, more
than most changes are worth, so timing two builds one after the other decides nothing.
This loads every build's ``_radix_tree`` module side by side in one process and alternates
whole serving rounds between them (A B, then B A, ...): each round of a build is divided by
the first build's round next to it, and the median of those ratios (with its quartiles)
resolves differences of a few percent.

Usage (from the repository root)::

    cp pymllm/mem_cache/_radix_tree.*.so /tmp/before.so    # keep the build you start from
    # ... change pyx/, rebuild: PYMLLM_EXT_FILTER=_radix python setup.py build_ext --inplace
    cp pymllm/mem_cache/_radix_tree.*.so /tmp/after.so
    python bench/ab_builds.py /tmp/before.so /tmp/after.so --keys list --rounds 30

``--match-tree TOKENS`` times ``match_prefix`` instead (the benchmark's 128-token probes on
a tree of TOKENS cached tokens, one tree per build; ``--requests`` probes a round), where
a change shows in how a large tree's memory is reached rather than in the serving loop.
``--evict-tree TOKENS`` times one-node ``evict(1)`` calls on a fresh tree of TOKENS cached
tokens per build and round, handing the slots back to its allocator (the benchmark's
per-node eviction cost: as many calls as it makes, a tenth of the tree's leaves, at most
200).

Only ``_radix_tree`` is swapped: builds whose ``_allocator`` differs (its C interface is
cimported by the tree) are compared as whole checkouts with ``bench/ab_checkouts.py``.

A build may also be named ``seed-style`` or ``reference``: the pure-Python caches the
benchmark compares against (``bench/seed_style.py``, ``tests/reference_model.py``), or
``seed-style-tolist``, the SGLang-style tree converting a numpy key to a list once a call
(what its numpy-key rounds cost without comparing numpy scalars). Paired
with a compiled build, round by round, their ratio is the benchmark's ratio with the
machine's drift taken out (workload only)::

    python bench/ab_builds.py pymllm/mem_cache/_radix_tree.*.so seed-style --rounds 15

The first build is the reference. Each path must be a distinct file (a copy, not a link):
the loader maps one file once.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
from bench_radix_cache import _evictions, _grown_tree, _probes
from conftest import SystemPromptWorkload, fresh_cache, keep_freed_memory, paired_ratio, serve
from reference_model import RefRadixCache
from seed_style import SeedStyleRadixCache, SeedStyleTolistRadixCache

from pymllm.mem_cache.base_prefix_cache import BasePrefixCache

PURE_PYTHON = {
    "seed-style": SeedStyleRadixCache,
    "seed-style-tolist": SeedStyleTolistRadixCache,
    "reference": RefRadixCache,
}


def load_build(path: str | Path, index: int) -> type:
    """A cache class (the build's RadixTreeCore bound to BasePrefixCache) from one .so, or
    the pure-Python cache of that name (PURE_PYTHON)."""
    if str(path) in PURE_PYTHON:
        return PURE_PYTHON[str(path)]
    # the module name must end in the extension's own name: its init symbol is looked up
    # from it; the prefix keeps the builds apart in sys.modules
    spec = importlib.util.spec_from_file_location(f"_ab_build{index}._radix_tree", str(path))
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return type(f"RadixCacheBuild{index}", (module.RadixTreeCore, BasePrefixCache), {})


def compare(
    builds: list[str],
    keys: str = "numpy",
    rounds: int = 20,
    requests: int = 4000,
    match_tree: int | None = None,
    evict_tree: int | None = None,
) -> list[dict[str, float]]:
    """Per build: median us per request (per match with `match_tree`, per evicted node with
    `evict_tree`) and the median / quartiles of its paired ratio to the first build (< 1:
    faster)."""
    classes = [load_build(p, i) for i, p in enumerate(builds)]
    if (match_tree or evict_tree) is not None and any(str(p) in PURE_PYTHON for p in builds):
        raise ValueError("--match-tree and --evict-tree compare compiled builds only")
    hits: set[int] = {0} if (match_tree or evict_tree) is not None else set()
    if evict_tree is not None:
        n_evict = _evictions(evict_tree)

        def one_round(i: int) -> float:
            cache = _grown_tree(evict_tree, cache_cls=classes[i], with_allocator=True)[0]
            cache.evict(1)  # untimed, as the benchmark: a fresh cache's first evict costs more
            gc.collect()  # the tree's keys are freed here
            before = cache.total_size()
            t0 = time.perf_counter()
            for _ in range(n_evict):
                cache.evict(1)
            elapsed = time.perf_counter() - t0
            if before - cache.total_size() != n_evict * 64:  # _grown_tree's 64-token nodes
                raise AssertionError(f"{n_evict} evict(1) did not free {n_evict} nodes")
            return elapsed / n_evict * 1e6

    elif match_tree is None:
        wl = SystemPromptWorkload(n_requests=requests)
        data = wl.lists if keys == "list" else wl.arrays

        def one_round(i: int) -> float:
            cache, alloc = fresh_cache(classes[i])
            gc.collect()  # the last round's pure-Python tree (cycles) goes here, untimed
            t0 = time.perf_counter()
            hits.add(serve(cache, alloc, data))
            return (time.perf_counter() - t0) / len(data) * 1e6

    else:
        grown = [_grown_tree(match_tree, cache_cls=cls) for cls in classes]
        probes = _probes(grown[0][1], requests)

        def one_round(i: int) -> float:
            match = grown[i][0].match_prefix
            t0 = time.perf_counter()
            for k in probes:
                match(k)
            return (time.perf_counter() - t0) / len(probes) * 1e6

    gc.collect()
    gc.freeze()
    times: list[list[float]] = [[] for _ in builds]
    for r in range(rounds):
        order = range(len(builds)) if r % 2 == 0 else reversed(range(len(builds)))
        for i in order:
            times[i].append(one_round(i))
    if len(hits) != 1:
        raise AssertionError(f"the builds disagree on the hit tokens: {sorted(hits)}")
    rows = []
    for t in times:
        ratio, q1, q3 = paired_ratio(t, times[0])
        rows.append(
            {"us_per_request": float(np.median(t)), "ratio": ratio, "ratio_q1": q1, "ratio_q3": q3}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", help="_radix_tree .so files; the first is the reference")
    ap.add_argument("--keys", choices=["numpy", "list"], default="numpy")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument(
        "--match-tree",
        type=int,
        metavar="TOKENS",
        help="time match_prefix on a tree of TOKENS cached tokens instead of the workload",
    )
    ap.add_argument(
        "--evict-tree",
        type=int,
        metavar="TOKENS",
        help="time evict(1) on a fresh tree of TOKENS cached tokens instead",
    )
    args = ap.parse_args(argv)
    if not keep_freed_memory():
        print(
            "glibc's default malloc thresholds (PYMLLM_BENCH_MALLOC=default or not glibc)",
            file=sys.stderr,
        )
    rows = compare(
        args.builds, args.keys, args.rounds, args.requests, args.match_tree, args.evict_tree
    )
    if args.evict_tree is not None:
        unit = "node"
        print(
            f"{_evictions(args.evict_tree)} evict(1) on a fresh {args.evict_tree:,}-token tree,"
            f" {args.rounds} paired rounds"
        )
    elif args.match_tree is None:
        unit = "request"
        print(f"{args.keys} keys, {args.requests} requests a round, {args.rounds} paired rounds")
    else:
        unit = "match"
        print(
            f"match_prefix on a {args.match_tree:,}-token tree, {args.requests} probes a round, "
            f"{args.rounds} paired rounds"
        )
    for path, row in zip(args.builds, rows, strict=True):
        print(
            f"{Path(path).name:<28} {row['us_per_request']:8.2f} us/{unit}  "
            f"vs the first: {row['ratio']:.3f} "
            f"(quartiles {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
