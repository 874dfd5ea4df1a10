"""Workloads for the engine: shared system prompts, multi-turn chat, Mooncake trace files.

A workload is a list of :class:`RequestSpec` plus an optional ``follow_up`` hook that turns a
finished request into the next one (multi-turn chat: the next turn's prompt is the previous
prompt, the tokens the model generated, and a new user message). Token ids are drawn from
seeded generators, so a workload is the same on every run and machine.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pymllm.replay.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TraceError,
    check_block_tokens,
    is_finite,
    is_int,
    mooncake_record,
    trace_records,
)


@dataclass
class RequestSpec:
    """One request: prompt token ids, how many tokens to generate, when it arrives.

    ``arrival`` is in seconds from the start of the run (for a follow-up: from the moment
    the request it follows finished), finite and >= 0. ``rid`` names the request in the
    run's results: a run refuses a second request with the same one. ``meta`` is free for
    the workload's own bookkeeping.
    """

    rid: str
    prompt: np.ndarray
    max_new_tokens: int
    arrival: float = 0.0
    extra_key: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt = _token_ids(self.rid, self.prompt)
        self.max_new_tokens = _max_new_tokens(self.rid, self.max_new_tokens)
        self.arrival = _arrival(self.rid, self.arrival)


def _arrival(rid: str, a: Any) -> float:
    """``a`` as an arrival time (a finite real number of seconds, >= 0), else
    ``TypeError``/``ValueError``: a NaN or infinite one never comes, and a run waiting for
    it would never end."""
    if isinstance(a, bool) or not isinstance(a, int | float | np.integer | np.floating):
        raise TypeError(f"request {rid}: arrival must be a number of seconds, got {a!r}")
    try:
        t = float(a)
    except OverflowError:  # an int past float's range
        t = math.inf
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"request {rid}: arrival must be finite and >= 0, got {a!r:.40}")
    return t


def _max_new_tokens(rid: str, n: Any) -> int:
    """``n`` as a request's output length (an int >= 1), else ``TypeError``/``ValueError``."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"request {rid}: max_new_tokens must be an integer, got {n!r}")
    if n < 1:
        raise ValueError(f"request {rid}: max_new_tokens must be >= 1, got {n}")
    return int(n)


#: Token ids are int32 on the device: ids at or past this bound cannot be represented.
MAX_TOKEN_ID = 2**31


def _token_ids(rid: str, prompt: Any) -> np.ndarray:
    """``prompt`` as a contiguous int32 array, checked before the cast (no id wraps or
    truncates): integer dtype, 1-D, non-empty, every id in ``[0, 2**31)``."""
    arr = np.asarray(prompt)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"request {rid}: prompt must be a non-empty 1-D token array")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"request {rid}: prompt must hold integer token ids, got {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= MAX_TOKEN_ID))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"request {rid}: prompt token {int(arr[i])} at position {i} is outside [0, 2**31)"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


@dataclass
class Workload:
    """Requests to serve. ``follow_up(spec, output_tokens)`` may return the next request."""

    name: str
    description: str
    requests: list[RequestSpec]
    follow_up: Callable[[RequestSpec, np.ndarray], RequestSpec | None] | None = None
    #: Requests including the follow-ups that will be created (for progress reports).
    total_requests: int = 0

    def __post_init__(self) -> None:
        if not self.total_requests:
            self.total_requests = len(self.requests)

    def max_seq_len(self) -> int:
        """An upper bound of prompt + output length over the initial requests."""
        return max(len(r.prompt) + r.max_new_tokens for r in self.requests)


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> np.ndarray:
    return rng.integers(1, vocab_size, size=n, dtype=np.int32)


