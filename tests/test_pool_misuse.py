"""Misuse of the JAX pools that an adversarial review (session 23) found mishandled: K and
V on two devices, a JAX bool among slots, a deleted column array, a bool in scatter_rows'
slot list. Each test failed on the code before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import KVPool, MambaPool, ReqToTokenPool, pad_slots

# --- K and V committed to two devices. At a bucket size (n=16) each is moved onto the
# pool's device by _placed and the write goes through; at any other n, _pad_pair padded
# both in one jitted call (_pad_rows), which JAX refused with a bare ValueError ("Received
# incompatible devices for jitted computation"): the same call worked or failed by length.
TWO_DEVICES = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pymllm.mem_cache.memory_pool import KVPool, MambaPool
    devs = jax.devices()
    assert len(devs) == 4, devs
    for n in (16, 5, 17):
        loc = np.arange(1, n + 1)
        k = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
        pool = KVPool(64, 2, 2, 3, dtype=jnp.float32, device=devs[0])
        pool.set_kv_buffer(1, loc, jax.device_put(k, devs[1]), jax.device_put(-k, devs[0]))
        assert (np.asarray(pool.buffers.k)[1, 1 : n + 1] == k).all(), n
        assert (np.asarray(pool.buffers.v)[1, 1 : n + 1] == -k).all(), n
        kk = np.stack([k, k + 1])
        pool.set_kv_all(loc, jax.device_put(kk, devs[2]), jax.device_put(-kk, devs[3]))
        assert (np.asarray(pool.get_kv_all(loc)[1]) == -kk).all(), n
        mesh = Mesh(np.array(devs), ("tp",))
        tp = KVPool(64, 2, 4, 3, dtype=jnp.float32, mesh=mesh)
        k4 = np.concatenate([k, k], axis=1)
        tp.set_kv_buffer(0, loc, jax.device_put(k4, NamedSharding(mesh, P())),
                         jax.device_put(k4, devs[0]))
        assert (np.asarray(tp.get_kv(0, loc)[0]) == k4).all(), n
        m = MambaPool(32, 1, (2,), (3,), conv_dtype=jnp.float32, device=devs[0])
        conv = np.ones((1, n, 2), np.float32)
        m.set_states(loc, jax.device_put(conv, devs[1]),
                     jax.device_put(np.ones((1, n, 3), np.float32), devs[2]))
        assert (np.asarray(m.get_states(loc).conv) == 1).all(), n
    print("TWO-DEVICES-OK")
"""


def test_k_and_v_on_two_devices_write_at_every_length_as_at_a_bucket_size() -> None:
    out = run_child(
        TWO_DEVICES,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    assert "TWO-DEVICES-OK" in out


# --- a jax bool scalar among the slots of a list was read as slot 1. numpy turns
# [jnp.array(True), 5] into [1, 5]; the bool refusal (_holds_bool) knew Python's and
# numpy's bools and numpy bool arrays, not jax ones, so K/V landed on slot 1 (another
# request's rows), a request-table write stored KV slot 1, and a free freed slot 1.


def _jax_true() -> jax.Array:
    return jnp.array(True)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda kv, m, r: kv.set_kv_buffer(
                0, [_jax_true(), 5], np.ones((2, 1, 2), np.float32), np.ones((2, 1, 2), np.float32)
            ),
            id="set_kv_buffer",
        ),
        pytest.param(lambda kv, m, r: kv.copy([2, 3], (_jax_true(), 5)), id="copy"),
        pytest.param(lambda kv, m, r: kv.get_kv(0, [_jax_true(), 4]), id="get_kv"),
        pytest.param(lambda kv, m, r: m.reset_states([_jax_true(), 3]), id="reset_states"),
        pytest.param(lambda kv, m, r: r.write((1, slice(0, 2)), [_jax_true(), 7]), id="write"),
        pytest.param(lambda kv, m, r: r.to_device([_jax_true(), 2]), id="to_device"),
        pytest.param(lambda kv, m, r: pad_slots([_jax_true(), 5]), id="pad_slots"),
    ],
)
def test_a_jax_bool_in_a_slot_list_is_refused_and_changes_nothing(call) -> None:
    kv = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    kv.set_kv_buffer(0, [2, 3], np.full((2, 1, 2), 2, np.float32), np.ones((2, 1, 2), np.float32))
    mamba = MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32)
    req = ReqToTokenPool(4, 4)
    before = np.asarray(kv.buffers.k).copy()
    with pytest.raises(InvalidValueError, match="bool"):
        call(kv, mamba, req)
    assert (np.asarray(kv.buffers.k) == before).all()
    assert not req.req_to_token.any()


