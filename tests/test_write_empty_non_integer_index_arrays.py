"""``ReqToTokenPool.write`` reads an empty list or tuple of rows or columns as no rows or
columns, as numpy does, but an empty numpy array of a non-integer dtype is not an index
numpy takes (``IndexError``): it is refused with ``InvalidValueError``, as a non-empty one
of the same dtype is."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import ReqToTokenPool

NON_INTEGER_DTYPES = [np.float64, np.float32, object, "U1", np.complex128]


@pytest.mark.parametrize("dtype", NON_INTEGER_DTYPES)
def test_an_empty_non_integer_array_of_columns_is_refused(dtype: object) -> None:
    table = np.zeros((5, 8), np.int32)
    with pytest.raises(IndexError):
        table[1, np.array([], dtype=dtype)] = []  # numpy refuses it
    pool = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError):
        pool.write((1, np.array([], dtype=dtype)), [])


@pytest.mark.parametrize("dtype", NON_INTEGER_DTYPES)
def test_an_empty_non_integer_array_of_rows_is_refused(dtype: object) -> None:
    pool = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError):
        pool.write(np.array([], dtype=dtype), np.zeros((0, 8), np.int32))


@pytest.mark.parametrize("cols", [[], (), [[]]])
def test_an_empty_list_or_tuple_of_columns_still_writes_nothing(cols: object) -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((1, cols), [])
    assert not pool.req_to_token.any()
