"""``pymllm-cache``: argument structure, the demo's output, its errors."""

from __future__ import annotations

import json

import pytest

from pymllm.cli import COMMANDS, build_parser, main

# The step shapes of tests/test_engine.py (micro model, 512 slots, 4 running, prefill steps of
# 2 rows x 32 tokens): the CLI tests and the engine tests compile them once between them.
SMALL = [
    "--model", "micro", "--pool-size", "512", "--max-running", "4", "--chunk-tokens", "32",
    "--prefill-batch", "2", "--pad-prefill-batch", "--jit-cache", "",
]  # fmt: skip


def rec(n_in, ids, n_out=4, ts=0):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


@pytest.fixture
def trace(tmp_path):
    # Two groups of three requests sharing their first 512-token block (cut to the length).
    lines = [rec(60 + 8 * i, [i % 2]) for i in range(6)]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_parser_has_demo_and_requires_a_command(capsys):
    assert "demo" in COMMANDS
    args = build_parser().parse_args(["demo"])
    assert (args.workload, args.cache, args.model, args.variant) == (
        "shared-prefix",
        "both",
        "tiny",
        "full",
    )
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_demo_json_reports_an_exact_run_with_hits(trace, capsys):
    rc = main(["demo", "--trace", str(trace), "--json", *SMALL])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)
    radix, chunk = report["runs"]
    assert (radix["cache"], chunk["cache"]) == ("RadixCache", "ChunkCache")
    assert radix["requests"] == chunk["requests"] == 6
    assert report["exact"]["identical_outputs"] == 6
    assert report["exact"]["first_token_logits_max_abs_diff"] < 1e-4
    assert radix["cached_tokens"] > 0 and chunk["cached_tokens"] == 0
    assert radix["prefill_tokens"] + radix["cached_tokens"] == radix["prompt_tokens"]
    assert 0.5 < radix["hit_rate"] <= report["ideal_hit_rate"]
    assert radix["leak_free"] and chunk["leak_free"]
    assert radix["kv_free"] + radix["kv_in_cache"] == 512
    assert report["speedup"] > 0
    assert "6/6 requests" in out.err  # progress on stderr; stdout is only the JSON


def test_demo_prints_the_table_and_progress(trace, capsys):
    rc = main(["demo", "--trace", str(trace), *SMALL])
    out = capsys.readouterr()
    assert rc == 0, out.err
    for label in (
        "cached tokens (hit rate)",
        "prefill tokens computed",
        "TTFT p50",
        "tokens/s",
        "no slot leaks",
        "speedup (ChunkCache wall / RadixCache wall)",
        "greedy tokens identical: 6/6 requests",
    ):
        assert label in out.out
    assert "RadixCache" in out.out and "ChunkCache" in out.out
    assert "6/6 requests" in out.err  # progress goes to stderr


def test_demo_single_cache(trace, capsys):
    rc = main(["demo", "--trace", str(trace), "--cache", "chunk", "--json", "--quiet", *SMALL])
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert rc == 0
    assert out.err == ""
    assert [r["cache"] for r in report["runs"]] == ["ChunkCache"]
    assert "speedup" not in report


def test_demo_bad_trace_names_line_and_field(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec(60, [1])) + "\n" + json.dumps(rec(60, [1, 2])) + "\n")
    rc = main(["demo", "--trace", str(path), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.jsonl:2: field 'hash_ids' has 2 ids" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # a model without recurrent layers needs no state slots: the run goes on (and stops
        # at the missing trace, checked next)
        (["--max-running", "64", "--trace", "/nonexistent.jsonl"], "nonexistent.jsonl"),
        (["--variant", "hybrid", "--max-running", "64"], "--state-slots must exceed"),
        (["--max-requests", "5"], "--max-requests only applies with --trace"),
        (["--block-tokens", "64"], "--block-tokens only applies with --trace"),
        (["--time-scale", "5"], "--time-scale only applies with --trace"),
        (["--swa-pool-size", "100"], "--swa-pool-size only applies with --variant swa"),
        (["--state-slots", "100"], "--state-slots only applies with --variant hybrid"),
    ],
)
def test_demo_options_that_do_not_apply_are_refused_and_only_those(argv, message, capsys):
    """--state-slots was checked for every model, refusing --max-running 64 on a model that
    keeps no state; --max-requests, and --swa-pool-size on other models, were ignored."""
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "only applies" in message:  # one line, the message alone
        assert err == f"pymllm-cache: error: {message}\n"
    if "--state-slots" not in argv and "hybrid" not in argv:
        assert "--state-slots" not in err


