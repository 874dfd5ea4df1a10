"""The pools under ``jax.transfer_guard``: a pool call's own host-to-device transfers (its
slot lists, host K/V and states) are explicit, so a guard on implicit transfers
(``"disallow"``, ``"log"``) lets them through silently, while an ``*_explicit`` level
refuses them with the pool unchanged. The caller's own transfers stay guarded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache.memory_pool import KVPool, MambaPool, scatter_rows

_K = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
_CONV = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
_TEMPORAL = np.arange(6, dtype=np.float32).reshape(2, 3, 1)


def _pools() -> tuple[KVPool, MambaPool]:
    return (
        KVPool(16, 2, 2, 4, dtype=jnp.float32),
        MambaPool(8, 2, (4,), (1,), conv_dtype=jnp.float32, temporal_dtype=jnp.float32),
    )


def _kv_calls(pool: KVPool) -> dict[str, Callable[[], Any]]:
    return {
        "set_kv_buffer": lambda: pool.set_kv_buffer(1, [3, 4, 5], _K, -_K),
        "set_kv_all": lambda: pool.set_kv_all([6, 7, 8], np.stack([_K, _K]), np.stack([_K, _K])),
        "get_kv": lambda: pool.get_kv(1, [3, 4, 5]),
        "get_kv_all": lambda: pool.get_kv_all(np.array([3, 6])),
        "copy": lambda: pool.copy([3, 4], [9, 10]),
    }


def _mamba_calls(pool: MambaPool) -> dict[str, Callable[[], Any]]:
    return {
        "set_states": lambda: pool.set_states([1, 2, 3], _CONV, _TEMPORAL),
        "copy_states": lambda: pool.copy_states([1], [4]),
        "reset_states": lambda: pool.reset_states([2]),
        "get_states": lambda: pool.get_states([1, 2, 3, 4]),
    }


def _run_all(level: str | None) -> list[Any]:
    """Every pool call in order, under *level* (None: no guard); what each returned."""
    kv, mamba = _pools()
    calls = [*_kv_calls(kv).values(), *_mamba_calls(mamba).values()]
    calls.append(lambda: scatter_rows(np.array([0, 5, 2], np.int32), 16))
    out = []
    for call in calls:
        if level is None:
            out.append(call())
        else:
            with jax.transfer_guard(level):
                out.append(call())
    out.append(kv.buffers)
    out.append(mamba.buffers)
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(out)]


@pytest.mark.parametrize("level", ["disallow", "log"])
def test_pool_calls_run_under_a_guard_on_implicit_transfers(
    level: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before, every slot-taking call failed under "disallow" with JAX's bare
    ``JaxRuntimeError`` (the slot list was an implicit transfer) and logged under "log"."""
    want = _run_all(None)
    capfd.readouterr()
    got = _run_all(level)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert "transfer" not in capfd.readouterr().err


def test_the_callers_own_transfers_stay_guarded() -> None:
    """The pool lifts the guard for its own call only: the caller's implicit transfer right
    after it is still refused."""
    kv, _ = _pools()
    with jax.transfer_guard("disallow"):
        kv.set_kv_buffer(0, [1], _K[:1], _K[:1])
        with pytest.raises(jax.errors.JaxRuntimeError, match="host-to-device"):
            jnp.add(np.ones(3, np.float32), 1.0)
        assert cast(Any, jax.config).jax_transfer_guard_host_to_device == "disallow"


@pytest.mark.parametrize("call", [*_kv_calls(_pools()[0]), *_mamba_calls(_pools()[1])])
def test_a_guard_on_explicit_transfers_refuses_and_changes_nothing(call: str) -> None:
    """Under "disallow_explicit" a pool call is refused as ``jax.device_put`` would be; the
    pool keeps its buffers and its contents, and works once the guard is gone."""
    kv, mamba = _pools()
    kv.set_kv_all([1, 2, 3], np.stack([_K, _K]), np.stack([_K, _K]))
    mamba.set_states([1, 2, 3], _CONV, _TEMPORAL)
    calls = {**_kv_calls(kv), **_mamba_calls(mamba)}
    before = [np.asarray(x) for x in (*kv.buffers, *mamba.buffers)]
    with jax.transfer_guard("disallow_explicit"), pytest.raises(jax.errors.JaxRuntimeError):
        calls[call]()
    after = [np.asarray(x) for x in (*kv.buffers, *mamba.buffers)]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    calls[call]()


_K = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
_CONV = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
_TEMPORAL = np.arange(6, dtype=np.float32).reshape(2, 3, 1)


def test_pool_calls_run_under_a_host_to_device_guard_alone() -> None:
    """``jax.transfer_guard_host_to_device("disallow")`` guards exactly the transfers a pool
    call makes explicitly (its slot lists): the calls run as under ``jax.transfer_guard``."""
    kv = KVPool(16, 2, 2, 4, dtype=jnp.float32)
    mamba = MambaPool(8, 2, (4,), (1,), conv_dtype=jnp.float32, temporal_dtype=jnp.float32)
    with jax.transfer_guard_host_to_device("disallow"):
        kv.set_kv_buffer(1, [3, 4, 5], _K, -_K)
        k, v = kv.get_kv(1, [3, 4, 5])
        kv.copy([3], [9])
        mamba.set_states([1, 2, 3], _CONV, _TEMPORAL)
        conv = mamba.get_states([2]).conv
        rows = scatter_rows(np.array([0, 5, 2], np.int32), 16)
    np.testing.assert_array_equal(np.asarray(k), _K)
    np.testing.assert_array_equal(np.asarray(v), -_K)
    np.testing.assert_array_equal(np.asarray(kv.get_kv(1, [9])[0]), _K[:1])
    np.testing.assert_array_equal(np.asarray(conv), _CONV[:, 1:2])
    assert np.asarray(rows).tolist() == [16, 5, 2]


def test_a_device_to_host_guard_alone_does_not_lift_the_host_to_device_one() -> None:
    """Only the host-to-device level decides: a pool call under a guard on device-to-host
    transfers and ``"disallow_explicit"`` host-to-device is still refused."""
    kv = KVPool(16, 1, 2, 4, dtype=jnp.float32)
    with (
        jax.transfer_guard_device_to_host("disallow"),
        jax.transfer_guard_host_to_device("disallow_explicit"),
        pytest.raises(jax.errors.JaxRuntimeError, match="host-to-device"),
    ):
        kv.get_kv(0, [1])
