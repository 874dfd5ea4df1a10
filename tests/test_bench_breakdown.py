"""bench/breakdown.py, the workload timed call by call: it runs, and prints a row for every
call of the serving loop and both key kinds."""

from __future__ import annotations

from pathlib import Path

from conftest import run_script  # tests/ is on sys.path (rootdir conftest)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "breakdown.py"


def test_breakdown_prints_every_call_for_both_key_kinds() -> None:
    out = run_script(SCRIPT, "--rounds", "1", "--requests", "40")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["per", "request", "(us)", "list", "keys", "numpy", "keys"]
    rows = {line[:32].strip(): line[32:].split() for line in lines[1:10]}
    for call in ("RadixKey(tokens)", "match_prefix", "insert", "evict", "sum"):
        assert len(rows[call]) == 2 and all(float(x) >= 0 for x in rows[call]), rows
    assert float(rows["match_prefix"][0]) > 0
    assert sum("match_prefix on an empty tree" in line for line in lines) == 2
