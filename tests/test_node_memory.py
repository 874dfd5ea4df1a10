"""Host memory of the compiled tree: a node's key and slot arrays are sized to the node.

A short leaf under a long cached prefix (a new chat turn under a long conversation) must
not hold arrays as long as the whole key it was inserted with. Measured with glibc's
``mallinfo2`` (bytes in use on the heap plus mmap'ed blocks) around the inserts; the keys
and values are built before, so the difference is the tree's own allocations.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
from conftest import heap_bytes_in_use, run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 is glibc's")

PREFIX = 1 << 16  # 64K tokens: the whole key's arrays would be 256 KB each
SUFFIX = 16
LEAVES = 40


@pytest.mark.parametrize(
    "window",
    [None, 64, PREFIX + 8],
    ids=["full", "sliding-window", "sliding-window-tombstones"],
)
def test_a_short_leaf_under_a_long_prefix_holds_only_its_own_tokens(window) -> None:
    cache = RadixCache(sliding_window_size=window)
    base = np.arange(1, PREFIX + 1, dtype=np.int32)
    cache.insert(RadixKey(base), base.copy())
    rng = np.random.default_rng(0)
    keys = [
        np.concatenate([base, rng.integers(PREFIX + 1, 1 << 30, SUFFIX, dtype=np.int32)])
        for _ in range(LEAVES + 1)
    ]
    values = [k.copy() for k in keys]
    # with the window ending inside the new suffix, part of it is stored as a tombstone
    kwargs = {"swa_evicted_seqlen": PREFIX + SUFFIX // 2} if window == PREFIX + 8 else {}
    # the first insert of this shape grows the cache's scratch buffers (sized by the key,
    # reused by every later call): left out of the count
    cache.insert(RadixKey(keys[0]), values[0], **kwargs)
    before = heap_bytes_in_use()
    for k, v in zip(keys[1:], values[1:], strict=True):
        assert cache.insert(RadixKey(k), v, **kwargs).prefix_len == PREFIX
    per_leaf = (heap_bytes_in_use() - before) / LEAVES
    assert cache.total_size() == PREFIX + (LEAVES + 1) * SUFFIX
    # 16 tokens x (4-byte key + 4-byte slot), node and map growth: well under 16 KB a leaf;
    # arrays sized by the whole key would be over 512 KB
    assert per_leaf < 16 * 1024, f"{per_leaf:.0f} bytes a leaf"


def test_a_split_near_the_end_of_a_long_node_leaves_the_lower_half_short() -> None:
    cache = RadixCache()
    rng = np.random.default_rng(1)
    # LEAVES long nodes under the root (distinct first tokens), each then diverged from
    # SUFFIX tokens before its end: the split leaves a SUFFIX-token lower half
    bases = [
        np.concatenate([[i], rng.integers(1, 1 << 30, PREFIX // 4 - 1)]).astype(np.int32)
        for i in range(LEAVES)
    ]
    for b in bases:
        cache.insert(RadixKey(b), b.copy())
    keys = [np.concatenate([b[:-SUFFIX], b[-SUFFIX:] + 1]) for b in bases]
    values = [k.copy() for k in keys]
    before = heap_bytes_in_use()
    for k, v in zip(keys, values, strict=True):
        assert cache.insert(RadixKey(k), v).prefix_len == PREFIX // 4 - SUFFIX
    per_split = (heap_bytes_in_use() - before) / LEAVES
    # the upper half's new arrays replace what the lower half gives back; a lower half
    # keeping the whole node's arrays would add 128 KB a split
    assert per_split < 16 * 1024, f"{per_split:.0f} bytes a split"


def test_splits_near_the_start_of_a_long_node_keep_its_block_then_give_it_back() -> None:
    """A split copies the positions above it and leaves the lower half in its block, past
    the part it gave away (O(what was matched), not O(the node)). The block is laid out
    again and shrunk once the skipped part outgrows the half: memory stays within twice
    what the tree holds, and a last split near the end gives the long block back."""
    cache = RadixCache()
    base = np.arange(1, PREFIX + 1, dtype=np.int32)
    cache.insert(RadixKey(base), base.copy())
    probes = []
    for i in range(1, LEAVES + 1):  # diverge at 16, 32, ...: each split is 16 tokens deeper
        p = base[: i * SUFFIX + 1].copy()
        p[-1] = 0
        probes.append(RadixKey(p))
    before = heap_bytes_in_use()
    for i, p in enumerate(probes, 1):
        assert cache.match_prefix(p).prefix_len == i * SUFFIX
        cache._check_invariants()  # each node's block skips at most as much as it holds
    # the upper halves' 16-token blocks and nodes: no copy of the 64K-token lower half
    per_split = (heap_bytes_in_use() - before) / LEAVES
    assert per_split < 16 * 1024, f"{per_split:.0f} bytes a split"
    m = cache.match_prefix(RadixKey(base))
    assert m.prefix_len == PREFIX and np.array_equal(m.indices, base)
    # a split 16 tokens before the end: the lower half is laid out again and its block
    # shrunk, giving back about what the new upper half takes
    tail = base[: PREFIX - SUFFIX + 1].copy()
    tail[-1] = 0
    held = heap_bytes_in_use()
    assert cache.match_prefix(RadixKey(tail)).prefix_len == PREFIX - SUFFIX
    cache._check_invariants()
    assert heap_bytes_in_use() - held < 16 * 1024, "the long block was kept"
    m = cache.match_prefix(RadixKey(base))
    assert m.prefix_len == PREFIX and np.array_equal(m.indices, base)
    lengths = sorted(len(n.key) for n in cache._nodes() if len(n.key))
    assert lengths == [SUFFIX] * (LEAVES + 1) + [PREFIX - SUFFIX * (LEAVES + 1)]


# Run in a child process: an address-space limit makes the tree's next large malloc fail.
OUT_OF_MEMORY = r"""
import resource
import numpy as np
from pymllm.mem_cache import RadixCache, RadixKey

