"""Session 23's changes as a reviewer drove them: own-lock accounting (an unlock through an
ancestor refused, in every cache kind and after the finalizer), ``TreeNode.__new__``
handles, ``AlreadyInitializedError``, and the pools' joint pad and trim (``_pad_pair``,
``_trim_rows``). The two tests whose docstrings say what they once found failed on the
session's first versions of those changes; the others pin what the changes must keep."""

from __future__ import annotations

import gc
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from pymllm.mem_cache._radix_tree import MambaTreeNode, TreeNode
from pymllm.mem_cache.errors import (
    AlreadyInitializedError,
    LockStateError,
    StaleNodeError,
)
from pymllm.mem_cache.memory_pool import (
    KVPool,
    MambaBuffers,
    MambaPool,
    ReqToTokenPool,
    bucket_size,
)

FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


# -- 1. own-lock accounting --------------------------------------------------------------


def _make(kind: str) -> Any:
    if kind == "mamba":
        return MambaRadixCache()
    if kind == "swa":
        return RadixCache(sliding_window_size=3)
    return RadixCache()


@pytest.mark.parametrize("kind", ["plain", "swa", "mamba"])
def test_locks_survive_splits_by_other_requests_and_refuse_ancestor_unlocks(kind: str) -> None:
    """A node locked several times is split above and below its lock point by other
    requests' inserts and matches: the upper halves hold only the descendant's locks
    (refused), the locked node's own unlocks all pass, and the sizes end where they began."""
    c = _make(kind)
    kw = {"mamba_value": np.array([1], np.int32)} if kind == "mamba" else {}
    c.insert(RadixKey(list(range(1, 11))), np.arange(1, 11, dtype=np.int32), **kw)
    node = c.match_prefix(RadixKey(list(range(1, 11)))).last_node
    tokens = [c.inc_lock_ref(node) for _ in range(3)]
    c._check_invariants()
    # other requests split the locked node twice (a match and an insert)
    c.match_prefix(RadixKey([1, 2, 3, 99]))
    c.insert(RadixKey([1, 2, 3, 4, 5, 6, 42]), np.arange(100, 107, dtype=np.int32))
    c._check_invariants()
    upper = node.parent
    assert upper.id != 0 and upper.lock_ref == 3
    before = (c.evictable_size(), c.protected_size(), upper.lock_ref, node.lock_ref)
    bad_tokens = {"plain": (None,), "swa": (tokens[0], None, 0), "mamba": (True, False, None)}
    for tok in bad_tokens[kind]:
        with pytest.raises(LockStateError):
            c.dec_lock_ref(upper, tok)
    assert (c.evictable_size(), c.protected_size(), upper.lock_ref, node.lock_ref) == before
    # the root stays a no-op, however often
    for _ in range(5):
        c.dec_lock_ref(c.root_node, c.inc_lock_ref(c.root_node))
    for tok in tokens:
        c.dec_lock_ref(node, tok)
        c._check_invariants()
    assert c.protected_size() == 0
    with pytest.raises(LockStateError):
        c.dec_lock_ref(node, tokens[0])
    c.evict(100)
    assert c.total_size() == 0
    c._check_invariants()


class _Resurrecting:
    """A Python allocator that keeps its cache alive from the finalizer's ``free``."""

    def __init__(self, size: int, saved: list[Any]) -> None:
        self.books = TokenToKVPoolAllocator(size, need_sort=False)
        self.saved = saved
        self.owner: Any = None
        self.handles: Any = None

    def alloc(self, n: int) -> Any:
        return self.books.alloc(n)

    def free(self, slots: Any) -> None:
        self.books.free(slots)
        if self.owner is not None:
            self.saved.append(self.owner)
            self.owner = None


def test_after_the_finalizer_an_unlock_through_an_ancestor_is_not_silently_taken() -> None:
    """The finalizer recorded each node's lock_ref (its descendants' locks too), not its
    own locks, so after it an unlock of an ancestor that was never locked itself was
    accepted silently (once per descendant lock), where a live cache refuses it and a
    stale handle raises StaleNodeError. It records own_lock now."""
    saved: list[Any] = []
    kv = _Resurrecting(16, saved)
    cache = RadixCache(token_to_kv_pool_allocator=kv)
    a = kv.alloc(2)
    cache.insert(RadixKey([1, 2]), a)
    cache.insert(RadixKey([1, 2, 3, 4]), np.concatenate([a, kv.alloc(2)]))
    child = cache.match_prefix(RadixKey([1, 2, 3, 4])).last_node
    parent = child.parent
    assert parent.id != 0
    cache.inc_lock_ref(child)
    with pytest.raises(LockStateError):  # the live cache refuses it
        cache.dec_lock_ref(parent)
    kv.owner = cache
    kv.handles = (parent, child)
    del cache, kv, parent, child
    gc.collect()
    cache = saved.pop()
    parent, child = cache.token_to_kv_pool_allocator.handles
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(parent)  # never locked itself
    assert cache.dec_lock_ref(child) is None  # the lock it found: silent
    cache._check_invariants()


