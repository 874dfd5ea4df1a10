"""Seeded workloads shared by the benchmark suites, and a ratio summary at the end.

Each suite records the median of every timed case with :func:`record`; the terminal summary
prints, per group, every case's median and its ratio against the group's baseline, all from
the same run (medians of one run, never single times).
"""

from __future__ import annotations

import gc
import os
from collections import defaultdict

# numpy's OpenBLAS threads spin after any BLAS call and steal the second core from the
# timed code; nothing here needs BLAS threads (set before numpy is imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ctypes
import ctypes.util
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from pymllm.mem_cache import RadixKey
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator

# The pure-Python reference models live with the tests that use them as oracles
# (tests/reference_model.py, reference_swa.py, reference_mamba.py); the suites time against
# them too. Every bench module imports this one before them (pytest loads it first; the
# scripts import it by name), so the tests directory is on the path by then.
_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_FREED_ENV = "PYMLLM_BENCH_MALLOC"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    Every timed round builds a fresh cache and fills it (the filling is the workload, so
    setup cannot do it). With glibc's defaults a freed heap top over 128 KB goes back to
    the OS and blocks over 128 KB are mmap'ed, until glibc's adaptive thresholds rise, which
    depends on what ran earlier in the process. Then each round touches megabytes of fresh
    pages: on the development machine (a nested virtual machine, 5.5 us a page fault, about
    20x bare metal) the issue-2 workload took 0.46 faults a request and 1.5 us (numpy keys)
    to 4 us (list keys) more a request, in some rounds and not in others. A server keeps one
    cache for its lifetime and pays that once, so the benchmarks leave it out, for every
    implementation alike. ``PYMLLM_BENCH_MALLOC=default`` measures with glibc's defaults.
    Returns whether the setting took effect (glibc only)."""
    if os.environ.get(_KEEP_FREED_ENV, "") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2 = 32 MiB)
    return bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 25)
    )


KEEPS_FREED_MEMORY = False


def pytest_configure(config) -> None:
    # here, not at import: the tests import this module for its serving loop and must not
    # change their own process's malloc
    global KEEPS_FREED_MEMORY
    KEEPS_FREED_MEMORY = keep_freed_memory()


_MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
_BASELINES: dict[str, list[str]] = defaultdict(list)
_NOTES: dict[str, list[str]] = defaultdict(list)
_FLOORS: dict[str, str] = {}


def record(
    benchmark,
    group: str,
    case: str,
    *,
    baseline: bool = False,
    floor: bool = False,
    per: int = 1,
) -> None:
    """Remember the median of a finished ``benchmark`` call (seconds per `per` operations).

    ``floor``: the case is the timed loop with every call under test left out; the summary
    then also shows each case minus it (the calls' own cost) and those ratios."""
    stats = benchmark.stats
    if stats is None:  # --benchmark-disable
        return
    _MEDIANS[group][case] = stats.stats.median / per
    if baseline and case not in _BASELINES[group]:
        _BASELINES[group].append(case)
    if floor:
        _FLOORS[group] = case


def note(group: str, line: str) -> None:
    _NOTES[group].append(line)


def paired_ratio(times, ref_times) -> tuple[float, float, float]:
    """Median and quartiles of ``times[i] / ref_times[i]``: rounds timed next to each other,
    so that the machine's drift divides out of each ratio."""
    ratio = np.asarray(times, dtype=float) / np.asarray(ref_times, dtype=float)
    q1, median, q3 = np.percentile(ratio, [25, 50, 75])
    return float(median), float(q1), float(q3)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _MEDIANS and not _NOTES:
        return
    tr = terminalreporter
    tr.section("pymllm ratios (medians of this run)")
    tr.write_line(
        "freed memory kept in the process (glibc mallopt)"
        if KEEPS_FREED_MEMORY
        else f"glibc's default malloc thresholds ({_KEEP_FREED_ENV}=default or not glibc)"
    )
    for group in dict.fromkeys([*_MEDIANS, *_NOTES]):  # each group with a median or a note
        cases = _MEDIANS.get(group, {})
        tr.write_line(f"[{group}]")
        _write_cases(tr, group, cases)
        floor = _FLOORS.get(group)
        if floor in cases and len(cases) > 1:
            tr.write_line(f"  minus the {floor} (the calls' own cost, a difference of medians):")
            own = {c: m - cases[floor] for c, m in cases.items() if c != floor}
            _write_cases(tr, group, own)
        for line in _NOTES.get(group, []):
            tr.write_line(f"  {line}")


def _write_cases(tr, group: str, cases: dict[str, float]) -> None:
    for case, median in cases.items():
        ratios = [
            f"{cases[base] / median:8.1f}x faster than {base}"
            for base in _BASELINES.get(group, [])
            if base in cases and base != case and median > 0
        ]
        tr.write_line(f"  {case:<40} {_fmt(median)}  " + "; ".join(ratios))


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:9.3f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:9.3f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:9.3f} us"
    return f"{seconds * 1e9:9.1f} ns"