N = 32 << 20                      # one node of 32M tokens: 128 MB of key, 128 MB of slots
base = np.arange(N, dtype=np.int32)
cache = RadixCache()
cache.insert(RadixKey(base), base)
longer = np.concatenate([base, np.arange(N, 2 * N, dtype=np.int32)])
probe = RadixKey(base[: N - 1])   # ends inside the node: matching it splits the node
before = (cache.total_size(), cache.evictable_size())
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
outcomes = []
for call in (lambda: cache.match_prefix(probe), lambda: cache.insert(RadixKey(longer), longer)):
    try:
        call()
        outcomes.append("ok")
    except MemoryError:
        outcomes.append("MemoryError")
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
cache._check_invariants()
m = cache.match_prefix(RadixKey(base))
assert (cache.total_size(), cache.evictable_size()) == before
assert m.prefix_len == N and np.array_equal(m.indices, base)
print(*outcomes)
"""


def test_out_of_memory_in_a_split_or_a_new_leaf_raises_and_keeps_the_tree() -> None:
    assert run_child(OUT_OF_MEMORY, timeout=120).split() == ["MemoryError", "MemoryError"]


NEW_NAMESPACE_OUT_OF_MEMORY = r"""
import resource
import numpy as np
from pymllm.mem_cache import RadixCache, RadixKey

N = 16 << 20                      # arrays of 64 MB each; the walk's path buffer is 64 MB too
key = np.arange(N, dtype=np.int32)
cache = RadixCache()
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
# room for two of the three 64 MB blocks the insert needs
resource.setrlimit(resource.RLIMIT_AS, (vm + (160 << 20), resource.RLIM_INFINITY))
try:
    cache.insert(RadixKey(key, extra_key="adapter-a"), key)
    print("ok")
except MemoryError:
    print("MemoryError")
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
cache._check_invariants()         # no namespace left behind without a node
print(cache.total_size())
print(cache.insert(RadixKey(key[:8], extra_key="adapter-a"), key[:8]).prefix_len)
cache._check_invariants()
"""


def test_out_of_memory_inserting_into_a_new_namespace_leaves_no_namespace_behind() -> None:
    assert run_child(NEW_NAMESPACE_OUT_OF_MEMORY, timeout=120).split() == ["MemoryError", "0", "0"]


def test_reset_gives_back_the_scratch_buffers() -> None:
    """The scratch buffers kept their peak size after ``reset()``, which itself sized one
    to the whole tree (its copy-out of every slot): an emptied cache held on to memory of
    its largest moment. They are given back, and grow again as calls need them."""
    alloc = TokenToKVPoolAllocator(300_000)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    for i in range(50):
        tokens = list(range(i * 4_000 + 1, (i + 1) * 4_000 + 1))  # a list key: scratch
        cache.insert(RadixKey(tokens), alloc.alloc(4_000))
    assert cache._storage_state()["scratch_bytes"] >= 4_000 * 4
    cache.reset()
    assert cache._storage_state()["scratch_bytes"] == 0
    assert alloc.available_size() == 300_000
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3))
    assert cache.match_prefix(RadixKey([1, 2, 3])).prefix_len == 3
    assert 0 < cache._storage_state()["scratch_bytes"] < 4_000 * 4
    cache._check_invariants()
