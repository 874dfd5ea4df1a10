"""The pools hold what they were passed at call time: a caller may reuse its arrays (K/V
staging buffers, slot lists) as soon as a call returns.

On the CPU backend a numpy array handed to ``jax.device_put`` or to a jitted call may become
the device buffer itself (zero copy, for aligned arrays), and the computation that reads it
runs later (asynchronous dispatch). Each test first queues a slow computation on the pool's
buffers, so the pool's own work is still waiting when the caller overwrites its arrays: a pool
that kept the caller's memory then reads the new contents (before the fix: wrong K/V, writes
into other slots, reads of other rows). The host arrays are page-aligned, so XLA:CPU would
alias them every time, not only when malloc happens to align them. The pools are not tiny:
XLA:CPU runs a program over a few hundred floats inline, before the call returns, and
:func:`queued` checks that the stall really held the device back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import (
    KVBuffers,
    KVPool,
    MambaBuffers,
    MambaPool,
    ReqToTokenPool,
)

SPIN = 10_000_000  # iterations of a scalar sin: about 0.1 s of one CPU core


def aligned(shape: tuple[int, ...], dtype: Any, fill: Any) -> np.ndarray:
    """A page-aligned host array (XLA:CPU maps aligned numpy memory instead of copying)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 4096, np.uint8)
    off = -raw.ctypes.data % 4096
    out = raw[off : off + nbytes].view(dtype).reshape(shape)
    out[...] = fill
    return out


def _spin(x: jax.Array) -> jax.Array:
    return jax.lax.fori_loop(0, SPIN, lambda i, s: jnp.sin(s), x.reshape(-1)[0])


@jax.jit
def _slow_kv(b: KVBuffers) -> KVBuffers:
    s = _spin(b.k)  # never < -2: the buffers come back unchanged, ~0.1 s later
    return KVBuffers(jnp.where(s < -2, 0, b.k), jnp.where(s < -2, 0, b.v))


@jax.jit
def _slow_states(b: MambaBuffers) -> MambaBuffers:
    s = _spin(b.temporal)
    return MambaBuffers(jnp.where(s < -2, 0, b.conv), jnp.where(s < -2, 0, b.temporal))


def stall(pool: KVPool | MambaPool) -> None:
    """Queue ~0.1 s of work on the pool's buffers (warm: compiled before, so the call itself
    returns at once); the pool's next call waits for it on the device."""
    if isinstance(pool, KVPool):
        pool.buffers = _slow_kv(pool.buffers)
    else:
        pool.buffers = _slow_states(pool.buffers)


def queued(x: jax.Array) -> None:
    """The test only proves something if the device had not run the call yet."""
    assert not x.is_ready(), "the device ran ahead of the test: raise SPIN"


def kv_pool() -> KVPool:
    pool = KVPool(64, 2, 2, 16, dtype=jnp.float32)
    pool.set_kv_all(
        np.arange(1, 65), np.zeros((2, 64, 2, 16), np.float32), np.zeros((2, 64, 2, 16), np.float32)
    )
    for _ in range(2):  # compile the stall and the calls of the tests at bucket 16
        stall(pool)
        pool.set_kv_buffer(
            0,
            np.arange(1, 17),
            np.zeros((16, 2, 16), np.float32),
            np.zeros((16, 2, 16), np.float32),
        )
    jax.block_until_ready(pool.buffers)
    return pool


def host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def test_set_kv_buffer_keeps_the_k_v_and_slots_passed_at_call_time() -> None:
    pool = kv_pool()
    loc = aligned((16,), np.int32, np.arange(1, 17))  # a bucket size: no padding copy
    k = aligned((16, 2, 16), np.float32, 7.0)
    v = aligned((16, 2, 16), np.float32, 8.0)
    stall(pool)
    pool.set_kv_buffer(1, loc, k, v)
    k[...] = -1.0  # the caller's staging buffers and slot list, reused at once
    v[...] = -1.0
    loc[...] = np.arange(33, 49)
    queued(pool.buffers.k)
    got = host(pool.buffers.k)[1], host(pool.buffers.v)[1]
    assert (got[0][1:17] == 7.0).all() and (got[1][1:17] == 8.0).all()
    assert not got[0][33:49].any() and not got[1][33:49].any()  # no write elsewhere


