"""A synthetic Mooncake-format trace: shared system prompts and multi-turn chats.

The generator draws conversations. Each opens with one of ``groups`` system prompts
(``system_blocks`` blocks, chosen with Zipf-like popularity so a few are hot) or, with
probability ``no_prefix``, with none; its first turn adds ``user_blocks`` fresh blocks, and
every later turn repeats the whole previous turn's ``hash_ids`` and appends fresh blocks (the
model's answer and the next user message), as a chat client resends its history. With
probability ``regenerate`` a turn is sent twice (the user asks for another answer): the same
``hash_ids`` again a little later, a request that hits a leaf without extending it, which
is where recency-based and insertion-based eviction part ways. Turns per
conversation are geometric with mean ``mean_turns``. Conversations start as a Poisson
process and their turns follow after exponential think times, so chats interleave; the
lines are written in timestamp order and cut to ``requests``, which keeps every chain
prefix-closed (a turn's timestamp is always after its predecessor's).

Fresh blocks get fresh consecutive ids, so equal ids mean equal blocks, as in the published
traces. Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give
the same file on every machine. With the defaults, 12,000 requests hold about 300,000 block
references (the scale of the issue's benchmark).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pymllm.replay.traces import MOONCAKE_BLOCK_TOKENS, is_finite, is_int

#: Bounds on :class:`TraceSpec` that keep a generation finite and in memory.
MAX_MEAN_TURNS = 100
MAX_GROUPS = 1_000_000


@dataclass(frozen=True)
class TraceSpec:
    """The shape of a generated trace; see the module docstring."""

    requests: int = 12_000
    seed: int = 0
    groups: int = 64
    system_blocks: tuple[int, int] = (2, 24)
    user_blocks: tuple[int, int] = (1, 10)
    mean_turns: float = 3.0
    no_prefix: float = 0.1
    regenerate: float = 0.1
    zipf: float = 1.1
    rate: float = 20.0  # conversations started per second
    think_s: float = 30.0  # mean gap between a turn and the next
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    output_tokens: tuple[int, int] = (16, 512)

    def __post_init__(self) -> None:
        for name, high in (("requests", None), ("groups", MAX_GROUPS), ("block_tokens", 1 << 31)):
            val = getattr(self, name)
            if not is_int(val) or val < 1:
                raise ValueError(f"{name}: expected a positive integer, got {val!r}")
            if high is not None and val >= high:
                raise ValueError(f"{name}: expected an integer below {high:,}, got {val!r}")
        seed = self.seed
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        for name in ("system_blocks", "user_blocks", "output_tokens"):
            lo, hi = getattr(self, name)
            if not (is_int(lo) and is_int(hi)):
                raise ValueError(f"{name}: expected two integers, got {(lo, hi)!r}")
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: expected 1 <= low <= high, got {(lo, hi)!r}")
        # the readers take lengths below 2**31 (a trace this writes must read back)
        if self.output_tokens[1] >= 1 << 31:
            raise ValueError(
                f"output_tokens: expected lengths below 2**31, got {self.output_tokens!r}"
            )
        # a chat resends its whole history every turn, so its requests grow with its turns
        # and their ids with the square: a mean of thousands of turns would not finish
        if not 1 <= self.mean_turns <= MAX_MEAN_TURNS:
            raise ValueError(
                f"mean_turns: expected a number in [1, {MAX_MEAN_TURNS}], got {self.mean_turns!r}"
            )
        for name in ("no_prefix", "regenerate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name}: expected a fraction in [0, 1], got {getattr(self, name)!r}"
                )
        for name in ("zipf", "rate", "think_s"):
            val = getattr(self, name)
            if not (val > 0 and is_finite(val)):
                raise ValueError(f"{name}: expected a positive finite number, got {val!r}")


def generate_trace(spec: TraceSpec | None = None) -> list[dict[str, Any]]:
    """The trace's records (``timestamp``, ``input_length``, ``output_length``,
    ``hash_ids``), in timestamp order, ``spec.requests`` of them."""
    spec = spec or TraceSpec()
    rng = np.random.default_rng(spec.seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    lo, hi = spec.system_blocks
    systems = [fresh(int(rng.integers(lo, hi + 1))) for _ in range(spec.groups)]
    weight = 1.0 / np.arange(1, spec.groups + 1) ** spec.zipf
    weight /= weight.sum()
    p_end = 1.0 / spec.mean_turns
    events: list[tuple[int, int, list[int]]] = []  # (time ms, order, hash_ids)
    start = 0.0
    # Once `requests` turns exist, the latest time among the first `requests` of them bounds
    # the trace: a chat starting after it cannot enter. New turns only lower that bound, so
    # it is recomputed as turns accumulate, and the loop ends once chats start after it.
    cutoff = np.inf
    next_check = spec.requests
    while True:
        start += rng.exponential(1.0 / spec.rate)
        if start * 1000 >= cutoff:
            break
        if rng.random() < spec.no_prefix:
            ids: list[int] = []
        else:
            ids = list(systems[int(rng.choice(spec.groups, p=weight))])
        t = start
        while True:
            ids = ids + fresh(int(rng.integers(spec.user_blocks[0], spec.user_blocks[1] + 1)))
            events.append((round(t * 1000), len(events), ids))
            if rng.random() < spec.regenerate:
                t += rng.exponential(spec.think_s / 4)
                events.append((round(t * 1000), len(events), ids))
            if rng.random() < p_end:
                break
            t += rng.exponential(spec.think_s)
        if len(events) >= next_check:
            times = np.fromiter((e[0] for e in events), dtype=np.int64, count=len(events))
            cutoff = float(np.partition(times, spec.requests - 1)[spec.requests - 1])
            next_check = len(events) + max(spec.requests // 16, 1)
    events.sort()
    longest = max((len(ids) for _, _, ids in events[: spec.requests]), default=0)
    if longest * spec.block_tokens >= 1 << 31:  # a Mooncake reader refuses such a line
        raise ValueError(
            f"block_tokens: {spec.block_tokens:,} tokens a block make a {longest}-block "
            f"prompt {longest * spec.block_tokens:,} tokens long, past 2**31 - 1"
        )
    out_lo, out_hi = spec.output_tokens
    outs = rng.integers(out_lo, out_hi + 1, size=spec.requests)
    return [
        {
            "timestamp": ts,
            "input_length": len(ids) * spec.block_tokens,
            "output_length": int(n_out),
            "hash_ids": ids,
        }
        for (ts, _, ids), n_out in zip(events[: spec.requests], outs, strict=True)
    ]


def write_trace(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write *records* as JSON Lines (one compact object per line)."""
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, separators=(",", ":")))
            f.write("\n")


__all__ = ["TraceSpec", "generate_trace", "write_trace"]
