"""``ChunkCache``: the no-op prefix cache used when prefix caching is disabled."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from pymllm.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    EvictResult,
    InsertResult,
    MatchResult,
    RadixKey,
)
from pymllm.mem_cache.errors import InvalidValueError, LockStateError

# The keyword arguments the radix caches take, which a scheduler may pass to any cache.
_INSERT_KWARGS = frozenset({"prev_prefix_len", "swa_evicted_seqlen", "priority", "mamba_value"})
_EVICT_KWARGS = frozenset({"mamba_num"})
_UNLOCK_KWARGS = frozenset({"swa_boundary_id"})


def _check_kwargs(method: str, kwargs: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword arguments {unknown}")


def _check_key(key: Any) -> None:
    if not isinstance(key, RadixKey):
        raise TypeError(f"key: expected a RadixKey, got {key!r} ({type(key).__name__})")


def _check_count(name: str, v: Any) -> int:
    """*v* as an int, as the radix caches read one (``operator.index``; a bool refused)."""
    try:
        if isinstance(v, (bool, np.bool_)):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {v!r} ({type(v).__name__})") from None


def _check_node(node: Any) -> None:
    if node is not None:
        raise TypeError(
            f"node: expected None (ChunkCache's match_prefix hands out no node), got {node!r}"
        )


class ChunkCache(BasePrefixCache):
    """A cache that caches nothing.

    ``match_prefix`` always misses, ``insert`` takes ownership of nothing (every index the
    caller passes stays the caller's to free: ``prefix_len`` is 0), ``evict`` frees nothing
    and locks are no-ops. Use it to serve without prefix reuse through the same scheduler
    code path as :class:`~pymllm.mem_cache.radix_cache.RadixCache`, provided that path
    frees what the cache did not take: a loop that frees only the duplicates a radix
    insert reports would leak every slot here. ``pymllm.engine`` measures what an insert
    took as the growth of ``total_size()`` (always 0 here) and frees the rest when the
    request ends.

    It reads no tokens, but refuses what the radix caches refuse before they read any
    (``TypeError``): a key that is not a ``RadixKey``, a count or ``priority`` that is not
    an int, a Mamba state count given twice (``mamba_num`` and the 2nd argument of
    ``evict``), a node other than the ``None`` its ``match_prefix`` hands out, and keyword
    arguments no radix cache takes. So a scheduler's mistake shows here too, not only once
    caching is on.
    """

    def __init__(self, token_to_kv_pool_allocator: Any = None) -> None:
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator

    def reset(self) -> None:
        """Nothing is cached, so nothing is cleared."""

    def match_prefix(self, key: RadixKey) -> MatchResult:
        """Always a miss: empty int32 ``indices``, ``prefix_len`` 0, ``last_node`` None."""
        _check_key(key)
        return MatchResult(indices=np.zeros(0, dtype=np.int32), last_node=None, prefix_len=0)

    def insert(self, key: RadixKey, value: Any = None, **kwargs: Any) -> InsertResult:
        """Stores nothing: the caller keeps ownership of every index in *value*. Takes the
        radix caches' keyword arguments (``prev_prefix_len``, ``swa_evicted_seqlen``,
        ``priority``, ``mamba_value``) and ignores them, but for ``priority``, which is
        checked as the radix caches check it (``TypeError`` unless an int,
        ``InvalidValueError`` outside 64 bits)."""
        _check_key(key)
        _check_kwargs("insert", kwargs, _INSERT_KWARGS)
        if "priority" in kwargs:  # the one the radix caches check before reading tokens
            p = _check_count("priority", kwargs["priority"])
            if not -(2**63) <= p < 2**63:
                raise InvalidValueError(f"priority: expected a 64-bit int, got {p}")
        return InsertResult(prefix_len=0, last_node=None)

    def evict(self, num_tokens: int, swa_num_tokens: int = 0, **kwargs: Any) -> EvictResult:
        """Nothing to evict (``mamba_num``, a MambaRadixCache's argument, is taken too)."""
        _check_count("num_tokens", num_tokens)
        _check_count("swa_num_tokens", swa_num_tokens)
        _check_kwargs("evict", kwargs, _EVICT_KWARGS)
        if kwargs.get("mamba_num") is not None:
            _check_count("mamba_num", kwargs["mamba_num"])
            if swa_num_tokens:  # MambaRadixCache reads its 2nd argument as the state count
                raise TypeError(
                    "mamba_num: give the Mamba state count once (mamba_num or the 2nd "
                    f"argument), got {swa_num_tokens!r} and {kwargs['mamba_num']!r}"
                )
        return EvictResult()

    def inc_lock_ref(self, node: Any) -> None:
        """No-op; returns None (the token to hand back to :meth:`dec_lock_ref`)."""
        _check_node(node)
        return None

    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        """No-op. ``swa_boundary_id`` is what :meth:`inc_lock_ref` returned, None; any
        other token is ``LockStateError``, as :class:`RadixCache` without a window says."""
        _check_node(node)
        _check_kwargs("dec_lock_ref", kwargs, _UNLOCK_KWARGS)
        token = kwargs.get("swa_boundary_id")
        if token is not None:
            raise LockStateError(
                f"swa_boundary_id: got {token!r:.60}, but ChunkCache locks nothing: pass what "
                "inc_lock_ref returned (None)"
            )

    def pretty_print(self) -> None:
        print("ChunkCache (caches nothing)")


__all__ = ["ChunkCache"]
