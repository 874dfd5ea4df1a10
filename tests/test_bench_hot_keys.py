"""bench/hot_keys.py, the workload with each key read from memory or from cache: it runs,
serves the same requests every way (it raises if two passes find different hits), and
prints a paired ratio for each key kind and way."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_child, run_script  # tests/ is on sys.path (rootdir conftest)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "hot_keys.py"
LINE = re.compile(
    r"(list|numpy) keys, (cold|hot): ([\d.]+)x \(quartiles ([\d.]+)-([\d.]+)x\); "
    r"medians ([\d.]+) us \(SGLang-style\) and ([\d.]+) us \(compiled\) a request"
)


def test_hot_keys_prints_a_ratio_for_each_kind_and_way() -> None:
    out = run_script(SCRIPT, "--rounds", "2", "--requests", "60")
    assert out.returncode == 0, out.stderr
    rows = [LINE.fullmatch(line) for line in out.stdout.splitlines()]
    assert all(rows), out.stdout
    assert [(m[1], m[2]) for m in rows if m] == [
        ("list", "cold"),
        ("list", "hot"),
        ("numpy", "cold"),
        ("numpy", "hot"),
    ]
    for m in rows:
        assert m is not None
        ratio, q1, q3, base, comp = map(float, m.groups()[2:])
        assert q1 <= ratio <= q3 and base > 0 and comp > 0


def test_a_key_made_hot_is_a_copy_with_the_same_tokens() -> None:
    out = run_child(
        f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        from hot_keys import _in_cache
        tokens = [5, 70000, 3]
        copy = _in_cache(tokens)
        arr = np.array(tokens, dtype=np.int32)
        acopy = _in_cache(arr)
        print(copy == tokens and copy is not tokens, acopy.dtype == np.int32,
              np.array_equal(acopy, arr) and not np.shares_memory(acopy, arr))
        """
    )
    assert out.split() == ["True", "True", "True"]
