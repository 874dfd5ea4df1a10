"""bench/instructions.py, the callgrind count of the workload's instructions a request.

valgrind itself is too slow for the suite: the child processes run for real without it, and a
stand-in ``valgrind`` (a script that runs the command and prints a count the way callgrind
does) checks the orchestration and the arithmetic."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env  # tests/ is on sys.path (rootdir conftest)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "instructions.py"


@pytest.fixture(scope="module")
def instructions():
    spec = importlib.util.spec_from_file_location("bench_instructions", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["setup", "floor", "compiled", "seed-style"])
@pytest.mark.parametrize("keys", ["numpy", "list"])
def test_each_child_configuration_runs(config: str, keys: str) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", config, "--keys", keys, "--requests", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert out.returncode == 0, out.stderr


# A stand-in for valgrind: runs the child (dropping valgrind's own options), then reports
# a count that encodes the configuration, as callgrind's "Collected : N" line does.
FAKE_VALGRIND = """#!{python}
import subprocess, sys
args = [a for a in sys.argv[1:] if not a.startswith("--callgrind-out-file")
        and a != "--tool=callgrind"]
rc = subprocess.run(args).returncode
config = args[args.index("--child") + 1]
base = {{"setup": 1_000_000, "floor": 1_100_000, "compiled": 1_300_000,
        "seed-style": 21_100_000}}[config]
sys.stderr.write(f"==1== Events    : Ir\\n==1== Collected : {{base}}\\n")
sys.exit(rc)
"""


def test_counts_are_turned_into_ratios(tmp_path: Path) -> None:
    fake = tmp_path / "valgrind"
    fake.write_text(FAKE_VALGRIND.format(python=sys.executable))
    fake.chmod(0o755)
    env_path = f"{tmp_path}:{Path(sys.executable).parent}"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--keys", "numpy", "--requests", "100"],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env({"PATH": env_path}),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "numpy keys, 100 requests (callgrind, PYTHONHASHSEED=0):"
    # per request, setup subtracted: floor 1,000; compiled 3,000; seed-style 201,000
    assert "1,000 instructions a request" in lines[1]
    assert lines[2].split()[-1] == "3,000"
    assert lines[3].split()[-1] == "201,000"
    assert "executes 67.0x the instructions" in lines[4]
    assert lines[5].endswith("(minus the floor): 100.0x")


def test_a_failed_child_is_reported(instructions, tmp_path: Path) -> None:
    fake = tmp_path / "valgrind"
    fake.write_text("#!/bin/sh\necho 'valgrind: no such tool' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"callgrind run of floor \(list keys\) failed"):
        instructions.count("floor", "list", 10, valgrind=str(fake))


def test_no_valgrind_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--keys", "numpy"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(tmp_path)},
    )
    assert out.returncode == 2
    assert "valgrind is not installed" in out.stderr
