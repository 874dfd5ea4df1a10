"""JAX device pools: KVPool, ReqToTokenPool, MambaPool (CPU; sharding in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_env, run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import BuffersDeletedError, InvalidFreeError, InvalidValueError
from pymllm.mem_cache.memory_pool import (
    KVBuffers,
    KVPool,
    MambaBuffers,
    MambaPool,
    ReqToTokenPool,
    _trim_rows,
    bucket_size,
    copy_kv,
    copy_states,
    make_full_attention_net_mem_pool,
    make_req_to_token_pool,
    pad_slots,
    read_kv,
    reset_states,
    scatter_rows,
    write_kv,
    write_kv_all,
)

BF16 = jnp.bfloat16

# (k_head_num, k_head_dim, v_head_num, v_head_dim)
SHAPES = {
    "mha": (4, 16, 4, 16),
    "gqa": (2, 32, 2, 32),
    "mla": (1, 72, 1, 64),
}


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(BF16)


def host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


@pytest.fixture
def compiles() -> Iterator[list[str]]:
    """Names of the XLA backend compilations that happen while the test runs."""
    seen: list[str] = []

    def listener(name: str, *_: Any, **__: Any) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


# -- bucketing --------------------------------------------------------------------------


def test_bucket_size_is_small_set_and_bounded_padding() -> None:
    buckets = {bucket_size(n) for n in range(1, 65537)}
    assert len(buckets) <= 2 * 17
    for n in range(1, 5000):
        b = bucket_size(n)
        assert b >= n and (n <= 16 or b <= 1.5 * n)
    assert pad_slots([5, 6]).tolist() == [5, 6] + [0] * 14
    # the smallest bucket >= n, as documented: a bucket itself maps to itself
    ladder = sorted({16} | {3 << k for k in range(3, 16)} | {1 << k for k in range(4, 17)})
    assert ladder[:6] == [16, 24, 32, 48, 64, 96]
    for n in range(1, 65537):
        assert bucket_size(n) == next(b for b in ladder if b >= n)
    assert bucket_size(0) == 16


@pytest.mark.parametrize(("n", "exc"), [(-1, InvalidValueError), (True, TypeError)])
def test_bucket_size_refuses_what_is_not_a_count(n: object, exc: type) -> None:
    with pytest.raises(exc, match="n: "):
        bucket_size(n)  # type: ignore[arg-type]


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_write_then_read_round_trip(shape: str, page_size: int) -> None:
    hk, dk, hv, dv = SHAPES[shape]
    pool, alloc = make_full_attention_net_mem_pool(
        128, 2, hk, dk, v_head_num=hv, v_head_dim=dv, page_size=page_size
    )
    assert pool.k_shape == (2, 128 + page_size, hk, dk)
    assert pool.v_shape == (2, 128 + page_size, hv, dv)
    rng = np.random.default_rng(0)
    loc = alloc.alloc(48)
    k, v = rand(rng, 48, hk, dk), rand(rng, 48, hv, dv)
    pool.set_kv_buffer(1, loc, k, v)
    got_k, got_v = pool.get_kv(1, loc)
    np.testing.assert_array_equal(host(got_k), k)
    np.testing.assert_array_equal(host(got_v), v)
    want_k = np.zeros(pool.k_shape, BF16)
    want_k[1, loc] = k
    np.testing.assert_array_equal(host(pool.buffers.k), want_k)  # nothing else written


def test_the_factory_places_the_pool_as_kv_pool_does() -> None:
    """``make_full_attention_net_mem_pool`` takes KVPool's placement arguments, ``device``
    among them (it had no such argument), and passes them on: the same checks apply."""
    dev = jax.devices()[-1]
    pool, _ = make_full_attention_net_mem_pool(32, 1, 2, 4, dtype=jnp.float32, device=dev)
    assert pool.buffers.k.sharding.device_set == {dev} == pool.buffers.v.sharding.device_set
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
    with pytest.raises(InvalidValueError, match="not both"):
        make_full_attention_net_mem_pool(32, 1, 2, 4, mesh=mesh, device=dev)


def test_all_layer_calls_and_whole_layer_views() -> None:
    pool = KVPool(64, 3, 2, 8, v_head_num=1, v_head_dim=4)
    rng = np.random.default_rng(9)
    loc = np.arange(5, 25)
    k3, v3 = rand(rng, 3, 20, 2, 8), rand(rng, 3, 20, 1, 4)
    pool.set_kv_all(loc, k3, v3)
    ak, av = pool.get_kv_all(loc)
    np.testing.assert_array_equal(host(ak), k3)
    np.testing.assert_array_equal(host(av), v3)
    kb, vb = pool.get_kv_buffer(2)
    assert kb.shape == (65, 2, 8) and vb.shape == (65, 1, 4)
    np.testing.assert_array_equal(host(kb)[loc], k3[2])
    np.testing.assert_array_equal(host(pool.get_value_buffer(1))[loc], v3[1])
    np.testing.assert_array_equal(host(pool.get_key_buffer(0))[loc], k3[0])


def test_jax_inputs_round_trip_and_module_functions_compose_in_a_step() -> None:
    pool = KVPool(64, 2, 2, 8)
    rng = np.random.default_rng(1)
    loc = pad_slots(np.arange(1, 11))
    k = jnp.asarray(rand(rng, 16, 2, 8))

    @jax.jit
    def step(buffers: KVBuffers, loc: jax.Array, k: jax.Array) -> tuple[KVBuffers, jax.Array]:
        for layer in range(2):
            buffers = write_kv(buffers, layer, loc, k * (layer + 1), k)
        return buffers, read_kv(buffers, 1, loc)[0]

    new, got = step(pool.buffers, loc, k)
    pool.buffers = new
    np.testing.assert_array_equal(host(got)[:10], host(k * 2)[:10])
    np.testing.assert_array_equal(host(pool.get_kv(0, loc[:10])[0]), host(k)[:10])


def test_padding_writes_nothing_and_row_zero_stays_zero() -> None:
    pool = KVPool(40, 2, 2, 4)
    rows = np.arange(1, 41)
    rng = np.random.default_rng(2)
    base_k, base_v = rand(rng, 2, 40, 2, 4), rand(rng, 2, 40, 2, 4)
    pool.set_kv_all(rows, base_k, base_v)
    loc = np.array([7, 3, 30], dtype=np.int32)  # padded to 16 with 13 zeros
    k, v = rand(rng, 3, 2, 4), rand(rng, 3, 2, 4)
    pool.set_kv_buffer(1, loc, k, v)
    want_k = np.concatenate([np.zeros((2, 1, 2, 4), BF16), base_k], axis=1)
    want_k[1, loc] = k
    got_k = host(pool.buffers.k)
    np.testing.assert_array_equal(got_k, want_k)  # row 0 included: still zeros
    # copy() pads with 0 -> 0 as well.
    pool.copy([30], [31])
    got_k2 = host(pool.buffers.k)
    np.testing.assert_array_equal(got_k2[:, 31], got_k[:, 30])
    np.testing.assert_array_equal(np.delete(got_k2, 31, axis=1), np.delete(got_k, 31, axis=1))


def _nan_padded(n: int, m: int, *shape: int) -> jax.Array:
    """``[*lead, m, ...]`` device rows: ``n`` of ones, then NaN padding (what padded tokens
    that went through a masked softmax hold)."""
    x = np.full((*shape[:-1], m, shape[-1]), np.nan, np.float32)
    x[..., :n, :] = 1.0
    return jnp.asarray(x)


def test_bucket_sized_device_rows_leave_row_zero_alone() -> None:
    """K/V made at the bucket size in a model step (as the module docstring advises) carry
    the padded tokens' rows; the pools scattered them into row 0, where a NaN then turned
    every masked read of a padded slot-table entry into NaN logits. Padding writes nothing
    now, in the pools and the module functions alike."""
    pool = KVPool(32, 2, 1, 4, dtype=jnp.float32)
    loc = pad_slots([5, 6, 7])  # 16 entries, 13 padding
    k = jnp.moveaxis(_nan_padded(3, 16, 2, 1, 4), -2, 1)  # [L, 16, H, D]
    pool.set_kv_all(loc, k, k)
    pool.set_kv_buffer(1, loc, k[1], k[1])
    got = host(pool.buffers.k)
    assert not got[:, 0].any() and np.isfinite(got).all()
    assert (got[:, 5:8] == 1).all() and not got[:, 8:].any()
    bufs = write_kv(pool.buffers, 0, jnp.asarray(loc), k[0], k[0])
    assert not host(bufs.k)[:, 0].any() and np.isfinite(host(bufs.v)).all()
    mamba = MambaPool(8, 2, (3,), (2, 2), conv_dtype=jnp.float32)
    s = pad_slots([2, 3])
    conv = _nan_padded(2, 16, 2, 3)
    temporal = jnp.broadcast_to(conv[..., None], (2, 16, 3, 1))[..., :2, :].repeat(2, -1)
    mamba.set_states(s, conv, temporal)
    states = mamba.buffers
    assert not host(states.conv)[:, 0].any() and np.isfinite(host(states.temporal)).all()
    assert (host(states.conv)[:, 2:4] == 1).all()


def test_scatter_rows_routes_padding_past_the_end_distinct() -> None:
    loc = jnp.asarray([4, 0, 9, 0], jnp.int32)
    assert scatter_rows(loc, 10).tolist() == [4, 11, 9, 13]
    valid = jnp.asarray([True, True, False, True])
    assert scatter_rows(loc, 10, valid).tolist() == [4, 0, 12, 0]
    # any shape (a padded [B, T] step), lists, narrow integers (as int32)
    assert scatter_rows([[1, 0], [0, 2]], 5).tolist() == [[1, 6], [7, 2]]
    assert scatter_rows(np.array([3, 0], np.uint8), 300).dtype == jnp.int32
    assert scatter_rows(np.array([3, 0], np.uint8), 300).tolist() == [3, 301]
    # the last routed row may be 2**31 - 1, not past it
    top = jax.jit(lambda x: scatter_rows(x, 2**31 - 4))(loc)
    assert top.tolist() == [4, 2**31 - 3, 9, 2**31 - 1]
    with pytest.raises(InvalidValueError, match="do not fit int32"):
        jax.jit(lambda x: scatter_rows(x, 2**31 - 3))(loc)
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        scatter_rows(jnp.asarray([1.0, 0.0]), 10)
    with pytest.raises(InvalidValueError, match="does not fit"):
        scatter_rows([2**40, 0], 10)
    # a mask of another shape broadcast into a bigger index array of repeated rows
    for bad in (jnp.ones((4, 4), bool), jnp.ones(3, bool), jnp.ones(4, jnp.int32)):
        with pytest.raises(InvalidValueError, match="bool mask of loc's shape"):
            scatter_rows(loc, 10, bad)


def test_module_writes_take_the_slot_shapes_they_took_before() -> None:
    """scatter_rows read loc.shape[0]: a list, a scalar or a [B, T] loc (a padded step's
    K of [B, T, H, D]) crashed in write_kv / copy_kv / reset_states."""
    bufs = KVBuffers(jnp.zeros((2, 8, 1, 2)), jnp.zeros((2, 8, 1, 2)))
    k = jnp.arange(1.0, 13.0).reshape(2, 3, 1, 2)  # [B=2, T=3, H, D]
    loc = jnp.asarray([[1, 2, 0], [3, 0, 0]], jnp.int32)
    out = write_kv(bufs, 1, loc, k, k)
    got = host(out.k)[1, :, 0, 0]
    assert got.tolist() == [0.0, 1.0, 3.0, 7.0, 0.0, 0.0, 0.0, 0.0]
    out = write_kv(out, 0, 5, k[0, 0], k[0, 0])  # one slot as a scalar
    assert host(out.k)[0, 5, 0, 0] == 1.0
    out = copy_kv(out, [5], [6])
    assert host(out.k)[0, 6, 0, 0] == 1.0
    states = MambaBuffers(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)))
    states = reset_states(states, [2, 0])
    assert host(states.conv)[0, :, 0].tolist() == [1.0, 1.0, 0.0, 1.0]  # row 0 untouched


def test_module_writes_take_64_bit_slots_with_x64() -> None:
    """With jax_enable_x64, uint64 slots promoted with the routed int32 rows to float64,
    and every module write raised inside JAX."""
    out = run_child(
        """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from pymllm.mem_cache.memory_pool import KVBuffers, write_kv, copy_kv