# The issue-2 workload's KV pool: smaller than what its requests cache, so eviction runs.
POOL = 300_000


def fresh_cache(cache_cls):
    """A new cache of `cache_cls` over a new POOL-slot allocator: (cache, allocator)."""
    alloc = TokenToKVPoolAllocator(POOL, need_sort=False)
    return cache_cls(token_to_kv_pool_allocator=alloc), alloc


class SystemPromptWorkload:
    """The issue-2 workload: shared system prompts plus fresh suffixes.

    ``n_prompts`` prompts of ``prompt_len`` random tokens; ``n_requests`` requests, each a
    random prompt followed by ``suffix_len`` fresh random tokens.
    """

    def __init__(
        self,
        n_prompts: int = 200,
        prompt_len: int = 1024,
        n_requests: int = 4000,
        suffix_len: int = 256,
        vocab: int = 50_000,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        prompts = rng.integers(0, vocab, size=(n_prompts, prompt_len), dtype=np.int32)
        which = rng.integers(0, n_prompts, size=n_requests)
        suffixes = rng.integers(0, vocab, size=(n_requests, suffix_len), dtype=np.int32)
        self.arrays = [
            np.concatenate([prompts[w], s]) for w, s in zip(which, suffixes, strict=True)
        ]
        self.lists = [a.tolist() for a in self.arrays]
        self.prompt_tokens = n_requests * (prompt_len + suffix_len)
        # the best any cache can do: every prompt after its first use is a hit
        first_use = len(set(which.tolist()))
        self.ideal_hit_tokens = (n_requests - first_use) * prompt_len


def serve(cache, allocator, keys, extra_key=None, concatenate=False) -> int:
    """Run every key as one request: match -> lock -> allocate (evicting when short) ->
    insert -> free duplicates -> unlock. Returns the number of cached (hit) tokens.
    ``concatenate``: see ``admit``."""
    hits = 0
    for tokens in keys:
        key, m, lock, value = admit(cache, allocator, tokens, extra_key, concatenate)
        r = cache.insert(key, value)
        if r.prefix_len > m.prefix_len:
            allocator.free(value[m.prefix_len : r.prefix_len])
        cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)
        hits += m.prefix_len
    return hits


def admit(cache, allocator, tokens, extra_key=None, concatenate=False):
    """The start of every request: match -> lock -> allocate the uncached part (evicting
    when the pool is short). Returns (key, match, lock token, prefix slots + new slots).
    The value is made by ``alloc(need, prefix=m.indices)``; with ``concatenate``, by
    ``np.concatenate([m.indices, alloc(need)])`` instead (the way before ``prefix``
    existed, which bench_radix_cache times against it)."""
    key = RadixKey(tokens, extra_key)
    m = cache.match_prefix(key)
    lock = cache.inc_lock_ref(m.last_node)
    need = len(tokens) - m.prefix_len
    short = need - allocator.available_size()
    if short > 0:
        cache.evict(short)
    if concatenate:
        new = allocator.alloc(need)
        value = None if new is None else np.concatenate([m.indices, new])
    else:  # the matched slots then the new ones, in one array made in C
        value = allocator.alloc(need, prefix=m.indices)
    assert value is not None, "pool too small for one request"
    return key, m, lock, value


def script_workload(
    doc: str, rounds: int, argv: list[str] | None = None
) -> tuple[argparse.Namespace, SystemPromptWorkload]:
    """The start of a script that serves the workload (``breakdown.py``, ``hot_keys.py``):
    its ``--rounds`` (default `rounds`) and ``--requests`` options, read from `argv`, and
    the workload, set up as the benchmark sets it up (freed memory kept, the workload's
    objects frozen out of the collector's way)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"rounds per key kind ({rounds})"
    )
    parser.add_argument("--requests", type=int, default=4000, help="requests a round (4000)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    wl = SystemPromptWorkload(n_requests=args.requests)
    gc.collect()
    gc.freeze()
    return args, wl


@pytest.fixture(scope="session")
def system_prompt_workload() -> SystemPromptWorkload:
    wl = SystemPromptWorkload()
    # The workload's token lists are millions of long-lived objects; like a serving
    # engine after start-up, move them out of the collector's way so that neither
    # implementation pays for rescanning them.
    gc.collect()
    gc.freeze()
    return wl
