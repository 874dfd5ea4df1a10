"""``ReqToTokenPool.write`` reads each slice bound's ``__index__`` once: the rows it
checks are the rows it writes, so a bound that reads differently the second time never
reaches the padding row 0; a bound that is no integer is ``InvalidValueError``, as any
other bad index is."""

from __future__ import annotations

import pytest

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import ReqToTokenPool


class Drifting:
    """An index that reads *first* once, then *later* on every further read."""

    def __init__(self, first: int, later: int) -> None:
        self.first, self.later, self.reads = first, later, 0

    def __index__(self) -> int:
        self.reads += 1
        return self.first if self.reads == 1 else self.later


def test_a_row_slice_bound_is_read_once() -> None:
    pool = ReqToTokenPool(4, 8)
    start = Drifting(1, 0)
    try:
        pool.write((slice(start, 3), slice(0, 2)), 9)
    except InvalidValueError:
        pass
    assert not pool.req_to_token[0].any()  # the padding row stays zero
    assert start.reads == 1


@pytest.mark.parametrize(
    "index",
    [(1, slice(0, 2.5)), (slice(0.5, 3), slice(0, 2)), (1, slice("a", 2))],
)
def test_a_slice_bound_that_is_no_int_is_a_typed_error(index: tuple[object, ...]) -> None:
    pool = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError):
        pool.write(index, [1, 2])
    assert not pool.req_to_token.any()
