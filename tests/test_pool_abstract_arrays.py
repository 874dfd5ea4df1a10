"""K/V and states that are abstract shapes (jax.ShapeDtypeStruct), not arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import KVPool, MambaPool


@pytest.mark.parametrize("n", [3, 16], ids=["padded", "bucket-size"])
def test_kv_pool_refuses_a_shape_dtype_struct_as_k_and_v(n: int) -> None:
    """_check_array took anything with .shape and .dtype for an array: a ShapeDtypeStruct
    (what jax.eval_shape returns) failed later with a bare IndexError or TypeError."""
    pool = KVPool(32, 1, 1, 2, dtype=jnp.float32)
    sds = jax.ShapeDtypeStruct((1, n, 1, 2), jnp.float32)
    loc = np.arange(1, n + 1, dtype=np.int32)
    with pytest.raises(InvalidValueError):
        pool.set_kv_all(loc, sds, sds)
    one = jax.ShapeDtypeStruct((n, 1, 2), jnp.float32)
    with pytest.raises(InvalidValueError):
        pool.set_kv_buffer(0, loc, one, one)
    assert not np.asarray(pool.get_kv_all(loc)[0]).any()


def test_mamba_pool_refuses_a_shape_dtype_struct_as_states() -> None:
    pool = MambaPool(8, 1, (2,), (3,), conv_dtype=jnp.float32)
    conv = jax.ShapeDtypeStruct((1, 2, 2), jnp.float32)
    temporal = jax.ShapeDtypeStruct((1, 2, 3), jnp.float32)
    with pytest.raises(InvalidValueError):
        pool.set_states(np.array([1, 2], dtype=np.int32), conv, temporal)
