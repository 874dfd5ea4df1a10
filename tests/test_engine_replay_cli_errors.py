"""A review of untested paths (session 24): replay, trace reading, trace generation and
CLI paths no test ran: a replay run twice, progress, partial Mooncake blocks evicted,
argument checks, the demo's "only applies with" refusals, the default JIT cache folder,
and runtime failures of the demo that must not end in a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import child_env

from pymllm.cli import build_parser, main
from pymllm.replay import simulator
from pymllm.replay.generate import TraceSpec, generate_trace, write_trace
from pymllm.replay.traces import read_trace, trace_field, trace_from_records


def mooncake(*recs: tuple[list[int], int]) -> list[dict]:
    return [{"hash_ids": ids, "input_length": n} for ids, n in recs]


# -- simulator ---------------------------------------------------------------------------------


def test_a_replay_runs_once_then_refuses():
    trace = trace_from_records([[1, 2, 3], [1, 2, 4]])
    rep = simulator.Replay(trace, None)
    res = rep.run()
    assert res.hit_blocks == 2 and res.leak_free
    with pytest.raises(RuntimeError, match=r"Replay\.run: this replay has run; set up a new one"):
        rep.run()
    assert rep.cache.total_size() + rep.allocator.available_size() == rep.pool  # untouched


def test_progress_every_few_requests_and_once_at_the_end(monkeypatch):
    monkeypatch.setattr(simulator, "PROGRESS_EVERY", 2)
    trace = trace_from_records([[i, i + 1] for i in range(5)])
    seen = []
    simulator.replay(trace, None, progress=lambda d, t, s: seen.append((d, t)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_evicted_tokens_count_a_partial_last_block_by_its_own_tokens():
    """4-token blocks; A's last block holds 2 tokens. B (capacity 2) evicts both of A's
    blocks: 2 units, 4 + 2 = 6 tokens."""
    trace = trace_from_records(mooncake(([1, 2], 6), ([3, 4], 8)), block_tokens=4)
    res = simulator.replay(trace, 2)
    assert (res.evicted_units, res.evicted_tokens) == (2, 6)
    assert res.leak_free
    # the full block evicted instead of the partial one: B first, then A evicts it
    trace = trace_from_records(mooncake(([3, 4], 8), ([1, 2], 6)), block_tokens=4)
    assert simulator.replay(trace, 2).evicted_tokens == 8


def test_default_capacities_when_one_request_is_the_whole_trace():
    trace = trace_from_records([[1, 2, 3, 4]])
    assert simulator.default_capacities(trace) == [4, None]
    assert all(r.leak_free for r in simulator.sweep(trace, [4, None], ["lru"]))


# -- traces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, True, 1 << 31, 2.0])
def test_read_trace_refuses_a_bad_block_size(tmp_path, bad):
    path = tmp_path / "t.jsonl"
    path.write_text('{"hash_ids": [1]}\n')
    with pytest.raises(ValueError, match=r"block_tokens: expected an integer in \[1, 2\*\*31\)"):
        read_trace(path, block_tokens=bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_read_trace_refuses_a_bad_max_requests(tmp_path, bad):
    """Only ``< 1`` was checked (fixed in session 24). 1.5 reads 2 requests, True
    reads 1, "2" raises a bare "'<' not supported" TypeError naming nothing."""
    path = tmp_path / "t.jsonl"
    path.write_text("[1, 2]\n[1, 3]\n[1, 4]\n")
    with pytest.raises((TypeError, ValueError), match="max_requests: expected a positive integer"):
        read_trace(path, max_requests=bad)


def test_trace_field_refuses_an_unknown_kind():
    with pytest.raises(
        ValueError, match="kind: expected one of number, posint, int, ids; got 'str'"
    ):
        trace_field({"a": 1}, "a", "f:1", kind="str")


# -- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("system_blocks", (3, 2)), ("user_blocks", (0, 4)), ("output_tokens", (5, 4))],
)
def test_trace_spec_refuses_a_bad_range(field, value):
    with pytest.raises(
        ValueError, match=rf"{field}: expected 1 <= low <= high, got \({value[0]}, "
    ):
        TraceSpec(**{field: value})


def test_a_generated_trace_reads_back(tmp_path):
    """TraceSpec bounded block_tokens below 2**31 (so the reader takes every line) but not
    output_tokens: (2**31, 2**31) wrote lines whose output_length the readers (replay and
    demo alike) refuse. It is refused at the spec now, and the largest length it takes
    reads back."""
    with pytest.raises(ValueError, match="output_tokens: expected lengths below 2"):
        TraceSpec(requests=3, groups=2, output_tokens=(1 << 31, 1 << 31))
    spec = TraceSpec(requests=3, groups=2, output_tokens=((1 << 31) - 1, (1 << 31) - 1))
    path = tmp_path / "g.jsonl"
    write_trace(path, generate_trace(spec))
    assert len(read_trace(path)) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", 1.5), ("system_blocks", (1.5, 3)), ("user_blocks", ("1", "2"))],
)
def test_trace_spec_refuses_non_integer_seeds_and_block_counts(field, value):
    """Until session 24 the seed was not checked (numpy's "expected non-negative integer"
    came out of generate_trace) and block ranges were compared but not type-checked ((1.5,
    3) was accepted, strings gave a bare TypeError)."""
    with pytest.raises((TypeError, ValueError), match=field):
        TraceSpec(requests=3, **{field: value})


# -- CLI ------------------------------------------------------------------------------------------


def test_a_time_scale_that_is_no_number_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--time-scale", "abc"])
    assert exc.value.code == 2
    assert "argument --time-scale: expected a number, got 'abc'" in capsys.readouterr().err


def test_the_default_jit_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build_parser().parse_args(["demo"]).jit_cache == os.path.join(tmp_path, "pymllm", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = os.path.join(tmp_path, "home", ".cache", "pymllm", "jax")
    assert build_parser().parse_args(["demo"]).jit_cache == want


# The child caps its own address space (a failed allocation, never a machine short of
# memory) before it runs the CLI: a preexec_fn would fork this process, which runs JAX.
_CAPPED_CLI = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
sys.argv = ["pymllm-cache", *sys.argv[1:]]
runpy.run_module("pymllm.cli", run_name="__main__")
"""