def test_demo_trace_with_other_block_tokens(tmp_path, capsys):
    """A trace of 64-token blocks (gen-trace --block-tokens 64) was refused by the demo
    ("is the block size 512?"), which had no way to say otherwise."""
    path = tmp_path / "t.jsonl"
    lines = [rec(100 + 4 * i, [i % 2, 10 + i]) for i in range(4)]  # 2 blocks of 64 each
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["demo", "--trace", str(path), *SMALL, "--quiet"]) == 2
    assert "is the block size 512?" in capsys.readouterr().err
    argv = ["demo", "--trace", str(path), "--block-tokens", "64", "--json", "--quiet", *SMALL]
    assert main([*argv, "--cache", "radix"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"][0]["requests"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--pool-size", "0"], "argument --pool-size: expected an integer in [1, "),
        (["demo", "--pool-size", "3000000000"], "argument --pool-size: expected an integer in"),
        (["demo", "--swa-pool-size", "-5"], "argument --swa-pool-size: expected an integer"),
        (["demo", "--swa-pool-size", "0"], "argument --swa-pool-size: expected an integer"),
        (["demo", "--max-requests", "0"], "argument --max-requests: expected an integer >= 1"),
        (["demo", "--max-running", "0"], "argument --max-running: expected an integer in [1, "),
        (["demo", "--max-running", str(2**31)], "argument --max-running: expected an integer"),
        (["demo", "--prefill-batch", "0"], "argument --prefill-batch: expected an integer in"),
        (["demo", "--chunk-tokens", "-1"], "argument --chunk-tokens: expected an integer in"),
        (["demo", "--state-slots", "0"], "argument --state-slots: expected an integer in"),
        (["demo", "--time-scale", "inf"], "argument --time-scale: expected a number in"),
        (["demo", "--time-scale", "nan"], "argument --time-scale: expected a number in"),
        (["demo", "--time-scale", "-1"], "argument --time-scale: expected a number in"),
        (["demo", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["replay", "--max-requests", "-1"], "argument --max-requests: expected an integer >= 1"),
        (["replay", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["replay", "--requests", "0"], "argument --requests: expected an integer >= 1"),
        (["replay", "--block-tokens", str(10**20)], "argument --block-tokens: expected an int"),
        (["replay", "--block-tokens", str(2**31)], "argument --block-tokens: expected an int"),
        (["replay", "--page-size", "x"], "argument --page-size: expected an integer, got 'x'"),
        (["gen-trace", "o.jsonl", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["gen-trace", "o.jsonl", "--requests", "0"], "argument --requests: expected an int"),
    ],
)
def test_options_are_checked_and_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_pools_that_do_not_fit_are_an_error_not_a_traceback(monkeypatch, capsys):
    import jax

    from pymllm.engine import memory

    def no_room(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory\ndetails")

    monkeypatch.setattr(memory, "EngineMemory", no_room)
    assert main(["demo", *SMALL, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: the KV pools (512 slots) do not fit in memory: RESOURCE_EXHAUSTED" in err
    assert "details" not in err


# -- replay and gen-trace -----------------------------------------------------------------


@pytest.fixture
def replay_trace(tmp_path):
    # 3 blocks of system prompt shared by all; request i adds 2 fresh blocks.
    lines = [rec(512 * 5, [0, 1, 2, 100 + 2 * i, 101 + 2 * i], ts=i) for i in range(8)]
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_replay_json_reports_each_capacity_and_policy(replay_trace, capsys):
    rc = main(["replay", str(replay_trace), "--capacity", "5", "12", "inf", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads(out.out)  # stdout is only the JSON
    assert report["trace"]["requests"] == 8 and report["trace"]["unit"] == "block"
    assert report["trace"]["distinct_units"] == 3 + 16
    # ideal: every request after the first reuses the 3 system blocks
    assert report["ideal"]["block_hit_rate"] == round(7 * 3 / 40, 6)
    runs = {(r["capacity"], r["policy"]): r for r in report["runs"]}
    assert ("inf", "lru") in runs and (5, "lru") in runs and (12, "lru") in runs
    assert runs["inf", "lru"]["block_hit_rate"] == report["ideal"]["block_hit_rate"]
    assert runs["inf", "lru"]["evicted_units"] == 0
    # 5 blocks: each request locks the shared 3 and evicts the previous request's 2 fresh
    # ones (the only unlocked leaf), so it still hits the ideal; 12 blocks evict less
    assert runs[5, "lru"]["block_hit_rate"] == report["ideal"]["block_hit_rate"]
    assert runs[5, "lru"]["evicted_units"] == 7 * 2
    assert runs[12, "lru"]["evicted_units"] == 2 * (8 - 4)
    assert all(r["leak_free"] and r["requests_per_s"] > 0 for r in report["runs"])
    from pymllm.mem_cache import EVICTION_POLICIES

    n = 8 * 3 * len(EVICTION_POLICIES)  # 8 requests, 3 capacities, every policy
    assert f"{n}/{n} requests" in out.err  # progress over all the runs goes to stderr


def test_replay_table_and_policies(replay_trace, capsys):
    from pymllm.mem_cache import EVICTION_POLICIES

    rc = main(["replay", str(replay_trace), "--capacity", "inf", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0 and out.err == ""
    assert "ideal (unbounded cache): block hit 52.50%" in out.out
    for label in ("capacity (blocks)", "block hit", "token hit", "reqs with hit", "requests/s"):
        assert label in out.out
    rows = [line for line in out.out.splitlines() if line.startswith("inf ")]
    assert [r.split()[1] for r in rows] == list(EVICTION_POLICIES)  # default: every policy
    assert all("52.50%" in r for r in rows)


def test_replay_errors_name_the_line_or_argument(tmp_path, replay_trace, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec(512, [1])) + "\n\n" + '{"hash_ids": [1, -2]}\n')
    assert main(["replay", str(bad)]) == 2
    assert "bad.jsonl:3: field 'hash_ids': id -2 is outside" in capsys.readouterr().err
    assert main(["replay", str(replay_trace), "--capacity", "4"]) == 2
    assert "capacity: 4 blocks cannot hold the trace's longest request" in capsys.readouterr().err
    assert main(["replay", str(replay_trace), "--capacity", "lots"]) == 2
    assert "capacity: expected a positive whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(replay_trace), "--policy", "mru"])
    assert "invalid choice: 'mru'" in capsys.readouterr().err


def test_replay_plot(replay_trace, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "hit.png"
    rc = main(["replay", str(replay_trace), "--capacity", "6", "12", "inf", "--plot", str(png)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot saved to {png}" in out.out


def test_replay_plot_without_matplotlib_says_what_to_install(replay_trace, monkeypatch, capsys):
    from pymllm.replay import plot

    monkeypatch.setattr(plot.importlib.util, "find_spec", lambda name: None)
    rc = main(["replay", str(replay_trace), "--plot", "x.png", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'plotting needs matplotlib: pip install "pymllm[plot]"' in err
    assert 'pip install ".[plot]"' in err


def test_gen_trace_then_replay(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["gen-trace", str(a), "--requests", "300", "--seed", "4"]) == 0
    assert "wrote 300 requests" in capsys.readouterr().out
    assert main(["gen-trace", str(b), "--requests", "300", "--seed", "4"]) == 0
    capsys.readouterr()
    assert a.read_bytes() == b.read_bytes()
    assert len(a.read_text().splitlines()) == 300
    assert main(["replay", str(a), "--capacity", "inf", "--policy", "lru", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    # no TRACE: the same generator, the same defaults
    built_in_args = ["--requests", "300", "--seed", "4", "--capacity", "inf", "--policy", "lru"]
    assert main(["replay", *built_in_args, "--json"]) == 0
    built_in = json.loads(capsys.readouterr().out)
    assert from_file["runs"][0]["hit_blocks"] == built_in["runs"][0]["hit_blocks"] > 0
    assert from_file["ideal"] == built_in["ideal"]
    for bad in ("inf", "1e9"):  # a chat that never ends: refused, not generated forever
        assert main(["gen-trace", str(a), "--mean-turns", bad]) == 2
        assert "mean_turns: expected a number in [1, 100]" in capsys.readouterr().err


def test_replay_checks_the_plot_path_before_replaying(replay_trace, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for path, message in (
        (tmp_path / "no" / "dir" / "x.png", "no folder"),
        (tmp_path / "x.foo", "the suffix must name a format matplotlib writes"),
    ):
        assert main(["replay", str(replay_trace), "--quiet", "--plot", str(path)]) == 2
        out = capsys.readouterr()
        assert message in out.err and out.out == ""  # before the replay: no table


def test_replay_reports_a_failed_plot_after_its_results(
    replay_trace, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    from pymllm.replay import plot

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plot, "plot_hit_rates", fail)
    rc = main(["replay", str(replay_trace), "--quiet", "--capacity", "inf", "--plot", "x.png"])
    out = capsys.readouterr()
    assert rc == 2
    assert "block hit" in out.out and "plot saved" not in out.out  # the results still print
    assert "error: --plot x.png: disk full" in out.err


def test_replay_huge_capacity_allocates_only_the_trace(replay_trace, capsys):
    rc = main(["replay", str(replay_trace), "--capacity", "1e12", "--policy", "lru", "--json"])
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert rc == 0
    assert (run["capacity"], run["pool_slots"]) == (10**12, 8 * 5)


def test_replay_built_in_trace_takes_block_tokens_and_refuses_other_formats(capsys):
    args = ["replay", "--requests", "50", "--capacity", "inf", "--policy", "lru", "--json"]
    assert main([*args, "--block-tokens", "256"]) == 0
    trace = json.loads(capsys.readouterr().out)["trace"]
    assert (trace["unit_tokens"], trace["tokens"]) == (256, 256 * trace["units"])
    assert main([*args, "--format", "tokens"]) == 2
    assert "--format tokens: the built-in trace is Mooncake's" in capsys.readouterr().err


def test_replay_plain_trace_with_page_size(tmp_path, capsys):
    path = tmp_path / "plain.jsonl"
    path.write_text(
        "[1, 2, 3, 4, 5]\n[1, 2, 3, 4, 6]\n" + '{"tokens": [1, 2, 3], "extra_key": "x"}\n'
    )
    rc = main(["replay", str(path), "--page-size", "2", "--capacity", "inf", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (report["trace"]["format"], report["trace"]["unit"]) == ("tokens", "token")
    run = report["runs"][0]
    # the second request reuses 2 whole pages (4 tokens); the namespace "x" shares nothing
    assert (run["hit_blocks"], run["blocks"], run["hit_tokens"], run["tokens"]) == (2, 8, 4, 13)


def test_replay_refuses_built_in_trace_options_with_a_trace(tmp_path, capsys):
    """--requests and --seed shape the built-in trace only: with a TRACE they were
    accepted and ignored."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec(10, [1])) + "\n")
    for flag in ("--requests", "--seed"):
        assert main(["replay", str(path), flag, "3", "--capacity", "inf", "--quiet"]) == 2
        assert f"{flag} only applies to the built-in trace" in capsys.readouterr().err
    assert main(["replay", str(path), "--capacity", "inf", "--quiet", "--json"]) == 0


def test_gen_trace_refuses_a_block_size_whose_prompts_no_reader_takes(tmp_path, capsys):
    """gen-trace wrote input_length = blocks * block_tokens past 2**31 - 1, which replay
    and the demo then refused line by line (the built-in trace too)."""
    out = tmp_path / "big.jsonl"
    assert main(["gen-trace", str(out), "--requests", "5", "--block-tokens", "1000000000"]) == 2
    assert "past 2**31 - 1" in capsys.readouterr().err and not out.exists()
    args = ["replay", "--requests", "5", "--block-tokens", "1000000000", "--quiet"]
    assert main(args) == 2
    assert "past 2**31 - 1" in capsys.readouterr().err


def test_a_trace_block_is_drawn_only_as_far_as_prompts_read_it(tmp_path):
    """A 10-token prompt with a block size of 10**12 drew 10**12 tokens for its one id (an
    uncaught MemoryError); each id now draws what the trace reads of it, the same tokens."""
    from pymllm.engine.workloads import load_mooncake_trace

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec(10, [1])) + "\n" + json.dumps(rec(700, [1, 2])) + "\n")
    small = load_mooncake_trace(path, vocab_size=1000, block_size=512)
    prompts = [r.prompt for r in small.requests]
    assert [len(p) for p in prompts] == [10, 700]
    assert (prompts[0] == prompts[1][:10]).all()  # id 1's block, read to 10 and to 512
    path.write_text(json.dumps(rec(10, [1])) + "\n")
    huge = load_mooncake_trace(path, vocab_size=1000, block_size=10**12)
    assert (huge.requests[0].prompt == prompts[0]).all()


# -- the exit code is the verdict: a run that differs or leaks must not exit 0 ------------


def _wrap_engine_run(monkeypatch, change) -> None:
    """Engine.run, with *change(stats)* applied to what the ChunkCache run returns."""
    from pymllm.engine import scheduler

    run = scheduler.Engine.run

    def wrapped(self, workload, *, name=None, progress=None):
        stats = run(self, workload, name=name, progress=progress)
        if name == "ChunkCache":
            change(stats)
        return stats

    monkeypatch.setattr(scheduler.Engine, "run", wrapped)


def test_demo_exits_1_when_the_outputs_differ(trace, monkeypatch, capsys):
    def differ(stats):
        stats.results[0].output = stats.results[0].output + 1

    _wrap_engine_run(monkeypatch, differ)
    assert main(["demo", "--trace", str(trace), "--json", *SMALL, "--quiet"]) == 1
    assert json.loads(capsys.readouterr().out)["exact"]["identical_outputs"] == 5


def test_demo_exits_1_on_a_leak(trace, monkeypatch, capsys):
    _wrap_engine_run(monkeypatch, lambda stats: setattr(stats, "leak_free", False))
    assert main(["demo", "--trace", str(trace), *SMALL, "--quiet"]) == 1
    assert "NO" in capsys.readouterr().out  # the "no slot leaks" row


def test_replay_reports_a_leak_and_exits_1(replay_trace, monkeypatch, capsys):
    """A slot held outside the tree while the replay runs is a leak its own check sees, and
    the command's exit code says so."""
    from pymllm.replay import simulator

    init = simulator.Replay.__init__

    def leaky(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.allocator.alloc(1)  # never freed

    monkeypatch.setattr(simulator.Replay, "__init__", leaky)
    rc = main(["replay", str(replay_trace), "--capacity", "inf", "--policy", "lru", "--json"])
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert rc == 1 and run["leak_free"] is False


def test_replay_max_requests_cuts_the_built_in_trace(capsys):
    args = ["replay", "--requests", "50", "--capacity", "inf", "--policy", "lru", "--json"]
    assert main([*args, "--max-requests", "7", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["trace"]["requests"] == 7


def test_replay_a_policy_named_twice_runs_once(replay_trace, capsys):
    argv = ["replay", str(replay_trace), "--capacity", "inf", "--policy", "lru", "lru", "--json"]
    assert main(argv) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["lru"]


def test_replay_refuses_block_tokens_for_a_plain_trace(tmp_path, capsys):
    """A plain trace counts tokens, not blocks: --block-tokens was accepted and ignored."""
    path = tmp_path / "plain.jsonl"
    path.write_text("[1, 2, 3]\n[1, 2, 4]\n")
    argv = ["replay", str(path), "--capacity", "inf", "--quiet"]
    assert main([*argv, "--block-tokens", "64"]) == 2
    assert "--block-tokens only applies to a Mooncake trace" in capsys.readouterr().err
    assert main([*argv, "--json"]) == 0


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """``pymllm-cache replay t.jsonl --json | head -c 100``: the reader goes away before
    the report is written. The command stops with status 141 (128 + SIGPIPE) and no
    traceback; the build before printed BrokenPipeError's traceback and exited 1. With
    stdout buffered (no PYTHONUNBUFFERED, as a shell runs it) the report met the closed
    pipe only at the interpreter's exit, after main() had returned (exit 120): main()
    flushes stdout itself."""
    import subprocess
    import sys
    import tempfile

    from conftest import child_env

    trace = tmp_path / "t.jsonl"
    trace.write_text("[1, 2, 3]\n[1, 2, 3, 4]\n")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pymllm.cli import main; sys.exit(main())",
            "replay",
            str(trace),
            "--json",
            "--quiet",
        ],
        cwd=tempfile.gettempdir(),
        env={k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # before the child has imported anything: its report finds no reader
    with child.stderr:
        err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141, err
    assert err == ""


def test_a_broken_pipe_in_process_returns_141(replay_trace, monkeypatch):
    """main() called in-process with a stdout that raises BrokenPipeError (and has no file
    descriptor to point elsewhere) returns the status, without raising."""
    import io
    import sys

    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["replay", str(replay_trace), "--json", "--quiet"]) == 141
