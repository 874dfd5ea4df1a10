"""bench/conftest.py's keep_freed_memory: the benchmarks' rounds must not pay for page faults
of memory that glibc handed back to the OS between rounds (a fresh process each case: the
setting is process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env  # tests/ is on sys.path (rootdir conftest)

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Mallocs a 1 MiB block and prints how many more blocks glibc serves by mmap after it: with
# glibc's defaults a block that size is mmap'ed (and unmapped again on free), with the
# setting it comes from the heap, which keeps freed memory.
PROBE = f"""
import ctypes, ctypes.util, sys
sys.path.insert(0, {str(BENCH)!r})
import conftest

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                "keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
took = conftest.keep_freed_memory()
before = libc.mallinfo2().hblks
p = libc.malloc(1 << 20)
print(took, libc.mallinfo2().hblks - before)
libc.free(p)
"""


def _probe(malloc_env: str | None, cwd: Path) -> tuple[str, int]:
    env = child_env()
    env.pop("PYMLLM_BENCH_MALLOC", None)
    if malloc_env is not None:
        env["PYMLLM_BENCH_MALLOC"] = malloc_env
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=cwd,  # not the checkout: `-c` puts the cwd first on sys.path, before the install
    )
    assert out.returncode == 0, out.stderr
    took, mmapped = out.stdout.split()
    return took, int(mmapped)


pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's"
)


def test_the_benchmarks_keep_large_blocks_on_the_heap(tmp_path: Path) -> None:
    assert _probe(None, tmp_path) == ("True", 0)


def test_default_leaves_glibc_as_it_is(tmp_path: Path) -> None:
    assert _probe("default", tmp_path) == ("False", 1)
