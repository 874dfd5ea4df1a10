"""Where a request of the issue-2 workload spends its time, call by call.

Serves the workload of ``bench_radix_cache.py`` (``conftest.SystemPromptWorkload``, the
same loop as ``conftest.serve``) with ``time.perf_counter_ns`` around each call, and
prints, per key kind, the median over the rounds of each call's mean time per request. The
clock pairs themselves add about 40 ns to each call, and the timing slows the loop, so the
parts add up to more than an untimed request. Also prints what reading a key costs on its
own: ``match_prefix`` on an empty tree over every request's key (cold: each key read once)
and over one key again and again (warm).

Run: ``python bench/breakdown.py [--rounds N] [--requests N]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest as bench
import numpy as np

from pymllm.mem_cache import RadixCache, RadixKey

CALLS = (
    "RadixKey(tokens)",
    "match_prefix",
    "inc_lock_ref",
    "size checks",
    "evict",
    "alloc(need, prefix=m.indices)",
    "insert",
    "free duplicates, dec_lock_ref",
)


def timed_round(data: list) -> list[float]:
    """One round of the workload on a fresh cache; each call's mean ns per request."""
    clock = time.perf_counter_ns
    cache, alloc = bench.fresh_cache(RadixCache)
    total = [0] * len(CALLS)
    for tokens in data:
        t0 = clock()
        key = RadixKey(tokens)
        t1 = clock()
        m = cache.match_prefix(key)
        t2 = clock()
        lock = cache.inc_lock_ref(m.last_node)
        t3 = clock()
        need = len(tokens) - m.prefix_len
        short = need - alloc.available_size()
        t4 = clock()
        if short > 0:
            cache.evict(short)
        t5 = clock()
        value = alloc.alloc(need, prefix=m.indices)
        t6 = clock()
        r = cache.insert(key, value)
        t7 = clock()
        if r.prefix_len > m.prefix_len:
            alloc.free(value[m.prefix_len : r.prefix_len])
        cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)
        t8 = clock()
        marks = (t0, t1, t2, t3, t4, t5, t6, t7, t8)
        for i in range(len(CALLS)):
            total[i] += marks[i + 1] - marks[i]
    return [t / len(data) for t in total]


def key_read_ns(data: list) -> tuple[float, float]:
    """``match_prefix`` on an empty tree: ns a key over all the keys (each read once,
    cold), and over the first key again and again (warm)."""
    clock = time.perf_counter_ns
    cache = RadixCache()
    keys = [RadixKey(t) for t in data]
    t0 = clock()
    for k in keys:
        cache.match_prefix(k)
    cold = (clock() - t0) / len(keys)
    t0 = clock()
    for _ in range(len(keys)):
        cache.match_prefix(keys[0])
    return cold, (clock() - t0) / len(keys)


def main(argv: list[str] | None = None) -> int:
    args, wl = bench.script_workload(__doc__ or "", 5, argv)
    kinds = {"list keys": wl.lists, "numpy keys": wl.arrays}
    medians = {}
    for kind, data in kinds.items():
        rounds = np.array([timed_round(data) for _ in range(args.rounds)])
        medians[kind] = np.median(rounds, axis=0)
    print(f"{'per request (us)':<32}" + "".join(f"{k:>12}" for k in kinds))
    for i, call in enumerate(CALLS):
        print(f"{call:<32}" + "".join(f"{medians[k][i] / 1e3:>12.2f}" for k in kinds))
    print(f"{'sum':<32}" + "".join(f"{medians[k].sum() / 1e3:>12.2f}" for k in kinds))
    for kind, data in kinds.items():
        cold, warm = key_read_ns(data)
        print(
            f"match_prefix on an empty tree, {kind}: {cold / 1e3:.2f} us cold, "
            f"{warm / 1e3:.2f} us warm"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