def test_a_jax_bool_among_freed_slots_frees_nothing() -> None:
    for pool in (MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32), ReqToTokenPool(4, 4)):
        slots = pool.alloc(3)
        assert slots is not None and {1, 2} <= set(slots.tolist())
        free_before = pool.available_size()
        with pytest.raises(InvalidValueError, match="bool"):
            pool.free([_jax_true(), 2])
        assert pool.available_size() == free_before


# --- ReqToTokenPool.write checked only the row part of the index for a deleted jax array:
# a deleted array among the columns reached numpy, whose conversion raises a bare
# RuntimeError (every other deleted-array argument is a typed InvalidValueError).


def test_req_to_token_write_with_a_deleted_column_array_is_a_typed_error() -> None:
    pool = ReqToTokenPool(2, 4)
    cols = jnp.array([0, 1])
    cols.delete()
    with pytest.raises(InvalidValueError, match="deleted"):
        pool.write((1, cols), [5, 6])
    assert not pool.req_to_token.any()


# --- scatter_rows read a Python bool among a list of slots as slot 1 ([True, 5] -> rows
# [1, 5]); pad_slots and every pool method refuse the same list (InvalidValueError).


def test_scatter_rows_refuses_a_bool_in_a_slot_list() -> None:
    from pymllm.mem_cache.memory_pool import scatter_rows

    with pytest.raises(InvalidValueError):
        scatter_rows([True, 5], 8)


@pytest.mark.parametrize("empty", [[], ()])
def test_scatter_rows_takes_an_empty_list_as_no_slots(empty) -> None:
    """pad_slots and every pool method read [] as zero slots; scatter_rows refused it
    (JAX reads an empty list as float32), outside and inside jax.jit."""
    from pymllm.mem_cache.memory_pool import scatter_rows

    assert pad_slots(empty).dtype == np.int32
    for rows in (scatter_rows(empty, 8), jax.jit(lambda: scatter_rows(empty, 8))()):
        assert rows.shape == (0,)
        assert rows.dtype == jnp.int32


# --- A bool as a column of ReqToTokenPool.write (session 24): numpy reads ``True`` as a new
# axis, so ``write((1, True), [5])`` wrote 5 into every column of row 1, and a bool mask
# picked columns where positions were meant. Rows refused bools already.
@pytest.mark.parametrize(
    "index",
    [
        (1, True),
        (1, np.bool_(False)),
        (1, np.ones(8, dtype=bool)),
        (1, jnp.array(True)),
        (1, [True, 2]),
        (1, slice(0, 2), True),
    ],
    ids=["true", "np-false", "mask", "jax-bool", "list-with-bool", "third-part"],
)
def test_req_to_token_write_refuses_a_bool_column(index):
    req = ReqToTokenPool(4, 8)
    req.write((1, slice(0, 3)), [4, 5, 6])
    before = req.req_to_token.copy()
    with pytest.raises(InvalidValueError, match="bool"):
        req.write(index, [9])
    np.testing.assert_array_equal(req.req_to_token, before)
    req.write((1, np.array([3, 7])), [7, 8])  # integer columns still write
    assert req.req_to_token[1].tolist() == [4, 5, 6, 7, 0, 0, 0, 8]


# --- ReqToTokenPool.to_device with a bad sharding raised JAX's bare ValueError (session 24).
@pytest.mark.parametrize("sharding", ["tp", 5, object()], ids=["str", "int", "object"])
def test_req_to_token_to_device_refuses_a_bad_sharding(sharding):
    req = ReqToTokenPool(4, 8)
    req.write((1, slice(0, 2)), [4, 5])
    with pytest.raises(InvalidValueError, match="sharding"):
        req.to_device([1], sharding=sharding)
    out = req.to_device([1], sharding=jax.devices()[0])
    assert np.asarray(out)[0, :2].tolist() == [4, 5]
