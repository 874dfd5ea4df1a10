"""The engine's device memory: the package's KV and state pools, sized for one model.

:class:`EngineMemory` builds a :class:`~pymllm.mem_cache.memory_pool.KVPool` with one layer
per attention layer and its :class:`~pymllm.mem_cache.memory_pool.TokenToKVPoolAllocator`
(the allocator the prefix cache frees through), and for models with recurrent layers a
:class:`~pymllm.mem_cache.memory_pool.MambaPool` of per-request states. The jitted step
takes ``kv``/``state`` donated and returns new ones; :meth:`rebind` hands them back to the
pools, so no donated array is ever kept.
"""

from __future__ import annotations

import jax.numpy as jnp

from pymllm.engine.config import ModelConfig
from pymllm.engine.model import state_shapes
from pymllm.mem_cache.memory_pool import (
    KVBuffers,
    KVPool,
    MambaBuffers,
    MambaPool,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    make_full_attention_net_mem_pool,
)


class EngineMemory:
    """KV and recurrent-state pools for one model.

    * ``kv_pool`` / ``token_to_kv_pool_allocator``: ``kv_size`` KV slots ``[1, kv_size]``,
      one per cached token, for every attention layer.
    * ``swa_pool`` (only with ``swa_size``, for the ``swa`` variant): the sliding-window
      layers' KV in a pool of ``swa_size`` slots of its own; the allocator is then a
      ``SWATokenToKVPoolAllocator`` that gives every token a full slot and an SWA slot, and
      ``kv_pool`` holds only the full-attention layers.
    * ``state_pool`` (``None`` without recurrent layers): ``state_size`` state slots,
      one per running request plus those a state-tracking cache keeps.

    Not thread-safe; one engine drives it.
    """

    def __init__(
        self, cfg: ModelConfig, kv_size: int, state_size: int = 0, swa_size: int | None = None
    ) -> None:
        self.cfg = cfg
        self.kv_size = kv_size
        self.kv_pool: KVPool
        self.swa_pool: KVPool | None = None
        self.token_to_kv_pool_allocator: TokenToKVPoolAllocator | SWATokenToKVPoolAllocator
        n_swa = sum(k == "swa" for k in cfg.layer_kinds)
        if swa_size is not None:
            if not n_swa:
                raise ValueError(f"swa_size given but the {cfg.variant!r} model has no SWA layers")
            dtype = jnp.dtype(cfg.dtype)
            heads = (cfg.n_kv_heads, cfg.head_dim)
            self.kv_pool = KVPool(kv_size, len(cfg.kv_layer_ids) - n_swa, *heads, dtype=dtype)
            self.swa_pool = KVPool(swa_size, n_swa, *heads, dtype=dtype)
            self.token_to_kv_pool_allocator = SWATokenToKVPoolAllocator(kv_size, swa_size)
        else:
            self.kv_pool, self.token_to_kv_pool_allocator = make_full_attention_net_mem_pool(
                kv_size,
                layer_num=len(cfg.kv_layer_ids),
                head_num=cfg.n_kv_heads,
                head_dim=cfg.head_dim,
                dtype=jnp.dtype(cfg.dtype),
            )
        self.swa_size = swa_size
        self.state_pool: MambaPool | None = None
        self.state_size = 0
        if cfg.rec_layer_ids:
            if state_size < 1:
                raise ValueError(f"the {cfg.variant!r} model needs state_size >= 1")
            conv_shape, temporal_shape = state_shapes(cfg)
            self.state_pool = MambaPool(
                state_size,
                len(cfg.rec_layer_ids),
                conv_shape,
                temporal_shape,
                conv_dtype=jnp.dtype(cfg.dtype),
                temporal_dtype=jnp.float32,
            )
            self.state_size = state_size

    @property
    def kv(self) -> KVBuffers:
        return self.kv_pool.buffers

    @property
    def swa_kv(self) -> KVBuffers | None:
        return self.swa_pool.buffers if self.swa_pool is not None else None

    @property
    def state(self) -> MambaBuffers | None:
        return self.state_pool.buffers if self.state_pool is not None else None

    def rebind(self, kv: KVBuffers, swa_kv: KVBuffers | None, state: MambaBuffers | None) -> None:
        """Give the pools the buffers a donated step returned."""
        self.kv_pool.buffers = kv
        if self.swa_pool is not None:
            assert swa_kv is not None
            self.swa_pool.buffers = swa_kv
        if self.state_pool is not None:
            assert state is not None
            self.state_pool.buffers = state

    def buffers_alive(self) -> bool:
        """Whether every pool still holds live device buffers (an update donates the old
        ones; an interrupt between its return and the rebind would leave deleted ones)."""
        pools = (self.kv_pool, self.swa_pool, self.state_pool)
        return not any(b.is_deleted() for p in pools if p is not None for b in p.buffers)

    def kv_available(self) -> int:
        return self.token_to_kv_pool_allocator.available_size()

    def state_available(self) -> int:
        return self.state_pool.available_size() if self.state_pool is not None else 0

    def mem_bytes(self) -> int:
        pools = (self.kv_pool, self.swa_pool, self.state_pool)
        return sum(p.mem_bytes() for p in pools if p is not None)


__all__ = ["EngineMemory"]
