"""The pools check a caller's slot array in place (``_slots`` returns the caller's int32
array itself), then run Python code (the K/V or state arguments' ``shape``, ``dtype`` and
``__array__``; a collection started by an allocation, and with it ``gc.callbacks``) before
``_pad`` copies the slots for the jitted update. A slot changed in between is written
unchecked: -1 wraps onto the pool's last row, another slot's KV or state."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from conftest import Flip, collection_inside  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import KVPool, MambaPool, pad_slots, scatter_rows


def _kv_pool() -> tuple[KVPool, int]:
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    last = pool.rows - 1
    nine = np.full((1, 1, 2), 9.0, np.float32)
    pool.set_kv_buffer(0, np.array([last], np.int32), nine, nine)
    return pool, last


def test_kv_write_slots_changed_by_k_shape_are_not_written() -> None:
    pool, last = _kv_pool()
    loc = np.array([1], np.int32)
    ones = np.ones((1, 1, 2), np.float32)

    class K:
        dtype = np.dtype(np.float32)

        @property
        def shape(self) -> tuple[int, ...]:
            loc[0] = -1  # after loc was checked
            return ones.shape

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return ones

    try:
        pool.set_kv_buffer(0, loc, K(), ones)
    except InvalidValueError:
        pass
    k, _ = pool.get_kv(0, np.array([last], np.int32))
    assert np.asarray(k).tolist() == [[[9.0, 9.0]]]  # the last slot's row is untouched


def test_kv_copy_destination_changed_after_its_check_is_not_written() -> None:
    pool, last = _kv_pool()
    dst = np.array([2], np.int32)

    def rewrite() -> None:
        dst[0] = -1

    with collection_inside("_live_buffers", rewrite):  # after _check_distinct
        try:
            pool.copy(np.array([1], np.int32), dst)
        except InvalidValueError:
            pass
    k, _ = pool.get_kv(0, np.array([last], np.int32))
    assert np.asarray(k).tolist() == [[[9.0, 9.0]]]


def test_mamba_state_slots_changed_by_conv_array_are_not_written() -> None:
    pool = MambaPool(4, 1, (2,), (2,), conv_dtype=jnp.float32)
    pool.alloc(4)
    nine = np.full((1, 1, 2), 9.0, np.float32)
    pool.set_states(np.array([4], np.int32), nine, nine)
    slots = np.array([1], np.int32)
    ones = np.ones((1, 1, 2), np.float32)

    class Conv:
        dtype = np.dtype(np.float32)
        shape = ones.shape

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            slots[0] = -1  # after the slots were checked
            return ones

    try:
        pool.set_states(slots, Conv(), ones)
    except InvalidValueError:
        pass
    got = pool.get_states(np.array([4], np.int32))
    assert np.asarray(got.conv).tolist() == [[[9.0, 9.0]]]  # state slot 4 untouched


def test_pad_slots_never_returns_a_slot_its_check_refuses() -> None:
    loc = np.array([3, 4], np.int32)

    class Size:
        def __index__(self) -> int:
            loc[0] = -5  # after loc was checked
            return 16

    try:
        out = pad_slots(loc, Size())
    except InvalidValueError:
        return
    assert (out >= 0).all(), out


def test_scatter_rows_refuses_a_bool_however_often_it_reads_the_slots() -> None:
    # scatter_rows checks a list for bools on one read and converts it on another
    probe = Flip([3, 4], [True, 4], 1 << 30)
    scatter_rows([probe], 8)
    try:
        got = scatter_rows([Flip([3, 4], [True, 4], probe.reads)], 8)
    except InvalidValueError:
        return
    assert np.asarray(got).tolist() == [[3, 4]]  # never True read as row 1
