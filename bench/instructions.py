"""Instructions per request of the issue-2 workload, counted by callgrind: a ratio that the
shared machine's drift cannot move.

Time on this machine drifts by up to 2x within minutes and memory stalls weigh differently on
the two sides (the compiled loop waits on memory, the interpreter does not), so a timed ratio
says how fast the code ran there and then. The instructions each side executes are the same
on every run (``PYTHONHASHSEED=0``): they say how much work each side does. Each
configuration runs in its own process under ``valgrind --tool=callgrind``; a process that
only builds the workload is the baseline subtracted from the others, and the loop with no
cache at all (``bench_radix_cache._serve_without_cache``) gives the cache calls' own share.

Usage (from the repository root; needs valgrind; the full workload takes ~10 minutes)::

    python bench/instructions.py                   # all four, 4,000 requests
    python bench/instructions.py --requests 500    # a shorter workload (less eviction)

Not a pytest-benchmark suite: it times nothing, and its figures are a property of the code
(and of the interpreter and numpy builds), not of the machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# setup: the workload alone (the baseline); floor: the loop with every cache call left out
CONFIGS = ("setup", "floor", "compiled", "seed-style")
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _child(config: str, keys: str, requests: int) -> None:
    """The measured process: build the workload, then run `config` over it once."""
    from bench_radix_cache import _serve_without_cache
    from conftest import POOL, SystemPromptWorkload, fresh_cache, keep_freed_memory, serve
    from seed_style import SeedStyleRadixCache

    from pymllm.mem_cache import RadixCache
    from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

    keep_freed_memory()
    wl = SystemPromptWorkload(n_requests=requests)
    gc.collect()
    gc.freeze()
    data = wl.lists if keys == "list" else wl.arrays
    if config == "floor":
        _serve_without_cache(TokenToKVPoolAllocator(POOL, need_sort=False), data)
    elif config != "setup":
        cls = RadixCache if config == "compiled" else SeedStyleRadixCache
        cache, alloc = fresh_cache(cls)
        serve(cache, alloc, data)


def count(config: str, keys: str, requests: int, valgrind: str = "valgrind") -> int:
    """Instructions callgrind counts for one child process running `config`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={Path(tmp) / 'callgrind.out'}",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            config,
            "--keys",
            keys,
            "--requests",
            str(requests),
        ]
        env = dict(os.environ, PYTHONHASHSEED="0")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = _COLLECTED.findall(proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"callgrind run of {config} ({keys} keys) failed (exit {proc.returncode}):\n"
            + proc.stderr[-2000:]
        )
    return int(found[-1])


def per_request(totals: dict[str, int], requests: int) -> dict[str, float]:
    """Instructions a request of each configuration, the workload's setup subtracted."""
    return {c: (n - totals["setup"]) / requests for c, n in totals.items() if c != "setup"}


def report(per: dict[str, float]) -> list[str]:
    """Lines of the summary: each side's instructions a request, the whole loop's ratio and
    the cache calls' own ratio (each side minus the loop with no cache)."""
    floor, compiled, seed = per["floor"], per["compiled"], per["seed-style"]
    return [
        f"  loop with no cache (floor)   {floor:>12,.0f} instructions a request",
        f"  compiled                     {compiled:>12,.0f}",
        f"  SGLang-style tree            {seed:>12,.0f}",
        f"  whole loop: the SGLang-style tree executes {seed / compiled:.1f}x the instructions",
        f"  the cache calls alone (minus the floor): {(seed - floor) / (compiled - floor):.1f}x",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", choices=["numpy", "list", "both"], default="both")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.keys, args.requests)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    for keys in ["numpy", "list"] if args.keys == "both" else [args.keys]:
        totals = {c: count(c, keys, args.requests, valgrind) for c in CONFIGS}
        print(f"{keys} keys, {args.requests} requests (callgrind, PYTHONHASHSEED=0):")
        for line in report(per_request(totals, args.requests)):
            print(line)
    return 0


if __name__ == "__main__":
    # run as a script from anywhere: the bench helpers (and, through them, tests/) import
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
