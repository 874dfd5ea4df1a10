"""The benchmark's SGLang-style baseline (bench/seed_style.py) is only a fair yardstick if it
does the same job: request by request it must hit the same tokens as RadixCache, evict the
same amount and leave the allocator in the same state (both keep LRU by the same clock)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache
from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator


def _bench_module(name: str) -> ModuleType:
    """bench/<name>.py, loaded under "bench_<name>" (bench/conftest.py must not shadow the
    tests' conftest)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SeedStyleRadixCache = _bench_module("seed_style").SeedStyleRadixCache
SeedStyleTolistRadixCache = _bench_module("seed_style").SeedStyleTolistRadixCache
_bench_serve = _bench_module("conftest").serve  # the benchmarks' own serving loop


def _requests(as_list: bool) -> list:
    """30 base keys re-requested at random, cut short and extended: hits refresh recency,
    splits make inner nodes, and a 300-slot pool keeps evicting."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 1000, size=(30, 20), dtype=np.int32)
    out = []
    for _ in range(400):
        b = base[int(rng.integers(0, 30))][: int(rng.integers(5, 21))]
        tail = rng.integers(0, 1000, size=int(rng.integers(0, 8)), dtype=np.int32)
        key = np.concatenate([b, tail])
        out.append(key.tolist() if as_list else key)
    return out


def _serve_one(cache, alloc, tokens) -> tuple[int, int]:
    """One request through the benchmarks' loop; returns (hit tokens, tokens evicted)."""
    before = cache.total_size()
    hit = _bench_serve(cache, alloc, [tokens])
    return hit, before + len(tokens) - hit - cache.total_size()


@pytest.mark.parametrize("baseline", ["seed-style", "seed-style-tolist"])
@pytest.mark.parametrize("as_list", [False, True], ids=["numpy-keys", "list-keys"])
def test_seed_style_baseline_matches_radix_cache(as_list: bool, baseline: str) -> None:
    pair = []
    other = SeedStyleRadixCache if baseline == "seed-style" else SeedStyleTolistRadixCache
    for cls in (RadixCache, other):
        alloc = TokenToKVPoolAllocator(300, need_sort=False)
        pair.append((cls(token_to_kv_pool_allocator=alloc), alloc))
    evictions = 0
    for tokens in _requests(as_list):
        (got, got_alloc), (want, want_alloc) = pair
        hit, ev = _serve_one(got, got_alloc, tokens)
        assert (hit, ev) == _serve_one(want, want_alloc, tokens)
        assert got_alloc.available_size() == want_alloc.available_size()
        assert got.evictable_size() == want.evictable_size()
        assert got.protected_size() == want.protected_size() == 0
        evictions += ev > 0
    assert evictions > 10  # the pool is small enough that eviction order matters


def test_the_two_ways_of_making_a_value_serve_alike() -> None:
    """The benchmarks time the value made by alloc(prefix=) against np.concatenate: the two
    loops must do the same job, hit for hit, slot for slot."""
    runs = []
    for concatenate in (False, True):
        alloc = TokenToKVPoolAllocator(300, need_sort=False)
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        hits = _bench_serve(cache, alloc, _requests(False), concatenate=concatenate)
        slots = np.arange(alloc.size + 1)
        runs.append((hits, alloc.is_allocated(slots).tolist(), alloc.is_cached(slots).tolist()))
        cache._check_invariants()
    assert runs[0] == runs[1]
    assert runs[0][0] > 0