def test_set_kv_all_keeps_the_k_v_and_slots_passed_at_call_time() -> None:
    pool = kv_pool()
    pool.set_kv_all(
        np.arange(1, 17), np.zeros((2, 16, 2, 16), np.float32), np.zeros((2, 16, 2, 16), np.float32)
    )
    loc = aligned((16,), np.int32, np.arange(1, 17))
    k = aligned((2, 16, 2, 16), np.float32, 7.0)
    v = aligned((2, 16, 2, 16), np.float32, 8.0)
    stall(pool)
    pool.set_kv_all(loc, k, v)
    k[...] = -1.0
    v[...] = -1.0
    loc[...] = np.arange(33, 49)
    queued(pool.buffers.k)
    got_k, got_v = host(pool.buffers.k), host(pool.buffers.v)
    assert (got_k[:, 1:17] == 7.0).all() and (got_v[:, 1:17] == 8.0).all()
    assert not got_k[:, 33:49].any() and not got_v[:, 33:49].any()


def test_copy_keeps_the_slots_passed_at_call_time() -> None:
    pool = kv_pool()
    pool.set_kv_buffer(
        0,
        np.arange(1, 17),
        np.full((16, 2, 16), 5.0, np.float32),
        np.full((16, 2, 16), 5.0, np.float32),
    )
    pool.copy(np.arange(1, 17), np.arange(17, 33))  # compile
    src = aligned((16,), np.int32, np.arange(1, 17))
    dst = aligned((16,), np.int32, np.arange(33, 49))
    stall(pool)
    pool.copy(src, dst)
    dst[...] = np.arange(49, 65)
    queued(pool.buffers.k)
    got = host(pool.buffers.k)[0, :, 0, 0]
    assert (got[33:49] == 5.0).all() and not got[49:65].any()


@pytest.mark.parametrize("every_layer", [False, True], ids=["get_kv", "get_kv_all"])
def test_reads_gather_the_slots_passed_at_call_time(every_layer: bool) -> None:
    pool = kv_pool()
    pool.set_kv_buffer(
        0,
        np.arange(1, 17),
        np.full((16, 2, 16), 5.0, np.float32),
        np.full((16, 2, 16), 5.0, np.float32),
    )
    loc = aligned((16,), np.int32, np.arange(1, 17))
    pool.get_kv_all(loc) if every_layer else pool.get_kv(0, loc)  # compile
    stall(pool)
    k, v = pool.get_kv_all(loc) if every_layer else pool.get_kv(0, loc)
    loc[...] = np.arange(33, 49)
    queued(k)
    got_k, got_v = (host(k)[0], host(v)[0]) if every_layer else (host(k), host(v))
    assert (got_k == 5.0).all() and (got_v == 5.0).all()


def mamba_pool() -> MambaPool:
    pool = MambaPool(40, 2, (64,), (8,), conv_dtype=jnp.float32)
    zeros = np.zeros((2, 16, 64), np.float32), np.zeros((2, 16, 8), np.float32)
    for _ in range(2):  # compile every call of the tests at bucket 16
        stall(pool)
        pool.set_states(np.arange(1, 17), *zeros)
        pool.copy_states(np.arange(1, 17), np.arange(17, 33))
        pool.reset_states(np.arange(17, 33))
        pool.get_states(np.arange(1, 17))
    jax.block_until_ready(pool.buffers)
    return pool


def test_set_states_keeps_the_states_and_slots_passed_at_call_time() -> None:
    pool = mamba_pool()
    slots = aligned((16,), np.int32, np.arange(1, 17))
    conv = aligned((2, 16, 64), np.float32, 7.0)
    temporal = aligned((2, 16, 8), np.float32, 8.0)
    stall(pool)
    pool.set_states(slots, conv, temporal)
    conv[...] = -1.0
    temporal[...] = -1.0
    slots[...] = np.arange(17, 33)
    queued(pool.buffers.conv)
    got = MambaBuffers(*(host(b) for b in pool.buffers))
    assert (got.conv[:, 1:17] == 7.0).all() and (got.temporal[:, 1:17] == 8.0).all()
    assert not got.conv[:, 17:].any() and not got.temporal[:, 17:].any()


