"""``SWATokenToKVPoolAllocator.translate_loc_from_full_to_swa`` reads the caller's int64
array in place. It sizes its result from the array's shape, then loops over
``PyArray_SIZE`` of the array read again after ``np.empty`` ran (Python code: a
collection, and with it ``gc.callbacks``): an array whose dtype the caller narrowed in
between (``idx.dtype = np.int16``: the same bytes, four times the elements) is read as
int64 past its end, and the result is written past its end. Each slot is bounded, not the
count. The array here is a view of a larger one whose next element holds a sentinel:
reading it shows the read past the end (which for a standalone array is heap memory, and
for a large one unmapped pages). Runs in a child process: the overrun writes out of bounds.
"""

from __future__ import annotations

from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

_CODE = r"""
import gc
import sys

import numpy as np
from pymllm.mem_cache import SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidValueError

N = 64
SENTINEL = 1 << 40
a = SWATokenToKVPoolAllocator(16, 16)
a.alloc(4)
SWA_OF_1 = int(a.translate_loc_from_full_to_swa([1])[0])
big = np.full(8 * N, SENTINEL, np.int64)
idx = big[:N]  # the caller's array: N int64 slots, then memory that is not its own
idx[:] = 1
narrow = [np.int32, np.int16, np.int8]
seen = []
keep = []


def inside_require():
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "require":
            return True
        f = f.f_back
    return False


def narrow_after_require(phase, info):
    if phase == "stop":
        if seen and narrow:
            # empty the tuple and dict free lists and count past the threshold: the next
            # tuple or dict the call makes (the result's shape, np.empty's arguments)
            # starts a collection
            keep.extend((i,) for i in range(5000))
            keep.extend({} for _ in range(200))
        return
    if inside_require():
        seen.append(True)
    elif seen and narrow:
        idx.dtype = narrow.pop(0)  # same bytes, more elements


gc.collect()
gc.callbacks.append(narrow_after_require)
gc.set_threshold(1)
try:
    out = a.translate_loc_from_full_to_swa(idx)
except InvalidValueError as exc:
    print("refused", str(SENTINEL) in str(exc))
else:
    # the slots of the array as checked (N ones), or of a narrowed view (ones and zeros)
    ok = out.size in (N, 2 * N, 4 * N, 8 * N) and set(out.tolist()) <= {0, SWA_OF_1}
    print("returned", ok)
finally:
    gc.set_threshold(700)
    gc.callbacks.remove(narrow_after_require)
"""


def test_translate_never_reads_past_an_array_narrowed_mid_call() -> None:
    out = run_child(_CODE)
    # refused (nothing read past the array), or the slots of the array in one of its states
    assert out.split() in (["refused", "False"], ["returned", "True"]), out
