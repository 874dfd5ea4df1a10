"""A slot list that numpy reads as an object array (an int mixed with an ``np.uint64``)
is checked item by item; an int subclass among them is checked by its value, so the slot
used afterwards must be that value too, never what the subclass's ``__int__`` or
``__index__`` says when numpy converts the checked array."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import ReqToTokenPool


class Lying(int):
    """An int whose conversions answer -1 (another slot: the last row, from the end)."""

    def __int__(self) -> int:
        return -1

    def __index__(self) -> int:
        return -1


def _slots() -> list[object]:
    return [Lying(2), np.uint64(3)]  # no common integer dtype: an object array


def test_write_never_stores_a_value_other_than_the_one_checked() -> None:
    pool = ReqToTokenPool(4, 8)
    try:
        pool.write((1, slice(0, 2)), _slots())
    except InvalidValueError:
        return
    assert pool.req_to_token[1, :2].tolist() == [2, 3]


def test_to_device_never_gathers_a_row_other_than_the_one_checked() -> None:
    pool = ReqToTokenPool(4, 8)
    pool.write((4, slice(0, 2)), [7, 7])  # another request's row, the last one
    try:
        rows = np.asarray(pool.to_device(_slots()))
    except InvalidValueError:
        return
    assert rows[0].tolist() == [0] * 8  # row 2, not row -1 (request 4's)


_TRANSLATE = r"""
import numpy as np
from pymllm.mem_cache import SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidValueError


class Lying(int):
    def __int__(self):
        return BAD

    def __index__(self):
        return BAD


a = SWATokenToKVPoolAllocator(16, 16)
a.alloc(4)
want = a.translate_loc_from_full_to_swa([2, 3]).tolist()
try:
    got = a.translate_loc_from_full_to_swa([Lying(2), np.uint64(3)]).tolist()
except InvalidValueError:
    print("refused")
else:
    print("same" if got == want else f"other {got}")
"""


@pytest.mark.parametrize("bad", [1 << 40, -(1 << 40)])
def test_translate_never_reads_a_slot_other_than_the_one_checked(bad: int) -> None:
    # a child process: a slot read past the mapping may crash it
    out = run_child(f"BAD = {bad}\n" + textwrap.dedent(_TRANSLATE), timeout=120)
    assert out.split() in (["refused"], ["same"]), out