for dt, big in ((np.uint64, 2**32), (np.int64, 2**32), (np.uint32, 2**31)):
    bufs = KVBuffers(jnp.zeros((1, 8, 1, 1)), jnp.zeros((1, 8, 1, 1)))  # donated below
    loc = np.array([3, 0, 5, big + 4], dt)  # the last one far past the end
    k = jnp.arange(1.0, 5.0).reshape(4, 1, 1)
    b = write_kv(bufs, 0, loc, k, k)
    b = copy_kv(b, np.array([3, 3], dt), np.array([6, big + 1], dt))
    print(np.asarray(b.k)[0, :, 0, 0].tolist())
"""
    )
    # 2**32 + 4 landed on row 4 (JAX narrows 64-bit scatter indices to 32 bits): dropped now
    assert out.split("\n")[:3] == ["[0.0, 0.0, 0.0, 1.0, 0.0, 3.0, 1.0, 0.0]"] * 3


def test_copy_reads_sources_before_writing() -> None:
    pool = KVPool(16, 1, 1, 2, dtype=jnp.float32)
    vals = np.arange(1, 17, dtype=np.float32)[None, :, None, None] * np.ones((1, 16, 1, 2))
    pool.set_kv_all(np.arange(1, 17), vals.astype(np.float32), vals.astype(np.float32))
    pool.copy([1, 2, 3], [2, 3, 4])  # overlapping shift
    got = host(pool.buffers.k)[0, 1:6, 0, 0].tolist()
    assert got == [1, 1, 2, 3, 5]
    with pytest.raises(InvalidValueError):
        pool.copy([1, 2], [3])


# -- donation and compilation -----------------------------------------------------------


def test_every_update_donates_the_old_buffers() -> None:
    # pytest runs with filterwarnings=error: a "donated buffers were not usable" warning fails.
    pool = KVPool(32, 2, 2, 4)
    rng = np.random.default_rng(3)
    loc = np.arange(1, 6)
    for update in (
        lambda: pool.set_kv_buffer(0, loc, rand(rng, 5, 2, 4), rand(rng, 5, 2, 4)),
        lambda: pool.set_kv_all(loc, rand(rng, 2, 5, 2, 4), rand(rng, 2, 5, 2, 4)),
        lambda: pool.copy(loc, loc + 10),
    ):
        old = pool.buffers
        update()
        assert old.k.is_deleted() and old.v.is_deleted()
        assert not pool.buffers.k.is_deleted()
    buffers = pool.buffers
    out = write_kv(
        buffers, 1, pad_slots(loc), jnp.zeros((16, 2, 4), BF16), jnp.zeros((16, 2, 4), BF16)
    )
    assert buffers.k.is_deleted() and not out.k.is_deleted()


_F32_KV = np.ones((1, 1, 2), np.float32)
_F32_STATE = np.ones((2, 1, 3), np.float32), np.ones((2, 1, 2), np.float32)
_KV_CALLS = {
    "set_kv_buffer": lambda p: p.set_kv_buffer(0, [1], _F32_KV, _F32_KV),
    "set_kv_all": lambda p: p.set_kv_all([1], _F32_KV[None], _F32_KV[None]),
    "get_kv": lambda p: p.get_kv(0, [1]),
    "get_kv_all": lambda p: p.get_kv_all([1]),
    "get_kv_buffer": lambda p: p.get_kv_buffer(0),
    "copy": lambda p: p.copy([1], [2]),
}
_MAMBA_CALLS = {
    "set_states": lambda p: p.set_states([1], *_F32_STATE),
    "get_states": lambda p: p.get_states([1]),
    "copy_states": lambda p: p.copy_states([1], [2]),
    "reset_states": lambda p: p.reset_states([1]),
}


@pytest.mark.parametrize("call", [*_KV_CALLS, *_MAMBA_CALLS])
def test_a_pool_whose_buffers_were_donated_elsewhere_says_so(call: str) -> None:
    """A step that donates pool.buffers and does not hand its result back leaves the pool
    with deleted buffers: every call raised JAX's bare "Array has been deleted"
    RuntimeError. It is a BuffersDeletedError naming the fix, and handing the result back
    makes the pool work again."""
    if call in _KV_CALLS:
        pool: Any = KVPool(8, 1, 1, 2, dtype=jnp.float32)
        run = _KV_CALLS[call]
    else:
        pool = MambaPool(4, 2, (3,), (2,), conv_dtype=jnp.float32)
        run = _MAMBA_CALLS[call]
    step = jax.jit(lambda b: b, donate_argnums=0)
    new = step(pool.buffers)
    with pytest.raises(BuffersDeletedError, match=r"pool\.buffers = new"):
        run(pool)
    pool.buffers = new
    run(pool)


def test_an_update_interrupted_after_donating_leaves_a_pool_that_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C raised as a jitted update returns (after it donated the buffers, before the
    pool stored the new ones): the next call raises BuffersDeletedError, not JAX's bare
    RuntimeError."""
    from pymllm.mem_cache import memory_pool

    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)

    def interrupted(new: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(memory_pool, "_concrete", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _KV_CALLS["set_kv_buffer"](pool)
    monkeypatch.undo()
    with pytest.raises(BuffersDeletedError, match="make a new pool"):
        pool.get_kv(0, [1])


def test_random_request_sizes_compile_once_per_bucket(compiles: list[str]) -> None:
    pool = KVPool(4096, 2, 2, 8)
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 1025, size=200)
    k = rand(rng, 1024, 2, 8)
    pool.set_kv_buffer(0, [1], k[:1], k[:1])  # warm: compile bucket 16 before counting
    compiles.clear()
    for i, n in enumerate(sizes.tolist()):
        loc = rng.choice(np.arange(1, 4097, dtype=np.int32), size=n, replace=False)
        pool.set_kv_buffer(i % 2, loc, k[:n], k[:n])
    buckets = {bucket_size(n) for n in sizes.tolist()} - {16}
    assert len(compiles) <= len(buckets), (len(compiles), sorted(buckets))
    assert len(buckets) <= 20


def test_bucket_sized_device_inputs_do_not_compile_again(compiles: list[str]) -> None:
    pool = KVPool(256, 1, 2, 8)
    k = jnp.asarray(np.ones((32, 2, 8), BF16))
    pool.set_kv_buffer(0, np.arange(1, 33), k, k)
    compiles.clear()
    for n in (17, 20, 31, 32):  # all bucket 32: loc padded on the host, k already 32 rows
        pool.set_kv_buffer(0, pad_slots(np.arange(1, n + 1), 32), k, k)
    assert compiles == []


def _forms(shape: tuple[int, ...]) -> list[Any]:
    """One array in each form a caller may hand a pool: host, a committed device array, a
    weakly typed one (float32), then an uncommitted one."""
    return [
        np.full(shape, 2.0, np.float32),
        jax.device_put(np.ones(shape, np.float32), jax.devices()[0]),
        jnp.full(shape, 2.0),
        jnp.ones(shape, jnp.float32),
    ]


@pytest.mark.parametrize("n", [16, 5])  # a whole bucket; one padded on the device
def test_input_forms_compile_the_update_once_each(compiles: list[str], n: int) -> None:
    """A jit is keyed on weak types and committed-ness too: a weakly typed
    ``jnp.full(shape, 2.0)`` compiled the update and the padding again. Host, committed
    and weakly typed K/V now share one compilation per bucket; an uncommitted array is
    taken as it is (no conversion a call) at the cost of one more, its first time; no
    form compiles anything after that."""
    kv = KVPool(64, 2, 2, 8, dtype=jnp.float32)
    ms = MambaPool(8, 2, (3,), (2,), conv_dtype=jnp.float32, temporal_dtype=jnp.float32)
    loc, slots = np.arange(1, n + 1), np.arange(1, min(n, 7) + 1)
    m = len(slots)
    calls = [
        (kv.set_kv_buffer, (1, loc), (n, 2, 8), (n, 2, 8)),
        (kv.set_kv_all, (loc,), (2, n, 2, 8), (2, n, 2, 8)),
        (ms.set_states, (slots,), (2, m, 3), (2, m, 2)),
    ]
    for call, args, a_shape, b_shape in calls:
        pairs = list(zip(_forms(a_shape), _forms(b_shape), strict=True))  # made uncounted
        warm = jax.device_put(np.zeros(a_shape, np.float32), jax.devices()[0])
        call(*args, warm, jax.device_put(np.zeros(b_shape, np.float32), jax.devices()[0]))
        compiles.clear()
        for a, b in pairs[:3]:
            call(*args, a, b)
        assert compiles == [], call
        call(*args, *pairs[3])
        assert len(compiles) <= 2, call  # the update, and for n=5 its padding
        compiles.clear()
        for a, b in pairs:
            call(*args, a, b)
        assert compiles == [], call
    k, _ = kv.get_kv(1, loc)
    assert float(host(k).min()) == 1.0  # the last write, uncommitted ones, landed


def test_mamba_updates_and_module_helpers_donate() -> None:
    pool = MambaPool(6, 2, (3,), (2,), conv_dtype=jnp.float32)
    for update in (
        lambda: pool.set_states(
            [1, 2], np.ones((2, 2, 3), np.float32), np.ones((2, 2, 2), np.float32)
        ),
        lambda: pool.copy_states([1], [3]),
        lambda: pool.reset_states([1]),
    ):
        old = pool.buffers
        update()
        assert old.conv.is_deleted() and old.temporal.is_deleted()
    states = pool.buffers
    states = copy_states(old := states, pad_slots([1]), pad_slots([3]))
    assert old.conv.is_deleted() and old.temporal.is_deleted()
    states = reset_states(old := states, pad_slots([1]))
    assert old.conv.is_deleted() and old.temporal.is_deleted()
    kv = KVPool(32, 2, 1, 2, dtype=jnp.float32).buffers
    ones = jnp.ones((2, 16, 1, 2), jnp.float32)
    kv = write_kv_all(old_kv := kv, pad_slots([1]), ones, ones)
    assert old_kv.k.is_deleted() and old_kv.v.is_deleted()
    kv = copy_kv(old_kv := kv, pad_slots([1]), pad_slots([2]))
    assert old_kv.k.is_deleted() and old_kv.v.is_deleted()
    assert host(kv.k)[:, 2].tolist() == [[[1.0, 1.0]]] * 2


def test_reads_and_copies_compile_once_per_bucket() -> None:
    """The gathers and copies run at the bucket size, so a serving loop compiles each a
    bounded number of times; trimming a read to ``n`` rows is one small jitted call for
    both arrays (``_trim_rows``, one entry per read kind and distinct ``n`` off a bucket
    size), not eager slices (0.1-0.8 ms of host time each). Counted as new entries of each
    jitted function's cache (shared by every pool): the shapes here are used by no other
    test, so the new entries are this test's."""
    pool = KVPool(100, 2, 3, 7, dtype=jnp.float32)
    mamba = MambaPool(70, 1, (3, 5), (7,), conv_dtype=jnp.float32)
    fns = (pool._read, pool._read_all, pool._copy, mamba._read, mamba._copy, mamba._reset)
    before = [f._cache_size() for f in fns]
    trims_before = _trim_rows._cache_size()
    sizes = [1, 5, 16, 17, 20, 23, 24, 25, 29, 32]  # 10 sizes, 3 buckets: 16, 24, 32
    for n in sizes:
        loc = np.arange(1, n + 1)
        pool.get_kv(n % 2, loc)
        pool.get_kv_all(loc)
        pool.copy(loc, loc + 50)
        mamba.get_states(loc)
        mamba.copy_states(loc, loc + 35)
        mamba.reset_states(loc)
    grown = [f._cache_size() - b for f, b in zip(fns, before, strict=True)]
    assert grown == [3] * len(fns), grown
    off_bucket = [n for n in sizes if bucket_size(n) != n]  # 7: every size but 16, 24, 32
    assert _trim_rows._cache_size() - trims_before == 3 * len(off_bucket)  # 3 read kinds


def test_to_device_sends_a_batch_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ReqToTokenPool(8, 64)
    slots = pool.alloc(5)
    assert slots is not None
    for i, slot in enumerate(slots.tolist()):
        pool.write((slot, slice(0, 20)), np.arange(20) + 100 * i)
    shapes: list[tuple[int, ...]] = []
    device_put = jax.device_put

    def counting(x: Any, *args: Any, **kwargs: Any) -> Any:
        shapes.append(np.shape(x))
        return device_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting)
    dev = pool.to_device(slots, max_len=20)
    assert shapes == [(16, 24)]  # the whole padded batch, once
    assert host(dev)[4, :20].tolist() == (np.arange(20) + 400).tolist()


