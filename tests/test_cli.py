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


def test_demo_rejects_bad_settings(capsys):
    assert main(["demo", "--pool-size", "0"]) == 2
    assert "--pool-size must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--max-running", "0"]) == 2
    assert "max_running must be >= 1" in capsys.readouterr().err
