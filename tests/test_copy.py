"""The int32 copy routine of the compiled modules (pyx/pymllm/mem_cache/_copy.pxd).

It copies with memcpy except when the destination starts 1-63 bytes past the source modulo
4 KiB on an AMD x86-64 processor, where it copies forward in 128-byte steps (glibc's memcpy
is ~30x slower there on AMD Zen). Every test here runs with the stepped loop forced on and
forced off in both compiled modules, so both paths, and the step loop's tail, are checked to
copy exactly the source on any machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest

from pymllm.mem_cache import _allocator, _radix_tree
from pymllm.mem_cache._allocator import _copy_int32
from pymllm.mem_cache.errors import InvalidValueError


@pytest.fixture(autouse=True, params=[1, 0], ids=["stepped", "memcpy"])
def copy_mode(request):
    """Force the aliasing window's copy in both modules; restore the vendor default after."""
    _allocator._copy_set_mode(request.param)
    _radix_tree._copy_set_mode(request.param)
    yield request.param
    _allocator._copy_set_mode(-1)
    _radix_tree._copy_set_mode(-1)


def _cpu_vendor() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def test_default_mode_follows_the_cpu_vendor(copy_mode):
    """The stepped loop is the default on AMD x86-64 only (on Intel glibc's copy has no
    such cliff and the loop was the slower one); set_mode reports the mode it replaces."""
    vendor = _cpu_vendor()
    if (
        platform.machine() not in ("x86_64", "AMD64")
        or vendor is None
        or os.environ.get("PYMLLM_UNDER_VALGRIND")  # its CPU is not /proc/cpuinfo's
    ):
        expect = None  # no vendor to compare with: only check the modes round-trip
    else:
        expect = 1 if vendor == "AuthenticAMD" else 0
    for mod in (_allocator, _radix_tree):
        assert mod._copy_set_mode(-1) == copy_mode  # what the fixture forced
        default = mod._copy_set_mode(-1)
        if expect is not None:
            assert default == expect, f"{mod.__name__}: vendor {vendor}"
        assert mod._copy_set_mode(1 - default) == default
        assert mod._copy_set_mode(copy_mode) == 1 - default


def _page_aligned(n_int32: int) -> tuple[np.ndarray, int]:
    """A zeroed int32 buffer and the index of its first element on a 4 KiB boundary."""
    buf = np.zeros(n_int32 + 1024, dtype=np.int32)
    return buf, (-buf.ctypes.data) % 4096 // 4


# 511/512/513: the size below which memcpy is always used; 543/544: a 128-byte step plus
# tails of 31 and 0 int32s
LENGTHS = [0, 1, 7, 8, 31, 32, 33, 511, 512, 513, 543, 544, 1024, 4099]


