"""Abstract base class and shared data types for prefix cache implementations.

All concrete caches (:class:`~pymllm.mem_cache.radix_cache.RadixCache`,
:class:`~pymllm.mem_cache.chunk_cache.ChunkCache`,
:class:`~pymllm.mem_cache.mamba_radix_cache.MambaRadixCache`) inherit from
:class:`BasePrefixCache` and share the data classes defined here.

KV slot ownership, the one rule every cache follows: an index is at every moment in exactly
one place, free in the allocator, owned by the tree, or owned by the caller. The docstring
of each method says which indices change hands.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import operator
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

# the compiled allocators own the reading of slot and token sequences the caches share
from pymllm.mem_cache._allocator import _BOOL_TYPES, _sequence_as_list
from pymllm.mem_cache.errors import InvalidKeyError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

_U32_LIMIT = 1 << 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


_HASH_CHUNK = 1 << 16  # tokens converted per step: the buffer stays in L2 cache
_SMALL_PAGE = 256  # up to this many list tokens are packed by struct, not numpy


def _refuse_bools(token_ids: Any) -> None:
    """A bool is not a token (the compiled caches refuse it too), but numpy reads
    ``[True, 2]`` as ``[1, 2]`` and struct packs True as 1: look for bools in a list or
    tuple key, tuple tokens included, by their types alone (a C loop, no per-token Python
    code)."""
    if not isinstance(token_ids, (list, tuple)):  # subclasses too (others came as a list)
        return
    types = set(map(type, token_ids))
    if any(issubclass(t, tuple) for t in types):
        try:
            types = set(map(type, itertools.chain.from_iterable(token_ids)))
        except TypeError:  # tuples mixed with ints: numpy's error says which
            types.discard(tuple)
    if not _BOOL_TYPES.isdisjoint(types):
        raise InvalidKeyError(f"token_ids: tokens must be integers, not bools: {token_ids!r:.80}")


def _token_array(token_ids: Any) -> np.ndarray:
    """Tokens (ints, equal-length tuples or an integer array) as one flat integer array."""
    if isinstance(token_ids, RadixKey):
        token_ids = token_ids.token_ids
    # a list or tuple subclass by its items as stored, as the caches read keys (its own
    # __iter__ may say otherwise); any other sequence numpy reads item by item, as a list
    if type(token_ids) is not list and isinstance(token_ids, list):
        token_ids = list.copy(token_ids)
    elif type(token_ids) is not tuple and isinstance(token_ids, tuple):
        token_ids = tuple.__getitem__(token_ids, slice(None))
    token_ids = _sequence_as_list("token_ids", token_ids, InvalidKeyError)
    _refuse_bools(token_ids)
    try:
        arr = np.asarray(token_ids)
    except ValueError as exc:  # ragged tuples
        raise InvalidKeyError(
            f"token_ids: tuple tokens must all have one length, got {token_ids!r:.80}"
        ) from exc
    if arr.ndim == 0 or arr.ndim > 2 or (arr.ndim == 2 and arr.size == 0 and len(arr)):
        raise InvalidKeyError(
            "token_ids: expected a sequence of ints or of equal-length, non-empty tuples, "
            f"got {token_ids!r:.80}"
        )
    if arr.dtype.kind not in "iu" and arr.size:
        if arr.dtype != object and not isinstance(token_ids, np.ndarray):
            # numpy found no integer dtype for a sequence (numpy ints of both signs make
            # float64): read its tokens one by one, as the caches do
            arr = np.asarray(token_ids, dtype=object)
        if arr.dtype != object:
            raise InvalidKeyError(
                f"token_ids: tokens must be integers, got dtype {arr.dtype}: {token_ids!r:.80}"
            )
        # Python ints beyond int64, objects with __index__ and numpy ints of both signs
        # land here; they are read one by one (rare path), as operator.index reads them
        arr = np.array([_token_int(t, token_ids) for t in arr.ravel()], dtype=np.uint32)
    return arr.reshape(-1)


def _token_int(t: Any, token_ids: Any) -> int:
    """One token of an object array: an int as operator.index reads it, in [0, 2**32)."""
    try:
        if type(t) in _BOOL_TYPES:
            raise TypeError
        v = operator.index(t)
    except TypeError:
        raise InvalidKeyError(
            f"token_ids: tokens must be integers, got {t!r:.40} in {token_ids!r:.80}"
        ) from None
    if not 0 <= v < _U32_LIMIT:
        raise InvalidKeyError(f"token_ids: token {v} is outside [0, 2**32)")
    return v


def _check_token_range(arr: np.ndarray) -> None:
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 4:
        return
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= _U32_LIMIT:
        bad = lo if lo < 0 else hi
        raise InvalidKeyError(f"token_ids: token {int(bad)} is outside [0, 2**32)")


def _feed_tokens(h: Any, token_ids: Any) -> None:
    """Feed the tokens to hasher *h* as little-endian uint32, without building the packed
    bytes of a long key: 32-bit arrays go in as they are, others in L2-sized chunks."""
    if (
        type(token_ids) is list
        and len(token_ids) <= _SMALL_PAGE
        and _BOOL_TYPES.isdisjoint(map(type, token_ids))  # struct packs True as 1
    ):
        # a page of plain ints: one struct.pack (a C loop) beats numpy's fixed costs
        try:
            h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
            return
        except struct.error:
            pass  # tuples, out-of-range or non-int tokens: the array path says which
    arr = _token_array(token_ids)
    if arr.size == 0:
        return
    if arr.dtype.itemsize == 4 and arr.dtype.byteorder in "<=|" and arr.flags.c_contiguous:
        _check_token_range(arr)
        h.update(arr if np.little_endian or arr.dtype.byteorder == "<" else arr.byteswap())
        return
    buf = np.empty(min(arr.size, _HASH_CHUNK), dtype="<u4")
    for start in range(0, arr.size, _HASH_CHUNK):
        chunk = arr[start : start + _HASH_CHUNK]
        _check_token_range(chunk)
        out = buf[: chunk.size]
        np.copyto(out, chunk, casting="unsafe")
        h.update(out)


def hash_token_ids(token_ids: Any, prior_hash: str | None = None) -> str:
    """SHA-256 hash of a token-id page with optional chain-hash.

    Each token is encoded as a 4-byte little-endian unsigned integer; tuples (bigram /
    EAGLE) hash each element in order. When *prior_hash* (a hex digest) is supplied the
    digest is first fed the raw bytes of that hash, making the result position-aware.
    Tokens are packed with numpy, never one by one; a token outside [0, 2**32) or a
    *prior_hash* that is not a hex string raises ``InvalidKeyError`` (a ``ValueError``).
    A :class:`RadixKey` is hashed by its tokens when its ``extra_key`` is None; with a
    namespace it is ``InvalidKeyError``, since the hash would drop the namespace (two
    adapters' equal pages would hash alike): hash ``key.token_ids`` and keep the
    ``extra_key`` beside the hash.
    """
    if isinstance(token_ids, RadixKey) and token_ids.extra_key is not None:
        raise InvalidKeyError(
            f"token_ids: a RadixKey with extra_key {token_ids.extra_key!r:.60}: the page hash "
            "covers tokens only, so pass key.token_ids and key the hash by the extra_key too"
        )
    h = hashlib.sha256()
    if prior_hash is not None:
        try:
            raw = bytes.fromhex(prior_hash)
        except (ValueError, TypeError):
            raw = b""
        # fromhex alone takes "" (no prior hash at all) and skips whitespace: both refused
        if not raw or 2 * len(raw) != len(prior_hash):
            raise InvalidKeyError(f"prior_hash: expected a hex digest, got {prior_hash!r:.80}")
        h.update(raw)
    _feed_tokens(h, token_ids)
    return h.hexdigest()


def hash_to_int64(hex_str: str) -> int:
    """Convert a hex digest to a signed 64-bit integer (its first 16 hex chars).

    ``TypeError`` for a non-string, ``InvalidKeyError`` (a ``ValueError``) unless its first
    16 characters (all of it, if shorter, but at least one) are hex digits: no sign, ``0x``,
    underscore or space, which ``int(s, 16)`` would accept."""
    if not isinstance(hex_str, str):
        raise TypeError(
            f"hex_str: expected a hex string, got {type(hex_str).__name__} {hex_str!r:.80}"
        )
    head = hex_str[:16]
    if not head or not all(c in _HEX_DIGITS for c in head):
        raise InvalidKeyError(f"hex_str: expected a hex digest, got {hex_str!r:.80}")
    value = int(head, 16)
    return value - (1 << 64) if value >= (1 << 63) else value


def hash_bytes(data: Buffer | np.ndarray) -> int:
    """SHA-256 -> unsigned 64-bit int (first 8 digest bytes, big-endian).

    Useful for multimodal embedding keys (``extra_key``). ``TypeError`` unless *data*
    supports the buffer protocol (bytes, bytearray, memoryview, a contiguous array) with
    bytes of its own: an array of Python objects holds pointers, which differ between
    equal arrays and between runs, so it is refused.
    """
    try:
        view = memoryview(data)  # type: ignore[arg-type]  # numpy declares no __buffer__
        if _holds_objects(data, view):
            raise TypeError
        digest = hashlib.sha256(view).digest()
    except (TypeError, ValueError, BufferError):  # not bytes-like, or not contiguous
        raise TypeError(
            f"data: expected bytes-like, got {type(data).__name__} {data!r:.80}"
        ) from None
    return int.from_bytes(digest[:8], "big")


def _holds_objects(data: Any, view: memoryview) -> bool:
    """Whether a buffer holds Python objects (pointers), in a field of a record too: read
    from the array's dtype, or from the buffer's format as numpy reads it; a format numpy
    cannot read is taken to hold them if it names the object type code at all."""
    if isinstance(data, np.ndarray):
        return bool(data.dtype.hasobject)
    try:
        return bool(np.asarray(view).dtype.hasobject)
    except (TypeError, ValueError, RuntimeError):  # numpy's errors for formats it cannot map
        return "O" in view.format


class RadixKey:
    """Compound lookup key: token-id sequence + optional namespace tag.

    ``token_ids`` is a list of ints, a list of equal-length tuples (bigram / EAGLE keys) or
    a 1-D integer numpy array (taken without a copy by the compiled caches). ``extra_key``
    isolates independent namespaces so that sequences with identical leading tokens but
    different adapters / LoRA ids / multimodal context hashes never share prefix nodes.
    Equal ``extra_key`` values (by ``==``: ``1``, ``1.0``, ``numpy.int64(1)``) share a
    namespace, but for the few kept apart that ``RadixCache`` lists. The compiled caches
    find namespaces through a registry hashed with a random key of each tree's own, so
    extra_keys chosen to collide in Python's hash (the ints ``k + i * (2**61 - 1)``) cost a
    lookup no more than any others; an extra_key of a class of your own is hashed by its
    own ``__hash__``.
    """

    __slots__ = ("token_ids", "extra_key")  # noqa: RUF023 (the seed's order)

    def __init__(self, token_ids: Any, extra_key: Any = None) -> None:
        self.token_ids = token_ids
        self.extra_key = extra_key

    def __len__(self) -> int:
        return len(self.token_ids)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.token_ids)

    def __getitem__(self, idx: int | slice) -> RadixKey:
        tokens = _sliceable(self.token_ids)
        if isinstance(idx, slice):
            return RadixKey(tokens[idx], self.extra_key)
        n = len(tokens)
        try:
            i = operator.index(idx)
        except TypeError:
            raise TypeError(f"idx: expected an int or a slice, got {idx!r:.80}") from None
        if i < -n or i >= n:
            raise IndexError(f"idx: RadixKey index {idx} out of range for length {n}")
        i %= n
        return RadixKey(tokens[i : i + 1], self.extra_key)

    def __repr__(self) -> str:
        return f"RadixKey(extra_key={self.extra_key!r}, token_ids={_tokens_repr(self.token_ids)})"


def _tokens_repr(tokens: Any) -> str:
    """At most the first ten tokens, then ``...``: an array's as Python ints (an array of
    another kind, a jax one, read as numpy), so that it prints as the same list key would.
    What is no collection (an iterator, which reading would consume; a value the caches
    refuse, ``None`` or an int) is shown by its own repr, cut short: the repr of a key must
    answer, for the error handler that logs a refused one too."""
    given = tokens
    try:
        if hasattr(tokens, "__array__") and not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens)
        if isinstance(tokens, np.ndarray) and tokens.ndim == 0:  # a scalar, an int array
            return f"{given!r:.80}"
        if isinstance(tokens, np.ndarray) and tokens.ndim == 1:
            head, n = tokens[:10].tolist(), len(tokens)
        elif hasattr(tokens, "__len__") and hasattr(tokens, "__iter__"):
            head, n = list(itertools.islice(tokens, 10)), len(tokens)
        else:
            return f"{given!r:.80}"
    except Exception:  # a collection whose own methods raise
        return f"<{type(given).__name__}>"
    return f"{head}{'...' if n > 10 else ''}"


def _sliceable(tokens: Any) -> Any:
    """The tokens as they are when they can be sliced (list, tuple, array); an array of
    another kind (a ``jax.Array``, anything with ``__array__``) as numpy (slicing a jax
    array would compile per length, and ``list`` of it makes a device scalar per token);
    else as a list (a deque, any other sequence the caches read)."""
    if isinstance(tokens, (list, tuple, np.ndarray)):
        return tokens
    if hasattr(tokens, "__array__"):
        return np.asarray(tokens)
    return list(tokens)


@dataclass(slots=True, eq=False)
class MatchResult:
    """Returned by :meth:`BasePrefixCache.match_prefix`.

    ``indices`` is a 1-D ``numpy.int32`` array of the KV slots of the matched prefix, on
    the host. They stay owned by the tree: lock ``last_node`` before relying on them past
    the next ``evict``. Results compare field by field, ``indices`` by value.
    """

    indices: np.ndarray
    last_node: Any = None
    prefix_len: int = 0
    mamba_branching_seqlen: int | None = None

    def __eq__(self, other: object) -> bool:
        # the generated __eq__ compared the tuples of fields, and with them the index
        # arrays, whose truth value numpy refuses (ValueError for any two results)
        if not isinstance(other, MatchResult) or other.__class__ is not self.__class__:
            return NotImplemented
        return (
            self.prefix_len == other.prefix_len
            and self.mamba_branching_seqlen == other.mamba_branching_seqlen
            and self.last_node == other.last_node
            and bool(np.array_equal(self.indices, other.indices))
        )


@dataclass(slots=True)
class InsertResult:
    """Returned by :meth:`BasePrefixCache.insert`.

    ``prefix_len`` tokens of the key were already cached. Without a sliding window the
    caller still owns the indices of ``value[:prefix_len]`` that it allocated itself (the
    duplicates, usually ``value[match.prefix_len:prefix_len]``, to free; the tree's own
    indices from a match stay the tree's) and the partial page ``value[aligned:]``. With
    a sliding window (``RadixCache(sliding_window_size=W)``) the tree settles every index
    of ``value[prev_prefix_len:aligned]`` itself, freeing the duplicates, so the caller
    frees none of them; the partial page past ``aligned`` stays the caller's (see
    ``RadixCache.insert``). ``mamba_exist``
    (``MambaRadixCache``): a state was already stored at the key's end, so the caller
    keeps, and frees, the ``mamba_value`` it passed, if it passed one.
    """

    prefix_len: int = 0
    last_node: Any = None
    mamba_exist: bool = False


@dataclass(slots=True)
class EvictResult:
    """Returned by :meth:`BasePrefixCache.evict`: how many tokens/states were freed."""

    full_evicted: int = 0
    swa_evicted: int = 0
    mamba_evicted: int = 0


class BasePrefixCache(abc.ABC):
    """Abstract interface for all prefix cache implementations.

    Concrete implementations:

    * :class:`~pymllm.mem_cache.radix_cache.RadixCache` -- radix tree with SWA tombstones
    * :class:`~pymllm.mem_cache.chunk_cache.ChunkCache` -- no-op fallback (what a server
      runs with prefix caching disabled)
    * :class:`~pymllm.mem_cache.mamba_radix_cache.MambaRadixCache` -- radix tree with
      independent Mamba/SSM state tracking

    Thread safety: each call of a compiled cache is atomic with respect to other Python
    threads (the cache guards itself even while its callbacks run Python code); a sequence
    of calls (match, lock, insert) is not, so threads sharing one cache hold a lock of
    their own around each request's sequence.
    """

    @abc.abstractmethod
    def reset(self) -> None:
        """Clear all cached state and re-initialise."""

    @abc.abstractmethod
    def match_prefix(self, key: RadixKey) -> MatchResult:
        """Find the longest cached prefix of *key*."""

    @abc.abstractmethod
    def insert(self, key: RadixKey, value: Any = None, **kwargs: Any) -> InsertResult:
        """Insert *key*/*value* into the cache."""

    @abc.abstractmethod
    def evict(self, num_tokens: int, swa_num_tokens: int = 0) -> EvictResult:
        """Evict tokens to free memory."""

    @abc.abstractmethod
    def inc_lock_ref(self, node: Any) -> Any:
        """Lock *node* (and ancestors) to prevent eviction.

        Returns an opaque token (e.g. ``swa_boundary_id``) that must be passed back to
        :meth:`dec_lock_ref`.
        """

    @abc.abstractmethod
    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        """Unlock *node* (and ancestors)."""

    def evictable_size(self) -> int:
        return 0

    def swa_evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def swa_protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0


__all__ = [
    "BasePrefixCache",
    "EvictResult",
    "InsertResult",
    "MatchResult",
    "RadixKey",
    "hash_bytes",
    "hash_to_int64",
    "hash_token_ids",
]
