"""A pool whose buffers a step donated without handing its result back raises
``BuffersDeletedError`` on its next call (docs/design.md, memory_pool's module docstring), also when
that call writes or copies no slot: the reads of nothing already raise it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache.errors import BuffersDeletedError
from pymllm.mem_cache.memory_pool import KVPool, MambaPool

_EMPTY_KV = np.zeros((0, 1, 2), np.float32)
_EMPTY_STATE = np.zeros((1, 0, 2), np.float32)

CALLS = {
    "set_kv_buffer": lambda p: p.set_kv_buffer(0, [], _EMPTY_KV, _EMPTY_KV),
    "set_kv_all": lambda p: p.set_kv_all([], _EMPTY_KV[None], _EMPTY_KV[None]),
    "copy": lambda p: p.copy([], []),
    "set_states": lambda m: m.set_states([], _EMPTY_STATE, _EMPTY_STATE),
    "copy_states": lambda m: m.copy_states([], []),
    "reset_states": lambda m: m.reset_states([]),
}


@pytest.mark.parametrize("name", CALLS)
def test_an_empty_update_of_a_pool_with_deleted_buffers_says_so(name: str) -> None:
    pool: Any
    if name in ("set_kv_buffer", "set_kv_all", "copy"):
        pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
        read_nothing = lambda: pool.get_kv(0, [])  # noqa: E731
    else:
        pool = MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
        read_nothing = lambda: pool.get_states([])  # noqa: E731
    new = jax.jit(lambda b: b, donate_argnums=0)(pool.buffers)  # result not handed back
    with pytest.raises(BuffersDeletedError):
        read_nothing()  # as documented
    with pytest.raises(BuffersDeletedError):
        CALLS[name](pool)
    pool.buffers = new
    CALLS[name](pool)  # the pool works again
