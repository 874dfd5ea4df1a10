"""Compare two checkouts of the package (each built in place) on the issue-2 serving
workload: whole builds, the allocator included, in alternating child processes.

``bench/ab_builds.py`` loads two ``_radix_tree`` builds side by side in one process, which
only works while both were built against the same ``_allocator`` (the tree cimports its C
interface). A change to the allocator is compared here instead: each round is a child
process that puts one checkout first on ``sys.path``, builds the workload and serves it
``--serves`` times with a fresh cache each (median time per request); the two checkouts
alternate (A B, then B A, ...) and the summary is the median and quartiles of the rounds'
ratios B / A. The workload and serving loop are this file's own (``bench/conftest.py``),
whichever checkout is timed (for a checkout whose allocator predates ``alloc(n,
prefix=)``, with each value made by ``np.concatenate``, as that checkout's own loop did).

Usage (from the repository root; both checkouts built with ``python setup.py build_ext
--inplace``)::

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python bench/ab_checkouts.py /tmp/base . --keys numpy --rounds 16
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(keys: str, serves: int) -> None:
    """One round: serve the workload `serves` times; print the median us per request."""
    import gc
    import time

    import numpy as np
    from conftest import SystemPromptWorkload, fresh_cache, keep_freed_memory, serve

    from pymllm.mem_cache import RadixCache

    keep_freed_memory()
    wl = SystemPromptWorkload()
    gc.collect()
    gc.freeze()
    data = wl.lists if keys == "list" else wl.arrays
    # a checkout from before alloc(n, prefix=) makes each value with np.concatenate, as
    # its serving loop did
    from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

    concatenate = "prefix" not in inspect.signature(TokenToKVPoolAllocator.alloc).parameters
    times = []
    for _ in range(serves):
        cache, alloc = fresh_cache(RadixCache)
        t0 = time.perf_counter()
        serve(cache, alloc, data, concatenate=concatenate)
        times.append((time.perf_counter() - t0) / len(data) * 1e6)
    import pymllm

    print(json.dumps({"us": float(np.median(times)), "package": pymllm.__file__}))


def one_round(checkout: Path, keys: str, serves: int) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(HERE), str(HERE.parent / "tests")])
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--keys", keys, "--serves", str(serves)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(checkout):
        raise RuntimeError(f"{checkout}: the child imported pymllm from {result['package']}")
    return float(result["us"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="*", type=Path, help="two checkout roots; A first")
    ap.add_argument("--keys", choices=["numpy", "list"], default="numpy")
    ap.add_argument("--rounds", type=int, default=16, help="child processes per checkout")
    ap.add_argument("--serves", type=int, default=9, help="workload runs per child")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.keys, args.serves)
        return 0
    if len(args.checkouts) != 2:
        ap.error("expected two checkouts")
    import numpy as np

    a, b = (p.resolve() for p in args.checkouts)
    times: dict[Path, list[float]] = {a: [], b: []}
    for r in range(args.rounds):
        for c in (a, b) if r % 2 == 0 else (b, a):
            times[c].append(one_round(c, args.keys, args.serves))
    ratio = np.asarray(times[b]) / np.asarray(times[a])
    q1, med, q3 = np.percentile(ratio, [25, 50, 75])
    print(f"{args.keys} keys, {args.rounds} paired rounds of {args.serves} serves")
    print(f"A {a}: {np.median(times[a]):.3f} us/request")
    print(f"B {b}: {np.median(times[b]):.3f} us/request")
    print(f"B / A: {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