# -- bad input: clear errors, nothing written -------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda p, k: p.set_kv_buffer(2, [1, 2], k, k), id="layer-too-big"),
        pytest.param(lambda p, k: p.set_kv_buffer(-1, [1, 2], k, k), id="layer-negative"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, 9], k, k), id="slot-past-end"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, -1], k, k), id="slot-negative"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, 2, 3], k, k), id="loc-too-long"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [[1, 2]], k, k), id="loc-2d"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1.0, 2.0], k, k), id="loc-float"),
        pytest.param(
            lambda p, k: p.set_kv_buffer(0, [1, 2], k.astype(np.float32), k), id="k-dtype"
        ),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, 2], k, k[:, :1]), id="v-heads"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, 2], k[..., :2], k), id="k-dim"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [1, 2], [[0]], k), id="k-not-array"),
        pytest.param(lambda p, k: p.set_kv_all([1, 2], k, k), id="all-missing-layer-axis"),
        pytest.param(lambda p, k: p.get_kv(5, [1]), id="read-layer"),
        pytest.param(lambda p, k: p.get_kv(0, [99]), id="read-slot"),
        pytest.param(lambda p, k: p.copy([1], [9]), id="copy-range"),
    ],
)
def test_bad_input_raises_before_writing(call: Any) -> None:
    pool = KVPool(8, 2, 2, 4)
    k = np.ones((2, 2, 4), BF16)
    pool.set_kv_buffer(0, [1, 2], k, k)
    before = pool.buffers
    with pytest.raises(InvalidValueError):
        call(pool, k)
    assert pool.buffers is before and not before.k.is_deleted()
    assert host(before.k)[0, 1:3].all() and not host(before.k)[:, 3:].any()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda p, k: p.set_kv_buffer(0, [3, 4, 3], k, k), id="set_kv_buffer"),
        pytest.param(lambda p, k: p.set_kv_buffer(0, [4, 3, 3], k, k), id="set_kv_buffer-end"),
        pytest.param(lambda p, k: p.set_kv_all([5, 5, 6], k[None], k[None]), id="set_kv_all"),
        pytest.param(lambda p, k: p.copy([1, 2, 3], [6, 7, 6]), id="copy-dst"),
    ],
)
def test_duplicate_slots_are_refused_before_writing(call: Any) -> None:
    """The scatters promise XLA distinct indices (undefined on GPU otherwise): a slot
    listed twice in a write was accepted and one of its values landed."""
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    k = np.arange(1, 7, dtype=np.float32).reshape(3, 1, 2)
    before = pool.buffers
    with pytest.raises(InvalidValueError, match="more than once"):
        call(pool, k)
    assert pool.buffers is before and not before.k.is_deleted()