def test_copy_reset_and_get_states_keep_the_slots_passed_at_call_time() -> None:
    pool = mamba_pool()
    pool.set_states(
        np.arange(1, 17),
        np.full((2, 16, 64), 5.0, np.float32),
        np.full((2, 16, 8), 5.0, np.float32),
    )
    src = aligned((16,), np.int32, np.arange(1, 17))
    dst = aligned((16,), np.int32, np.arange(17, 33))
    stall(pool)
    pool.copy_states(src, dst)
    dst[...] = np.arange(1, 17)  # copying 1..16 onto itself would change nothing
    queued(pool.buffers.conv)
    assert (host(pool.buffers.conv)[:, 17:33] == 5.0).all()

    reset = aligned((16,), np.int32, np.arange(17, 33))
    stall(pool)
    pool.reset_states(reset)
    reset[...] = np.arange(1, 17)
    queued(pool.buffers.conv)
    conv = host(pool.buffers.conv)
    assert not conv[:, 17:33].any() and (conv[:, 1:17] == 5.0).all()

    read = aligned((16,), np.int32, np.arange(1, 17))
    stall(pool)
    got = pool.get_states(read)
    read[...] = np.arange(17, 33)
    queued(got.conv)
    assert (host(got.conv) == 5.0).all() and (host(got.temporal) == 5.0).all()


def test_to_device_holds_the_rows_at_call_time() -> None:
    pool = ReqToTokenPool(4, 16)
    pool.write((1, slice(0, 16)), np.arange(1, 17))
    dev = pool.to_device(np.array([1], np.int32))
    pool.write((1, slice(0, 16)), np.arange(17, 33))
    assert host(dev)[0].tolist() == list(range(1, 17))


def test_the_pools_own_buffers_as_input_are_refused_and_change_nothing() -> None:
    """set_kv_all(slots, pool.buffers.k, pool.buffers.v) (their shapes match the input's
    when the pool's rows are a bucket size) failed inside XLA ('a buffer that was
    previously donated') instead of raising InvalidValueError; set_states the same."""
    pool = KVPool(15, 2, 1, 4, dtype=jnp.float32)  # 16 rows, a bucket size
    slots = np.arange(16)
    own = pool.buffers
    fresh = jnp.ones(pool.k_shape, jnp.float32)
    twin = jax.device_put(own.k, jax.devices()[0])
    assert twin is not own.k and twin.unsafe_buffer_pointer() == own.k.unsafe_buffer_pointer()
    for k, v in ((own.k, own.v), (fresh, own.v), (own.v, fresh), (twin, fresh)):
        with pytest.raises(InvalidValueError, match="own buffers"):
            pool.set_kv_all(slots, k, v)
        assert pool.buffers is own and not any(b.is_deleted() for b in own)
    pool.set_kv_all(slots, own.k + 1, fresh)  # copies are taken
    # slot 0 is padding: its write is dropped, row 0 stays zeros
    assert (host(pool.buffers.k)[:, 1:] == 1.0).all() and (host(pool.buffers.v)[:, 1:] == 1.0).all()
    assert not host(pool.buffers.k)[:, 0].any()

    mamba = MambaPool(15, 1, (2,), (2,), conv_dtype=jnp.float32)
    states = mamba.buffers
    for conv, temporal in ((states.conv, states.temporal), (states.temporal + 1, states.conv)):
        with pytest.raises(InvalidValueError, match="own buffers"):
            mamba.set_states(slots, conv, temporal)
        assert mamba.buffers is states and not any(b.is_deleted() for b in states)
    mamba.set_states(slots, states.conv + 2, states.temporal + 3)
    conv, temporal = host(mamba.buffers.conv), host(mamba.buffers.temporal)
    assert (conv[:, 1:] == 2.0).all() and (temporal[:, 1:] == 3.0).all()
    assert not conv[:, 0].any() and not temporal[:, 0].any()


def test_the_buffer_setters_do_not_wait_for_the_step_that_made_the_buffers() -> None:
    """A serving loop hands the pool a donated step's outputs and goes on with host work
    while the device computes. The setters check that the two buffers are distinct device
    buffers, which for buffers of one shape reads their device addresses: that read must
    not wait for the step (it does not on CPU here, nor on an H200:
    ``bench/gpu_setter_overlap.py``, in ``bench/RESULTS.md``)."""
    pool = kv_pool()
    assert pool.k_shape == pool.v_shape  # the setter compares addresses
    stall(pool)  # the setter, on the outputs of ~0.1 s of queued work
    queued(pool.buffers.k)
    queued(pool.buffers.v)
    mamba = MambaPool(15, 2, (8, 4), (8, 4), conv_dtype=jnp.float32)
    stall(mamba)  # compile
    jax.block_until_ready(mamba.buffers)
    stall(mamba)
    queued(mamba.buffers.conv)
    queued(mamba.buffers.temporal)
    jax.block_until_ready((pool.buffers, mamba.buffers))
