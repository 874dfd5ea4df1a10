"""The README's embedding example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedding_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    cache, alloc = namespace["cache"], namespace["alloc"]
    cache._check_invariants()
    # every slot is free or in the tree: none leaked by the example
    assert alloc.available_size() + cache.total_size() == 4096


def test_readme_windowed_insert_rule():
    """What the README says of a sliding window: the tree frees the duplicates itself, so
    the plain loop's free of them is refused as a second free, and the windowed loop (pass
    prev_prefix_len, free nothing) leaves every slot free or in the tree."""
    import pytest

    from pymllm.mem_cache import RadixCache, RadixKey, SWATokenToKVPoolAllocator
    from pymllm.mem_cache.errors import InvalidFreeError

    assert "prev_prefix_len=m.prefix_len" in README.read_text()
    alloc = SWATokenToKVPoolAllocator(64, 64, need_sort=False)
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    key = RadixKey(list(range(1, 11)))
    matches = [cache.match_prefix(key) for _ in range(2)]  # both before either inserts
    slots = [alloc.alloc(10, prefix=m.indices) for m in matches]
    for m, s in zip(matches, slots, strict=True):
        r = cache.insert(key, s, prev_prefix_len=m.prefix_len)
    assert r.prefix_len == 10  # the second request's slots were all duplicates
    assert not alloc.is_allocated(slots[1]).any()  # and the tree freed them
    with pytest.raises(InvalidFreeError):
        alloc.free(slots[1][matches[1].prefix_len : r.prefix_len])
    assert alloc.full_available_size() + cache.total_size() == 64
    cache._check_invariants()
    alloc._check_invariants()
    # the README's loop with the windowed insert: each unlock names its lock's boundary
    # (the third request's match ends past the window: a plain unlock would be refused)
    for tokens in (list(range(1, 16)), list(range(1, 18))):
        key = RadixKey(tokens)
        m = cache.match_prefix(key)
        lock = cache.inc_lock_ref(m.last_node)
        slots = alloc.alloc(len(tokens) - m.prefix_len, prefix=m.indices)
        cache.insert(key, slots, prev_prefix_len=m.prefix_len)
        cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)
        assert cache.protected_size() == 0 and cache.swa_protected_size() == 0
        assert alloc.full_available_size() + cache.total_size() == 64
        cache._check_invariants()
    assert lock is not None and "swa_boundary_id=lock" in README.read_text()


def test_readme_paged_loop_rule():
    """The README's rule for pages: allocate whole pages, insert one slot per token, free
    the duplicates and the partial last page; then nothing is leaked."""
    from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator

    assert "slots[len(prompt) // page_size * page_size:]" in README.read_text()
    ps = 4
    alloc = TokenToKVPoolAllocator(64, page_size=ps)
    cache = RadixCache(page_size=ps, token_to_kv_pool_allocator=alloc)
    hits = []
    for prompt in (list(range(10)), list(range(11)), list(range(11)), list(range(12))):
        key = RadixKey(prompt)
        m = cache.match_prefix(key)
        lock = cache.inc_lock_ref(m.last_node)
        need = -(-(len(prompt) - m.prefix_len) // ps) * ps
        slots = alloc.alloc(need, prefix=m.indices)
        r = cache.insert(key, slots[: len(prompt)])
        alloc.free(slots[m.prefix_len : r.prefix_len])
        alloc.free(slots[len(prompt) // ps * ps :])
        cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)
        hits.append(m.prefix_len)
        assert alloc.available_size() + cache.total_size() == 64
    assert hits == [0, 8, 8, 8]
    cache.evict(64)
    assert alloc.available_size() == 64


def test_readme_windowed_chunk_rule():
    """A windowed request that goes on after caching a chunk keeps only what a re-match of
    the chunk returns: over a tombstone another request holds locked, the tree freed the
    request's copies, and the live tail it cached after the tombstone is not matched."""
    from pymllm.mem_cache import RadixCache, RadixKey, SWATokenToKVPoolAllocator

    assert "matches the chunk\nagain and keeps only what that returns" in README.read_text()
    alloc = SWATokenToKVPoolAllocator(200, 200, need_sort=False)
    cache = RadixCache(sliding_window_size=8, token_to_kv_pool_allocator=alloc)
    system, other, mine = list(range(1, 17)), list(range(100, 116)), list(range(200, 216))
    for tokens in (system, system + other):
        m = cache.match_prefix(RadixKey(tokens))
        cache.insert(
            RadixKey(tokens),
            alloc.alloc(len(tokens) - m.prefix_len, prefix=m.indices),
            prev_prefix_len=m.prefix_len,
        )
    held = cache.match_prefix(RadixKey(system + other))
    held_lock = cache.inc_lock_ref(held.last_node)
    cache.evict(0, 16)  # tombstones the system prompt, which `held` still reads
    chunk = RadixKey((system + mine)[:20])
    m = cache.match_prefix(chunk)
    assert m.prefix_len == 0
    value = alloc.alloc(20, prefix=m.indices)
    cache.insert(chunk, value, prev_prefix_len=m.prefix_len)
    again = cache.match_prefix(chunk)
    assert again.prefix_len == 0  # positions 0..19 are computed again, in new slots
    assert not alloc.is_allocated(value[:16]).any()  # freed: the duplicates
    assert alloc.is_cached(value[16:]).all()  # cached, not matched: not the request's
    cache.dec_lock_ref(held.last_node, swa_boundary_id=held_lock)
    assert alloc.full_available_size() + cache.total_size() == 200
    cache._check_invariants()


def test_readme_node_handle_keeps_its_cache_alive():
    """A dropped cache hands its slots back once its node handles are gone too."""
    import gc

    from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator

    assert "a handle keeps its cache alive" in README.read_text()
    alloc = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4))
    handle = cache.match_prefix(RadixKey([1, 2])).last_node
    del cache
    gc.collect()
    assert alloc.available_size() == 12
    del handle
    gc.collect()
    assert alloc.available_size() == 16