def test_padding_slot_may_repeat_and_copy_sources_may_repeat() -> None:
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    k = np.arange(1, 9, dtype=np.float32).reshape(4, 1, 2)
    pool.set_kv_buffer(0, [0, 3, 0, 4], k, k)
    pool.copy([3, 3], [5, 6])  # one row forked into two
    got = host(pool.buffers.k)[0, :, 0, 0]
    assert got[[0, 3, 4, 5, 6]].tolist() == [0.0, 3.0, 7.0, 3.0, 3.0]  # padding writes nothing
    mamba = MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
    for call in (
        lambda: mamba.set_states(
            [1, 1], np.ones((1, 2, 2), np.float32), np.ones((1, 2, 2), np.float32)
        ),
        lambda: mamba.copy_states([1, 2], [3, 3]),
        lambda: mamba.reset_states([2, 2]),
    ):
        before = mamba.buffers
        with pytest.raises(InvalidValueError, match="more than once"):
            call()
        assert mamba.buffers is before and not before.conv.is_deleted()


def test_setters_refuse_host_arrays_and_one_array_twice() -> None:
    """Numpy buffers were accepted (the next write then copied them to the device), and K
    and V as the same array failed the next write ('donate the same buffer twice')."""
    pool = KVPool(8, 1, 2, 2, dtype=jnp.float32)
    mamba = MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
    kv, states = pool.buffers, mamba.buffers
    for target, new in (
        (pool, KVBuffers(np.zeros(pool.k_shape, np.float32), np.zeros(pool.v_shape, np.float32))),
        (pool, KVBuffers(kv.k, np.zeros(pool.v_shape, np.float32))),
        (pool, KVBuffers(kv.k, kv.k)),
        (mamba, MambaBuffers(np.asarray(states.conv), states.temporal)),
        (mamba, MambaBuffers(states.conv, states.conv)),
    ):
        with pytest.raises(InvalidValueError, match=r"jax\.Array|same array"):
            target.buffers = new
    assert pool.buffers is kv and mamba.buffers is states
    pool.buffers = KVBuffers(kv.k + 1, kv.v + 2)  # fresh arrays of the same device: taken
    pool.set_kv_buffer(0, [1], np.full((1, 2, 2), 5, np.float32), np.zeros((1, 2, 2), np.float32))
    assert host(pool.buffers.k)[0, 1:3, 0, 0].tolist() == [5.0, 1.0]
    mamba.buffers = MambaBuffers(states.conv + 1, states.temporal)
    mamba.reset_states([1])
    assert host(mamba.buffers.conv)[0, 1:3, 0].tolist() == [0.0, 1.0]


