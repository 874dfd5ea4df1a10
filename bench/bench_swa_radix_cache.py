"""RadixCache with a sliding window (issue 3): the serving workload beside full attention.

The issue-2 workload (200 system prompts x 1024 tokens, 4000 requests + 256 fresh tokens,
page_size 1, a 300,000-slot full pool so that eviction runs), served four ways:

* ``full attention``: ``RadixCache`` over ``TokenToKVPoolAllocator(300_000)`` (the baseline);
* ``no window, SWA allocator``: the same cache over ``SWATokenToKVPoolAllocator(300_000,
  300_000)``, a hybrid model whose cache ignores the window (it keeps SWA KV for every cached
  token); this separates the allocator's cost from the window's;
* ``SWA W=1024, SWA pool 75,000``: ``RadixCache(sliding_window_size=1024)`` over
  ``SWATokenToKVPoolAllocator(300_000, 75_000)``, an SWA pool a quarter of the full one. A
  request short of SWA slots frees them with ``evict(0, swa_need)`` (tombstones);
* ``SWA W=1024, SWA pool 300,000``: the same with an SWA pool as large as the full one, so
  that the window's own cost shows apart from the pool pressure;

and, for the windowed case, the pure-Python reference model ``RefSWARadixCache`` (one
round). Each case reports time per request (ratios against full attention) and the token
hit rate; the windowed cases also how many SWA tokens ``evict`` freed.

Run: ``pytest bench/bench_swa_radix_cache.py --benchmark-only`` (ratios printed at the end).
"""

from __future__ import annotations

import pytest
from conftest import POOL, fresh_cache, note, record, serve
from reference_swa import RefSWARadixCache

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator

WINDOW = 1024
GROUP = "system-prompt workload with a sliding window (per request)"
HITS: dict[str, int] = {}
MEDIANS: dict[str, float] = {}


def serve_swa(cache, allocator, keys) -> tuple[int, int]:
    """Run every key as one request on a windowed cache: match -> lock (keeping the
    boundary) -> free full slots, then SWA slots, when short -> allocate -> insert with
    prev_prefix_len (the cache settles the duplicates) -> unlock with the boundary.
    Returns (hit tokens, SWA tokens freed by evictions)."""
    hits = swa_freed = 0
    for tokens in keys:
        key = RadixKey(tokens)
        m = cache.match_prefix(key)
        boundary = cache.inc_lock_ref(m.last_node)
        need = len(tokens) - m.prefix_len
        short = need - allocator.full_available_size()
        if short > 0:
            swa_freed += cache.evict(short).swa_evicted
        swa_short = need - allocator.swa_available_size()
        if swa_short > 0:
            swa_freed += cache.evict(0, swa_short).swa_evicted
        value = allocator.alloc(need, prefix=m.indices)  # the matched slots, then new ones
        assert value is not None, "pool too small for one request"
        cache.insert(key, value, prev_prefix_len=m.prefix_len)
        cache.dec_lock_ref(m.last_node, boundary)
        hits += m.prefix_len
    return hits, swa_freed


CASES = {
    "full attention": None,
    "no window, SWA allocator 300,000 + 300,000": (RadixCache, POOL),
    "SWA W=1024, SWA pool 75,000": (RadixCache, 75_000),
    "SWA W=1024, SWA pool 300,000": (RadixCache, POOL),
    "SWA W=1024, SWA pool 75,000, pure-python": (RefSWARadixCache, 75_000),
}


@pytest.mark.parametrize("case", list(CASES))
def test_system_prompt_workload_swa(benchmark, system_prompt_workload, case):
    wl = system_prompt_workload
    spec = CASES[case]

    def setup():
        if spec is None:
            return fresh_cache(RadixCache), {}
        cls, swa_pool = spec
        alloc = SWATokenToKVPoolAllocator(POOL, swa_pool, need_sort=False)
        window = None if case.startswith("no window") else WINDOW
        cache = cls(sliding_window_size=window, token_to_kv_pool_allocator=alloc)
        return (cache, alloc), {}

    results = []

    def run(cache, alloc):
        if cache.sliding_window_size is None:
            results.append((serve(cache, alloc, wl.lists), 0))
        else:
            results.append(serve_swa(cache, alloc, wl.lists))
        results.append(cache)

    benchmark.group = "workload-swa"
    rounds = 1 if "pure-python" in case else 11
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    record(benchmark, GROUP, case, baseline=spec is None, per=len(wl.lists))
    (hits, swa_freed), cache = results[-2], results[-1]
    cache._check_invariants()
    HITS[case] = hits
    compiled = case.removesuffix(", pure-python")
    if compiled != case and compiled in HITS:
        assert hits == HITS[compiled], "the reference model served the workload differently"
    line = f"{case}: token hit rate {hits / wl.prompt_tokens:.1%}"
    if cache.sliding_window_size is not None:
        line += f", {swa_freed / len(wl.lists):,.0f} SWA tokens freed by evict per request"
    if benchmark.stats is not None:
        MEDIANS[case] = benchmark.stats.stats.median
        if spec is not None and "full attention" in MEDIANS:
            line += f", {MEDIANS[case] / MEDIANS['full attention']:.2f}x the time of full attention"
        if compiled != case and compiled in MEDIANS:
            line += f" (compiled: {MEDIANS[case] / MEDIANS[compiled]:.1f}x faster)"
    note(GROUP, line)
    if spec is None:
        note(GROUP, f"(ideal hit rate {wl.ideal_hit_tokens / wl.prompt_tokens:.1%})")
