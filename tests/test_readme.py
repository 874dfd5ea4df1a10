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
