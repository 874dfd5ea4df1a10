"""Handles made with ``TreeNode.__new__`` and second ``__init__`` calls: misuse that an
adversarial review found crashing the interpreter or escaping the ``CacheError`` family."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from conftest import run_child

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import AlreadyInitializedError, CacheError
from pymllm.mem_cache.memory_pool import KVPool, MambaPool, ReqToTokenPool

# A handle made with __new__ (TreeNode.__init__ refuses, __new__ does not) names no cache:
# its _tree is None. Reading it, or handing it to a cache (whose error message reprs it),
# dereferenced None as a RadixTreeCore: SIGSEGV. It now reads as evicted, and every use of
# its node raises StaleNodeError. Each use runs in its own child process, so that a crash
# fails only its own case.
_UNAIMED_HANDLE = """
from pymllm.mem_cache import MambaRadixCache, RadixCache
from pymllm.mem_cache._radix_tree import MambaTreeNode, TreeNode

cls = {cls}
h = cls.__new__(cls)
cache = MambaRadixCache() if cls is MambaTreeNode else RadixCache()
try:
    {use}
except Exception as exc:
    print("raised", type(exc).__name__)
else:
    print("returned", {use})
"""

_USES = [
    "h.key",
    "h.value",
    "h.parent",
    "h.lock_ref",
    "h.swa_tombstone",
    "cache.inc_lock_ref(h)",
    "cache.dec_lock_ref(h)",
    "cache.children(h)",
    "cache.compute_node_hash(h)",
]


@pytest.mark.parametrize("use", _USES)
@pytest.mark.parametrize("cls", ["TreeNode", "MambaTreeNode"])
def test_a_handle_made_with_new_raises_instead_of_crashing(cls: str, use: str) -> None:
    out = run_child(_UNAIMED_HANDLE.format(cls=cls, use=use), timeout=60).split()
    # a handle of no cache is stale for every cache; reading it raises, never crashes
    assert out == ["raised", "StaleNodeError"], out


@pytest.mark.parametrize("cls", ["TreeNode", "MambaTreeNode"])
def test_a_handle_made_with_new_reads_as_evicted(cls: str) -> None:
    for use, printed in (("h.evicted", "True"), ("h.id", "0"), ("repr(h)", "evicted)")):
        out = run_child(_UNAIMED_HANDLE.format(cls=cls, use=use), timeout=60).split()
        assert out[0] == "returned" and out[-1] == printed, (use, out)


def test_a_mamba_handle_made_with_new_raises_for_its_state() -> None:
    for use in ("h.mamba_value", "h.mamba_lock_ref", "h.full_lock_ref"):
        code = _UNAIMED_HANDLE.format(cls="MambaTreeNode", use=use)
        assert run_child(code, timeout=60).split() == ["raised", "StaleNodeError"], use


_SECOND_INIT = {
    "RadixCache": (RadixCache, ()),
    "windowed RadixCache": (lambda: RadixCache(sliding_window_size=2), ()),
    "MambaRadixCache": (MambaRadixCache, ()),
    "TokenToKVPoolAllocator": (lambda: TokenToKVPoolAllocator(8), (8,)),
    "SWATokenToKVPoolAllocator": (lambda: SWATokenToKVPoolAllocator(8, 8), (8, 8)),
    "KVPool": (lambda: KVPool(8, 1, 1, 2, dtype=jnp.float32), (8, 1, 1, 2)),
    "MambaPool": (lambda: MambaPool(4, 1, (2,), (2,)), (4, 1, (2,), (2,))),
    "ReqToTokenPool": (lambda: ReqToTokenPool(2, 4), (2, 4)),
}


@pytest.mark.parametrize("kind", list(_SECOND_INIT))
def test_a_second_init_raises_a_cache_error(kind: str) -> None:
    """errors.py: every error of the family subclasses CacheError. A second ``__init__`` on
    a live cache, allocator or pool raised a bare RuntimeError, which a scheduler catching
    ``CacheError`` around its cache calls missed; it is an ``AlreadyInitializedError``
    (still a RuntimeError), and the object keeps working."""
    make, args = _SECOND_INIT[kind]
    obj = make()
    with pytest.raises(AlreadyInitializedError, match="already initialized") as info:
        obj.__init__(*args)
    assert isinstance(info.value, CacheError) and isinstance(info.value, RuntimeError)
    if isinstance(obj, RadixCache | MambaRadixCache):
        obj._check_invariants()
        assert obj.total_size() == 0
    elif hasattr(obj, "available_size"):
        assert obj.available_size() > 0
