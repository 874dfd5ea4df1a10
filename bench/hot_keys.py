"""Does it matter that the issue-2 workload's keys are read from memory?

The benchmark makes its 4,000 keys up front (200 MB as lists of ints), so each request reads
its key from memory, where a server's request arrives with a key its tokenizer has just
written, in cache. This script serves the workload (``conftest.SystemPromptWorkload``,
``conftest.serve``) both ways, with the SGLang-style tree (``seed_style.py``) and the
compiled cache, and prints the paired ratio of each way:

- *cold*: each key as the benchmark hands it over;
- *hot*: before each request, untimed, the key is copied (a list: a new list of the same
  int objects, each int read once; an array: ``copy()``), so its bytes are in cache.

Each request is timed on its own (``time.perf_counter_ns`` around ``conftest.serve`` of a
one-key list, the same calls as the benchmark's loop), so both ways pay the same clock
and call costs; the times are therefore a little above the benchmark's. A round serves the
workload four times (tree x way), each on a fresh cache; the ratio of a round is the
SGLang-style tree's time over the compiled cache's in that round.

Run: ``python bench/hot_keys.py [--rounds N] [--requests N]``.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest as bench
import numpy as np
from seed_style import SeedStyleRadixCache

from pymllm.mem_cache import RadixCache


def _in_cache(tokens):
    """A copy of the key whose bytes the CPU has just read (lists: every int object too)."""
    if isinstance(tokens, np.ndarray):
        return tokens.copy()
    copy = list(tokens)
    sum(copy)
    return copy


def serve_ns(cache_cls, data: list, hot: bool, hits: set[int]) -> float:
    """Mean ns a request of the workload on a fresh ``cache_cls`` cache; adds the tokens it
    found cached to ``hits`` (every tree and way must find the same)."""
    clock = time.perf_counter_ns
    cache, alloc = bench.fresh_cache(cache_cls)
    total = found = 0
    for tokens in data:
        one = [_in_cache(tokens) if hot else tokens]
        t0 = clock()
        found += bench.serve(cache, alloc, one)
        total += clock() - t0
    hits.add(found)
    del cache
    gc.collect()  # the SGLang-style tree's cycles, outside the next timed pass
    return total / len(data)


def main(argv: list[str] | None = None) -> int:
    args, wl = bench.script_workload(__doc__ or "", 8, argv)
    for kind, data in (("list", wl.lists), ("numpy", wl.arrays)):
        times: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
        hits: set[int] = set()
        for _ in range(args.rounds):  # the two ways interleaved, so drift hits both alike
            for hot, (base, comp) in times.items():
                base.append(serve_ns(SeedStyleRadixCache, data, hot, hits))
                comp.append(serve_ns(RadixCache, data, hot, hits))
        if len(hits) != 1:
            raise AssertionError(f"{kind} keys: the passes found {sorted(hits)} cached tokens")
        for hot, (base, comp) in times.items():
            ratio, q1, q3 = bench.paired_ratio(base, comp)
            print(
                f"{kind} keys, {'hot' if hot else 'cold'}: {ratio:.1f}x (quartiles "
                f"{q1:.1f}-{q3:.1f}x); medians {np.median(base) / 1e3:.1f} us (SGLang-style) "
                f"and {np.median(comp) / 1e3:.2f} us (compiled) a request"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
