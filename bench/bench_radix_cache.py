"""RadixCache benchmarks (issue 2).

* the serving workload (200 system prompts x 1024 tokens, 4000 requests + 256 fresh tokens,
  300,000-slot pool so eviction runs, page_size 1): compiled vs two pure-Python caches (the
  reference model, and the SGLang-style tree of seed_style.py), with list keys and numpy
  keys, plus the same loop with no cache at all (the floor: the summary also shows every
  case minus it), and the compiled cache paired round by round with the SGLang-style tree
  (the ratio with the machine's drift divided out);
* per-match and per-evicted-node cost as the tree grows from 1e3 to 1e6 cached tokens;
* hash_token_ids throughput.

Run: ``pytest bench --benchmark-only`` (ratios printed at the end).
"""

from __future__ import annotations

import gc
import itertools
import time

import numpy as np
import pytest
from conftest import POOL, fresh_cache, note, paired_ratio, record, serve
from reference_model import RefRadixCache
from seed_style import SeedStyleRadixCache

from pymllm.mem_cache import EVICTION_POLICIES, RadixCache, RadixKey, hash_token_ids
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

# The compiled cache and the floor take ~0.05 s a round: 25 rounds span seconds of the
# machine's drift, as the 3 rounds of a pure-Python cache do.
COMPILED_ROUNDS = 25
_HITS: dict[str, set[int]] = {}  # hit tokens per key kind, across the implementations
IMPLS = {
    "compiled": RadixCache,
    "pure-python (seed style)": SeedStyleRadixCache,
    "pure-python (reference model)": RefRadixCache,
}