# -- 2. handles made with __new__ ----------------------------------------------------------


class _PySub(TreeNode):
    pass


class _PyMambaSub(MambaTreeNode):
    def __init__(self) -> None:  # a subclass whose __init__ does not refuse
        pass


@pytest.mark.parametrize(
    "make",
    [
        lambda: TreeNode.__new__(TreeNode),
        lambda: MambaTreeNode.__new__(MambaTreeNode),
        lambda: _PySub.__new__(_PySub),
        lambda: _PyMambaSub(),
    ],
)
def test_a_handle_made_without_a_cache_reads_as_evicted(make: Any) -> None:
    h = make()
    assert h.evicted is True and h.id == 0 and "evicted" in repr(h)
    hash(h)
    names = [
        "key",
        "value",
        "parent",
        "lock_ref",
        "last_access_time",
        "hit_count",
        "swa_tombstone",
        "swa_lock_ref",
    ]
    if isinstance(h, MambaTreeNode):
        names += ["mamba_value", "mamba_lock_ref", "full_lock_ref"]
    for name in names:
        with pytest.raises(StaleNodeError):
            getattr(h, name)
    for cache in (RadixCache(), RadixCache(sliding_window_size=2), MambaRadixCache()):
        cache.insert(RadixKey([1, 2]), [1, 2])
        before = (cache.evictable_size(), cache.protected_size())
        for call, args in (
            ("inc_lock_ref", ()),
            ("dec_lock_ref", ()),
            ("dec_lock_ref", (0,)),
            ("compute_node_hash", ()),
            ("children", ()),
        ):
            with pytest.raises(StaleNodeError):
                getattr(cache, call)(h, *args)
        assert (cache.evictable_size(), cache.protected_size()) == before
        assert h != cache.root_node
        cache._check_invariants()


# -- 3. a refused second __init__ changes nothing -------------------------------------------


def test_a_refused_second_init_leaves_caches_and_allocators_as_they_were() -> None:
    alloc = TokenToKVPoolAllocator(16, page_size=2)
    held = alloc.alloc(4)
    cache = RadixCache(page_size=2, token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2, 3, 4]), held)
    node = cache.match_prefix(RadixKey([1, 2, 3, 4])).last_node
    cache.inc_lock_ref(node)
    swa = SWATokenToKVPoolAllocator(8, 6)
    s_held = swa.alloc(2)
    for obj, args in (
        (cache, (4, 2, None, None, "lfu")),
        (alloc, (64, 4)),
        (swa, (64, 64)),
    ):
        with pytest.raises(AlreadyInitializedError) as info:
            obj.__init__(*args)
        assert isinstance(info.value, RuntimeError)
    assert (cache.page_size, cache.sliding_window_size, cache.total_size()) == (2, None, 4)
    assert (cache.protected_size(), node.lock_ref) == (4, 1)
    assert (alloc.size, alloc.page_size, alloc.available_size()) == (16, 2, 12)
    assert (swa.size, swa.swa_size, swa.available_size()) == (8, 6, 4)
    cache.dec_lock_ref(node)
    cache.evict(4)
    assert alloc.available_size() == 16
    swa.free(s_held)
    assert swa.available_size() == 6
    cache._check_invariants()
    m = MambaRadixCache()
    m.insert(RadixKey([1]), [1], mamba_value=np.array([3], np.int32))
    with pytest.raises(AlreadyInitializedError):
        m.__init__(2)
    assert (m.page_size, m.total_size(), m.mamba_evictable_size()) == (1, 1, 1)
    s = RadixCache(sliding_window_size=4)
    with pytest.raises(AlreadyInitializedError):
        s.__init__()
    assert s.sliding_window_size == 4
    s.insert(RadixKey(list(range(1, 9))), list(range(1, 9)))
    assert s.swa_evictable_size() == 8
    s._check_invariants()


