"""bench/ab_builds.py, the paired build-vs-build comparison, run as its users run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pymllm.mem_cache import _radix_tree

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ab_builds.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_two_copies_of_one_build_are_paired_round_by_round(tmp_path: Path) -> None:
    built = Path(_radix_tree.__file__)
    copies = []
    for name in ("before.so", "after.so"):  # distinct files: each is loaded on its own
        shutil.copy(built, tmp_path / name)
        copies.append(str(tmp_path / name))
    out = _run(*copies, "--keys", "list", "--rounds", "3", "--requests", "40")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "list keys, 40 requests a round, 3 paired rounds"
    assert len(lines) == 3
    assert (
        lines[1].startswith("before.so")
        and "vs the first: 1.000 (quartiles 1.000-1.000)" in lines[1]
    )
    assert lines[2].startswith("after.so") and "us/request" in lines[2]


def test_a_file_that_is_not_an_extension_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a build")
    out = _run(str(bogus), "--rounds", "1", "--requests", "5")
    assert out.returncode != 0
    assert "notes.txt: not a loadable extension module" in out.stderr
