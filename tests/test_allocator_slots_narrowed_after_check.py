"""The allocators' general slot path (``_as_int32_slots``) checks a 64-bit array's range
with numpy (``np.flatnonzero``, Python code: a collection, and with it ``gc.callbacks``,
may run there), then narrows the caller's array with ``astype(np.int32)``, which wraps.
A slot rewritten to ``2**32 + 3`` in between is narrowed to slot 3: ``free`` then frees a
slot the caller never listed (another request's), where it should refuse the slot or free
the one checked. And ``_integer_array`` checks a nested sequence for bools on one read and
converts it on another: an item that reads as a bool the second time becomes slot 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import Flip, collection_inside  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidFreeError, InvalidValueError

WRAPS_TO_3 = (1 << 32) + 3


def _rewritten_inside_the_range_check(call: Callable[[np.ndarray], Any]) -> Any:
    idx = np.array([1], np.int64)

    def rewrite() -> None:
        idx[0] = WRAPS_TO_3

    with collection_inside("flatnonzero", rewrite):
        try:
            return call(idx)
        except (InvalidFreeError, InvalidValueError):
            return "refused"


@pytest.mark.parametrize("swa", [False, True])
def test_free_never_frees_a_slot_the_caller_did_not_list(swa: bool) -> None:
    a = SWATokenToKVPoolAllocator(16, 16) if swa else TokenToKVPoolAllocator(16)
    a.alloc(4)  # slots 1..4, say four requests' tokens
    _rewritten_inside_the_range_check(a.free)
    assert a.is_allocated([3]).tolist() == [True]  # slot 3 was never passed to free
    a._check_invariants()


def test_free_swa_never_frees_a_slot_the_caller_did_not_list() -> None:
    a = SWATokenToKVPoolAllocator(16, 16)
    a.alloc(4)
    _rewritten_inside_the_range_check(a.free_swa)
    assert a.translate_loc_from_full_to_swa([3]).tolist() != [0]  # slot 3's SWA side kept


def test_alloc_prefix_is_the_prefix_checked() -> None:
    a = TokenToKVPoolAllocator(16)
    a.alloc(4)
    out = _rewritten_inside_the_range_check(lambda idx: a.alloc(2, prefix=idx))
    assert isinstance(out, str) or out[0] == 1, out


def test_a_bool_read_on_the_conversion_is_refused_like_one_read_on_the_check() -> None:
    a = TokenToKVPoolAllocator(16)
    a.alloc(1)  # slot 1 allocated, 3 and 4 free
    probe = Flip([3, 4], [True, 4], 1 << 30)
    a.is_allocated([probe])
    try:
        got = a.is_allocated([Flip([3, 4], [True, 4], probe.reads)])
    except InvalidValueError:
        return
    assert got.tolist() == [False, False]  # slots 3 and 4, never True read as slot 1