class _TaggedPool(KVPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.inits = getattr(self, "inits", 0) + 1  # its own work, before the base's
        super().__init__(*args, **kwargs)


def test_a_refused_second_init_leaves_pools_as_they_were() -> None:
    pool = _TaggedPool(32, 2, 2, 4, dtype=jnp.float32)
    k = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    pool.set_kv_buffer(1, [1, 2, 3], k, -k)
    bufs = pool.buffers
    req = ReqToTokenPool(4, 8)
    r = req.alloc(2)
    mpool = MambaPool(4, 1, (2,), (3,), conv_dtype=jnp.float32)
    slots = mpool.alloc(1)
    mb = mpool.buffers
    for obj, args in ((pool, (64, 1, 1, 8)), (req, (9, 9)), (mpool, (8, 2, (1,), (1,)))):
        with pytest.raises(AlreadyInitializedError):
            obj.__init__(*args)
    assert pool.buffers is bufs and not bufs.k.is_deleted() and not bufs.v.is_deleted()
    assert (pool.size, pool.layer_num, pool.head_num, pool.head_dim) == (32, 2, 2, 4)
    got_k, got_v = pool.get_kv(1, [1, 2, 3])
    np.testing.assert_array_equal(np.asarray(got_k), k)
    np.testing.assert_array_equal(np.asarray(got_v), -k)
    assert (req.size, req.max_context_len, req.available_size()) == (4, 8, 2)
    req.free(r)
    assert mpool.buffers is mb and mpool.available_size() == 3
    mpool.free(slots)
    assert mpool.available_size() == 4


# -- 4. joint pad and trim -------------------------------------------------------------------

_SIZES = (0, 1, 2, 15, 16, 17, 24, 25, 47, 48, 100)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pool_reads_and_writes_every_length_and_input_form(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    pool = KVPool(200, 2, 2, 4, v_head_num=1, v_head_dim=3, dtype=dtype)
    mpool = MambaPool(120, 2, (3, 2), (2,), conv_dtype=jnp.bfloat16, temporal_dtype=jnp.float32)
    forms = {
        "np/np": (lambda x: x, lambda x: x),
        "jax/jax": (jnp.asarray, jnp.asarray),
        "jax/np": (jnp.asarray, lambda x: x),
        "np/jax": (lambda x: x, jnp.asarray),
    }
    for n in _SIZES:
        loc = rng.choice(np.arange(1, 201), size=n, replace=False).astype(np.int32)
        for fk, fv in forms.values():
            k = rng.standard_normal((n, 2, 4)).astype(dtype)
            v = rng.standard_normal((n, 1, 3)).astype(dtype)
            pool.set_kv_buffer(1, loc, fk(k), fv(v))
            gk, gv = pool.get_kv(1, loc)
            assert gk.shape == (n, 2, 4) and gv.shape == (n, 1, 3) and gk.dtype == dtype
            np.testing.assert_array_equal(np.asarray(gk), k)
            np.testing.assert_array_equal(np.asarray(gv), v)
            K = rng.standard_normal((2, n, 2, 4)).astype(dtype)
            V = rng.standard_normal((2, n, 1, 3)).astype(dtype)
            pool.set_kv_all(loc, fk(K), fv(V))
            gk, gv = pool.get_kv_all(loc)
            assert gk.shape == (2, n, 2, 4) and gv.shape == (2, n, 1, 3)
            np.testing.assert_array_equal(np.asarray(gk), K)
            np.testing.assert_array_equal(np.asarray(gv), V)
        if n <= 120:
            s = rng.choice(np.arange(1, 121), size=n, replace=False).astype(np.int32)
            for fc, ft in forms.values():
                conv = rng.standard_normal((2, n, 3, 2)).astype(jnp.bfloat16)
                temp = rng.standard_normal((2, n, 2)).astype(np.float32)
                mpool.set_states(s, fc(conv), ft(temp))
                out = mpool.get_states(s)
                assert type(out) is MambaBuffers
                assert out.conv.shape == (2, n, 3, 2) and out.temporal.shape == (2, n, 2)
                assert (out.conv.dtype, out.temporal.dtype) == (jnp.bfloat16, jnp.float32)
                np.testing.assert_array_equal(np.asarray(out.conv), conv)
                np.testing.assert_array_equal(np.asarray(out.temporal), temp)
    assert bucket_size(16) == 16


MIXED_DEVICES = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from pymllm.mem_cache.memory_pool import KVPool, MambaPool
    devs = jax.devices()
    assert len(devs) == 4, devs
    mesh = Mesh(np.array(devs), ("tp",))
    n = 5
    loc = np.arange(1, n + 1, dtype=np.int32)
    k = np.ones((n, 8, 4), np.float32)
    failures = []

    def check(name, fn):
        try:
            fn()
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:90]}")

    def kv_case(pool, kd, vd, kd_all=None):
        pool.set_kv_buffer(0, loc, jax.device_put(k, kd), jax.device_put(2 * k, vd))
        gk, gv = pool.get_kv(0, loc)
        assert np.asarray(gk).tolist() == k.tolist() and np.asarray(gv).tolist() == (2 * k).tolist()
        K = np.stack([k, 3 * k])
        pool.set_kv_all(loc, jax.device_put(K, kd_all or kd), jax.device_put(-K, vd))
        gk, gv = pool.get_kv_all(loc)
        assert np.asarray(gk).tolist() == K.tolist() and np.asarray(gv).tolist() == (-K).tolist()

    meshed = KVPool(64, 2, 8, 4, dtype=jnp.float32, mesh=mesh, head_axis="tp")
    check("mesh pool, k on the mesh, v on device 1",
          lambda: kv_case(meshed, meshed._row_shardings[0], devs[1], meshed.shardings.k))
    single = KVPool(64, 2, 8, 4, dtype=jnp.float32, device=devs[2])
    check("device-2 pool, k on device 0, v on device 1", lambda: kv_case(single, devs[0], devs[1]))

    def mamba_case():
        pool = MambaPool(8, 2, (3,), (2,), conv_dtype=jnp.float32, device=devs[0])
        conv = np.ones((2, 3, 3), np.float32)
        temp = np.full((2, 3, 2), 5.0, np.float32)
        s = np.array([1, 2, 3], np.int32)
        pool.set_states(s, jax.device_put(conv, devs[1]), jax.device_put(temp, devs[3]))
        out = pool.get_states(s)
        assert np.asarray(out.conv).tolist() == conv.tolist()
        assert np.asarray(out.temporal).tolist() == temp.tolist()

    check("mamba pool, conv on device 1, temporal on device 3", mamba_case)
    print("FAILURES", len(failures))
    for f in failures:
        print(f)
