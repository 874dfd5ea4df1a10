"""MambaRadixCache benchmark (issue 4), beside RadixCache's system-prompt workload.

The issue-2 workload (``SystemPromptWorkload``: 200 system prompts x 1024 tokens, 4000
requests each adding 256 fresh tokens, a 300,000-slot KV pool so that eviction runs,
page_size 1), served by a hybrid model: besides KV, every request saves its recurrent state
at its end and, when ``match_prefix`` reports ``mamba_branching_seqlen``, at that point too
(there the next request on the same prompt can resume). States live in a pool of
``STATES`` slots, small enough that Mamba-only eviction runs.

Cases (one group, time per request, ratios against the pure-Python reference model):

* ``MambaRadixCache`` (compiled) and ``RefMambaRadixCache`` (pure Python), same loop;
* ``RadixCache`` on the same requests with the KV-only loop (``serve``): the cost and hit
  rate of a cache that does not have to find a saved state.

The state pool is a host slot allocator (``TokenToKVPoolAllocator`` over state slots): the
bench times the cache's bookkeeping, not device copies of states.

Run: ``pytest bench/bench_mamba_radix_cache.py --benchmark-only`` (ratios and hit rates
printed at the end). On a shared, loaded machine add ``--benchmark-timer=time.process_time``
(CPU time of this process; wall time there mostly measures the other processes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import POOL, admit, note, record, serve
from reference_mamba import RefMambaRadixCache

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

STATES = 256
GROUP = "hybrid (KV + Mamba state) system-prompt workload, numpy keys (per request)"
IMPLS: dict[str, Any] = {
    "MambaRadixCache": MambaRadixCache,
    "RefMambaRadixCache": RefMambaRadixCache,
    "RadixCache (KV only)": RadixCache,
}


def _alloc_state(cache: Any, states: TokenToKVPoolAllocator) -> int:
    if states.available_size() == 0:
        cache.evict(0, mamba_num=1)
    slot = states.alloc(1)
    assert slot is not None, "state pool too small: every state is locked"
    return int(slot[0])


def serve_mamba(cache: Any, kv: TokenToKVPoolAllocator, states: TokenToKVPoolAllocator, keys):
    """Run every key as one request of a hybrid model; returns (hit tokens, states saved).

    match -> lock -> allocate KV for the uncached part (evicting when short) -> save a state
    at mamba_branching_seqlen if reported -> save a state at the end -> free what the tree
    did not take -> unlock. Slot bookkeeping: ``value[:prefix_len]`` are the tree's own
    slots; a fresh slot the tree already holds a copy of (an insert's ``prefix_len`` beyond
    what this request matched) is a duplicate and goes back to the pool; a state slot goes
    back when ``mamba_exist`` says one was there already.
    """
    hits = saved = 0
    for tokens in keys:
        key, m, lock, value = admit(cache, kv, tokens)
        done = m.prefix_len  # value[:done] is the tree's or already given back
        branch = m.mamba_branching_seqlen
        if branch is not None:
            slot = _alloc_state(cache, states)
            r = cache.insert(RadixKey(tokens[:branch]), value[:branch], mamba_value=slot)
            if r.prefix_len > done:
                kv.free(value[done : r.prefix_len])
            done = branch
            if r.mamba_exist:
                states.free(np.array([slot], dtype=np.int32))
            else:
                saved += 1
        slot = _alloc_state(cache, states)
        r = cache.insert(key, value, mamba_value=slot)
        if r.prefix_len > done:
            kv.free(value[done : r.prefix_len])
        if r.mamba_exist:
            states.free(np.array([slot], dtype=np.int32))
        else:
            saved += 1
        cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)  # was the state lock taken
        hits += m.prefix_len
    return hits, saved


@pytest.mark.parametrize("impl", list(IMPLS))
def test_hybrid_system_prompt_workload(benchmark, system_prompt_workload, impl):
    wl = system_prompt_workload
    data = wl.arrays
    out: list[tuple[int, int, Any, Any]] = []

    def setup():
        kv = TokenToKVPoolAllocator(POOL, need_sort=False)
        if impl.startswith("RadixCache"):
            return (RadixCache(token_to_kv_pool_allocator=kv), kv, None), {}
        states = TokenToKVPoolAllocator(STATES, need_sort=False)
        cache = IMPLS[impl](token_to_kv_pool_allocator=kv, mamba_pool=states)
        return (cache, kv, states), {}

    def run(cache, kv, states):
        if states is None:
            out.append((serve(cache, kv, data), 0, cache, kv))
        else:
            out.append((*serve_mamba(cache, kv, states, data), cache, kv))

    rounds = 1 if impl.startswith("Ref") else 5
    benchmark.group = "hybrid-workload"
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    record(benchmark, GROUP, impl, baseline=impl.startswith("Ref"), per=len(data))
    hits, saved, cache, kv = out[-1]
    cache._check_invariants()
    # the ledger: every KV slot (and state slot) is in the tree or free, none leaked
    assert cache.total_size() + kv.available_size() == POOL
    if saved:
        tree_states = cache.mamba_evictable_size() + cache.mamba_protected_size()
        assert tree_states + cache.mamba_pool.available_size() == STATES
    line = f"{impl}: token hit rate {hits / wl.prompt_tokens:.1%}"
    if saved:
        line += f", {saved} states saved, {cache.mamba_evictable_size()} left in the tree"
    note(GROUP, line)
    if impl.startswith("RadixCache"):
        note(GROUP, f"ideal token hit rate {wl.ideal_hit_tokens / wl.prompt_tokens:.1%}")


@pytest.mark.parametrize("n_states", [256, 1024, 4096])
def test_hybrid_hit_rate_vs_state_pool(benchmark, system_prompt_workload, n_states):
    """The compiled cache alone, as the state pool grows: every request's end state is an
    LRU entry too, so a small pool evicts the shared prompts' states between their uses."""
    wl = system_prompt_workload
    out: list[tuple[int, int]] = []

    def setup():
        kv = TokenToKVPoolAllocator(POOL, need_sort=False)
        states = TokenToKVPoolAllocator(n_states, need_sort=False)
        return (MambaRadixCache(token_to_kv_pool_allocator=kv, mamba_pool=states), kv, states), {}

    def run(cache, kv, states):
        out.append(serve_mamba(cache, kv, states, wl.arrays))

    benchmark.group = "hybrid-vs-state-pool"
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    group = "MambaRadixCache by state-pool size (per request)"
    record(benchmark, group, f"{n_states:>5} state slots", per=len(wl.arrays))
    note(group, f"{n_states:>5} state slots: token hit rate {out[-1][0] / wl.prompt_tokens:.1%}")
