"""`pymllm-cache demo` / `replay` options the CLI tests did not pin (found by mutation testing).

Lives in tests/ (imports test_cli's small-model arguments and trace helper).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_cli import SMALL, rec

from pymllm.cli import main
from pymllm.engine.scheduler import Engine


def _trace(tmp_path, lines):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_demo_builds_the_swa_pool_with_swa_pool_size(tmp_path, capsys):
    """Pins: --swa-pool-size sizes the sliding-window layers' pool (the option's whole
    point). Ignored, the SWA pool silently got --pool-size slots: a user sizing the SWA pool
    down to measure SWA pressure measured nothing. Here a 50-slot SWA pool cannot hold a
    63-slot request, which the engine refuses up front, naming the SWA pool."""
    trace = _trace(tmp_path, [rec(60, [0])])
    argv = ["demo", "--trace", trace, "--variant", "swa", "--swa-pool-size", "50"]
    rc = main([*argv, "--cache", "chunk", "--quiet", *SMALL])
    err = capsys.readouterr().err
    assert rc == 1
    assert "needs 63 SWA slots at once (of its 63 KV slots); the SWA pool has 50" in err


def test_demo_serves_the_swa_model_with_the_windowed_tree(tmp_path, capsys, monkeypatch):
    """Pins: the demo's radix run of the sliding-window model uses the windowed RadixCache
    (sliding_window_size = the model's window), which frees SWA KV that left every window.
    A plain tree would still be exact and leak-free, so nothing else notices, but the demo
    would no longer show the windowed cache it is meant to demonstrate (no SWA memory
    saved, no tombstones)."""
    seen: list[Any] = []
    run = Engine.run

    def spy(self: Engine, *a: Any, **k: Any) -> Any:
        seen.append(self.cache)
        return run(self, *a, **k)

    monkeypatch.setattr(Engine, "run", spy)
    trace = _trace(tmp_path, [rec(40 + 8 * i, [0]) for i in range(2)])
    rc = main(["demo", "--trace", trace, "--variant", "swa", "--cache", "radix", "--quiet",
               "--json", *SMALL])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (cache,) = seen
    assert type(cache).__name__ == "RadixCache"
    assert cache.sliding_window_size == 32  # the micro preset's window


def test_demo_speedup_is_the_chunk_run_over_the_radix_run(tmp_path, capsys, monkeypatch):
    """Pins the direction of the reported speedup: ChunkCache's wall time over RadixCache's
    (>1 when the cache helps), as the table's label says. Inverted, a cache that halves the
    run time would be reported as a 0.5x slowdown. The wall times are fixed here so the
    figure is exact."""
    run = Engine.run

    def fixed(self: Engine, *a: Any, name: str | None = None, **k: Any) -> Any:
        stats = run(self, *a, name=name, **k)
        stats.wall_s = 1.0 if name == "RadixCache" else 3.0
        return stats

    monkeypatch.setattr(Engine, "run", fixed)
    trace = _trace(tmp_path, [rec(40 + 8 * i, [i % 2]) for i in range(4)])
    rc = main(["demo", "--trace", trace, "--json", "--quiet", *SMALL])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["speedup"] == 3.0


def test_demo_max_requests_replays_only_the_first_lines(tmp_path, capsys):
    """Pins: demo --trace F --max-requests N serves the first N lines only. Ignored, a user
    trying a huge trace's first lines would run the whole trace (hours)."""
    trace = _trace(tmp_path, [rec(40 + 8 * i, [i % 2]) for i in range(5)])
    rc = main(["demo", "--trace", trace, "--max-requests", "2", "--cache", "radix", "--json",
               "--quiet", *SMALL])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["runs"][0]["requests"] == 2


def test_demo_time_scale_replays_the_trace_arrivals(tmp_path, capsys):
    """Pins: demo --time-scale X makes requests arrive at (timestamp - t0) * X (timestamps in
    ms), so the run lasts at least until the last arrival. Ignored, every request arrived at
    once and the TTFT/throughput figures described a burst, not the trace's load."""
    lines = [rec(40, [0], ts=0), rec(48, [1], ts=200), rec(56, [0], ts=400)]
    trace = _trace(tmp_path, lines)
    rc = main(["demo", "--trace", trace, "--time-scale", "1", "--cache", "radix", "--json",
               "--quiet", *SMALL])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    run = json.loads(out.out)["runs"][0]
    assert run["requests"] == 3
    assert run["wall_s"] >= 0.4


def test_replay_ideal_uses_the_page_size(tmp_path, capsys):
    """Pins: with --page-size P the report's "ideal" line is the ideal of a tree of pages of P
    (whole pages only are cached and matched), the same figures an unbounded replay at that
    page size reaches. Computed at page size 1, the ideal overstated what any paged cache
    can reach, and every capacity looked further from ideal than it is."""
    path = tmp_path / "plain.jsonl"
    path.write_text("[1, 2, 3]\n[1, 2, 3, 4, 5]\n[7]\n[7, 8]\n")
    rc = main(["replay", str(path), "--page-size", "2", "--capacity", "inf", "--policy", "lru",
               "--json", "--quiet"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    (run,) = report["runs"]
    for rate in ("block_hit_rate", "token_hit_rate", "request_hit_fraction"):
        assert report["ideal"][rate] == run[rate], rate
    # page 2: [1, 2] is the only whole page shared; [7] is never cached
    assert report["ideal"]["token_hit_rate"] == pytest.approx(2 / 11, abs=1e-6)
    assert report["ideal"]["request_hit_fraction"] == 0.25


@pytest.mark.parametrize(
    "args",
    [
        ["--pool-size", "1500000000"],
        ["--variant", "swa", "--swa-pool-size", "1500000000"],
        ["--variant", "hybrid", "--state-slots", "1500000000"],
    ],
    ids=["pool", "swa-pool", "state-slots"],
)
def test_demo_refuses_pool_sizes_past_the_pools_limit_as_a_usage_error(args, capsys):
    """The options take sizes up to 2**31 - 1 (state slots any size), the pools at most
    2**30 - 1: the pools' InvalidValueError came out as a traceback with exit status 1.
    It is a usage error now: one line and exit status 2."""
    small = [a for a in SMALL if a not in ("--pool-size", "512")]
    rc = main(["demo", "--cache", "chunk", "--quiet", *small, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pymllm-cache: error: the pools refuse these sizes" in err and "2**30" in err


def test_every_option_with_a_default_names_it_in_its_help():
    """``--help`` says each option's default (an error such as "--state-slots must exceed
    --max-running" is otherwise hard to act on: --max-running's 16 was not shown)."""
    import argparse

    from pymllm.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.option_strings[0]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings
        and action.default not in (None, False, argparse.SUPPRESS)
        and "default" not in (action.help or "")
        and f"({action.default})" not in (action.help or "")  # gen-trace's "(12000)"
    ]
    assert missing == []