@pytest.mark.parametrize("n", LENGTHS)
def test_copy_matches_source_at_every_offset(n):
    """Destination 0..128 bytes past the source modulo 4 KiB (step 4: int32 alignment),
    which covers the stepped path (4..60) and memcpy on both sides of it."""
    rng = np.random.default_rng(n)
    buf, base = _page_aligned(4 * n + 8192)
    src_at = base + 4  # the source itself off the page boundary
    src = buf[src_at : src_at + n]
    src[:] = rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32)
    expect = src.copy()
    # the destination starts whole pages later (so the two never overlap), plus the offset
    pages_later = src_at + (n // 1024 + 2) * 1024
    for off in range(0, 33):
        at = pages_later + off
        dst = buf[at : at + n]
        before, after = buf[:at].copy(), buf[at + n :].copy()
        dst[:] = -7
        _copy_int32(dst, src)
        assert np.array_equal(dst, expect), f"offset {4 * off} bytes"
        assert np.array_equal(src, expect)
        assert np.array_equal(buf[at + n :], after), "wrote past the end"
        assert np.array_equal(buf[:at], before), "wrote before the start"


@pytest.mark.parametrize(
    ("dst", "src", "match"),
    [
        (np.zeros(4, np.int64), np.zeros(4, np.int32), "dst: expected"),
        (np.zeros(4, np.int32), np.zeros(4, np.uint32), "src: expected"),
        (np.zeros(4, np.int32), np.zeros(4, ">i4"), "src: expected"),
        (np.zeros((2, 2), np.int32), np.zeros(4, np.int32), "dst: expected"),
        (np.zeros(8, np.int32)[::2], np.zeros(4, np.int32), "dst: expected"),
        (np.zeros(4, np.int32), np.zeros(5, np.int32), "differ in length"),
    ],
)
def test_copy_rejects_bad_arrays(dst, src, match):
    keep = dst.copy()
    with pytest.raises(InvalidValueError, match=match):
        _copy_int32(dst, src)
    assert np.array_equal(dst, keep)


def test_copy_rejects_read_only_and_overlap():
    buf = np.arange(16, dtype=np.int32)
    ro = np.zeros(4, np.int32)
    ro.flags.writeable = False
    with pytest.raises(InvalidValueError, match="read-only"):
        _copy_int32(ro, buf[:4])
    with pytest.raises(InvalidValueError, match="overlap"):
        _copy_int32(buf[2:10], buf[:8])
    with pytest.raises(InvalidValueError, match="overlap"):
        _copy_int32(buf[:8], buf[7:15])
    assert np.array_equal(buf, np.arange(16, dtype=np.int32))
    _copy_int32(buf[:8], buf[8:])  # adjacent is fine
    assert np.array_equal(buf[:8], np.arange(8, 16, dtype=np.int32))
    with pytest.raises(TypeError):
        _copy_int32(None, buf)


def test_split_moves_the_tail_at_a_4k_aliasing_shift():
    """A split at 1,020 tokens moves the lower half's tail down by 4,080 bytes: 16 bytes
    short of 4 KiB, the window where the move runs forward in 128-byte steps (with memmove it
    was rep movsb's slow case). Both halves must keep exactly their tokens and slots."""
    from pymllm.mem_cache import RadixCache, RadixKey

    rng = np.random.default_rng(7)
    key = rng.integers(0, 50_000, 3000, dtype=np.int32)
    slots = np.arange(1, 3001, dtype=np.int32)
    cache = RadixCache()
    cache.insert(RadixKey(key), slots)
    other = key[:1100].copy()
    other[1020:] += 1  # diverges at 1,020: the node splits there
    m = cache.match_prefix(RadixKey(other))
    assert m.prefix_len == 1020
    assert np.array_equal(m.indices, slots[:1020])
    lower = next(iter(cache.children(m.last_node)))
    assert np.array_equal(lower.key, key[1020:])
    assert np.array_equal(lower.value, slots[1020:])
    full = cache.match_prefix(RadixKey(key))
    assert full.prefix_len == 3000 and np.array_equal(full.indices, slots)
    cache._check_invariants()


def test_allocator_compaction_at_a_4k_aliasing_shift():
    """The allocator (need_sort=False) compacts its free list when its tail runs out: with
    5,116 entries taken from the head (20,464 bytes: 16 short of 5 x 4 KiB) the live entries
    move down in the aliasing window. The free order must survive the move."""
    from collections import deque

    from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

    n = 4096
    alloc = TokenToKVPoolAllocator(n, need_sort=False)
    model = deque(range(1, n + 1))  # the free list, in the order alloc hands slots out

    def take(k):
        got = alloc.alloc(k)
        expect = [model.popleft() for _ in range(k)]
        assert got.tolist() == expect
        return got

    def give(slots):
        alloc.free(slots)
        model.extend(slots.tolist())

    first = take(4000)
    give(first)  # the free list's tail reaches 8,096 of its 8,192 entries
    second = take(1116)  # its head reaches 5,116
    give(second)  # no room at the tail: the 2,980 live entries move down 5,116 places
    assert alloc.available_size() == n
    alloc._check_invariants()
    take(n)  # every slot, in the model's order
    assert alloc.available_size() == 0