def test_setters_refuse_two_arrays_over_one_device_buffer() -> None:
    """`k is v` was refused, but two Array objects over one device buffer (each a
    jax.device_put of one uncommitted array) were taken: every later write then failed
    ('donate the same buffer twice')."""
    pool = KVPool(8, 1, 2, 2, dtype=jnp.float32)  # K and V of one shape and dtype
    mamba = MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
    kv, states = pool.buffers, mamba.buffers
    z = jnp.zeros(pool.k_shape, jnp.float32)
    k, v = jax.device_put(z, pool.shardings.k), jax.device_put(z, pool.shardings.v)
    assert k is not v and k.unsafe_buffer_pointer() == v.unsafe_buffer_pointer()
    with pytest.raises(InvalidValueError, match="same array"):
        pool.buffers = KVBuffers(k, v)
    z = jnp.zeros(states.conv.shape, jnp.float32)
    conv, temporal = (jax.device_put(z, states.conv.sharding) for _ in range(2))
    assert conv is not temporal
    with pytest.raises(InvalidValueError, match="same array"):
        mamba.buffers = MambaBuffers(conv, temporal)
    assert pool.buffers is kv and mamba.buffers is states
    pool.set_kv_buffer(0, [1], np.full((1, 2, 2), 5, np.float32), np.zeros((1, 2, 2), np.float32))
    assert host(pool.buffers.k)[0, 1, 0, 0] == 5.0 and not host(pool.buffers.v).any()
    mamba.reset_states([1])


