"""Pool and hashing behaviours that no test pinned (a mutation-testing review of
``memory_pool.py`` and ``base_prefix_cache.py``: 74 mutants, 62 killed by the suite; each
test here fails on one of the survivors and passes on the real code).
"""

from __future__ import annotations

import struct

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_child, sha256_hex  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.base_prefix_cache import RadixKey, hash_token_ids
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError
from pymllm.mem_cache.memory_pool import (
    KVBuffers,
    KVPool,
    MambaPool,
    ReqToTokenPool,
    scatter_rows,
    write_kv,
)

# --- reads: the first slot past the buffer is refused. A gather clamps an index past the
# end onto the last row, so slot == rows, unchecked, would read the K/V (or state) of slot
# rows - 1, another request's.


@pytest.mark.parametrize("page_size", [1, 4])
def test_kv_reads_refuse_the_first_slot_past_the_buffer(page_size: int) -> None:
    pool = KVPool(8, 2, 1, 2, dtype=jnp.float32, page_size=page_size)
    last = pool.rows - 1
    pool.set_kv_buffer(0, [last], np.ones((1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32))
    k, _ = pool.get_kv(0, [last])  # the last slot itself is fine
    assert np.asarray(k).tolist() == [[[1.0, 1.0]]]
    for read in (lambda: pool.get_kv(0, [pool.rows]), lambda: pool.get_kv_all([pool.rows])):
        with pytest.raises(InvalidValueError):
            read()


def test_mamba_reads_refuse_the_first_slot_past_the_buffer() -> None:
    pool = MambaPool(4, 1, (2,), (3,), conv_dtype=jnp.float32)
    pool.get_states([pool.rows - 1])
    with pytest.raises(InvalidValueError):
        pool.get_states([pool.rows])


# --- ReqToTokenPool.write refuses the first value past int32: numpy's setitem casts an
# int64 array into the int32 table unsafely, 2**31 to -2**31, a negative KV slot that a
# jitted gather would wrap onto another row.


def test_req_to_token_write_refuses_the_first_value_past_int32() -> None:
    pool = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError):
        pool.write((1, slice(0, 2)), np.array([2**31, 1], dtype=np.int64))
    assert not pool.req_to_token.any()
    pool.write((1, slice(0, 2)), np.array([2**31 - 1, 1], dtype=np.int64))
    assert pool.req_to_token[1, :2].tolist() == [2**31 - 1, 1]


# --- hash_token_ids ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [">u4", ">i4"])
def test_hash_of_a_big_endian_array_is_the_hash_of_its_values(dtype: str) -> None:
    """A big-endian 4-byte array hashes its values (fed as raw bytes, it would hash
    byte-swapped tokens and miss every prefix hit)."""
    tokens = np.array([1, 2, 0x01020304], dtype=dtype)
    assert hash_token_ids(tokens) == sha256_hex(struct.pack("<3I", 1, 2, 0x01020304))
    assert hash_token_ids(tokens) == hash_token_ids([1, 2, 0x01020304])


@pytest.mark.parametrize("dtype", [np.int64, np.uint16])
def test_hash_reads_every_chunk_of_a_long_key(dtype: type) -> None:
    """Keys packed in chunks are hashed whole: two long keys that differ only past the
    first 65,536 tokens hash differently."""
    n = (1 << 16) + 3
    tokens = (np.arange(n) % 50_000).astype(dtype)
    want = sha256_hex(tokens.astype("<u4").tobytes())
    assert hash_token_ids(tokens) == want
    other = tokens.copy()
    other[-1] += 1
    assert hash_token_ids(other) != want
    assert hash_token_ids(tokens.tolist()) == want  # a long list goes the same way


def test_hash_refuses_token_2_32_on_the_object_path() -> None:
    """numpy ints of both signs make an object array, read token by token; 2**32 is an
    InvalidKeyError there too (not numpy's OverflowError, nor a wrap to 0)."""
    ok = [np.int64(1), np.uint64(2**32 - 1)]
    assert hash_token_ids(ok) == sha256_hex(struct.pack("<2I", 1, 2**32 - 1))
    with pytest.raises(InvalidKeyError):
        hash_token_ids([np.int64(1), np.uint64(2**32)])


