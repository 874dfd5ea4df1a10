"""Bad calls across the public API: each raises its documented type, and its message names
the argument and shows the bad value.

One row per bad call: ``(call, exception type, argument name, bad value as it must appear
in the message)``. Value errors come from ``pymllm.mem_cache.errors`` (each a
``CacheError`` and a ``ValueError``); wrong types are plain ``TypeError``, as in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import (
    ChunkCache,
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    hash_bytes,
    hash_to_int64,
    hash_token_ids,
)
from pymllm.mem_cache.errors import (
    CacheError,
    InvalidFreeError,
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    StaleNodeError,
)


def _radix(**kwargs: Any) -> RadixCache:
    return RadixCache(token_to_kv_pool_allocator=TokenToKVPoolAllocator(64), **kwargs)


def _swa() -> RadixCache:
    return RadixCache(
        sliding_window_size=2, token_to_kv_pool_allocator=SWATokenToKVPoolAllocator(64, 64)
    )


def _mamba() -> MambaRadixCache:
    return MambaRadixCache(
        token_to_kv_pool_allocator=TokenToKVPoolAllocator(64),
        mamba_pool=TokenToKVPoolAllocator(8),
    )


def _with_node(make: Callable[[], Any], state: bool = False) -> tuple[Any, Any]:
    """A cache holding key [1, 2, 3] (slots from its allocator; with *state*, a state
    slot from its pool) and the handle of its node."""
    cache = make()
    slots = cache.token_to_kv_pool_allocator.alloc(3)
    kwargs = {"mamba_value": cache.mamba_pool.alloc(1)} if state else {}
    return cache, cache.insert(RadixKey([1, 2, 3]), slots, **kwargs).last_node


def _stale(make: Callable[[], Any]) -> tuple[Any, Any]:
    cache, node = _with_node(make)
    cache.evict(10)
    assert node.evicted
    return cache, node


def _unlock_unlocked(make: Callable[[], Any], **kwargs: Any) -> None:
    cache, node = _with_node(make)
    cache.dec_lock_ref(node, **kwargs)


def _allocated(alloc: Any, n: int = 4) -> Any:
    alloc.alloc(n)
    return alloc


def _double_free(alloc: Any) -> None:
    slots = alloc.alloc(2)
    alloc.free(slots)
    alloc.free(slots[1:])


def _kv_pool() -> Any:
    from pymllm.mem_cache.memory_pool import KVPool

    return KVPool(16, 2, 1, 4, dtype=np.float32)


def _mamba_pool() -> Any:
    from pymllm.mem_cache.memory_pool import MambaPool

    return MambaPool(4, 1, (1,), (1,))


def _req_pool() -> Any:
    from pymllm.mem_cache.memory_pool import ReqToTokenPool

    return ReqToTokenPool(4, 8)


def _memory_pool_module() -> Any:
    from pymllm.mem_cache import memory_pool

    return memory_pool


K3 = RadixKey([1, 2, 3])

CASES: list[Any] = [
    # ---- RadixCache: construction
    pytest.param(
        lambda: RadixCache(on_node_evict=5), TypeError, "on_node_evict", "5", id="on_node_evict=5"
    ),
    pytest.param(
        lambda: RadixCache(
            sliding_window_size=2, token_to_kv_pool_allocator=TokenToKVPoolAllocator(8)
        ),
        TypeError,
        "token_to_kv_pool_allocator",
        "TokenToKVPoolAllocator",
        id="window without free_swa",
    ),
    pytest.param(lambda: RadixCache(page_size=0), InvalidValueError, "page_size", "0", id="page=0"),
    pytest.param(
        lambda: RadixCache(eviction_policy="mru"),
        InvalidValueError,
        "eviction_policy",
        "'mru'",
        id="policy=mru",
    ),
    pytest.param(
        lambda: RadixCache(sliding_window_size=0),
        InvalidValueError,
        "sliding_window_size",
        "0",
        id="window=0",
    ),
    pytest.param(
        lambda: _radix(eviction_policy="priority").insert(K3, np.arange(3), priority=1.5),
        TypeError,
        "priority",
        "1.5",
        id="priority=1.5",
    ),
    # ---- RadixCache: keys and values
    pytest.param(lambda: _radix().match_prefix([1, 2]), TypeError, "key", "list", id="key=list"),
    pytest.param(
        lambda: _radix().match_prefix(RadixKey([1, -1])),
        InvalidKeyError,
        "token_ids",
        "-1",
        id="token -1",
    ),
    pytest.param(
        lambda: _radix().match_prefix(RadixKey(np.array([1, 2**32]))),
        InvalidKeyError,
        "token_ids",
        "4294967296",
        id="token 2**32 (array)",
    ),
    pytest.param(
        lambda: _radix().match_prefix(RadixKey(np.array([1.5]))),
        InvalidKeyError,
        "token_ids",
        "float64",
        id="float tokens",
    ),
    pytest.param(
        lambda: _radix().match_prefix(RadixKey([1], extra_key=[7])),
        TypeError,
        "extra_key",
        "list",
        id="unhashable extra_key",
    ),
    pytest.param(
        lambda: _radix().insert(K3, np.arange(2)),
        InvalidValueError,
        "value",
        "2",
        id="value too short",
    ),
    pytest.param(
        lambda: _radix().insert(K3, [1, -1, 2]), InvalidValueError, "value", "-1", id="value -1"
    ),
    pytest.param(
        lambda: _radix().insert(K3, [1, 2**31, 2]),
        InvalidValueError,
        "value",
        "2147483648",
        id="value 2**31",
    ),
    pytest.param(
        lambda: _radix().insert(K3, np.ones((3, 1), dtype=np.int32)),
        InvalidValueError,
        "value",
        "(3, 1)",
        id="value 2-D",
    ),
    pytest.param(
        lambda: _radix().insert(K3, np.arange(3), bogus=1),
        TypeError,
        "bogus",
        "bogus",
        id="unknown keyword",
    ),
    pytest.param(
        lambda: _radix(eviction_policy="priority").insert(K3, np.arange(3), priority="high"),
        TypeError,
        "priority",
        "str",
        id="priority=str",
    ),
    # ---- RadixCache: evict, locks, handles
    pytest.param(lambda: _radix().evict("3"), TypeError, "num_tokens", "str", id="evict('3')"),
    pytest.param(
        lambda: _radix().evict(1, swa_num_tokens=1.5),
        TypeError,
        "swa_num_tokens",
        "float",
        id="evict swa 1.5",
    ),
    pytest.param(lambda: _radix().inc_lock_ref("node"), TypeError, "node", "str", id="lock a str"),
    pytest.param(
        lambda: _unlock_unlocked(_radix), LockStateError, "node", "1", id="unlock unlocked"
    ),
    pytest.param(
        lambda: (lambda c, n: c.inc_lock_ref(n))(*_stale(_radix)),
        StaleNodeError,
        "node",
        "1",
        id="lock stale",
    ),
    pytest.param(
        lambda: (lambda c, n: c.compute_node_hash(n))(*_stale(_radix)),
        StaleNodeError,
        "node",
        "1",
        id="hash stale",
    ),
    # ---- RadixCache(sliding_window_size=W)
    pytest.param(
        lambda: _swa().insert(K3, np.arange(3), prev_prefix_len=5),
        InvalidValueError,
        "prev_prefix_len",
        "5",
        id="prev_prefix_len too long",
    ),
    pytest.param(
        lambda: _swa().insert(K3, np.arange(3), swa_evicted_seqlen=-1),
        InvalidValueError,
        "swa_evicted_seqlen",
        "-1",
        id="swa_evicted_seqlen=-1",
    ),
    pytest.param(
        lambda: _swa().insert(K3, np.arange(3), prev_prefix_len="0"),
        TypeError,
        "prev_prefix_len",
        "str",
        id="prev_prefix_len=str",
    ),
    pytest.param(
        lambda: _unlock_unlocked(_swa, swa_boundary_id=1),
        LockStateError,
        "node",
        "1",
        id="SWA unlock unlocked",
    ),
    pytest.param(
        lambda: (lambda c, n: (c.inc_lock_ref(n), c.dec_lock_ref(n, swa_boundary_id=-1)))(
            *_with_node(_swa)
        ),
        InvalidValueError,
        "swa_boundary_id",
        "-1",
        id="SWA boundary -1",
    ),
    # ---- MambaRadixCache
    pytest.param(
        lambda: MambaRadixCache(mamba_pool=5), TypeError, "mamba_pool", "5", id="mamba_pool=5"
    ),
    pytest.param(
        lambda: _mamba().insert(K3, np.arange(3), mamba_value=-1),
        InvalidValueError,
        "mamba_value",
        "-1",
        id="mamba_value=-1",
    ),
    pytest.param(
        lambda: _mamba().insert(K3, np.arange(3), mamba_value=True),
        TypeError,
        "mamba_value",
        "True",
        id="mamba_value=True",
    ),
    pytest.param(
        lambda: _mamba().insert(K3, np.arange(3), mamba_value=[1, 2]),
        InvalidValueError,
        "mamba_value",
        "[1, 2]",
        id="mamba_value two slots",
    ),
    pytest.param(
        lambda: (lambda c, n: (c.inc_lock_ref(n), c.dec_lock_ref(n, swa_boundary_id=5)))(
            *_with_node(_mamba, state=True)
        ),
        TypeError,
        "swa_boundary_id",
        "5",
        id="Mamba token 5",
    ),
    pytest.param(
        lambda: (lambda c, n: (c.inc_lock_ref(n), c.dec_lock_ref(n, swa_boundary_id=True)))(
            *_with_node(_mamba)
        ),
        LockStateError,
        "swa_boundary_id",
        "True",
        id="Mamba token True without a state",
    ),
    # ---- allocators
    pytest.param(lambda: TokenToKVPoolAllocator(-1), InvalidValueError, "size", "-1", id="size=-1"),
    pytest.param(
        lambda: TokenToKVPoolAllocator(8, page_size=0),
        InvalidValueError,
        "page_size",
        "0",
        id="allocator page_size=0",
    ),
    pytest.param(
        lambda: TokenToKVPoolAllocator(8).alloc(-1), InvalidValueError, "n", "-1", id="alloc(-1)"
    ),
    pytest.param(
        lambda: TokenToKVPoolAllocator(8).alloc("3"), TypeError, "n", "str", id="alloc('3')"
    ),
    pytest.param(
        lambda: _allocated(TokenToKVPoolAllocator(8)).free(np.ones((1, 1), np.int32)),
        InvalidValueError,
        "indices",
        "(1, 1)",
        id="free 2-D",
    ),
    pytest.param(
        lambda: _allocated(TokenToKVPoolAllocator(8)).free(np.array([1.5])),
        InvalidValueError,
        "indices",
        "float64",
        id="free floats",
    ),
    # ---- JAX pools
    pytest.param(
        lambda: _req_pool().__class__(0, 8), InvalidValueError, "max_reqs", "0", id="max_reqs=0"
    ),
    pytest.param(
        lambda: _req_pool().__class__(2, "8"),
        InvalidValueError,
        "max_context_len",
        "'8'",
        id="max_context_len=str",
    ),
    pytest.param(
        lambda: _req_pool().to_device([9]), InvalidValueError, "slots", "9", id="to_device slot 9"
    ),
    pytest.param(
        lambda: _req_pool().write((9, slice(0, 2)), [1, 2]),
        InvalidValueError,
        "index",
        "9",
        id="write row 9",
    ),
    pytest.param(
        lambda: _kv_pool().__class__(16, 2, 1, 0),
        InvalidValueError,
        "k_head_dim",
        "0",
        id="k_head_dim=0",
    ),
    pytest.param(
        lambda: _kv_pool().get_kv(5, [1]), InvalidValueError, "layer_id", "5", id="layer_id=5"
    ),
    pytest.param(
        lambda: _kv_pool().get_kv_all(np.array([100])),
        InvalidValueError,
        "loc",
        "100",
        id="loc 100",
    ),
    pytest.param(
        lambda: _kv_pool().copy([1], [1, 2]), InvalidValueError, "dst_loc", "2", id="copy lengths"
    ),
    pytest.param(
        lambda: _kv_pool().set_kv_all(
            [1], np.zeros((2, 1, 1, 3), np.float32), np.zeros((2, 1, 1, 4), np.float32)
        ),
        InvalidValueError,
        "k",
        "(2, 1, 1, 3)",
        id="k shape",
    ),
    pytest.param(
        lambda: _mamba_pool().__class__(0, 1, (1,), (1,)),
        InvalidValueError,
        "size",
        "0",
        id="MambaPool size=0",
    ),
    pytest.param(
        lambda: _mamba_pool().copy_states([1], [1, 2]),
        InvalidValueError,
        "dst",
        "2",
        id="copy_states lengths",
    ),
    pytest.param(
        lambda: _mamba_pool().reset_states([99]),
        InvalidValueError,
        "slots",
        "99",
        id="reset_states slot 99",
    ),
    pytest.param(
        lambda: _memory_pool_module().bucket_size(1.5), TypeError, "n", "1.5", id="bucket_size(1.5)"
    ),
    pytest.param(
        lambda: _mamba().evict(1, 2, mamba_num=3),
        TypeError,
        "mamba_num",
        "3",
        id="mamba count twice",
    ),
    pytest.param(
        lambda: TokenToKVPoolAllocator(8, page_size=2).alloc(3),
        InvalidValueError,
        "n",
        "3",
        id="alloc part of a page",
    ),
    pytest.param(
        lambda: _allocated(TokenToKVPoolAllocator(8)).free(np.array([0], np.int32)),
        InvalidFreeError,
        "indices",
        "0",
        id="free slot 0",
    ),
    pytest.param(
        lambda: _allocated(TokenToKVPoolAllocator(8)).free(np.array([99], np.int32)),
        InvalidFreeError,
        "indices",
        "99",
        id="free slot 99",
    ),
    pytest.param(
        lambda: _double_free(TokenToKVPoolAllocator(8)),
        InvalidFreeError,
        "indices",
        "2",
        id="double free",
    ),
    pytest.param(
        lambda: _allocated(TokenToKVPoolAllocator(8)).free(np.array([1, 1], np.int32)),
        InvalidFreeError,
        "indices",
        "1",
        id="free listed twice",
    ),
    pytest.param(
        lambda: SWATokenToKVPoolAllocator(8, -1),
        InvalidValueError,
        "swa_size",
        "-1",
        id="swa_size=-1",
    ),
    pytest.param(
        lambda: _allocated(SWATokenToKVPoolAllocator(8, 8)).free_swa(np.array([6], np.int32)),
        InvalidFreeError,
        "indices",
        "6",
        id="free_swa unallocated",
    ),
    pytest.param(
        lambda: _mamba_pool().free([3]),
        InvalidFreeError,
        "slots",
        "3",
        id="MambaPool free unallocated",
    ),
    # ---- hashing
    pytest.param(
        lambda: hash_token_ids([1, -1]), InvalidKeyError, "token_ids", "-1", id="hash token -1"
    ),
    pytest.param(
        lambda: hash_token_ids([1.5, 2.5]),
        InvalidKeyError,
        "token_ids",
        "1.5",
        id="hash float tokens",
    ),
    pytest.param(
        lambda: hash_token_ids([(1, 2), (1,)] * 200),
        InvalidKeyError,
        "token_ids",
        "(1, 2)",
        id="hash ragged tuples",
    ),
    pytest.param(
        lambda: hash_token_ids([1], prior_hash="zz"),
        InvalidKeyError,
        "prior_hash",
        "'zz'",
        id="prior_hash=zz",
    ),
    pytest.param(
        lambda: hash_to_int64("zz"), InvalidKeyError, "hex_str", "'zz'", id="hash_to_int64('zz')"
    ),
    pytest.param(lambda: hash_to_int64(5), TypeError, "hex_str", "5", id="hash_to_int64(5)"),
    pytest.param(lambda: hash_bytes("text"), TypeError, "data", "'text'", id="hash_bytes(str)"),
    # ---- RadixKey
    pytest.param(lambda: RadixKey([1, 2])[5], IndexError, "idx", "5", id="RadixKey[5]"),
    pytest.param(lambda: RadixKey([1, 2])["a"], TypeError, "idx", "'a'", id="RadixKey['a']"),
]


@pytest.mark.parametrize(("call", "exc", "arg", "bad"), CASES)
def test_bad_call_names_argument_and_value(
    call: Callable[[], Any], exc: type[Exception], arg: str, bad: str
) -> None:
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    # the argument as a word (a one-letter name like n must not match inside "cannot")
    assert re.search(rf"\b{re.escape(arg)}\b", msg), (
        f"{type(info.value).__name__}({msg!r}) does not name {arg!r}"
    )
    assert bad in msg, f"{type(info.value).__name__}({msg!r}) does not show {bad!r}"
    if issubclass(exc, ValueError) and exc is not IndexError:
        assert isinstance(info.value, CacheError), "value errors come from errors.py"


def test_chunk_cache_accepts_anything_and_caches_nothing() -> None:
    """ChunkCache is the no-op: no call on it can fail (the caller keeps every index)."""
    cache = ChunkCache()
    assert cache.insert(RadixKey([1]), [5]).prefix_len == 0
    assert cache.match_prefix(RadixKey([1])).prefix_len == 0
    cache.dec_lock_ref(cache.inc_lock_ref(None))
