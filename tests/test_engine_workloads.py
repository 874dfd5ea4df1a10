"""Built-in workloads and the Mooncake trace reader (no model involved)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pymllm.engine.workloads import (
    RequestSpec,
    TraceError,
    load_mooncake_trace,
    make_workload,
    multi_turn,
    shared_prefix,
)


def write_trace(tmp_path, lines, name="trace.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def rec(ts=0, n_in=600, n_out=4, ids=(1, 2)):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(ids)}


def test_shared_prefix_groups_share_exactly_their_prefix():
    wl = shared_prefix(vocab_size=100, n_groups=3, per_group=2, prefix_len=20, seed=1)
    assert len(wl.requests) == wl.total_requests == 6
    by_group: dict[int, list[RequestSpec]] = {}
    for r in wl.requests:
        by_group.setdefault(r.meta["group"], []).append(r)
        assert r.prompt.dtype == np.int32 and r.prompt.min() >= 1 and r.prompt.max() < 100
    a, b = by_group[0]
    np.testing.assert_array_equal(a.prompt[:20], b.prompt[:20])
    assert not np.array_equal(by_group[0][0].prompt[:20], by_group[1][0].prompt[:20])
    # Interleaved: consecutive requests belong to different groups.
    assert [r.meta["group"] for r in wl.requests[:3]] == [0, 1, 2]


def test_workloads_are_deterministic():
    a = make_workload("shared-prefix", vocab_size=50, seed=3)
    b = make_workload("shared-prefix", vocab_size=50, seed=3)
    for x, y in zip(a.requests, b.requests, strict=True):
        np.testing.assert_array_equal(x.prompt, y.prompt)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", vocab_size=50)


def test_multi_turn_follow_up_extends_the_conversation():
    wl = multi_turn(vocab_size=50, n_conversations=2, turns=2, system_len=10, user_len=(3, 3))
    assert wl.total_requests == 4 and len(wl.requests) == 2
    first = wl.requests[0]
    out = np.array([7, 8, 9], np.int32)
    nxt = wl.follow_up(first, out)
    assert nxt.rid == "c0-t1"
    np.testing.assert_array_equal(nxt.prompt[: len(first.prompt)], first.prompt)
    np.testing.assert_array_equal(nxt.prompt[len(first.prompt) : len(first.prompt) + 3], out)
    assert len(nxt.prompt) == len(first.prompt) + 3 + 3
    assert wl.follow_up(nxt, out) is None  # last turn
    # Every conversation opens with the one shared system prompt.
    np.testing.assert_array_equal(wl.requests[0].prompt[:10], wl.requests[1].prompt[:10])


def test_trace_blocks_expand_deterministically(tmp_path):
    path = write_trace(
        tmp_path,
        [rec(0, 600, 4, [1, 2]), "", rec(1000, 1100, 2, [1, 2, 3]), rec(500, 100, 1, [9])],
    )
    wl = load_mooncake_trace(path, vocab_size=1000, block_size=512)
    assert [len(r.prompt) for r in wl.requests] == [600, 1100, 100]
    assert [r.max_new_tokens for r in wl.requests] == [4, 2, 1]
    a, b, c = wl.requests
    # Equal hash ids, equal blocks: the shared prefix is the first two blocks.
    np.testing.assert_array_equal(a.prompt, b.prompt[:600])
    assert not np.array_equal(c.prompt[:100], a.prompt[:100])
    assert [r.rid for r in wl.requests] == ["line1", "line3", "line4"]
    assert all(r.arrival == 0.0 for r in wl.requests)  # time_scale 0: all at once, file order
    again = load_mooncake_trace(path, vocab_size=1000)
    np.testing.assert_array_equal(again.requests[1].prompt, b.prompt)


def test_trace_timestamps_and_limits(tmp_path):
    path = write_trace(tmp_path, [rec(1000), rec(3000, n_out=50), rec(2000)])
    wl = load_mooncake_trace(path, vocab_size=100, time_scale=0.5, max_output=8)
    assert [r.arrival for r in wl.requests] == [0.0, 0.5, 1.0]  # sorted by arrival
    assert wl.requests[2].max_new_tokens == 8
    assert len(load_mooncake_trace(path, vocab_size=100, max_requests=2).requests) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"trace.jsonl:2: not valid JSON"),
        ("[1, 2]", r"trace.jsonl:2: expected a JSON object, got list"),
        (json.dumps({"input_length": 5, "output_length": 1, "hash_ids": [1]}), "'timestamp'"),
        (
            json.dumps({**rec(), "input_length": "600"}),
            r":2: field 'input_length' must be an integer in \[1, 2\*\*31\)",
        ),
        (
            json.dumps({**rec(), "input_length": 0}),
            r"field 'input_length' must be an integer in \[1, 2\*\*31\), got 0",
        ),
        (
            json.dumps({**rec(), "output_length": 1.5}),
            r"field 'output_length' must be an integer in \[1",
        ),
        (json.dumps({**rec(), "timestamp": -1}), r"field 'timestamp' must be >= 0"),
        (json.dumps({**rec(), "timestamp": True}), r"field 'timestamp' must be a finite number"),
        (json.dumps({**rec(), "hash_ids": [1, "x"]}), r"field 'hash_ids' must be a list of int"),
        (json.dumps({**rec(), "hash_ids": [1]}), r":2: field 'hash_ids' has 1 ids but input_len"),
    ],
)
def test_bad_trace_lines_name_the_line_and_field(tmp_path, line, message):
    path = write_trace(tmp_path, [rec(), line])
    with pytest.raises(TraceError, match=message):
        load_mooncake_trace(path, vocab_size=100)


def test_unreadable_or_empty_trace(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace file"):
        load_mooncake_trace(tmp_path / "missing.jsonl", vocab_size=100)
    with pytest.raises(TraceError, match="holds no requests"):
        load_mooncake_trace(write_trace(tmp_path, ["", ""]), vocab_size=100)
    assert issubclass(TraceError, ValueError)


def test_request_spec_validates():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        RequestSpec("x", np.zeros(0, np.int32), 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RequestSpec("x", np.ones(3, np.int32), 0)


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        (np.array([2**32 + 5], np.int64), ValueError, r"token 4294967301 at position 0"),
        (np.array([3, 2**31], np.uint64), ValueError, r"token 2147483648 at position 1"),
        ([1, -3, 4], ValueError, r"token -3 at position 1 .*\[0, 2\*\*31\)"),
        (np.array([1.9]), TypeError, "integer token ids, got float64"),
        ([1.0, 2.0], TypeError, "integer token ids, got float64"),
        (np.array([True, False]), TypeError, "integer token ids, got bool"),
        ([1, 2**70], TypeError, "integer token ids, got object"),
        (np.ones((2, 2), np.int32), ValueError, "non-empty 1-D"),
    ],
)
def test_request_spec_rejects_bad_token_ids_without_casting(prompt, error, match):
    with pytest.raises(
        error, match=rf"request x: prompt .*{match}" if error is TypeError else match
    ):
        RequestSpec("x", prompt, 1)


def test_request_spec_keeps_valid_token_ids_exactly():
    for prompt in ([0, 5, 2**31 - 1], np.array([0, 5, 2**31 - 1], np.uint64)):
        spec = RequestSpec("x", prompt, 1)
        assert spec.prompt.dtype == np.int32 and spec.prompt.flags.c_contiguous
        assert spec.prompt.tolist() == [0, 5, 2**31 - 1]
    with pytest.raises(TypeError, match="max_new_tokens"):
        RequestSpec("x", [1, 2], 2.5)


def test_trace_arrivals_start_at_the_earliest_timestamp(tmp_path):
    # Line 2 comes first in time; lines 3 and 4 arrive together (file order kept).
    path = write_trace(tmp_path, [rec(3000), rec(1000), rec(5000), rec(5000, n_in=100, ids=[7])])
    wl = load_mooncake_trace(path, vocab_size=100, time_scale=1.0)
    assert [(r.rid, r.arrival) for r in wl.requests] == [
        ("line2", 0.0),
        ("line1", 2.0),
        ("line3", 4.0),
        ("line4", 4.0),
    ]
    # time_scale 0: all at once, in file order.
    wl = load_mooncake_trace(path, vocab_size=100)
    assert [r.rid for r in wl.requests] == ["line1", "line2", "line3", "line4"]
    # max_requests takes the first lines of the file; their earliest timestamp is t0.
    wl = load_mooncake_trace(path, vocab_size=100, time_scale=1.0, max_requests=1)
    assert [(r.rid, r.arrival) for r in wl.requests] == [("line1", 0.0)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_requests": 0}, "max_requests must be >= 1, got 0"),
        ({"max_output": 0}, "max_output must be >= 1, got 0"),
        ({"time_scale": -1.0}, "time_scale must be >= 0, got -1.0"),
        # a block size of 0 divided by zero; negative or fractional ones were blamed on
        # the trace's hash_ids; 1.5 requests read 2; an infinite scale made NaN arrivals
        ({"block_size": 0}, "block_size: expected an integer >= 1, got 0"),
        ({"block_size": -4}, "block_size: expected an integer >= 1, got -4"),
        ({"block_size": 2.5}, "block_size: expected an integer >= 1, got 2.5"),
        ({"block_size": True}, "block_size: expected an integer >= 1, got True"),
        ({"max_requests": 1.5}, "max_requests must be an integer, got 1.5"),
        ({"max_output": "2"}, "max_output must be an integer, got '2'"),
        ({"time_scale": float("inf")}, "time_scale must be finite, got inf"),
        ({"time_scale": float("nan")}, "time_scale must be finite, got nan"),
        ({"time_scale": "1"}, "time_scale must be a number, got '1'"),
    ],
)
def test_trace_limits_are_checked(tmp_path, kwargs, match):
    path = write_trace(tmp_path, [rec(0), rec(10)])
    with pytest.raises(ValueError, match=match):
        load_mooncake_trace(path, vocab_size=100, **kwargs)
