"""The engine's device memory: KV slots, recurrent-state slots, and their allocators.

:class:`EngineMemory` owns one KV buffer pair per attention layer and one state buffer per
recurrent layer, plus a host allocator for each kind of slot. It prefers the package's JAX
pools (:mod:`pymllm.mem_cache.memory_pool`) and falls back to plain arrays with a numpy
free list when that module is not importable (it is being built in parallel).

The jitted step receives ``kv``/``state`` donated and returns new ones; :meth:`rebind`
stores them, so no donated array is ever kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pymllm.engine import model as M
from pymllm.engine.config import ModelConfig


class FreeListAllocator:
    """Slots ``[1, size]`` (0 is the padding slot) on a host free list; ``alloc`` -> int32.

    The same contract as ``TokenToKVPoolAllocator`` with ``page_size=1``: ``alloc(n)``
    returns ``None`` and changes nothing when fewer than ``n`` slots are free; freeing a slot
    that is not allocated raises ``ValueError`` and frees nothing of that call.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._allocated = np.zeros(size + 1, dtype=bool)
        self.clear()

    def clear(self) -> None:
        self._free = np.arange(1, self.size + 1, dtype=np.int32)
        self._n_free = self.size
        self._allocated[:] = False

    def available_size(self) -> int:
        return self._n_free

    def alloc(self, n: int) -> np.ndarray | None:
        if n > self._n_free:
            return None
        out = self._free[self._n_free - n : self._n_free].copy()
        self._n_free -= n
        self._allocated[out] = True
        return out

    def free(self, indices: Any) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return
        if idx.min() < 1 or idx.max() > self.size:
            raise ValueError(f"free: slot out of range [1, {self.size}]")
        if not self._allocated[idx].all() or np.unique(idx).size != idx.size:
            raise ValueError("free: double free of a slot that is not allocated")
        self._allocated[idx] = False
        self._free[self._n_free : self._n_free + idx.size] = idx
        self._n_free += idx.size


class EngineMemory:
    """KV and recurrent-state storage for one model, with slot allocators.

    * ``token_to_kv_pool_allocator``: KV slots ``[1, kv_size]``, one per cached token; the
      prefix cache frees through it.
    * ``state_allocator``: recurrent-state slots ``[1, state_size]``, one per running
      request (only for models with ``rec`` layers).
    * ``kv``/``state``: the buffers the jitted step reads and writes (see
      :mod:`pymllm.engine.model` for the layout).
    """

    def __init__(self, cfg: ModelConfig, kv_size: int, state_size: int = 0) -> None:
        self.cfg = cfg
        self.kv_size = kv_size
        self.state_size = state_size if cfg.rec_layer_ids else 0
        self.token_to_kv_pool_allocator = FreeListAllocator(kv_size)
        self.state_allocator = FreeListAllocator(self.state_size) if self.state_size else None
        self.kv: M.KVBuffers = M.init_kv_buffers(cfg, kv_size)
        self.state: M.StateBuffers = M.init_state_buffers(cfg, self.state_size)

    def rebind(self, kv: M.KVBuffers, state: M.StateBuffers) -> None:
        """Store the buffers a donated step returned."""
        self.kv = kv
        self.state = state

    def kv_available(self) -> int:
        return self.token_to_kv_pool_allocator.available_size()

    def state_available(self) -> int:
        return self.state_allocator.available_size() if self.state_allocator else 0

    def mem_bytes(self) -> int:
        return sum(int(k.nbytes + v.nbytes) for k, v in self.kv) + sum(
            int(s.nbytes) for s in self.state
        )


__all__ = ["EngineMemory", "FreeListAllocator"]
