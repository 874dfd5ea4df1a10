"""``ReqToTokenPool.write`` checks its rows and values, then hands ``index`` and the
checked array to numpy's assignment, which reads them again after Python code ran: an
index part's ``__index__`` (a column, a slice bound) may rewrite the caller's arrays, and a
sequence is read once more by numpy. What the checks refuse (row 0, a negative KV slot, a
KV slot past int32, a bool) must never land in the table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import Flip  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import ReqToTokenPool


def _pool() -> ReqToTokenPool:
    pool = ReqToTokenPool(4, 8)
    pool.alloc(2)  # request slots 1 and 2
    return pool


def _write_or_refuse(pool: ReqToTokenPool, index: Any, values: Any) -> bool:
    """Whether the write went through (False: refused, nothing written)."""
    before = pool.req_to_token.copy()
    try:
        pool.write(index, values)
    except InvalidValueError:
        assert (pool.req_to_token == before).all()
        return False
    return True


@pytest.mark.parametrize("bad", [-7, (1 << 32) + 9])
def test_values_rewritten_by_a_column_index_are_not_written(bad: int) -> None:
    pool = _pool()
    vals = np.array([5, 6], dtype=np.int64)

    class Col:
        def __index__(self) -> int:
            vals[0] = bad
            return 0

    if _write_or_refuse(pool, (1, slice(Col(), 2)), vals):
        assert pool.req_to_token[1, :2].tolist() == [5, 6]
    assert (pool.req_to_token >= 0).all()


def test_rows_rewritten_by_a_column_index_do_not_write_the_padding_row() -> None:
    pool = _pool()
    row = np.array([1])

    class Col:
        def __index__(self) -> int:
            row[0] = 0
            return 0

    if _write_or_refuse(pool, (row, Col()), 5):
        assert pool.req_to_token[1, 0] == 5
    assert not pool.req_to_token[0].any()  # row 0 pads every batch: all zeros


def test_rows_read_again_by_numpy_do_not_write_the_padding_row() -> None:
    # how often the call reads the rows, then a sequence whose last read gives row 0
    probe = Flip([1], [0], 1 << 30)
    _pool().write(probe, np.arange(1, 9))
    pool = _pool()
    if _write_or_refuse(pool, Flip([1], [0], probe.reads), np.arange(1, 9)):
        assert pool.req_to_token[1].tolist() == list(range(1, 9))
    assert not pool.req_to_token[0].any()


def test_a_bool_in_a_nested_sequence_read_again_is_not_written() -> None:
    index = (slice(1, 2), slice(0, 2))
    probe = Flip([3, 4], [True, 4], 1 << 30)
    _pool().write(index, [probe])
    pool = _pool()
    if _write_or_refuse(pool, index, [Flip([3, 4], [True, 4], probe.reads)]):
        assert pool.req_to_token[1, :2].tolist() == [3, 4]  # never True read as slot 1