def _demo_child(tmp_path, *args: str) -> subprocess.CompletedProcess:
    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 20, "output_length": 3, "hash_ids": [i]} for i in range(2)
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = [sys.executable, "-c", _CAPPED_CLI, "demo", "--trace", str(trace), "--model", "micro"]
    cmd += ["--pool-size", "128", "--cache", "radix", "--quiet", "--jit-cache", "", *args]
    # started outside the checkout, which may hold unbuilt sources (see conftest.run_child)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=tempfile.gettempdir(),
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--prefill-batch", "3000000000", "--pad-prefill-batch"],
        ["--max-running", "3000000000"],
        ["--prefill-batch", "99999999999999999999", "--pad-prefill-batch"],
        ["--max-running", "99999999999999999999"],
        ["--chunk-tokens", "99999999999999999999"],
        ["--prefill-batch", "2000000000", "--pad-prefill-batch"],
    ],
    ids=["prefill-batch", "max-running", "prefill-batch-1e20", "max-running-1e20", "chunk-1e20",
         "prefill-batch-2e9"],
)  # fmt: skip
def test_demo_batch_sizes_past_memory_fail_in_one_line(tmp_path, args):
    """--max-running and --prefill-batch size the step's host arrays: the MemoryError ended
    in a traceback until session 24, and a size past numpy's largest array (numpy's
    ValueError) until session 29; the batch options now stop below 2**31, as slot counts."""
    run = _demo_child(tmp_path, *args)
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert run.returncode in (1, 2)
    *usage, last = run.stderr.strip().splitlines()  # argparse's usage, when it refuses
    assert "error:" in last and all(line.startswith(("usage:", " ")) for line in usage)


def test_numpy_integers_are_integers_to_the_trace_tools(tmp_path):
    """numpy integers pass where Python ints do (the refusal said "expected a positive
    integer, got np.int64(2)"), as the engine's configs take them."""
    spec = TraceSpec(requests=np.int64(3), seed=np.int64(1), user_blocks=(np.int32(1), 4))
    path = tmp_path / "g.jsonl"
    write_trace(path, generate_trace(spec))
    assert len(read_trace(path, max_requests=np.int64(2))) == 2
