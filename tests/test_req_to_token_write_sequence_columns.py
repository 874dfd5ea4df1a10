"""``ReqToTokenPool.write`` reads a column sequence that is no list (numpy reads it item
by item) once: the items it checks for bools are the items it writes at, so a sequence
that gives a bool on a later read never has it read as column 1."""

from __future__ import annotations

import pytest
from conftest import Flip  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import ReqToTokenPool


@pytest.mark.parametrize("at", range(1, 7))
def test_a_bool_on_any_read_of_the_columns_is_never_column_1(at: int) -> None:
    pool = ReqToTokenPool(4, 8)
    cols = Flip([2, 3], [True, 3], at)  # ints until the at-th read, a bool from then on
    try:
        pool.write((1, cols), [5, 6])
    except InvalidValueError:
        return
    assert pool.req_to_token[1].tolist() == [0, 0, 5, 6, 0, 0, 0, 0]
