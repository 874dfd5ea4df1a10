"""Trace files: the Mooncake JSONL format and a plain token format, read into int32 keys.

Both formats are JSON Lines; blank lines are skipped, and anything malformed raises
:class:`TraceError` naming the file, the line number and the field. The line-level checks
here are also what the engine's :func:`pymllm.engine.workloads.load_mooncake_trace` uses,
so a line is read the same way by both, except that the demo needs every Mooncake field
(it replays arrivals and outputs), where the replay tool can do without ``timestamp``,
``input_length`` and ``output_length``, and that only the replay tool reads plain traces.

**Mooncake** (one object per line, as published with the Mooncake paper)::

    {"timestamp": 27482, "input_length": 1264, "output_length": 52, "hash_ids": [46, 47, 2]}

``hash_ids`` holds one id per ``block_tokens``-token block of the prompt (512 in Mooncake's
traces); equal ids mean equal blocks, and since a block's id depends on everything before it,
a shared id prefix is a shared prompt prefix. ``timestamp`` (ms, a number >= 0),
``input_length`` and ``output_length`` (integers in ``[1, 2**31)``) are checked when
present; when ``input_length`` is present it must need exactly ``len(hash_ids)`` blocks. An
optional ``priority`` (a 64-bit integer) is passed to ``insert`` under the ``priority``
eviction policy.

**Plain** (one request per line)::

    [101, 2023, 2003, 1037]
    {"tokens": [101, 2023, 2003], "extra_key": "lora-7", "priority": 2}

A bare JSON list is the prompt's token ids. An object holds them under ``tokens``, with an
optional ``extra_key`` (a string, an integer or null: the cache namespace, so requests with
different extra keys never share a prefix) and an optional integer ``priority``.

In both formats every id must lie in ``[0, 2**31)`` so that a key is one contiguous
``int32`` array, which the compiled cache reads without a copy.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("auto", "mooncake", "tokens")

#: Mooncake's block size: one hash id stands for this many prompt tokens.
MOONCAKE_BLOCK_TOKENS = 512

_ID_LIMIT = 1 << 31
_I64 = 1 << 63

#: The Mooncake fields and how each is checked (see :func:`trace_field`).
MOONCAKE_FIELDS = {
    "timestamp": "number",
    "input_length": "posint",
    "output_length": "posint",
    "hash_ids": "ids",
}


def is_int(val: Any) -> bool:
    """Whether *val* is an integer (a Python int or a numpy integer; never a bool)."""
    return isinstance(val, numbers.Integral) and not isinstance(val, (bool, np.bool_))


def is_finite(val: float) -> bool:
    """``math.isfinite`` for any real number: an int past float's range (valid JSON, a
    401-digit timestamp say) is not finite here, where ``math.isfinite`` raises
    ``OverflowError``."""
    try:
        return math.isfinite(val)
    except OverflowError:
        return False


def check_block_tokens(name: str, val: Any, bounded: bool = True) -> None:
    """Refuse a block size (tokens per hash id) that is not an integer of at least 1, below
    2**31 when *bounded* (the replay's token counts are int32): ``ValueError`` naming
    *name*."""
    if not is_int(val) or val < 1 or (bounded and val >= _ID_LIMIT):
        want = "in [1, 2**31)" if bounded else ">= 1"
        raise ValueError(f"{name}: expected an integer {want}, got {val!r}")


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the line and the field."""


def trace_field(rec: dict[str, Any], name: str, where: str, *, kind: str) -> Any:
    """``rec[name]`` checked as *kind*: ``number`` (finite, >= 0), ``posint`` (an integer
    in ``[1, 2**31)``), ``int`` (a 64-bit integer) or ``ids`` (a list of integers). Raises
    :class:`TraceError` naming *where* (``file:line``) and the field."""
    if name not in rec:
        raise TraceError(f"{where}: missing field {name!r}")
    val = rec[name]
    if kind == "number":
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not is_finite(val):
            raise TraceError(f"{where}: field {name!r} must be a finite number, got {val!r:.80}")
        if val < 0:
            raise TraceError(f"{where}: field {name!r} must be >= 0, got {val!r}")
    elif kind == "posint":
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val < _ID_LIMIT:
            raise TraceError(
                f"{where}: field {name!r} must be an integer in [1, 2**31), got {val!r:.80}"
            )
    elif kind == "int":
        if isinstance(val, bool) or not isinstance(val, int) or not -_I64 <= val < _I64:
            raise TraceError(f"{where}: field {name!r} must be a 64-bit integer, got {val!r:.80}")
    elif kind == "ids":
        if not isinstance(val, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in val
        ):
            raise TraceError(f"{where}: field {name!r} must be a list of integers, got {val!r:.80}")
    else:
        raise ValueError(f"kind: expected one of number, posint, int, ids; got {kind!r}")
    return val


def trace_records(path: str | Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, where, value)`` for every non-blank line of a JSON Lines file,
    ``where`` being ``"file:line"`` for messages. Raises :class:`TraceError` for an
    unreadable file or a line that is not JSON (the value's shape is the caller's to check)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is no token
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TraceError(f"{path}: cannot read trace file: {reason}") from exc
    # JSON Lines ends a line at "\n" only: str.splitlines() would also split inside a
    # string at U+2028, form feeds and other separators that JSON allows unescaped
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # a huge integer literal; deep nesting
            raise TraceError(f"{where}: not a line this reader takes ({exc})") from None
        yield lineno, where, rec


def mooncake_record(
    rec: Any, where: str, *, block_size: int, optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The checked :data:`MOONCAKE_FIELDS` of one Mooncake line.

    Every field is required except those named in *optional*, which are ``None`` in the
    result when absent (and checked when present). Every hash id must lie in
    ``[0, 2**31)`` and a ``priority``, when present, must be an integer. When
    ``input_length`` is known it must need exactly ``len(hash_ids)`` blocks of
    *block_size* tokens.
    """
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    out = {
        name: None
        if name in optional and name not in rec
        else trace_field(rec, name, where, kind=kind)
        for name, kind in MOONCAKE_FIELDS.items()
    }
    ids, n_in = out["hash_ids"], out["input_length"]
    # the same ids and priority as the replay's keys take, whichever reader calls this
    if ids is not None:
        _ids_array(ids, "hash_ids", where)
    if "priority" in rec:
        trace_field(rec, "priority", where, kind="int")
    if ids is not None and n_in is not None:
        want = -(-n_in // block_size)
        if len(ids) != want:
            raise TraceError(
                f"{where}: field 'hash_ids' has {len(ids)} ids but input_length {n_in} needs "
                f"ceil({n_in}/{block_size}) = {want} (is the block size {block_size}?)"
            )
    return out


@dataclass
class Trace:
    """Requests read from a trace, each already one contiguous ``int32`` key.

    ``keys[i]`` is request *i*'s key in the trace's unit: one hash id per block for a
    Mooncake trace (``unit="block"``, ``unit_tokens`` tokens each), one token id for a plain
    trace (``unit="token"``, ``unit_tokens=1``). ``tokens[i]`` is its prompt length in
    tokens (``input_length`` when the line gives it). ``extra_keys`` and ``priorities`` are
    ``None`` when no line sets them.
    """

    name: str
    format: str
    keys: list[np.ndarray]
    tokens: np.ndarray
    unit: str
    unit_tokens: int
    extra_keys: list[Any] | None = None
    priorities: list[int] | None = None
    lines: list[int] = field(default_factory=list)
    _distinct: int | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def total_units(self) -> int:
        """Key units (blocks or tokens) over all requests, repeats included."""
        return int(sum(k.size for k in self.keys))

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    def distinct_units(self) -> int:
        """Units a cache must hold to keep every prefix of the trace: the nodes of a trie of
        all keys (equal to the distinct hash ids of a well-formed Mooncake trace). Computed
        once: a trace's keys are not meant to change after reading."""
        if self._distinct is not None:
            return self._distinct
        root: dict[Any, Any] = {}
        n = 0
        for key, ns in zip(self.keys, self.extra_keys or [None] * len(self.keys), strict=True):
            node = root.setdefault(("ns", ns), {})
            for u in key.tolist():
                nxt = node.get(u)
                if nxt is None:
                    nxt = node[u] = {}
                    n += 1
                node = nxt
        self._distinct = n
        return n


def _ids_array(ids: list[int], name: str, where: str) -> np.ndarray:
    if not ids:
        raise TraceError(f"{where}: field {name!r} is empty")
    try:
        arr = np.array(ids, dtype=np.int64)
    except OverflowError:
        arr = None
    if arr is None or int(arr.min()) < 0 or int(arr.max()) >= _ID_LIMIT:
        bad = next(h for h in ids if not 0 <= h < _ID_LIMIT)
        raise TraceError(f"{where}: field {name!r}: id {bad} is outside [0, 2**31)")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _extra_key(rec: dict[str, Any], where: str) -> Any:
    val = rec.get("extra_key")
    if val is not None and (isinstance(val, bool) or not isinstance(val, (str, int))):
        raise TraceError(
            f"{where}: field 'extra_key' must be a string, an integer or null, got {val!r:.80}"
        )
    return val


def _detect(first: Any, where: str) -> str:
    if isinstance(first, list) or (isinstance(first, dict) and "tokens" in first):
        return "tokens"
    if isinstance(first, dict) and "hash_ids" in first:
        return "mooncake"
    raise TraceError(
        f"{where}: cannot tell the trace format: expected an object with 'hash_ids' "
        f"(Mooncake), a list of token ids, or an object with 'tokens'"
    )


def read_trace(
    path: str | Path,
    *,
    format: str = "auto",
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    max_requests: int | None = None,
) -> Trace:
    """Read a trace file (format ``auto``, ``mooncake`` or ``tokens``; see the module doc).

    ``auto`` decides from the first non-blank line. Requests stay in file order (a replay
    runs them one at a time, so arrival times only matter through that order).
    ``block_tokens`` is the tokens per Mooncake block. Raises :class:`TraceError` naming
    the line for anything malformed, or when the file holds no request.
    """
    return _build(
        trace_records(path),
        str(path),
        format=format,
        block_tokens=block_tokens,
        max_requests=max_requests,
    )


def trace_from_records(
    records: Iterable[Any],
    name: str = "<records>",
    *,
    format: str = "auto",
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> Trace:
    """A :class:`Trace` from parsed lines (``records[i]`` stands for line ``i + 1`` of a
    file called *name*), checked exactly as :func:`read_trace` checks a file."""
    numbered = ((i, f"{name}:{i}", rec) for i, rec in enumerate(records, 1))
    return _build(numbered, name, format=format, block_tokens=block_tokens, max_requests=None)


def _build(
    records: Iterable[tuple[int, str, Any]],
    name: str,
    *,
    format: str,
    block_tokens: int,
    max_requests: int | None,
) -> Trace:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    check_block_tokens("block_tokens", block_tokens)
    if max_requests is not None and (not is_int(max_requests) or max_requests < 1):
        raise ValueError(f"max_requests: expected a positive integer, got {max_requests!r}")
    keys: list[np.ndarray] = []
    tokens: list[int] = []
    extra: list[Any] = []
    prio: list[int] = []
    lines: list[int] = []
    fmt = None if format == "auto" else format
    for lineno, where, rec in records:
        if fmt is None:
            fmt = _detect(rec, where)
        if fmt == "mooncake":
            r = mooncake_record(
                rec,
                where,
                block_size=block_tokens,
                optional=("timestamp", "input_length", "output_length"),
            )
            key = np.asarray(r["hash_ids"], dtype=np.int32)  # checked by mooncake_record
            tokens.append(r["input_length"] or key.size * block_tokens)
            extra.append(None)
        else:
            if isinstance(rec, list):
                rec = {"tokens": rec}
            elif not isinstance(rec, dict):
                raise TraceError(
                    f"{where}: expected a list of token ids or an object with 'tokens', "
                    f"got {type(rec).__name__}"
                )
            key = _ids_array(trace_field(rec, "tokens", where, kind="ids"), "tokens", where)
            tokens.append(key.size)
            extra.append(_extra_key(rec, where))
        prio.append(trace_field(rec, "priority", where, kind="int") if "priority" in rec else 0)
        keys.append(key)
        lines.append(lineno)
        if max_requests is not None and len(keys) >= max_requests:
            break
    if not keys:
        raise TraceError(f"{name}: the trace holds no requests")
    mooncake = fmt == "mooncake"
    return Trace(
        name=Path(name).name,
        format=fmt or format,
        keys=keys,
        tokens=np.asarray(tokens, dtype=np.int64),
        unit="block" if mooncake else "token",
        unit_tokens=block_tokens if mooncake else 1,
        extra_keys=extra if any(e is not None for e in extra) else None,
        priorities=prio if any(prio) else None,
        lines=lines,
    )


__all__ = [
    "FORMATS",
    "MOONCAKE_BLOCK_TOKENS",
    "MOONCAKE_FIELDS",
    "Trace",
    "TraceError",
    "mooncake_record",
    "read_trace",
    "trace_field",
    "trace_from_records",
    "trace_records",
]
