"""``SWATokenToKVPoolAllocator.translate_loc_from_full_to_swa`` checks the slots' range,
then runs Python code (numpy's ``require``, which allocates: the garbage collector, and
with it finalizers and ``gc.callbacks``, may run there, and another thread may take the
GIL) before it gathers ``mapping[slot]`` in C with no bound. A slot of the caller's array
changed in between is read out of bounds. Each case runs in a child process, so that a
crash fails one case."""

from __future__ import annotations

from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

_CODE = r"""
import gc
import sys

import numpy as np
from pymllm.mem_cache import SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidValueError

a = SWATokenToKVPoolAllocator(16, 16)
idx = a.alloc(4).astype(np.int64)  # int64, C-contiguous: read in place
fired = []


def rewrite_inside_require(phase, info):
    # a collection that starts inside the call, after the range check: the slot changes
    if phase != "start" or fired:
        return
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "require":
            idx[0] = BAD
            fired.append(True)
            return
        f = f.f_back


gc.callbacks.append(rewrite_inside_require)
gc.set_threshold(1)
try:
    out = a.translate_loc_from_full_to_swa(idx)
except InvalidValueError:
    print("refused", bool(fired))
else:
    gc.set_threshold(700)
    print("returned", bool(fired), bool(((out >= 0) & (out <= a.swa_size)).all()))
"""


def test_a_slot_changed_after_the_range_check_is_not_read_out_of_bounds() -> None:
    for bad in (1 << 40, -(1 << 40)):
        out = run_child(f"BAD = {bad}\n" + _CODE).split()
        assert out in (["refused", "True"], ["returned", "True", "True"]), out