@pytest.mark.parametrize("keys", ["list", "numpy"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_system_prompt_workload(benchmark, system_prompt_workload, impl, keys):
    wl = system_prompt_workload
    data = wl.lists if keys == "list" else wl.arrays

    def setup():
        gc.collect()  # the last round's tree (cycles, in the pure-Python ones) goes here
        return fresh_cache(IMPLS[impl]), {}

    hits = []

    def run(cache, alloc):
        hits.append(serve(cache, alloc, data))

    rounds = COMPILED_ROUNDS if impl == "compiled" else 3
    benchmark.group = f"workload-{keys}"
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    group = f"system-prompt workload, {keys} keys (per request)"
    record(benchmark, group, impl, baseline=impl != "compiled", per=len(data))
    # every implementation keeps the same LRU order, so all must hit the same tokens
    assert len(set(hits)) == 1
    _HITS.setdefault(keys, set()).add(hits[-1])
    assert len(_HITS[keys]) == 1, f"implementations disagree on the hits: {_HITS[keys]}"
    if impl == "compiled":
        note(
            group,
            f"token hit rate {hits[-1] / wl.prompt_tokens:.1%} "
            f"(ideal {wl.ideal_hit_tokens / wl.prompt_tokens:.1%})",
        )


PAIRED_ROUNDS = 12


def _time_compiled_rounds(benchmark, group: str, data, setup) -> list[float] | None:
    """PAIRED_ROUNDS rounds of the compiled cache serving `data`, each after `setup` (which
    times the round it is paired with and returns the fresh cache and allocator); the
    rounds' times, or None under --benchmark-disable."""
    benchmark.group = group
    benchmark.pedantic(
        lambda cache, alloc: serve(cache, alloc, data),
        setup=setup,
        rounds=PAIRED_ROUNDS,
        iterations=1,
    )
    stats = benchmark.stats
    return None if stats is None else list(stats.stats.data)


@pytest.mark.parametrize("keys", ["list", "numpy"])
def test_system_prompt_workload_paired(benchmark, system_prompt_workload, keys):
    """The ratio with the drift divided out: each round of the compiled cache runs right
    after a round of the SGLang-style tree and a round of the loop with no cache (both timed
    in setup, which the benchmark leaves out), and the summary gives the median of the
    rounds' ratios. On this shared machine a cache's time per request moves by up to 2x
    within minutes, so the ratio of two medians taken seconds apart moves with it; the
    rounds' ratios do not. Two ratios per round: the whole loop (seed-style / compiled),
    and the cache calls' own time, each side minus the no-cache loop of the same round."""
    wl = system_prompt_workload
    data = wl.lists if keys == "list" else wl.arrays
    baseline: list[float] = []
    floor: list[float] = []
    ceiling: list[float] = []

    def setup():
        seed_style, alloc = fresh_cache(SeedStyleRadixCache)
        t0 = time.perf_counter()
        serve(seed_style, alloc, data)
        baseline.append(time.perf_counter() - t0)
        del seed_style
        gc.collect()  # the tree's cycles, before the compiled round rather than inside it
        alloc = TokenToKVPoolAllocator(POOL, need_sort=False)
        t0 = time.perf_counter()
        _serve_without_cache(alloc, data)
        floor.append(time.perf_counter() - t0)
        alloc = TokenToKVPoolAllocator(POOL, need_sort=False)
        t0 = time.perf_counter()
        _serve_without_cache(alloc, data, read_keys=RadixCache())
        ceiling.append(time.perf_counter() - t0)
        return fresh_cache(RadixCache), {}

    compiled = _time_compiled_rounds(benchmark, f"workload-{keys}-paired", data, setup)
    if compiled is None:
        return
    assert len(compiled) == len(baseline) == len(floor) == PAIRED_ROUNDS
    group = f"system-prompt workload, {keys} keys (per request)"
    ratio, q1, q3 = paired_ratio(baseline, compiled)
    note(
        group,
        f"paired with the SGLang-style tree round by round ({PAIRED_ROUNDS} rounds): "
        f"{ratio:.1f}x faster (quartiles {q1:.1f}-{q3:.1f}x)",
    )
    own, q1, q3 = paired_ratio(
        [b - f for b, f in zip(baseline, floor, strict=True)],
        [c - f for c, f in zip(compiled, floor, strict=True)],
    )
    note(
        group,
        f"  the cache calls alone, each side minus the same round's no-cache loop "
        f"({np.median(floor) / len(data) * 1e6:.2f} us a request): "
        f"{own:.1f}x (quartiles {q1:.1f}-{q3:.1f}x)",
    )
    best, q1, q3 = paired_ratio(baseline, ceiling)
    note(
        group,
        f"  the most any cache could reach here: the no-cache loop plus one read of each "
        f"key ({np.median(ceiling) / len(data) * 1e6:.2f} us a request): "
        f"{best:.1f}x (quartiles {q1:.1f}-{q3:.1f}x)",
    )


@pytest.mark.parametrize("keys", ["list", "numpy"])
def test_value_by_prefix_vs_concatenate(benchmark, system_prompt_workload, keys):
    """The compiled cache's workload with each request's value made by
    ``alloc(need, prefix=m.indices)`` (one array, made in C) against the same loop with
    ``np.concatenate([m.indices, alloc(need)])``, paired round by round as above (the
    concatenating round runs in setup, timed there)."""
    wl = system_prompt_workload
    data = wl.lists if keys == "list" else wl.arrays
    by_concatenate: list[float] = []

    def setup():
        cache, alloc = fresh_cache(RadixCache)
        t0 = time.perf_counter()
        serve(cache, alloc, data, concatenate=True)
        by_concatenate.append(time.perf_counter() - t0)
        del cache
        return fresh_cache(RadixCache), {}

    compiled = _time_compiled_rounds(benchmark, f"workload-{keys}-value", data, setup)
    if compiled is None:
        return
    ratio, q1, q3 = paired_ratio(compiled, by_concatenate)
    note(
        f"system-prompt workload, {keys} keys (per request)",
        f"the value by alloc(need, prefix=m.indices) / by np.concatenate, paired "
        f"({PAIRED_ROUNDS} rounds): {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f}), "
        f"{np.median(by_concatenate) / len(data) * 1e6:.2f} us a request by np.concatenate",
    )


def _serve_without_cache(allocator, keys, prompt_len: int = 1024, read_keys=None) -> None:
    """The serving loop's own work with every cache call left out: the key object, the
    allocation of the fresh part behind the matched prefix's slots (a stand-in int32 array
    of slots the loop holds) and the free. It bounds the ratio any cache can reach against
    the pure-Python ones on this workload.

    ``read_keys``: an empty compiled cache, matched against each key once (which reads
    the whole key, at C speed, and finds nothing). Every cache must read a request's key
    at least once, and the workload's keys are read from memory (4,000 keys of 1,280
    tokens: 5 KB each as int32, 51 KB as a list's ints and item pointers), so this is the
    tighter bound: the least a request can cost with any cache behind this loop."""
    prefix = allocator.alloc(prompt_len)
    for tokens in keys:
        key = RadixKey(tokens)
        if read_keys is not None:
            read_keys.match_prefix(key)
        value = allocator.alloc(len(key) - prompt_len, prefix=prefix)
        allocator.free(value[prompt_len:])
    allocator.free(prefix)


@pytest.mark.parametrize("keys", ["list", "numpy"])
def test_system_prompt_loop_floor(benchmark, system_prompt_workload, keys):
    wl = system_prompt_workload
    data = wl.lists if keys == "list" else wl.arrays

    def setup():
        return (TokenToKVPoolAllocator(POOL, need_sort=False),), {}

    benchmark.group = f"workload-{keys}"
    benchmark.pedantic(
        lambda alloc: _serve_without_cache(alloc, data), setup=setup, rounds=COMPILED_ROUNDS
    )
    group = f"system-prompt workload, {keys} keys (per request)"
    record(benchmark, group, "loop without any cache (floor)", floor=True, per=len(data))


def _n_keys(total_tokens: int, leaf_len: int = 64, fanout: int = 16) -> int:
    """Keys (= leaves) of `_grown_tree(total_tokens)`: each is its group's shared
    `leaf_len`-token stem plus `leaf_len` own tokens, so a group of `fanout` keys caches
    `(fanout + 1) * leaf_len` tokens."""
    return max(1, round(total_tokens * fanout / (leaf_len * (fanout + 1))))


def _grown_tree(
    total_tokens: int,
    leaf_len: int = 64,
    fanout: int = 16,
    policy: str = "lru",
    cache_cls: type = RadixCache,
    with_allocator: bool = False,
):
    """A tree caching about `total_tokens` tokens (within one key's; a few fewer where two
    random suffixes of a group happen to start alike): keys share 64-token stems in groups
    of `fanout`. `with_allocator`: its slots come from a
    `TokenToKVPoolAllocator` of exactly that size, so that an evict hands them back to it,
    as in serving; else they are plain numbers and an evict only drops them."""
    rng = np.random.default_rng(1)
    n_keys = _n_keys(total_tokens, leaf_len, fanout)
    stems = rng.integers(0, 50_000, size=((n_keys - 1) // fanout + 1, leaf_len), dtype=np.int32)
    keys = [
        np.concatenate([stems[i // fanout], rng.integers(0, 50_000, leaf_len, dtype=np.int32)])
        for i in range(n_keys)
    ]
    n_tokens = (n_keys + len(stems)) * leaf_len
    if with_allocator:
        alloc = TokenToKVPoolAllocator(n_tokens, need_sort=False)
        cache = cache_cls(eviction_policy=policy, token_to_kv_pool_allocator=alloc)
        for k in keys:
            rk = RadixKey(k)
            m = cache.match_prefix(rk)
            cache.insert(rk, alloc.alloc(len(k) - m.prefix_len, prefix=m.indices))
    else:
        cache = cache_cls(eviction_policy=policy)
        nxt = 1
        for k in keys:
            cache.insert(RadixKey(k), np.arange(nxt, nxt + len(k), dtype=np.int32))
            nxt += len(k)
    return cache, keys


def _probes(keys: list, n: int, rng: np.random.Generator | None = None) -> list:
    """`n` match keys drawn at random from a grown tree's keys (seeded unless `rng`)."""
    rng = np.random.default_rng(2) if rng is None else rng
    return [RadixKey(keys[i]) for i in rng.integers(0, len(keys), n)]


SIZES = [1_000, 10_000, 100_000, 1_000_000]


@pytest.mark.parametrize("probes", ["new", "same"])
@pytest.mark.parametrize("size", SIZES)
def test_match_cost_vs_tree_size(benchmark, size, probes):
    """1,000 matches of keys drawn at random a round. ``new``: new keys every round, so at
    1e6 tokens a round reaches about 1,000 of the tree's 14,706 leaves, mostly cold (what a
    server's fresh requests meet); ``same``: the same 1,000 every round after a warm-up
    round (a working set that stays in cache): the walk's own cost."""
    cache, keys = _grown_tree(size)
    rng = np.random.default_rng(2)
    fixed = _probes(keys, 1000)

    def run(batch):
        for k in batch:
            cache.match_prefix(k)

    def setup():
        return ((_probes(keys, 1000, rng) if probes == "new" else fixed),), {}

    benchmark.group = "match-vs-size"
    benchmark.pedantic(run, setup=setup, rounds=7, warmup_rounds=1 if probes == "same" else 0)
    record(
        benchmark,
        "match_prefix of a 128-token key, per call",
        f"{size:>9,} tokens, {probes} keys",
        per=1000,
    )


def _evictions(size: int) -> int:
    """One-node evictions a timed round makes on a fresh `size`-token tree (after one
    untimed): a tenth of its leaves, at most 200, so that the tree still holds most of
    `size` at the round's end and the figure is the cost at that size (a 1e3-token tree
    has 16 leaves)."""
    return max(1, min(200, _n_keys(size) // 10))


def _time_evictions(benchmark, make_cache, group: str, case: str, n_evict: int = 200) -> None:
    """Median time per evicted node of `n_evict` one-node evictions from each of enough
    fresh caches for 20 evictions a round (`n_evict` at most the cache's leaves, so that
    every call evicts one; more caches rather than more evictions keep a small tree near
    its size), over enough rounds for at least 200 evictions in all."""
    copies = -(-20 // n_evict)

    def run(caches):
        for cache in caches:
            for _ in range(n_evict):
                cache.evict(1)

    def setup():
        caches = [make_cache() for _ in range(copies)]
        for cache in caches:  # a fresh cache's first evict costs ~0.4 us more (untimed)
            cache.evict(1)
        return (caches,), {}

    benchmark.group = group
    rounds = max(5, -(-200 // (n_evict * copies)))
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    record(benchmark, group, case, per=n_evict * copies)


@pytest.mark.parametrize("size", SIZES)
def test_evict_cost_vs_tree_size(benchmark, size):
    _time_evictions(
        benchmark,
        lambda: _grown_tree(size, with_allocator=True)[0],
        "evict of one leaf (64 tokens, handed back to the allocator), per node",
        f"{size:>9,} tokens",
        n_evict=_evictions(size),
    )


@pytest.mark.parametrize("size", [100_000, 1_000_000])
@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_evict_cost_per_policy(benchmark, policy, size):
    """Every policy keeps evict proportional to what it frees: one heap pop per node."""

    def make():
        cache, keys = _grown_tree(size, policy=policy, with_allocator=True)
        rng = np.random.default_rng(4)
        for i in rng.integers(0, len(keys), len(keys) // 2):  # uneven hits and recency
            cache.match_prefix(RadixKey(keys[i]))
        return cache

    _time_evictions(
        benchmark, make, "evict of one leaf, per node, by policy", f"{policy:<8} {size:>9,} tokens"
    )


def _key_of_type(kind: str, a: np.ndarray):
    """1,280 tokens of a (1,281 random ids) as a key of `kind`."""
    if kind == "bigram tuples":
        return [(int(x), int(y)) for x, y in itertools.pairwise(a.tolist())]
    if kind == "list of ints":
        return a[:1280].tolist()
    return a[:1280].astype(kind.split()[1])


KEY_TYPES = ["numpy int32", "numpy int64", "numpy uint64", "list of ints", "bigram tuples"]


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_match_by_key_type(benchmark, kind):
    """match_prefix of a 1,280-token key by its type, 50 cached keys matched in turn: an
    int32 array is read in place, the others converted (int64/uint64 arrays narrowed in C,
    lists read four ints a group, bigram tuples from their items)."""
    rng = np.random.default_rng(0)
    keys = [RadixKey(_key_of_type(kind, rng.integers(0, 50_000, 1281))) for _ in range(50)]
    cache = RadixCache()
    for k in keys:
        cache.insert(k, np.arange(1, 1281, dtype=np.int32))

    def run():
        for k in keys:
            cache.match_prefix(k)

    benchmark.group = "match-by-key-type"
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=2)
    record(benchmark, "match_prefix of a 1,280-token key, by key type", kind, per=len(keys))


def test_hash_token_ids_throughput(benchmark):
    tokens = np.random.default_rng(3).integers(0, 1 << 31, size=1 << 20, dtype=np.int64)
    benchmark.group = "hash"
    benchmark(hash_token_ids, tokens)
    record(benchmark, "hash_token_ids, 1M tokens (4 MB)", "per call")
    stats = benchmark.stats
    if stats is not None:
        note(
            "hash_token_ids, 1M tokens (4 MB)",
            f"throughput {4 * (1 << 20) / stats.stats.median / 1e6:.0f} MB/s of token bytes",
        )


@pytest.mark.parametrize("offset", [0, 16, 64])
@pytest.mark.parametrize("nbytes", [4096, 65536])
@pytest.mark.parametrize("impl", ["memcpy (np.copyto)", "pymllm copy32"])
def test_copy_at_4k_alias(benchmark, impl, nbytes, offset):
    """Copying slot arrays with the destination `offset` bytes past the source modulo 4 KiB.
    glibc's memcpy (numpy's copyto calls it) uses `rep movsb` from a few KB up, which on AMD
    Zen 3/4 crawls at offsets 1-31; the compiled modules' copy (`_copy.pxd`) steps around it.
    (`_copy_int32` also checks its arguments, as copyto does.)"""
    from pymllm.mem_cache._allocator import _copy_int32

    n = nbytes // 4
    buf = np.zeros(3 * n + 2048, dtype=np.int32)
    base = (-buf.ctypes.data) % 4096 // 4
    src = buf[base : base + n]
    at = base + n + 1024 + offset // 4  # a page past the source's end, plus the offset
    dst = buf[at : at + n]
    copy = _copy_int32 if impl == "pymllm copy32" else np.copyto
    benchmark.group = "copy-4k-alias"
    benchmark.pedantic(copy, args=(dst, src), rounds=200, iterations=20, warmup_rounds=5)
    record(
        benchmark,
        f"copy of {nbytes:,} bytes, dst {offset} bytes past src mod 4 KiB",
        impl,
        baseline=impl != "pymllm copy32",
    )


def _time_splits(
    benchmark,
    group: str,
    case: str,
    node: int,
    at: int,
    rounds: int,
    page_size: int = 1,
    hashed: bool = False,
) -> None:
    """Time matches that each split a fresh `node`-token node after `at` tokens (the probe
    differs from the node at token `at`): a batch of caches holding that one node is made
    in each round's setup, and the round matches the probe once in each. ``hashed``: setup
    also asks for the node's page hashes (compute_node_hash), which the split then divides
    between the two halves."""
    rng = np.random.default_rng(0)
    key = RadixKey(rng.integers(0, 50_000, node, dtype=np.int32))
    slots = np.arange(1, node + 1, dtype=np.int32)
    probe = key.token_ids[: at + 1].copy()
    probe[at] += 1
    probe_key = RadixKey(probe)
    batch = max(10, min(200, 20_000_000 // node))  # at most ~160 MB of nodes a round

    def setup():
        caches = [RadixCache(page_size=page_size) for _ in range(batch)]
        for c in caches:
            leaf = c.insert(key, slots).last_node
            if hashed:
                c.compute_node_hash(leaf)
        return (caches,), {}

    def run(caches):
        for c in caches:
            assert c.match_prefix(probe_key).prefix_len == at

    benchmark.group = group
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    record(benchmark, group, case, per=batch)


@pytest.mark.parametrize("at", [1000, 1020])
def test_split_at_4k_alias(benchmark, at):
    """A match that splits a 2,000-token node at `at` tokens: the lower half's 1,000 or 980
    positions are fewer than those its block skips, so its tokens and slots move down in
    the block. At 1,020 the tokens' shift, 4,080 bytes, and the slots', 8,160, sit in glibc
    memmove's 4 KiB-aliasing window (`_copy.pxd`), where the moves take the stepped loop.
    A 4,000-token node split at 1,000 / 1,020 by the build before move32_down: 8.5 us and
    20.5 us (an ad-hoc run); this benchmark in session 24: 1.58 and 2.21-2.42 us. An ad-hoc
    script there, the copy mode forced each way in turn: at 1,000, 1.07-1.36 us; at 1,020,
    1.28 us with the stepped loop (this AMD machine's default) and 1.30-1.81 us with
    memmove."""
    _time_splits(
        benchmark,
        "match that splits a 2,000-token node, per split",
        f"at {at} tokens",
        node=2000,
        at=at,
        rounds=15,
    )


@pytest.mark.parametrize("node", [1_000, 10_000, 100_000, 1_000_000])
def test_split_cost_vs_node_length(benchmark, node):
    """A match of 129 tokens that splits a `node`-token node after 128: the split copies
    the 128 positions above it, whatever the node's length (the lower half stays in its
    block, which it starts 128 positions into). Should stay flat from 1e3 to 1e6."""
    _time_splits(
        benchmark,
        "match that splits a node after 128 tokens, per split",
        f"{node:>9,}-token node",
        node=node,
        at=128,
        rounds=7,
    )


@pytest.mark.parametrize("node", [10_000, 100_000, 1_000_000])
def test_split_cost_vs_node_length_hashed(benchmark, node):
    """As test_split_cost_vs_node_length, with 64-token pages and the node's page hashes
    cached (compute_node_hash): the upper half takes its 2 hashes and the lower half keeps
    the rest where they are. Should stay flat from 1e4 to 1e6."""
    _time_splits(
        benchmark,
        "match that splits a hashed node after 2 of its 64-token pages, per split",
        f"{node:>9,}-token node",
        node=node,
        at=128,
        rounds=7,
        page_size=64,
        hashed=True,
    )


def test_insert_latency_while_growing(benchmark):
    """Single-insert latency while a tree grows to 1.2M nodes (4-token leaves under the
    root): the inserts that grow the node array or the child map must not stall for a pass
    over the tree. Notes the median, the 99.9th percentile and the worst insert."""
    n = 1_200_000
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1 << 30, size=(n, 4), dtype=np.int32)
    keys[:, 0] = np.arange(n, dtype=np.int32)
    radix_keys = [RadixKey(k) for k in keys]
    vals = np.arange(1, 4 * n + 1, dtype=np.int32).reshape(n, 4)
    per_insert = np.empty(n)

    def grow():
        cache = RadixCache()
        clock = time.perf_counter
        for i in range(n):
            t0 = clock()
            cache.insert(radix_keys[i], vals[i])
            per_insert[i] = clock() - t0
        return cache

    benchmark.group = "insert-latency"
    benchmark.pedantic(grow, rounds=1, iterations=1)
    group = "insert while growing to 1.2M nodes, per insert"
    record(benchmark, group, "whole growth", per=n)
    worst = np.argsort(per_insert)[::-1][:3]
    note(
        group,
        f"median {np.median(per_insert) * 1e6:.2f} us, 99.9th percentile "
        f"{np.percentile(per_insert, 99.9) * 1e6:.1f} us, worst "
        + ", ".join(f"{per_insert[i] * 1e3:.1f} ms (insert {i:,})" for i in sorted(worst)),
    )