# Updates of a KVPool(32, 1, 1, 4) and a MambaPool(8, 1, (2,), (2,)), given x: ones of
# shape (1, 1, 4), a host array or a tracer.
KV_UPDATES = {
    "copy": lambda p, x: p.copy((x[0, 0, :1] + 2).astype(np.int32), [5]),  # 3 -> 5
    "set_kv_buffer": lambda p, x: p.set_kv_buffer(0, [5], x, x),
    "set_kv_all": lambda p, x: p.set_kv_all([5], x[None], x[None]),
}
MAMBA_UPDATES = {
    "copy_states": lambda m, x: m.copy_states([1], x[0, 0, :1].astype(np.int32) + 1),
    "reset_states": lambda m, x: m.reset_states(x[0, 0, :1].astype(np.int32)),
    "set_states": lambda m, x: m.set_states([2], x[..., :2], x[..., :2]),
}


@pytest.mark.parametrize("traced", [False, True], ids=["host-args", "tracer-args"])
@pytest.mark.parametrize("name", [*KV_UPDATES, *MAMBA_UPDATES])
def test_pool_updates_inside_jit_are_refused_and_change_nothing(name: str, traced: bool) -> None:
    """Called inside a jitted function with host arguments, an update was traced, not run,
    and the pool kept the tracers as its buffers: no error, every later call failed."""
    pool: KVPool | MambaPool
    if name in KV_UPDATES:
        pool, call = KVPool(32, 1, 1, 4, dtype=jnp.float32), KV_UPDATES[name]
    else:
        pool, call = MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32), MAMBA_UPDATES[name]
    before = pool.buffers
    ones = np.ones((1, 1, 4), np.float32)

    @jax.jit
    def step(x: jax.Array) -> jax.Array:
        call(pool, x if traced else ones)
        return x + 1

    with pytest.raises(InvalidValueError, match="trace"):
        step(jnp.asarray(ones))
    assert pool.buffers is before and not any(b.is_deleted() for b in before)
    call(pool, ones)  # the pool still works: the update runs and donates its buffers
    assert all(b.is_deleted() for b in before)


# Reads of a KVPool(32, 1, 1, 4), a MambaPool(8, 1, (2,), (2,)) and a ReqToTokenPool(4, 8)
# at slot/row 1, given x: ones of shape (1, 1, 4), a host array or a tracer.
READS = {
    "get_kv": lambda p, x: p.get_kv(0, (x[0, 0, :1] * 0 + 1).astype(np.int32))[0],
    "get_kv_all": lambda p, x: p.get_kv_all((x[0, 0, :1] * 0 + 1).astype(np.int32))[0],
    "get_kv_buffer": lambda p, x: p.get_kv_buffer(0)[0][1],
    "get_key_buffer": lambda p, x: p.get_key_buffer(0)[1],
    "get_value_buffer": lambda p, x: p.get_value_buffer(0)[1],
    "get_states": lambda m, x: m.get_states((x[0, 0, :1] * 0 + 1).astype(np.int32)).conv,
    "to_device": lambda r, x: r.to_device((x[0, 0, :1] * 0 + 1).astype(np.int32))[0],
}


@pytest.mark.parametrize("traced", [False, True], ids=["host-args", "tracer-args"])
@pytest.mark.parametrize("name", READS)
def test_pool_reads_inside_jit_are_refused(name: str, traced: bool) -> None:
    """Called inside a jitted function with host arguments, a read was traced, not run: the
    pool's contents at trace time became constants of the compiled function, which then
    returned them on every later call, however the pool changed (no error)."""
    pool: Any
    if name == "get_states":
        pool = MambaPool(8, 1, (2,), (2,), conv_dtype=jnp.float32)

        def write(value: float) -> None:
            pool.set_states(
                [1], np.full((1, 1, 2), value, np.float32), np.zeros((1, 1, 2), np.float32)
            )
    elif name == "to_device":
        pool = ReqToTokenPool(4, 8)

        def write(value: float) -> None:
            pool.write((1, slice(0, 8)), np.full(8, value, np.int32))
    else:
        pool = KVPool(32, 1, 1, 4, dtype=jnp.float32)

        def write(value: float) -> None:
            rows = np.full((1, 1, 4), value, np.float32)
            pool.set_kv_buffer(0, [1], rows, rows)

    ones = np.ones((1, 1, 4), np.float32)
    write(2)

    @jax.jit
    def step(x: jax.Array) -> jax.Array:
        return jnp.sum(READS[name](pool, x if traced else ones)) * 0 + x

    with pytest.raises(InvalidValueError, match="trace"):
        step(jnp.asarray(ones))
    write(5)  # outside a trace the read runs and sees the pool as it is now
    assert np.all(np.asarray(READS[name](pool, ones)) == 5)


