"""``ReqToTokenPool.write`` takes numpy's index forms for its columns: an empty list or
tuple of columns (a request with no new positions) writes nothing, and an object with
``__index__`` is one column, as numpy reads them."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache.memory_pool import ReqToTokenPool


class Column:
    """An integer-like column index that is not an int (numpy calls ``__index__``)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.parametrize("cols", [[], ()])
def test_an_empty_list_of_columns_writes_nothing(cols: list[int] | tuple[int, ...]) -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((1, slice(0, 3)), [7, 8, 9])
    pool.write((1, cols), [])  # numpy reads [] as no columns, as it reads np.array([], int)
    assert pool.req_to_token[1].tolist() == [7, 8, 9, 0, 0, 0, 0, 0]


def test_an_empty_list_of_columns_matches_an_empty_int_array() -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((1, np.array([], np.int64)), [])
    pool.write((1, []), np.zeros(0, np.int32))
    assert not pool.req_to_token.any()


def test_a_column_with_index_is_one_column() -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((2, Column(3)), 5)
    expected = np.zeros(8, np.int64)
    expected[3] = 5
    assert pool.req_to_token[2].tolist() == expected.tolist()