def test_radix_key_repr_of_exactly_ten_tokens_has_no_ellipsis() -> None:
    """The ellipsis marks tokens left out: ten tokens show whole."""
    assert repr(RadixKey(list(range(10)))).endswith("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])")
    assert repr(RadixKey(list(range(11)))).endswith("9]...)")


def test_to_device_refuses_the_first_slot_past_the_table() -> None:
    """Slot max_reqs + 1 is an InvalidValueError, not numpy's bare IndexError."""
    pool = ReqToTokenPool(4, 8)
    pool.to_device([4])
    with pytest.raises(InvalidValueError):
        pool.to_device([5])


def test_scatter_rows_routes_a_uint32_slot_past_int32_past_the_end() -> None:
    """A uint32 slot >= 2**31 is routed past the end (dropped), never cast to a negative
    int32 that wraps onto a real row: 0xFFFFFFFF would write slot rows - 1, another
    request's K/V."""
    loc = np.array([3, 0xFFFFFFFF, 0], np.uint32)
    assert scatter_rows(loc, 8).tolist() == [3, 9, 10]
    bufs = KVBuffers(jnp.zeros((1, 8, 1, 1)), jnp.zeros((1, 8, 1, 1)))
    k = jnp.ones((3, 1, 1))
    out = write_kv(bufs, 0, loc, k, k)
    assert np.asarray(out.k)[0, :, 0, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_negative_64_bit_slots_wrap_with_x64_as_int32_ones_do() -> None:
    """With x64 on, a negative int64 slot in [-rows, 0) wraps as an int32 one does (and
    as it does with x64 off); one below -rows is routed past the end."""
    out = run_child(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np, jax.numpy as jnp
        from pymllm.mem_cache.memory_pool import scatter_rows
        print(scatter_rows(jnp.asarray(np.array([-1, 3, -(2**40)], np.int64)), 8).tolist())
        print(scatter_rows(np.array([-1, 3], np.int32), 8).tolist())
        """,
        JAX_PLATFORMS="cpu",
    )
    assert out.split() == ["[-1,", "3,", "10]", "[-1,", "3]"], out


def test_set_kv_buffer_on_a_mesh_where_k_and_v_shard_differently() -> None:
    """K sharded over heads (8 heads / 4 devices), V replicated (1 head), and the
    reverse; set_kv_buffer must place K and V on their own row shardings."""
    out = run_child(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        from pymllm.mem_cache.memory_pool import KVPool
        assert len(jax.devices()) == 4
        mesh = Mesh(np.array(jax.devices()), ("tp",))
        for hk, hv in ((8, 1), (1, 8)):
            one = KVPool(32, 2, hk, 4, v_head_num=hv, v_head_dim=4, dtype=jnp.float32)
            many = KVPool(32, 2, hk, 4, v_head_num=hv, v_head_dim=4, dtype=jnp.float32,
                          mesh=mesh)
            k = np.arange(3 * hk * 4, dtype=np.float32).reshape(3, hk, 4)
            v = -np.arange(3 * hv * 4, dtype=np.float32).reshape(3, hv, 4)
            for pool in (one, many):
                pool.set_kv_buffer(1, [5, 6, 7], k, v)
                pool.set_kv_buffer(0, [9], jnp.asarray(k[:1]), jnp.asarray(v[:1]))
            for a, b in zip(one.buffers, many.buffers):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("MESH-KV-OK")
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    assert "MESH-KV-OK" in out


def test_hash_refuses_a_uint64_token_past_uint32() -> None:
    """A uint64 token past uint32 is refused, not wrapped: [2**32] hashing as [0] would
    be a silent collision between different keys."""
    with pytest.raises(InvalidKeyError):
        hash_token_ids(np.array([1, 2**32], dtype=np.uint64))
    assert hash_token_ids(np.array([1, 2**32 - 1], np.uint64)) == hash_token_ids([1, 2**32 - 1])


def test_a_traced_request_row_is_named_as_a_tracer() -> None:
    """ReqToTokenPool.write inside jax.jit with a traced row: the same refusal as a traced
    value (call the pool outside traced code), not a failed numpy conversion."""
    import jax

    pool = ReqToTokenPool(4, 8)

    @jax.jit
    def step(row: jax.Array) -> jax.Array:
        pool.write((row, slice(0, 1)), [1])
        return row

    with pytest.raises(InvalidValueError, match="index is a tracer"):
        step(jnp.int32(1))
    assert not pool.req_to_token.any()