def shared_prefix(
    *,
    vocab_size: int,
    n_groups: int = 6,
    per_group: int = 8,
    prefix_len: int = 512,
    suffix_len: tuple[int, int] = (32, 96),
    output_len: int = 16,
    seed: int = 0,
) -> Workload:
    """Groups of requests sharing a long system prompt, interleaved across groups.

    Request ``i`` belongs to group ``i % n_groups``: its prompt is the group's
    ``prefix_len`` tokens plus a fresh suffix of ``suffix_len[0]..suffix_len[1]`` tokens.
    The ideal hit rate is that of every request but the first of each group reusing the
    whole prefix.
    """
    rng = np.random.default_rng(seed)
    prefixes = [_tokens(rng, prefix_len, vocab_size) for _ in range(n_groups)]
    reqs = []
    for i in range(n_groups * per_group):
        g = i % n_groups
        suffix = _tokens(rng, int(rng.integers(suffix_len[0], suffix_len[1] + 1)), vocab_size)
        reqs.append(
            RequestSpec(
                rid=f"g{g}-r{i // n_groups}",
                prompt=np.concatenate([prefixes[g], suffix]),
                max_new_tokens=output_len,
                meta={"group": g},
            )
        )
    return Workload(
        name="shared-prefix",
        description=(
            f"{n_groups} system prompts of {prefix_len} tokens, {per_group} requests each "
            f"(+{suffix_len[0]}-{suffix_len[1]} fresh tokens, {output_len} generated)"
        ),
        requests=reqs,
    )


def multi_turn(
    *,
    vocab_size: int,
    n_conversations: int = 8,
    turns: int = 4,
    system_len: int = 256,
    user_len: tuple[int, int] = (32, 64),
    output_len: int = 24,
    seed: int = 0,
) -> Workload:
    """Chats whose every turn extends the conversation so far.

    All conversations open with one shared system prompt of ``system_len`` tokens. Turn
    ``k + 1`` arrives when turn ``k`` finishes; its prompt is turn ``k``'s prompt, the
    ``output_len`` tokens the model generated, and a new user message.
    """
    rng = np.random.default_rng(seed)
    system = _tokens(rng, system_len, vocab_size)
    # All user messages are drawn up front so the workload does not depend on timing.
    user_msgs = [
        [
            _tokens(rng, int(rng.integers(user_len[0], user_len[1] + 1)), vocab_size)
            for _ in range(turns)
        ]
        for _ in range(n_conversations)
    ]
    reqs = [
        RequestSpec(
            rid=f"c{c}-t0",
            prompt=np.concatenate([system, user_msgs[c][0]]),
            max_new_tokens=output_len,
            meta={"conv": c, "turn": 0},
        )
        for c in range(n_conversations)
    ]

    def follow_up(spec: RequestSpec, output: np.ndarray) -> RequestSpec | None:
        c, t = spec.meta["conv"], spec.meta["turn"] + 1
        if t >= turns:
            return None
        return RequestSpec(
            rid=f"c{c}-t{t}",
            prompt=np.concatenate([spec.prompt, output, user_msgs[c][t]]),
            max_new_tokens=output_len,
            extra_key=spec.extra_key,
            meta={"conv": c, "turn": t},
        )

    return Workload(
        name="multi-turn",
        description=(
            f"{n_conversations} chats x {turns} turns, shared {system_len}-token system "
            f"prompt, {user_len[0]}-{user_len[1]}-token user turns, {output_len} generated"
        ),
        requests=reqs,
        follow_up=follow_up,
        total_requests=n_conversations * turns,
    )


