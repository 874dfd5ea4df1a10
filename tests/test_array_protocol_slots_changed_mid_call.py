"""An object whose ``__array__`` hands over an array it keeps is the caller's array too:
the allocators check a 64-bit array's range (numpy code: a collection, and with it
``gc.callbacks``, may run there) and then narrow it to int32. A slot rewritten to
``2**32 + 3`` in between must be refused or freed as checked, never narrowed to slot 3."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import collection_inside  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidFreeError, InvalidValueError

WRAPS_TO_3 = (1 << 32) + 3


class Held:
    """Slots behind ``__array__``: numpy gets the array this object keeps."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.a


@pytest.mark.parametrize("swa", [False, True])
def test_free_through_array_protocol_never_frees_an_unlisted_slot(swa: bool) -> None:
    a = SWATokenToKVPoolAllocator(16, 16) if swa else TokenToKVPoolAllocator(16)
    a.alloc(4)  # slots 1..4
    held = Held(np.array([1], np.int64))

    def rewrite() -> None:
        held.a[0] = WRAPS_TO_3

    with collection_inside("flatnonzero", rewrite) as fired:
        try:
            a.free(held)
        except (InvalidFreeError, InvalidValueError):
            pass
    assert fired  # the rewrite ran inside the call
    assert a.is_allocated([3]).tolist() == [True]  # slot 3 was never passed to free