def test_req_to_token_write_inside_jit_is_refused() -> None:
    pool = ReqToTokenPool(4, 8)

    @jax.jit
    def step(x: jax.Array) -> jax.Array:
        pool.write((1, slice(0, 2)), x)
        return x + 1

    with pytest.raises(InvalidValueError, match="trace"):
        step(jnp.asarray([1, 2], dtype=jnp.int32))
    pool.write((1, slice(0, 2)), np.array([1, 2], dtype=np.int32))


def test_constructor_validation_and_sizes() -> None:
    with pytest.raises(InvalidValueError):
        KVPool(8, 0, 2, 4)
    with pytest.raises(InvalidValueError):
        KVPool(8, 1, 2, 4, page_size=0)
    pool = KVPool(100, 3, 2, 4, v_head_num=1, v_head_dim=8, dtype=jnp.float32, page_size=16)
    assert pool.size == 96 and pool.rows == 112
    assert pool.mem_bytes() == 3 * 112 * (2 * 4 + 1 * 8) * 4
    with pytest.raises(InvalidValueError):
        pool.buffers = KVBuffers(pool.buffers.v, pool.buffers.k)


# -- ReqToTokenPool ---------------------------------------------------------------------


def test_req_to_token_pool() -> None:
    pool = make_req_to_token_pool(4, 100)
    assert pool.req_to_token.shape == (5, 100) and pool.req_to_token.dtype == np.int32
    slots = pool.alloc(3)
    assert sorted(slots.tolist()) == [1, 2, 3] and pool.available_size() == 1
    assert pool.alloc(2) is None and pool.available_size() == 1
    pool.write((slots[0], slice(0, 5)), np.arange(10, 15))
    pool.write((slots[1], slice(0, 3)), [7, 8, 9])
    dev = pool.to_device(slots[:2], max_len=5)
    assert dev.shape == (16, 16) and dev.dtype == jnp.int32
    got = host(dev)
    assert got[0, :5].tolist() == [10, 11, 12, 13, 14] and got[1, :3].tolist() == [7, 8, 9]
    assert not got[2:].any()  # padding rows are row 0: zeros
    assert pool.to_device(slots).shape == (16, 100)
    pool.free(slots[0])
    with pytest.raises(InvalidFreeError):
        pool.free(slots[0])
    with pytest.raises(InvalidFreeError):
        pool.free(0)
    pool.clear()
    assert pool.available_size() == 4 and not pool.req_to_token.any()
    with pytest.raises(InvalidValueError):
        ReqToTokenPool(0, 4)


# -- MambaPool --------------------------------------------------------------------------


def test_mamba_pool_alloc_copy_reset() -> None:
    pool = MambaPool(6, 2, (3, 4), (2, 2), conv_dtype=BF16, temporal_dtype=jnp.float32)
    slots = pool.alloc(3)
    assert slots.dtype == np.int32 and pool.available_size() == 3
    assert pool.alloc(4) is None
    rng = np.random.default_rng(5)
    conv = rand(rng, 2, 3, 3, 4)
    temporal = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    pool.set_states(slots, conv, temporal)
    got = pool.get_states(slots)
    np.testing.assert_array_equal(host(got.conv), conv)
    old = pool.buffers
    pool.copy_states(slots[:1], slots[2:])
    assert old.conv.is_deleted()
    got = pool.get_states(slots)
    np.testing.assert_array_equal(host(got.temporal)[:, 2], temporal[:, 0])
    np.testing.assert_array_equal(host(got.conv)[:, 2], conv[:, 0])
    pool.reset_states(slots[1:2])
    got = pool.get_states(slots)
    assert not host(got.temporal)[:, 1].any() and not host(got.conv)[:, 1].any()
    np.testing.assert_array_equal(host(got.temporal)[:, 0], temporal[:, 0])
    pool.free(jnp.asarray(slots[:2]))
    with pytest.raises(InvalidFreeError):
        pool.free(slots[:1])
    assert pool.available_size() == 5
    with pytest.raises(InvalidValueError):
        pool.copy_states([1], [9])
    with pytest.raises(InvalidValueError):
        pool.set_states(slots, conv.astype(np.float32), temporal)
    assert pool.mem_bytes() == 2 * 7 * (12 * 2 + 4 * 4)


# -- sharding: 4 host devices in a subprocess -------------------------------------------