"""


def test_k_and_v_on_different_devices_are_still_written() -> None:
    """Before the joint pad each of K and V was padded on its own device and then placed
    on the pool's row sharding, so K and V committed to different devices (or one on the
    mesh and one on a single device) were accepted. ``_pad_pair``'s one jitted call for
    both, which JAX refuses for arguments on incompatible devices, raised a bare
    ``ValueError`` at every n off a bucket size; it is taken only for inputs on the same
    devices now."""
    out = run_child(MIXED_DEVICES, **FOUR)
    assert out.split("\n")[0] == "FAILURES 0", out


TRIM_SHARDINGS = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from pymllm.mem_cache.memory_pool import KVPool
    devs = jax.devices()
    mesh = Mesh(np.array(devs).reshape(2, 2), ("dp", "tp"))
    bad = []
    for heads in (8, 2, 1, 6):
        pool = KVPool(200, 2, heads, 4, dtype=jnp.bfloat16, mesh=mesh, head_axis="tp")
        k_row, v_row = pool._row_shardings
        for n in (1, 2, 15, 16, 17, 24, 30, 100):
            loc = np.arange(1, n + 1, dtype=np.int32)
            k = jax.device_put(np.ones((n, heads, 4), jnp.bfloat16), k_row)
            pool.set_kv_buffer(0, loc, k, k)
            for got, want in zip(pool.get_kv(0, loc), (k_row, v_row)):
                if not got.sharding.is_equivalent_to(want, 3):
                    bad.append(("get_kv", heads, n, str(got.sharding)))
            for got, want in zip(pool.get_kv_all(loc), pool.shardings):
                if not got.sharding.is_equivalent_to(want, 4):
                    bad.append(("get_kv_all", heads, n, str(got.sharding)))
    print("BAD", len(bad))
    for b in bad[:10]:
        print(b)
"""


def test_trimmed_reads_keep_the_pools_row_shardings_on_a_mesh() -> None:
    out = run_child(TRIM_SHARDINGS, **FOUR)
    assert out.split("\n")[0] == "BAD 0", out
