"""A short run of the soak (``bench/soak.py``); the full one is ``--ops 1000000``.

Marked ``soak``: not in the default run (``pytest -m soak`` selects it).
"""

from __future__ import annotations

import pytest
from conftest import load_bench  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.soak


def test_short_soak_of_every_cache_kind_leaks_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    soak = load_bench("soak")
    rc = soak.main(
        ["--ops", "30000", "--kinds", "radix,swa,mamba", "--check-every", "3000", "--pool", "2048"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.rstrip().endswith("soak: ok"), out
    for kind in ("radix", "swa", "mamba"):
        assert f"[{kind}] ops 30,000" in out, out
    assert "kv_leaked 0" in out and "swa_leaked 0" in out and "states_leaked 0" in out, out


def test_soak_reports_a_leak() -> None:
    """The soak's accounting can fail: a request that drops its slots shows as a leak."""
    soak = load_bench("soak")
    stack = soak.Stack("radix", 256, 8, 16)
    assert stack.admit(None, soak.np.arange(40, dtype=soak.np.int32))
    stack.check()
    stack.reqs.clear()  # forget the request without giving its slots back
    with pytest.raises(AssertionError, match="ledger"):
        stack.check()