SHARDED = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("error")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from pymllm.mem_cache.memory_pool import KVPool, pad_slots
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    rng = np.random.default_rng(7)
    # 8 heads: sharded 2 per device; 1 head (MLA-shaped): replicated.
    for hk, dk, hv, dv, sizes in [(8, 16, 8, 16, [5, 12, 30, 9]), (1, 24, 1, 16, [5, 12])]:
        one = KVPool(200, 2, hk, dk, v_head_num=hv, v_head_dim=dv)
        many = KVPool(200, 2, hk, dk, v_head_num=hv, v_head_dim=dv, mesh=mesh)
        spec = many.buffers.k.sharding.spec
        assert (len(spec) > 2 and spec[2] == "tp") == (hk % 4 == 0), spec
        for step, n in enumerate(sizes):
            loc = rng.choice(np.arange(1, 201), size=n, replace=False)
            k = rng.standard_normal((n, hk, dk)).astype(jnp.bfloat16)
            v = rng.standard_normal((n, hv, dv)).astype(jnp.bfloat16)
            for pool in (one, many):
                old = pool.buffers
                pool.set_kv_buffer(step % 2, loc, k, v)
                pool.copy(loc[:3], 200 - np.arange(3))
                assert old.k.is_deleted()
            assert many.buffers.k.sharding == many.shardings.k
        assert many._write._cache_size() <= 2, many._write._cache_size()
        for a, b in zip(one.get_kv(1, pad_slots(loc)), many.get_kv(1, pad_slots(loc))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(one.buffers.k), np.asarray(many.buffers.k))
        np.testing.assert_array_equal(np.asarray(one.buffers.v), np.asarray(many.buffers.v))
    print("SHARDED-OK")
    """
)


# The setters refuse buffers that the next donated update could not use in place: before,
# a mesh pool took single-device or uncommitted buffers and then failed in jit (bare
# ValueError, the pool stuck) or resharded them by a whole-cache copy (donation silently
# gone), and a pool on device 2 took buffers on device 0.
SETTERS = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("error")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pymllm.mem_cache.errors import InvalidValueError
    from pymllm.mem_cache.memory_pool import KVBuffers, KVPool, MambaBuffers, MambaPool
    devs = jax.devices()
    assert len(devs) == 4, devs

    def refused(pool, new, why):
        before = pool.buffers
        try:
            pool.buffers = new
        except InvalidValueError as exc:
            assert "buffers." in str(exc), exc
        else:
            raise AssertionError("accepted buffers " + why)
        assert pool.buffers is before and not before[0].is_deleted(), why

    def still_donates(pool):
        old = pool.buffers
        if isinstance(pool, KVPool):
            k = np.ones((1, pool.head_num, pool.head_dim), np.float32)
            pool.set_kv_buffer(0, [1], k, k)
        else:
            pool.reset_states([1])
        assert old[0].is_deleted() and old[1].is_deleted()

    mesh = Mesh(np.array(devs), ("tp",))
    for heads in (8, 1):  # 8: head-sharded; 1: replicated
        pool = KVPool(64, 2, heads, 16, mesh=mesh, dtype=jnp.float32)
        shapes = (pool.k_shape, pool.v_shape)
        on = lambda d: KVBuffers(*(jax.device_put(np.zeros(s, np.float32), d) for s in shapes))
        refused(pool, on(devs[1]), "on one device of the mesh")
        refused(pool, KVBuffers(jnp.zeros(pool.k_shape), jnp.zeros(pool.v_shape)), "uncommitted")
        refused(pool, on(NamedSharding(mesh, P(None, None, None, "tp"))), "sharded otherwise")
        flipped = Mesh(np.array(devs[::-1]), ("tp",))
        refused(pool, on(NamedSharding(flipped, pool.shardings.k.spec)), "on a reordered mesh")
        still_donates(pool)
        # what a model step returns (no out_shardings: jit keeps the input's sharding) is taken
        pool.buffers = jax.jit(lambda b: KVBuffers(b.k + 1, b.v + 1))(pool.buffers)
        still_donates(pool)

    single = KVPool(64, 1, 2, 4, dtype=jnp.float32, device=devs[2])
    b = single.buffers
    refused(single, KVBuffers(*(jax.device_put(np.asarray(x), devs[0]) for x in b)), "of device 0")
    refused(single, KVBuffers(jnp.zeros(single.k_shape), jnp.zeros(single.v_shape)), "uncommitted")
    single.buffers = KVBuffers(*(jax.device_put(np.asarray(x), devs[2]) for x in b))
    still_donates(single)

    mamba = MambaPool(4, 1, (2,), (3,), conv_dtype=jnp.float32, device=devs[1])
    m = mamba.buffers
    refused(mamba, MambaBuffers(*(jax.device_put(np.asarray(x), devs[0]) for x in m)), "dev 0")
    mamba.buffers = MambaBuffers(*(jax.device_put(np.asarray(x), devs[1]) for x in m))
    still_donates(mamba)
    print("SETTERS-OK")
    """
)

# mem_bytes on a mesh: bytes held on every device, and on the most loaded one.
MEM_BYTES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from pymllm.mem_cache.memory_pool import KVPool
    devs = jax.devices()
    meshes = [Mesh(np.array(devs), ("tp",)), Mesh(np.array(devs).reshape(2, 2), ("dp", "tp"))]
    for mesh in meshes:
        for hk, hv in [(8, 8), (1, 4), (6, 2)]:
            pool = KVPool(
                100, 3, hk, 8, v_head_num=hv, v_head_dim=4, dtype=jnp.float32,
                mesh=mesh, head_axis="tp",
            )
            per_dev = {d: 0 for d in devs}
            for buf in pool.buffers:
                for shard in buf.addressable_shards:
                    per_dev[shard.device] += shard.data.nbytes
            got = (pool.mem_bytes(), pool.mem_bytes_per_device())
            want = (sum(per_dev.values()), max(per_dev.values()))
            assert got == want, (mesh, hk, hv, got, want)
    one = KVPool(100, 3, 1, 8, v_head_num=4, v_head_dim=4, dtype=jnp.float32)
    assert one.mem_bytes() == one.mem_bytes_per_device() == 3 * 101 * (8 + 16) * 4
    print("MEM-BYTES-OK")
    """
)

SCRIPTS = {
    "test_sharded_over_four_devices_matches_one_device": (SHARDED, "SHARDED-OK"),
    "test_setters_refuse_buffers_of_another_sharding_or_device": (SETTERS, "SETTERS-OK"),
    "test_mem_bytes_counts_what_every_device_holds": (MEM_BYTES, "MEM-BYTES-OK"),
}


@pytest.fixture(scope="module", autouse=True)
def four_device_runs(
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Starts the 4-device checks in subprocesses as this module begins, so that they run
    beside the other tests (XLA_FLAGS must be set before jax initializes: a fresh process)."""
    wanted = {item.name for item in request.session.items} & set(SCRIPTS)
    env = child_env()
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", SCRIPTS[name][0]],
            env=env,
            # not the repo root: `python -c` puts the cwd first on sys.path, and the source
            # tree's pymllm (without compiled modules) would shadow the installed one
            cwd=os.path.dirname(os.path.abspath(__file__)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in sorted(wanted)
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _four_device_check(runs: dict[str, subprocess.Popen[str]], name: str) -> None:
    out, err = runs[name].communicate(timeout=180)
    assert runs[name].returncode == 0 and SCRIPTS[name][1] in out, err[-4000:]


def test_sharded_over_four_devices_matches_one_device(
    four_device_runs: dict[str, subprocess.Popen[str]],
) -> None:
    _four_device_check(four_device_runs, "test_sharded_over_four_devices_matches_one_device")


def test_setters_refuse_buffers_of_another_sharding_or_device(
    four_device_runs: dict[str, subprocess.Popen[str]],
) -> None:
    _four_device_check(
        four_device_runs, "test_setters_refuse_buffers_of_another_sharding_or_device"
    )


def test_mem_bytes_counts_what_every_device_holds(
    four_device_runs: dict[str, subprocess.Popen[str]],
) -> None:
    _four_device_check(four_device_runs, "test_mem_bytes_counts_what_every_device_holds")
