"""bench/ab_builds.py, the paired build-vs-build comparison, run as its users run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_child, run_script  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import _radix_tree

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "ab_builds.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script(SCRIPT, *args)


def _copies(tmp_path: Path, *names: str) -> list[str]:
    """Copies of the installed build under `names`: distinct files, each loaded on its own."""
    built = Path(_radix_tree.__file__)
    for name in names:
        shutil.copy(built, tmp_path / name)
    return [str(tmp_path / name) for name in names]


@pytest.mark.parametrize(
    ("args", "header", "unit"),
    [
        (
            ("--keys", "list", "--rounds", "3", "--requests", "40"),
            "list keys, 40 requests a round, 3 paired rounds",
            "us/request",
        ),
        (
            ("--match-tree", "2000", "--rounds", "3", "--requests", "50"),
            "match_prefix on a 2,000-token tree, 50 probes a round, 3 paired rounds",
            "us/match",
        ),
        (
            ("--evict-tree", "20000", "--rounds", "3"),
            "29 evict(1) on a fresh 20,000-token tree, 3 paired rounds",
            "us/node",
        ),
    ],
    ids=["workload", "match-tree", "evict-tree"],
)
def test_two_copies_of_one_build_are_paired_round_by_round(
    tmp_path: Path, args: tuple[str, ...], header: str, unit: str
) -> None:
    copies = _copies(tmp_path, "before.so", "after.so")
    out = _run(*copies, *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == header
    assert len(lines) == 3
    assert lines[1].startswith("before.so") and unit in lines[1]
    assert "vs the first: 1.000 (quartiles 1.000-1.000)" in lines[1]
    assert lines[2].startswith("after.so") and unit in lines[2]


def test_a_file_that_is_not_an_extension_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a build")
    out = _run(str(bogus), "--rounds", "1", "--requests", "5")
    assert out.returncode != 0
    assert "notes.txt: not a loadable extension module" in out.stderr


def test_a_pure_python_cache_is_paired_by_name(tmp_path: Path) -> None:
    (compiled,) = _copies(tmp_path, "compiled.so")
    out = _run(compiled, "seed-style", "reference", "--rounds", "2", "--requests", "20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "numpy keys, 20 requests a round, 2 paired rounds"
    assert [line.split()[0] for line in lines[1:]] == ["compiled.so", "seed-style", "reference"]
    assert all("us/request  vs the first: " in line for line in lines[1:])


def test_match_tree_refuses_a_pure_python_cache(tmp_path: Path) -> None:
    (compiled,) = _copies(tmp_path, "compiled.so")
    out = _run(compiled, "seed-style", "--match-tree", "2000", "--rounds", "1")
    assert out.returncode != 0
    assert "--match-tree and --evict-tree compare compiled builds only" in out.stderr


def test_two_checkouts_are_compared_in_alternating_children(tmp_path: Path) -> None:
    """bench/ab_checkouts.py: each checkout's own package is the one timed (two copies of
    the installed package here; the script checks where each child imported it from)."""
    import pymllm

    installed = Path(pymllm.__file__).resolve().parent
    roots = []
    for name in ("a", "b"):
        shutil.copytree(installed, tmp_path / name / "pymllm")
        roots.append(str(tmp_path / name))
    script = SCRIPT.parent / "ab_checkouts.py"
    out = subprocess.run(
        [sys.executable, str(script), *roots, "--rounds", "2", "--serves", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "numpy keys, 2 paired rounds of 1 serves"
    assert lines[1].startswith(f"A {roots[0]}: ") and lines[2].startswith(f"B {roots[1]}: ")
    assert lines[3].startswith("B / A: ")
    # a checkout without the package: the child's import comes from elsewhere, refused
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [sys.executable, str(script), roots[0], str(tmp_path / "empty"), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "the child imported pymllm from" in out.stderr


@pytest.mark.parametrize("size", [1_000, 10_000, 100_000])
def test_the_evict_benchmark_times_the_tree_at_its_size(size: int) -> None:
    """bench_radix_cache's per-node evict cost "at" 1e3..1e6 tokens: a timed round must
    leave the tree near that size (it drained a 1e3 or 1e4 tree to 6%), and every timed
    evict(1) must free one 64-token node; --evict-tree makes the same calls."""
    out = run_child(
        f"""
        import sys
        sys.path[:0] = [{str(BENCH)!r}, {str(BENCH.parent / "tests")!r}]
        import bench_radix_cache as b

        class Timer:
            stats = None  # record() skips a benchmark that has no stats

            def pedantic(self, run, setup, rounds, iterations):
                (caches,), _ = setup()
                before = [cache.total_size() for cache in caches]
                run(caches)
                for cache, was in zip(caches, before):
                    print(was, cache.total_size(), b._evictions({size}))

        b.test_evict_cost_vs_tree_size(Timer(), {size})
        """
    )
    before, after, calls = map(int, out.split()[:3])
    assert after >= 0.85 * before >= 0.85 * 0.95 * size
    assert before - after == 64 * calls