def load_mooncake_trace(
    path: str | Path,
    *,
    vocab_size: int,
    block_size: int = MOONCAKE_BLOCK_TOKENS,
    time_scale: float = 0.0,
    max_requests: int | None = None,
    max_output: int | None = None,
    seed: int = 0,
) -> Workload:
    """Parse a Mooncake-format JSONL trace into a workload.

    Each line is an object with ``timestamp`` (ms), ``input_length``, ``output_length`` and
    ``hash_ids``: one id per ``block_size``-token block of the prompt, equal ids meaning
    equal blocks (the trace's prefix sharing). Every id expands to a deterministic block of
    tokens (seeded by ``seed`` and the id); the prompt is the blocks joined and cut to
    ``input_length``. Arrivals are ``(timestamp - t0) * time_scale`` with ``t0`` the
    earliest timestamp of the lines read (0: all at once); the requests are ordered by
    arrival, in file order among equal arrivals. ``max_requests`` reads only the first
    lines of the file; ``max_output`` caps every request's output. Blank lines are skipped.
    Raises ``ValueError`` for a block size that is not an integer of at least 1, a limit
    that is not an integer of at least 1, or a ``time_scale`` that is not a finite number
    of at least 0, and :class:`TraceError` naming the file, the line and the field for anything
    else that is malformed.
    """
    check_block_tokens("block_size", block_size, bounded=False)  # draws only what is read
    for name, limit in (("max_requests", max_requests), ("max_output", max_output)):
        if limit is not None and not is_int(limit):
            raise ValueError(f"{name} must be an integer, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")
    if not isinstance(time_scale, numbers.Real) or isinstance(time_scale, bool):
        raise ValueError(f"time_scale must be a number, got {time_scale!r}")
    if time_scale < 0:
        raise ValueError(f"time_scale must be >= 0, got {time_scale}")
    if not is_finite(time_scale):
        raise ValueError(f"time_scale must be finite, got {time_scale}")
    path = Path(path)
    blocks: dict[int, np.ndarray] = {}

    def block(h: int) -> np.ndarray:
        if h not in blocks:
            rng = np.random.default_rng([seed, h & 0xFFFFFFFFFFFFFFFF])
            blocks[h] = _tokens(rng, need[h], vocab_size)
        return blocks[h]

    lines: list[tuple[int, dict[str, Any]]] = []
    for lineno, where, rec in trace_records(path):
        lines.append((lineno, mooncake_record(rec, where, block_size=block_size)))
        if max_requests is not None and len(lines) >= max_requests:
            break
    if not lines:
        raise TraceError(f"{path}: the trace holds no requests")
    # How many of its block's tokens each id is read for: the whole block, except where it
    # only ever ends a prompt (a draw of n tokens is the first n of a whole block's draw).
    # Drawing whole blocks made a huge block size allocate its tokens for a 10-token prompt.
    need: dict[int, int] = {}
    for _, r in lines:
        for k, h in enumerate(r["hash_ids"]):
            n = min(block_size, r["input_length"] - k * block_size)
            need[h] = max(need.get(h, 0), n)
    # Timestamps need not be sorted: the earliest one is the start, so every arrival keeps
    # its distance from the others (none is clamped to the start).
    t0 = min(r["timestamp"] for _, r in lines)
    reqs: list[RequestSpec] = []
    for lineno, r in lines:
        n_in, n_out, ids = r["input_length"], r["output_length"], r["hash_ids"]
        prompt = np.concatenate([block(h) for h in ids])[:n_in]
        reqs.append(
            RequestSpec(
                rid=f"line{lineno}",
                prompt=prompt,
                max_new_tokens=n_out if max_output is None else min(n_out, max_output),
                arrival=(r["timestamp"] - t0) / 1000.0 * time_scale,
                meta={"line": lineno, "hash_ids": ids},
            )
        )
    # The engine serves by arrival whatever the order; sorted, the workload's order (and so
    # the order of the results) is the order of arrival. Stable: file order among ties.
    reqs.sort(key=lambda r: r.arrival)
    return Workload(
        name=f"trace:{path.name}",
        description=f"{len(reqs)} requests replayed from {path} ({block_size}-token blocks)",
        requests=reqs,
    )


def make_workload(name: str, *, vocab_size: int, seed: int = 0, **kwargs: Any) -> Workload:
    """A built-in workload by name: ``shared-prefix`` or ``multi-turn``."""
    builders: dict[str, Callable[..., Workload]] = {
        "shared-prefix": shared_prefix,
        "multi-turn": multi_turn,
    }
    if name not in builders:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(builders)}")
    return builders[name](vocab_size=vocab_size, seed=seed, **kwargs)


WORKLOADS = ("shared-prefix", "multi-turn")

__all__ = [
    "WORKLOADS",
    "RequestSpec",
    "TraceError",
    "Workload",
    "load_mooncake_trace",
    "make_workload",
    "multi_turn",
    "shared_prefix",
]
