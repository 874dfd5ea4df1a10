"""A continuous-batching scheduler that serves a workload through any ``BasePrefixCache``.

The life of a request, and who owns its KV slots at each point (the rule of
:mod:`pymllm.mem_cache.base_prefix_cache`: a slot is free, the tree's, or ours):

1. **Admit**: ``match_prefix(prompt[:-1])`` gives the cached prefix (one token is always
   computed, for its logits); ``inc_lock_ref`` pins it; the slots for the rest of the prompt
   and for the generated tokens are allocated at once (evicting from the cache when the pool
   is short), so a running request never stalls. ``slots[:cached_len]`` are the tree's
   (locked), the rest ours. With a sliding window over split pools (see below) only the
   full side is allocated at once; the SWA side is reserved and attached step by step. A
   recurrent model also takes a state slot of its own; its first step reads the state the
   tree saved at the end of the match.
2. **Prefill** in chunks, several requests per step, then **cache the prompt**: ``insert``
   it, free the duplicates (prompt tokens another request inserted meanwhile), re-match to
   adopt the tree's slots and move our lock to the new node. Requests arriving later reuse
   this prompt while we are still decoding. A state-tracking cache also gets a copy of the
   recurrent state at the prompt's end. A windowed re-match can stop short, where the prompt
   runs through a tombstone that another request holds locked (the tree cannot revive it,
   and freed our copies there): we then prefill the positions past it again, in new slots.
3. **Decode** greedily, all running requests per step.

   **Sliding window** (a windowed ``RadixCache`` over a ``SWATokenToKVPoolAllocator``):
   after every step each running request whose prompt went to the tree frees the SWA side
   of its own slots (never of the tree's locked ``slots[:cached_len]``, whose SWA sides the
   tree settles) at the positions that no later token of its own can read: the model's
   ``swa`` layers let a token at position ``p`` read positions ``p - W + 1 .. p`` (``W``
   the model's ``sliding_window``), and the next token is at position ``prefilled``, so
   the SWA KV of positions below ``prefilled - W + 1`` is dead. The engine frees below
   ``prefilled - Wc + 1``, ``Wc`` the cache's ``sliding_window_size`` (``>= W``, checked
   at construction; equal to it unless configured otherwise; the allocator's pages are of
   one slot, checked at construction), and records how far in ``swa_evicted``:
   ``slots[cached_len:swa_evicted]`` are then ours as full slots with no SWA side, the rest
   of ``slots[cached_len:]`` ours with both sides. Keeping ``Wc - 1`` positions (then
   ``Wc`` at the finish, the last step's own position included) is what the tree needs to
   match a later request through the tombstone this leaves (``Wc`` live tokens after it).
   Every insert passes ``swa_evicted_seqlen=swa_evicted``: the tree stores those positions
   as a tombstone (it frees their full slots when it drops the node, and never revives a
   tombstone from them); ``free`` of a full slot whose SWA side is gone frees the full slot
   alone, so a release after an error gives back exactly what is left. Nothing of a
   prompt is freed before it is cached (``_cache_prompt``): the tree gets it whole, so other
   requests can reuse it, and the tree's own SWA eviction drops what no lock covers when
   the SWA pool is short. The prompt positions a short re-match makes a request compute
   again (``_refill``) are its own and freed as it goes (they are cached at the finish).
   A ``ChunkCache`` over the same split pools frees the same way, with the model's ``W``,
   and from the first prefill chunk on: it caches nothing, so every slot is the request's
   to the end.

   The SWA sides are also taken late, in both cases: admission allocates the full slots
   alone (``alloc(swa=False)``), and just before each step (``_attach_swa``) a request
   gets an SWA slot for each position the step writes (``alloc_swa``; the tree's SWA KV
   evicted first when the pool is short). ``slots[swa_upto:]`` are ours as full slots with
   no SWA side yet, so our slots with one are ``slots[max(cached_len, swa_evicted):
   swa_upto]`` (``check_slots`` counts it exactly): about ``Wc`` of them while decoding,
   whatever the request's length. No running request may then find the SWA pool empty:
   each is admitted with a reservation ``R`` (``_swa_reserve``: the most it can hold at
   once, its prompt and ``Wc`` with a windowed tree, which keeps the prompt's SWA KV locked
   to the end, ``W - 1`` plus a prefill chunk with a ``ChunkCache``), counted in
   ``swa_net`` (attached less freed out of the window), and only when what is free or
   evictable covers its ``R`` plus what every running request may still attach
   (``reserve - net``). A request is refused up front only when its ``R`` exceeds the SWA
   pool (or its ``kv_len`` the full pool).
4. **Finish**: ``insert`` prompt + output (the last token has no KV) and, for a recurrent
   model with a state-tracking cache, our state slot; free the duplicates and whatever the
   tree did not take, unlock. With a window the insert names the positions whose SWA side
   the request freed (``swa_evicted_seqlen``): the tree takes every slot past the locked
   prefix, tombstoned below that point, live after it.
5. **Error** (anything raised during a run: a refused follow-up, a callback, the cache):
   every running request frees the slots it owns (``slots[cached_len:]``, both sides, or
   the full side alone where it freed the SWA side already or never attached one) and its
   state slot and drops
   its lock, a request being admitted gives back what it took so far; then
   the error propagates. The tree keeps what it owns, so every slot is free or the tree's.

What the tree took from an ``insert`` is measured as the growth of ``total_size()``, so the
same code serves ``RadixCache`` (takes ``value[prefix_len:]``) and ``ChunkCache`` (takes
nothing) without asking which one it has. A cache tracks recurrent states when it has
``mamba_evictable_size`` (``MambaRadixCache``): it then receives ``mamba_value`` on insert.

Interrupts: a Ctrl-C (SIGINT) during a run is held while the records and the pools change
and raised at the top of the serving loop, where every request's records are whole: a
KeyboardInterrupt raised the moment a donated step returned lost the step's new buffers
(the pools kept the deleted ones, and no later run could start), and one between a call and
the record of what it did left slots or locks with no owner. In a callback (``progress``,
a workload's ``follow_up``: the user's code, which may block) a Ctrl-C goes through at once,
and the run releases as for any error a callback raises. Main thread only, where Python runs
signal handlers.

Timing: steps that trigger a JIT compilation are timed and taken off the clock, so the
figures describe a warmed-up server (the compile time is reported on its own).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from pymllm.engine import model as M
from pymllm.engine.config import ModelConfig
from pymllm.engine.memory import EngineMemory
from pymllm.engine.workloads import (
    RequestSpec,
    Workload,
    _arrival,
    _max_new_tokens,
    _token_ids,
)
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache, RadixKey
from pymllm.mem_cache.chunk_cache import ChunkCache
from pymllm.mem_cache.memory_pool import bucket_size
from pymllm.replay.traces import is_int


class EngineError(RuntimeError):
    """The engine cannot serve the workload as configured (e.g. the pool is too small)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits and shape buckets.

    * ``max_running``: requests admitted at once (the decode batch).
    * ``max_prefill_batch``, ``chunk_tokens``: requests and prompt tokens per prefill step;
      a longer prompt is prefilled over several steps (chunked prefill).
      ``pad_prefill_batch`` pads every prefill step to ``max_prefill_batch`` rows: fewer
      shapes to compile, padded rows computed for nothing.
    * ``min_token_bucket``, ``min_seq_bucket``: smallest padded chunk length and slot-table
      length. Batch and chunk sizes are padded to powers of two, slot tables to the pools'
      ``bucket_size`` (steps of at most 1.5x), so a run compiles a handful of shapes.
    * ``wait_for_shared_prefix``: hold back a request whose prompt shares at least
      ``share_min_tokens`` uncached tokens with a request still in prefill, so it reuses
      that prefill once cached instead of computing it again. ``None``: on unless the cache
      is a ``ChunkCache`` (which never reuses anything).
    * ``record_logits``: keep each request's first-token logits (for exactness checks).
    """

    max_running: int = 16
    max_prefill_batch: int = 4
    pad_prefill_batch: bool = False
    chunk_tokens: int = 256
    min_token_bucket: int = 32
    min_seq_bucket: int = 128
    wait_for_shared_prefix: bool | None = None
    share_min_tokens: int = 32
    record_logits: bool = False

    def __post_init__(self) -> None:
        names = (
            "max_running",
            "max_prefill_batch",
            "chunk_tokens",
            "min_token_bucket",
            "min_seq_bucket",
            "share_min_tokens",
        )
        for name in names:
            value = getattr(self, name)
            if not is_int(value):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def ideal_cached_tokens(results: list[RequestResult]) -> int:
    """Prompt tokens an unbounded cache could reuse serving ``results`` one at a time in
    order: each prompt's longest prefix (at most ``len - 1``) among the earlier sequences
    of the same ``extra_key``, each its prompt and its output but the last token (which
    never gets KV). The yardstick for a run's hit rate."""
    from pymllm.mem_cache.radix_cache import RadixCache

    tree = RadixCache(page_size=1)
    hit = 0
    for r in results:
        hit += min(tree.match_prefix(RadixKey(r.prompt, r.extra_key)).prefix_len, r.prompt_len - 1)
        tree.insert(RadixKey(np.concatenate([r.prompt, r.output[:-1]]), r.extra_key))
    return hit


def _run_all(steps: Iterable[Callable[[], Any]]) -> None:
    """Run every step even after one raises (cleanup that must not stop halfway: an
    interrupt included), then raise the first error."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


def _common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class _Req:
    spec: RequestSpec
    seq: int
    # (generation, index of the initial request it descends from): where its result goes,
    # whatever the order requests finish in.
    order: tuple[int, int]
    arrival: float
    prompt: np.ndarray
    # What the request owns, kept exact between any two calls into the cache, so a failed
    # run can give everything back (Engine._release): slots[cached_len:], state_slot when
    # non-zero, a lock on `node` while `locked`, and what is on its way back to the pools
    # (loose, loose_state).
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    cached_len: int = 0  # slots[:cached_len] belong to the tree (locked through `node`)
    loose: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # KV to free
    loose_state: int = 0  # a state slot to free (0: none)
    node: Any = None
    lock_token: Any = None
    locked: bool = False
    prefilled: int = 0  # positions whose KV is in the pool
    computed: int = 0  # prompt tokens this request computed itself (the cache's misses)
    recomputed: int = 0  # and again, past a short windowed re-match (_refill)
    state_slot: int = 0
    state_src: int = 0  # the tree's state slot the first step reads (0: our own slot)
    branch: int = 0  # a position to cache the prefix at with its state (0: none)
    # Prefilling again past a windowed re-match that came back short (_cache_prompt): the
    # first token is out already, and the prompt is cached at the finish only.
    refill: bool = False
    # With a window: the SWA sides of slots[cached_len:swa_evicted] are freed (positions no
    # later token reads; Engine._free_out_of_window); the full slots stay ours. Every
    # insert passes it as swa_evicted_seqlen. At most cached_len: nothing freed.
    swa_evicted: int = 0
    # With SWA sides attached step by step (Engine._lazy_swa): slots[swa_upto:] are ours as
    # full slots whose SWA side was never attached (no step wrote them yet); where SWA sides
    # come with the full slots at once, len(slots). Our slots with a live SWA side are thus
    # slots[max(cached_len, swa_evicted):swa_upto].
    swa_upto: int = 0
    # The SWA slots reserved for the request (Engine._swa_reserve: the most it can ever hold
    # at once) and how many it holds against that: attached less freed out of the window.
    # reserve - net is what it may still attach; admission keeps that within reach.
    swa_reserve: int = 0
    swa_net: int = 0
    output: list[int] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    t_finish: float = 0.0
    first_logits: np.ndarray | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def kv_len(self) -> int:
        """Positions that get KV: the prompt and every generated token but the last."""
        return self.prompt_len + self.spec.max_new_tokens - 1

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_len


@dataclass
class RequestResult:
    """One served request. ``extra_key`` is its cache namespace (``RequestSpec.extra_key``):
    prefixes are shared only between requests of equal keys."""

    rid: str
    prompt: np.ndarray = field(repr=False)
    prompt_len: int
    cached_tokens: int
    output: np.ndarray
    arrival: float
    ttft: float
    latency: float
    first_logits: np.ndarray | None = None
    extra_key: Any = None


@dataclass
class RunStats:
    """What one run served and what it cost. Times in seconds, compile time excluded."""

    cache: str
    workload: str
    requests: int
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the cache
    prefill_tokens: int  # prompt tokens computed, those computed again included
    generated_tokens: int
    wall_s: float
    compile_s: float
    compiles: int
    steps: int
    prefill_steps: int
    decode_steps: int
    evicted_tokens: int
    ttft_p50: float
    ttft_p99: float
    kv_slots: int
    kv_free: int
    kv_in_cache: int
    leak_free: bool
    results: list[RequestResult] = field(repr=False, default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Prompt plus generated tokens served per second."""
        return (self.prompt_tokens + self.generated_tokens) / self.wall_s if self.wall_s else 0.0

    def outputs(self) -> dict[str, np.ndarray]:
        return {r.rid: r.output for r in self.results}

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no per-request detail)."""
        return {
            "cache": self.cache,
            "workload": self.workload,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(self.ttft_p50 * 1e3, 1),
            "ttft_p99_ms": round(self.ttft_p99 * 1e3, 1),
            "compile_s": round(self.compile_s, 2),
            "compiles": self.compiles,
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "decode_steps": self.decode_steps,
            "evicted_tokens": self.evicted_tokens,
            "kv_slots": self.kv_slots,
            "kv_free": self.kv_free,
            "kv_in_cache": self.kv_in_cache,
            "leak_free": self.leak_free,
        }


ProgressFn = Callable[[int, int, float], None]


#: Longest wait for an arrival before a held Ctrl-C is looked at.
_SIGINT_POLL_S = 0.05


class _HeldSigint:
    """While active (``with``), a SIGINT is recorded instead of raised, and delivered by
    :meth:`deliver` at a point the caller knows to be safe, or at once while the caller runs
    code of its user (:meth:`opened`: a callback, which may block or run for long): the
    handler that was in place runs there (Python's default raises ``KeyboardInterrupt``).
    On exit the old handler is back, and a signal still held is delivered then, unless an
    exception is already on its way out. One instance a run, so that a run started inside
    another (from a callback) puts back the handler it found. Outside the main thread (no
    signal handlers there), or over a handler set outside Python, it does nothing."""

    def __init__(self) -> None:
        self._old: Any = None
        self._held: tuple[int, Any] | None = None
        self._active = False
        self._open = False

    def __enter__(self) -> _HeldSigint:
        # a handler set outside Python (getsignal gives None) could not be put back
        self._active = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not None
        )
        if self._active:
            self._old = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        if self._open:
            _run_handler(self._old, signum, frame)
        else:
            self._held = (signum, frame)

    def deliver(self) -> None:
        if self._held is not None:
            signum, frame = self._held
            self._held = None
            _run_handler(self._old, signum, frame)

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """A SIGINT held so far, and any during the block, goes through at once."""
        self.deliver()
        self._open = True
        try:
            yield
        finally:
            self._open = False

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._old)
            self._active = False
            if exc_type is None:
                self.deliver()


def _run_handler(handler: Any, signum: int, frame: Any) -> None:
    """What the process would have done on the signal: a Python handler is called (the
    default one raises KeyboardInterrupt), SIG_DFL is re-raised with it in place, SIG_IGN is
    ignored."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


class Engine:
    """Serves workloads with one model, one memory and one prefix cache.

    The cache must free through ``memory.token_to_kv_pool_allocator`` (a ``ChunkCache``,
    which frees nothing, may have none), and a state-tracking cache through
    ``memory.state_pool``; windowed and state-tracking caches must have ``page_size`` 1.
    Anything else raises ``ValueError`` here, before a run could lose or double-own slots.
    The engine is not thread-safe; one :meth:`run` at a time.

    After a run every KV slot is free or owned by the cache (:meth:`check_slots` verifies
    this; the cache keeps its contents, so a second run starts warm). After a run that
    raised, the same holds: every unfinished request gave back its slots, its state slot
    and its lock before the error propagated; what finished stays cached.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        memory: EngineMemory,
        cache: BasePrefixCache,
        *,
        params: M.Params | None = None,
        sched: SchedulerConfig | None = None,
    ) -> None:
        if memory.cfg != cfg:
            raise ValueError("memory was built for another model config")
        self._window = getattr(cache, "sliding_window_size", None)
        # whether the cache says what an evict can free: BasePrefixCache's own
        # evictable_size answers 0, and such a cache is asked to evict whenever it is short
        self._sizes_known = type(cache).evictable_size is not BasePrefixCache.evictable_size
        if self._window is not None and memory.swa_pool is None:
            raise ValueError(
                "a cache with a sliding window frees SWA KV on its own: build EngineMemory "
                "with swa_size (a SWATokenToKVPoolAllocator and an SWA pool)"
            )
        if self._window is not None and self._window < cfg.sliding_window:
            raise ValueError(
                f"the cache's window ({self._window}) is shorter than the model's "
                f"({cfg.sliding_window}): it would free KV the model still reads"
            )
        alloc = memory.token_to_kv_pool_allocator
        cache_alloc = getattr(cache, "token_to_kv_pool_allocator", None)
        # A ChunkCache frees nothing, so it may go without an allocator.
        if cache_alloc is not alloc and not (isinstance(cache, ChunkCache) and cache_alloc is None):
            got = "None" if cache_alloc is None else f"another {type(cache_alloc).__name__}"
            raise ValueError(
                "cache.token_to_kv_pool_allocator must be memory.token_to_kv_pool_allocator "
                f"(the cache frees the slots the engine allocates), got {got}"
            )
        page_size = getattr(cache, "page_size", 1)
        if self._window is not None and page_size != 1:
            raise ValueError(
                f"a windowed cache with page_size {page_size} is not supported: the engine "
                "hands it every token up to the end of a prompt, a paged tree takes only whole "
                "pages; use page_size=1"
            )
        self._state_cache = hasattr(cache, "mamba_evictable_size")
        if self._state_cache:
            name = type(cache).__name__
            if not cfg.rec_layer_ids:
                raise ValueError(
                    f"{name} tracks recurrent states but the {cfg.variant!r} model has no "
                    "recurrent layers; serve it with RadixCache or ChunkCache"
                )
            if getattr(cache, "mamba_pool", None) is not memory.state_pool:
                raise ValueError(
                    f"{name}.mamba_pool must be memory.state_pool (the cache frees the state "
                    "slots the engine allocates)"
                )
            if page_size != 1:
                raise ValueError(
                    f"{name} with page_size {page_size} is not supported: the state saved at "
                    "the end of a prompt would be attached at the page boundary before it; "
                    "use page_size=1"
                )
        if cfg.rec_layer_ids and not (isinstance(cache, ChunkCache) or self._state_cache):
            raise ValueError(
                f"the {cfg.variant!r} model keeps recurrent state that {type(cache).__name__} "
                "does not snapshot; serve it with MambaRadixCache or ChunkCache"
            )
        self.cfg = cfg
        self.memory = memory
        self.cache = cache
        self.params = params if params is not None else M.init_params(cfg)
        self.sched = sched or SchedulerConfig()
        wait = self.sched.wait_for_shared_prefix
        self._wait_shared = not isinstance(cache, ChunkCache) if wait is None else wait
        self._alloc = alloc
        # A ChunkCache over split pools caches nothing: every slot stays the request's, so
        # it frees the SWA side of all that left the model's window, prompt included.
        self._chunk_swa = isinstance(cache, ChunkCache) and memory.swa_pool is not None
        self._swa_free = bool(self._window) or self._chunk_swa
        if self._swa_free and alloc.page_size != 1:
            # SWA sides are taken and freed position by position (the reservation counts
            # them so): the split pools must have pages of one slot, as EngineMemory's do.
            raise ValueError(
                f"an SWA allocator with page_size {alloc.page_size} is not supported: the "
                "engine attaches and frees SWA sides one position at a time; use page_size=1"
            )
        # The SWA KV a running request keeps behind its next position: the
        # window less one (the next token reads W - 1 earlier positions of the model's
        # window W <= the cache's Wc; the tree matches through a tombstone only with Wc
        # live tokens after it, which the finish's insert then has).
        self._swa_keep = (self._window or cfg.sliding_window) - 1
        # Where SWA sides are freed (_swa_free) they are also taken late: admission takes
        # full slots alone and a reservation of SWA slots (_swa_reserve), and each step
        # attaches the SWA sides of the positions it writes just before it (_attach_swa).
        # The requests of the current (or last) run, by stage.
        self._pending: list[tuple[float, int, _Req]] = []
        self._rids: set[str] = set()  # the request ids of a run, each used once
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._done: list[_Req] = []
        self._sigint = _HeldSigint()
        self._warm_up_state_copy()

    # -- clock ------------------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self._t0 - self._compile_s

    # -- slots ------------------------------------------------------------------------------

    def _kv_short(self, n: int, swa_reserve: int = 0) -> tuple[int, int]:
        """How many slots the full and the SWA pool lack for ``n`` new KV slots (without an
        SWA pool, the one pool's shortfall twice). With SWA sides taken step by step
        (``_swa_free``) the SWA side is a reservation: the pool lacks what the running
        requests may still attach (``_swa_outstanding``) plus ``swa_reserve``, less what is
        free."""
        alloc = self._alloc
        if self.memory.swa_pool is None:
            short = n - alloc.available_size()
            return short, short
        swa_n = self._swa_outstanding() + swa_reserve if self._swa_free else n
        return (
            n - alloc.full_available_size(),  # type: ignore[union-attr]
            swa_n - alloc.swa_available_size(),  # type: ignore[union-attr]
        )

    def _kv_cannot_fit(
        self, n: int, short: tuple[int, int] | None = None, swa_reserve: int = 0
    ) -> bool:
        """Whether ``n`` new KV slots (lacking ``short``, from ``_kv_short``, when given;
        ``swa_reserve`` as there) stay out of reach even after evicting all the tree may
        free, as far as the cache's ``evictable_size`` (and ``swa_evictable_size``) tell;
        False when the cache does not report them. An SWA reservation (``_swa_free``) is
        checked whatever the cache reports: a running request's attach must never fail."""
        cache = self.cache
        full_short, swa_short = self._kv_short(n, swa_reserve) if short is None else short
        if self._swa_free:
            # a ChunkCache holds nothing to evict; a windowed tree frees SWA KV alone
            if swa_short > (cache.swa_evictable_size() if self._window else 0):
                return True
            return self._sizes_known and full_short > cache.evictable_size()
        if not self._sizes_known:
            return False
        if self.memory.swa_pool is None:
            return full_short > cache.evictable_size()
        # with a window the tree frees SWA KV alone (tombstones): its live SWA KV at most;
        # without, freeing a token frees both of its slots
        swa_room = cache.swa_evictable_size() if self._window else cache.evictable_size()
        return full_short > cache.evictable_size() or swa_short > swa_room

    def _alloc_kv(self, n: int, prefix: np.ndarray, swa_reserve: int = 0) -> np.ndarray | None:
        """``prefix`` then ``n`` new slots (ours), evicting first when the pool is short;
        None, with nothing evicted, when even evicting all the tree may free would leave
        it short (a request retried every step would otherwise flush the cache for
        nothing while it waits for running requests to end): see ``_kv_cannot_fit``.
        With SWA sides taken step by step (``_swa_free``) the new slots are full slots
        alone (``alloc(swa=False)``): the SWA pool must only have ``swa_reserve`` more
        slots within reach (free or evictable) beside what the running requests may still
        attach; nothing of it is taken or evicted here (``_attach_swa`` does, step by
        step)."""
        short = full_short, swa_short = self._kv_short(n, swa_reserve)
        if self._kv_cannot_fit(n, short):
            return None
        cache = self.cache
        if self._swa_free:
            if full_short > 0:
                self._evicted += cache.evict(full_short).full_evicted
            return self._alloc.alloc(n, prefix=prefix, swa=False)  # type: ignore[call-arg]
        if self.memory.swa_pool is None:
            if full_short > 0:
                self._evicted += cache.evict(full_short).full_evicted
        elif full_short > 0 or swa_short > 0:
            if self._window:
                res = cache.evict(max(full_short, 0), max(swa_short, 0))
            else:
                res = cache.evict(max(full_short, swa_short))
            self._evicted += res.full_evicted
        return self._alloc.alloc(n, prefix=prefix)

    def _swa_reserve(self, r: _Req, cached: int) -> int:
        """R, the SWA slots reserved for ``r`` admitted with ``cached`` positions the tree's:
        the most its ``swa_net`` (SWA sides it attached less those it freed out of the
        window) can reach. With K = ``_swa_keep`` and C the most positions one step writes
        for it (a prefill chunk, at most min(chunk_tokens, prompt_len - cached); a decode
        step, 1), and slots of one position each (the engine's allocators have pages of 1):

        * ``_attach_swa`` attaches, before a step, the C positions it writes.
        * ``_free_out_of_window`` frees, after every step, all below prefilled - K: what is
          left of ours is at most K (and nothing is freed of what is not ours: it cannot
          bring net down for the tree's).
        * A ``ChunkCache`` frees from the first step on: at most K before a step, plus C
          during it: R = K + C.
        * A windowed tree keeps the prompt whole until it is cached (nothing freed):
          prompt_len - cached by the end of prefill. The insert hands it to the tree, whose
          node the request keeps locked (SWA protected, not evictable: net keeps counting
          it); decode then frees from prompt_len on, and attaches 1 a step: K + 1 more.
          R = prompt_len - cached + K + 1.

        Never more than its own slots, ``kv_len - cached``. A short re-match (``_refill``)
        raises R then (its prefill frees as it goes); a ``ChunkCache`` request's R falls to
        K + 1 once its prefill is done (``_free_out_of_window``)."""
        if self._window:
            held = r.prompt_len - cached + self._swa_keep + 1
        else:
            held = self._swa_keep + max(1, min(self.sched.chunk_tokens, r.prompt_len - cached))
        return min(r.kv_len - cached, held)

    def _swa_outstanding(self) -> int:
        """SWA slots the running requests may still attach: reserved, not held."""
        return sum(r.swa_reserve - r.swa_net for r in self._running)

    def _attach_swa(self, rows: list[tuple[_Req, int]]) -> None:
        """Before a step, where SWA sides are taken step by step (``_swa_free``): each row's
        request gets an SWA side for the positions the step writes (``prefilled`` on, ``n``
        of them, within its slots), evicting the tree's SWA KV
        first when the pool is short. Within its reservation by construction
        (``_swa_reserve``) and admitted only with every running request's outstanding
        reservation within reach (``_kv_cannot_fit``): a failure here is a bug of that
        accounting, raised as ``EngineError``. ``swa_upto`` moves only once the attach
        succeeded (``alloc_swa`` changes nothing when it fails), so ``_release`` frees
        exactly what is attached."""
        if not self._swa_free:
            return
        alloc = self._alloc
        for r, n in rows:
            end = min(r.prefilled + n, len(r.slots))
            need = end - r.swa_upto
            if need <= 0:
                continue
            if need > r.swa_reserve - r.swa_net:
                raise EngineError(
                    f"request {r.spec.rid} would hold {r.swa_net + need} SWA slots, over the "
                    f"{r.swa_reserve} reserved for it (an engine bug)"
                )
            short = need - alloc.swa_available_size()  # type: ignore[union-attr]
            if short > 0 and self._window:
                self._evicted += self.cache.evict(0, short).full_evicted
            if not alloc.alloc_swa(r.slots[r.swa_upto : end]):  # type: ignore[union-attr]
                raise EngineError(
                    f"no SWA slots for {need} positions of request {r.spec.rid} within its "
                    f"reservation: {alloc.swa_available_size()} free (an engine bug)"  # type: ignore[union-attr]
                )
            r.swa_upto, r.swa_net = end, r.swa_net + need

    def _alloc_state(self) -> int | None:
        pool = self.memory.state_pool
        assert pool is not None
        if pool.available_size() < 1 and self._state_cache:
            # Dropping a state can drop the leaf it sat on, KV included.
            evict = self.cache.evict  # a MambaRadixCache's: it takes mamba_num
            self._evicted += evict(0, mamba_num=1).full_evicted  # type: ignore[call-arg]
        got = pool.alloc(1)
        return None if got is None else int(got[0])

    def _lock(self, node: Any) -> Any:
        return self.cache.inc_lock_ref(node)

    def _unlock(self, node: Any, token: Any) -> None:
        if token is None:
            self.cache.dec_lock_ref(node)
        else:
            self.cache.dec_lock_ref(node, swa_boundary_id=token)

    def _insert(
        self, r: _Req, tokens: np.ndarray, state: int | None = None
    ) -> tuple[np.ndarray, int, bool]:
        """Insert ``tokens`` with our slots (and ``state``, a state slot, when the cache
        tracks states). Returns the duplicates ours to free (tokens another request cached
        meanwhile), how many leading tokens the tree now holds for us (the slots past that
        stay ours), and whether it already had a state there. With a window the tree takes
        every slot past ``cached_len``, those whose SWA side we freed (``swa_evicted``) as a
        tombstone; the caller then sets ``cached_len`` and moves ``swa_evicted`` to at least
        it (nothing of ours is left without an SWA side below the new ``cached_len``)."""
        n = len(tokens)
        before = self.cache.total_size()
        key, value = RadixKey(tokens, r.spec.extra_key), r.slots[:n]
        kwargs: dict[str, Any] = {}
        if state is not None:
            kwargs["mamba_value"] = state
        if self._window:
            # A windowed tree settles every index past our locked prefix itself (stores,
            # frees or revives it): none of value[cached_len:] stays ours. The positions
            # whose SWA side we freed become a tombstone (a tombstone there is not revived
            # from our slots, which have no SWA KV): the tree frees their full slots when it
            # drops them.
            kwargs["prev_prefix_len"] = r.cached_len
            kwargs["swa_evicted_seqlen"] = r.swa_evicted
        res = self.cache.insert(key, value, **kwargs)
        if res.prefix_len < r.cached_len:
            raise EngineError(
                f"cache reported prefix_len {res.prefix_len} below the locked prefix "
                f"{r.cached_len} of request {r.spec.rid}"
            )
        exists = bool(res.mamba_exist)
        if self._window:
            return r.slots[:0], n, exists
        taken = self.cache.total_size() - before
        return r.slots[r.cached_len : res.prefix_len], res.prefix_len + taken, exists

    # -- request life -----------------------------------------------------------------------

    def _shares_pending_prefill(self, r: _Req, cached: int) -> bool:
        for p in self._running:
            if p.in_prefill and p.spec.extra_key == r.spec.extra_key:
                if _common_prefix_len(p.prompt, r.prompt) - cached >= self.sched.share_min_tokens:
                    return True
        return False

    def _try_admit(self, r: _Req) -> str:
        """'ok', 'wait' (a shared prefix is being prefilled) or 'nomem'."""
        key = RadixKey(r.prompt[:-1], r.spec.extra_key)
        m = self.cache.match_prefix(key)
        cached = len(m.indices)
        if self._wait_shared and self._shares_pending_prefill(r, cached):
            return "wait"
        pool = self.memory.state_pool
        state_slot, short = 0, False
        if pool is not None:
            # A request whose KV cannot fit is refused before its state slot is taken:
            # taking it may evict a saved state (and the leaf it sat on) for nothing.
            if self._kv_cannot_fit(r.kv_len - cached, swa_reserve=self._swa_reserve(r, cached)):
                return "nomem"
            # The state slot before the lock: with every slot taken, the state to drop may
            # be the one the match ends at (the match made it the most recent, so only when
            # no other is left), which the lock would have kept: with a pool of one, no
            # request after the first could ever be admitted. The match is then taken again.
            short = pool.available_size() < 1
            got = self._alloc_state()
            if got is None:
                return "nomem"
            state_slot = got
        slots = None  # the matched prefix's slots (the tree's), then the new ones (ours)
        token = locked = None

        def give_back() -> None:  # what this admission took so far, each step tried
            _run_all(
                (
                    lambda: self._alloc.free(slots[cached:]) if slots is not None else None,
                    lambda: self._unlock(locked, token) if locked is not None else None,
                    lambda: self._free_state_slot(state_slot),
                )
            )

        try:
            if state_slot and short:
                m = self.cache.match_prefix(key)
                cached = len(m.indices)
            token, locked = self._lock(m.last_node), m.last_node
            # (the reservation after the lock: what the lock protects is no longer evictable)
            reserve = self._swa_reserve(r, cached) if self._swa_free else 0
            slots = self._alloc_kv(r.kv_len - cached, m.indices, reserve)
        except BaseException:  # an evict that raised: give back what this admission took
            give_back()
            raise
        if slots is None:
            give_back()
            return "nomem"
        r.slots = slots
        r.cached_len = r.prefilled = cached
        # SWA sides come step by step (none yet) or came with the slots
        r.swa_upto = cached if self._swa_free else len(slots)
        r.swa_reserve, r.swa_net = reserve, 0
        r.node, r.lock_token, r.locked = m.last_node, token, True
        r.state_slot = state_slot
        try:
            # The first step starts from the state saved at the end of the cached prefix.
            r.state_src = int(m.last_node.mamba_value[0]) if self._state_cache and cached else 0
            # A state-tracking cache may hold the KV further than its last saved state (the
            # point where requests branch): prefill stops there once to save a state for them.
            branch = m.mamba_branching_seqlen
            r.branch = branch if self._state_cache and branch is not None and branch > cached else 0
        except BaseException:
            self._release(r)
            raise
        r.t_admit = self._now()
        return "ok"

    def _cache_prompt(self, r: _Req, upto: int | None = None) -> None:
        """Hand the prefilled ``prompt[:upto]`` to the cache and adopt the tree's slots."""
        tokens = r.prompt if upto is None else r.prompt[:upto]
        key = RadixKey(tokens, r.spec.extra_key)
        snap = None
        if self._state_cache:
            # The tree needs its own copy of the state at the prompt's end: ours moves on.
            # Without a free state slot the prompt is not cached now (only at the finish):
            # the re-match below must cover every slot the tree takes.
            snap = self._alloc_state()
            if snap is None:
                return
            pool = self.memory.state_pool
            assert pool is not None
            r.loose_state = snap  # ours until the insert takes it (else freed below)
            pool.copy_states(np.array([r.state_slot], np.int32), np.array([snap], np.int32))
            dups, covered, state_exists = self._insert(r, tokens, snap)
            if not state_exists:
                r.loose_state = 0  # the tree's now
        else:
            dups, covered, _ = self._insert(r, tokens)
        # From here the records say who owns what before any call that can raise (a cache
        # call, an interrupt), so that _release gives back exactly ours: slots[:covered]
        # are the tree's but for our duplicates among them (loose: freed below, or by
        # _release should that fail); slots[covered:] stay ours.
        r.loose = dups.copy()
        # the tree's now, tombstones included (a ChunkCache took nothing: covered is 0 and
        # what the request freed of its prompt's SWA stays on the record)
        r.cached_len, r.swa_evicted = covered, max(r.swa_evicted, covered)
        try:
            m = self.cache.match_prefix(key)
            got = len(m.indices)
            if got < covered and not self._window:
                # The tree holds slots[:covered] but will not lock them for us: _release
                # (after this error) gives back ours, slots[covered:]
                raise EngineError(
                    f"re-matching the cached prompt of {r.spec.rid} found {got} "
                    f"tokens, fewer than the {covered} the cache holds"
                )
            # the old lock first: should the new one then fail, no lock is ours and the
            # tree's slots are merely evictable (the request is released after the error)
            self._unlock_req(r)
            r.node, r.lock_token = m.last_node, self._lock(m.last_node)
            r.locked = True
            if got < covered:
                self._refill(r, m.indices, covered)
            else:
                r.slots[:got] = m.indices
        finally:
            self._free_loose(r)

    def _refill(self, r: _Req, matched: np.ndarray, covered: int) -> None:
        """A windowed re-match stopped short of the ``covered`` positions the tree settled:
        the prompt runs through a tombstone that another request holds locked, which the
        tree cannot revive, so it freed our copies there and the window past it has too few
        live tokens. Positions ``[len(matched), covered)`` are the tree's (or free) and have
        no SWA KV of ours: the request prefills them again in new slots, then decodes on."""
        got = len(matched)
        # Its SWA sides come step by step: none past `covered` yet (each step attaches
        # exactly what it writes), none on the new slots. It
        # keeps counting what it handed the tree (swa_net) and may now hold, past that,
        # what a request that frees as it goes holds: K + C (see _swa_reserve).
        assert r.swa_upto == covered, (r.swa_upto, covered)
        chunk = max(1, min(self.sched.chunk_tokens, covered - got))
        reserve = r.swa_net + self._swa_keep + chunk
        grow = max(0, reserve - r.swa_reserve)
        slots = self._alloc_kv(covered - got, prefix=matched, swa_reserve=grow)
        if slots is None:
            raise EngineError(
                f"no memory to recompute {covered - got} prompt tokens of {r.spec.rid} past "
                "a tombstone another request holds locked"
            )
        # one step from the old records to the new: slots[got:] are ours, with no SWA side
        # yet (nothing is freed before the prompt is cached: swa_evicted is 0)
        r.slots, r.cached_len = np.concatenate([slots, r.slots[covered:]]), got
        r.swa_evicted, r.swa_upto, r.swa_reserve = 0, got, r.swa_reserve + grow
        r.prefilled = min(r.prefilled, got)
        r.refill = True

    def _free_loose(self, r: _Req) -> None:
        """Free what the request holds on its way back to the pools; each record is
        cleared once its free succeeded (else _release tries again)."""
        if r.loose.size:
            self._alloc.free(r.loose)
            r.loose = r.loose[:0]
        if r.loose_state:
            self._free_state_slot(r.loose_state)
            r.loose_state = 0

    def _free_out_of_window(self) -> None:
        """With a window, after a step: every running request frees the SWA side of its own
        slots at the positions no later token of its own reads (see the module docstring):
        below ``prefilled - Wc + 1``, from ``max(swa_evicted, cached_len)``
        on (the tree's locked prefix is the tree's to settle). A prompt before its first
        caching (a request with no output yet) is kept whole; the prompt positions a
        request computes again after a short re-match (``_refill``: it has output, its
        prompt is cached at the finish) are its own and freed as it goes. With a
        ``ChunkCache`` over split pools (no window of the cache's: the model's ``W``) every
        slot is the request's and nothing is cached, so the prompt's positions go too,
        between prefill chunks. ``swa_evicted`` moves only once the free succeeded
        (``free_swa`` frees nothing when it raises), so the records stay exact for
        ``_release``."""
        if not self._swa_free:
            return
        whole_prompt = not self._chunk_swa
        free_swa = self._alloc.free_swa  # type: ignore[union-attr]
        for r in self._running:
            if whole_prompt and not r.output:  # the prompt goes to the tree whole
                continue
            start = max(r.swa_evicted, r.cached_len)
            end = r.prefilled - self._swa_keep
            if end > start:  # each of slots[start:end] has its SWA side (end <= prefilled)
                free_swa(r.slots[start:end])
                r.swa_evicted, r.swa_net = end, r.swa_net - (end - start)
            if self._chunk_swa and not r.in_prefill:
                # Prefill done: a ChunkCache request (whose net is all its own) holds at most
                # K now and attaches one a step: its reservation shrinks so.
                r.swa_reserve = min(r.swa_reserve, self._swa_keep + 1)

    def _finish(self, r: _Req) -> None:
        seq = np.concatenate([r.prompt, np.asarray(r.output[:-1], dtype=np.int32)])
        state = r.state_slot if self._state_cache else None
        dups, covered, state_exists = self._insert(r, seq, state)
        ours = np.concatenate([dups, r.slots[covered : len(seq)]])
        if state is not None and not state_exists:
            r.state_slot = 0  # the tree owns it now
        # all we own now, on its way back to the pool (_release frees it after an error)
        r.loose, r.slots, r.cached_len, r.swa_evicted = ours, r.slots[:0], 0, 0
        r.swa_upto = r.swa_reserve = r.swa_net = 0
        self._free_loose(r)
        self._unlock_req(r)
        self._free_state(r)
        r.t_finish = self._now()

    def _unlock_req(self, r: _Req) -> None:
        if r.locked:  # still ours if the unlock raises: _release tries again
            self._unlock(r.node, r.lock_token)
            r.locked = False
        r.node = r.lock_token = None

    def _free_state(self, r: _Req) -> None:
        if r.state_slot:  # still ours if the free raises: _release tries again
            self._free_state_slot(r.state_slot)
            r.state_slot = 0

    def _free_state_slot(self, slot: int) -> None:
        if slot:
            assert self.memory.state_pool is not None
            self.memory.state_pool.free(np.array([slot], np.int32))

    def _release(self, r: _Req) -> None:
        """Give back everything an unfinished request owns: its slots past the tree's, its
        state slot and its lock (each tried even if another fails; the first error is
        raised). Its tree slots stay the tree's."""
        # free() skips the SWA sides freed already, and those never attached
        ours = r.slots[r.cached_len :]
        r.slots, r.cached_len, r.swa_evicted = r.slots[:0], 0, 0
        r.swa_upto = r.swa_reserve = r.swa_net = 0
        steps = (
            lambda: self._alloc.free(ours) if ours.size else None,
            lambda: self._free_loose(r),
            lambda: self._unlock_req(r),
            lambda: self._free_state(r),
        )
        _run_all(steps)

    def _release_all(self) -> None:
        """After an error: release every running request and drop the queues, so every
        slot is free or the tree's again and the engine can run again. Every request is
        released even if one's release fails (the first error is raised after)."""
        running, self._running = self._running, []
        self._waiting, self._pending = [], []
        _run_all([functools.partial(self._release, r) for r in running])

    # -- steps ------------------------------------------------------------------------------

    def _run_step(self, rows: list[tuple[_Req, int]], decode: bool) -> tuple[np.ndarray, Any]:
        sched = self.sched
        # Decode pads the batch to max_running: a padded decode row costs little and one
        # batch size per slot-table bucket keeps compilations few.
        if decode:
            b = _bucket(sched.max_running, 1)
        else:
            b = _bucket(sched.max_prefill_batch if sched.pad_prefill_batch else len(rows), 1)
        t = 1 if decode else _bucket(max(n for _, n in rows), sched.min_token_bucket)
        s = max(bucket_size(max(r.prefilled + n for r, n in rows)), sched.min_seq_bucket)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        new_slots = np.zeros((b, t), np.int32)
        kv_slots = np.zeros((b, s), np.int32)
        chunk_lens = np.zeros(b, np.int32)
        state_slots = np.zeros(b, np.int32)
        state_read = np.zeros(b, np.int32)
        fresh = np.zeros(b, bool)
        for i, (r, n) in enumerate(rows):
            a = r.prefilled
            if decode:
                tokens[i, 0] = r.output[-1]
            else:
                tokens[i, :n] = r.prompt[a : a + n]
            positions[i, :n] = np.arange(a, a + n)
            new_slots[i, :n] = r.slots[a : a + n]
            kv_slots[i, : a + n] = r.slots[: a + n]
            chunk_lens[i] = n
            state_slots[i] = r.state_slot
            state_read[i] = r.state_src or r.state_slot
            r.state_src = 0
            fresh[i] = a == 0
        batch: dict[str, np.ndarray] = {
            "tokens": tokens,
            "positions": positions,
            "new_slots": new_slots,
            "kv_slots": kv_slots,
            "chunk_lens": chunk_lens,
            "last_idx": np.maximum(chunk_lens - 1, 0),
            "state_slots": state_slots,
            "state_read": state_read,
            "state_fresh": fresh,
        }
        if self.memory.swa_pool is not None:
            to_swa = self._alloc.translate_loc_from_full_to_swa  # type: ignore[union-attr]
            batch["swa_new_slots"] = to_swa(new_slots.reshape(-1)).reshape(new_slots.shape)
            batch["swa_kv_slots"] = to_swa(kv_slots.reshape(-1)).reshape(kv_slots.shape)
        # one transfer of host arrays; jnp.asarray would compile a staging kernel for each
        # new shape (10-40 ms each, before the compile timer starts)
        device_batch = jax.device_put(batch)
        n_compiled = M.compile_count()
        t_start = time.perf_counter()
        next_tokens, logits, kv, swa_kv, state = M.extend_step(
            self.params,
            self.memory.kv,
            self.memory.swa_kv,
            self.memory.state,
            device_batch,
            self.cfg,
        )
        self.memory.rebind(kv, swa_kv, state)
        out = np.asarray(next_tokens)
        if M.compile_count() != n_compiled:
            self._compile_s += time.perf_counter() - t_start
            self._compiles += 1
        self._steps += 1
        return out, logits

    def _prefill_step(self) -> None:
        budget = self.sched.chunk_tokens
        rows: list[tuple[_Req, int]] = []
        for r in self._running:
            if r.in_prefill:
                n = min(r.prompt_len - r.prefilled, budget)
                if r.branch > r.prefilled:
                    n = min(n, r.branch - r.prefilled)
                rows.append((r, n))
                budget -= n
                if budget <= 0 or len(rows) == self.sched.max_prefill_batch:
                    break
        self._attach_swa(rows)
        next_tokens, logits = self._run_step(rows, decode=False)
        self._prefill_steps += 1
        host_logits = None
        for i, (r, n) in enumerate(rows):
            r.prefilled += n
            if r.refill:
                r.recomputed += n
            else:
                r.computed += n
            if r.prefilled == r.branch:
                self._cache_prompt(r, upto=r.branch)
                r.branch = 0
            if r.in_prefill:
                continue
            if r.refill:  # the prompt's KV is whole again; its first token was out before
                r.refill = False
                if len(r.output) == r.spec.max_new_tokens:
                    self._retire(r)
                continue
            r.output.append(int(next_tokens[i]))
            r.t_first = self._now()
            if self.sched.record_logits:
                if host_logits is None:
                    host_logits = np.asarray(logits)
                r.first_logits = host_logits[i].copy()
            self._cache_prompt(r)
            if len(r.output) == r.spec.max_new_tokens and not r.in_prefill:
                self._retire(r)
        self._free_out_of_window()

    def _decode_step(self) -> None:
        rows = [(r, 1) for r in self._running if not r.in_prefill]
        self._attach_swa(rows)
        next_tokens, _ = self._run_step(rows, decode=True)
        self._decode_steps += 1
        for i, (r, _) in enumerate(rows):
            r.prefilled += 1
            r.output.append(int(next_tokens[i]))
            if len(r.output) == r.spec.max_new_tokens:
                self._retire(r)
        self._free_out_of_window()

    def _retire(self, r: _Req) -> None:
        self._finish(r)
        self._running.remove(r)
        self._done.append(r)
        wl = self._workload
        if wl is not None and wl.follow_up is not None:
            with self._sigint.opened():  # the user's code: a Ctrl-C goes through there
                nxt = wl.follow_up(r.spec, np.asarray(r.output, dtype=np.int32))
            if nxt is not None:
                if not isinstance(nxt, RequestSpec):
                    raise TypeError(
                        f"follow_up must return a RequestSpec or None, got "
                        f"{type(nxt).__name__} (after request {r.spec.rid})"
                    )
                self._push(nxt, r.t_finish, (r.order[0] + 1, r.order[1]))
        if self._progress is not None:
            with self._sigint.opened():
                self._progress(len(self._done), self._total, self._now())

    def _push(self, spec: RequestSpec, start: float, order: tuple[int, int]) -> None:
        """Queue a request arriving ``spec.arrival`` after ``start``, checked first: nothing
        is allocated for a request refused here (``TypeError``/``ValueError`` for a bad one,
        ``EngineError`` for one larger than a pool)."""
        if not isinstance(spec, RequestSpec):
            raise TypeError(f"workload requests must be RequestSpec, got {type(spec).__name__}")
        # Checked again here (RequestSpec's fields can be reassigned), and against the
        # vocabulary: the embedding gather would clamp an id past it without a word.
        prompt = _token_ids(spec.rid, spec.prompt)
        _max_new_tokens(spec.rid, spec.max_new_tokens)
        _arrival(spec.rid, spec.arrival)
        if spec.rid in self._rids:  # RunStats.outputs() is keyed by it
            raise ValueError(f"request id {spec.rid!r} is used twice in one run")
        bad = np.flatnonzero(prompt >= self.cfg.vocab_size)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"request {spec.rid}: prompt token {int(prompt[i])} at position {i} is outside "
                f"the model's vocabulary [0, vocab_size={self.cfg.vocab_size})"
            )
        self._seq += 1
        r = _Req(spec=spec, seq=self._seq, order=order, arrival=start + spec.arrival, prompt=prompt)
        # Admission allocates every full slot at once: a request must fit the pool. Where
        # SWA sides come step by step (_swa_free) it reserves at most R of them
        # (_swa_reserve, no prefix cached): R must fit the SWA pool; elsewhere it takes an
        # SWA slot per position with the full one: it must fit the smaller pool.
        limit, pool = self.memory.kv_size, "the pool"
        swa_size = self.memory.swa_size
        if self.memory.swa_pool is not None and swa_size is not None:
            if self._swa_free:
                reserve = self._swa_reserve(r, 0)
                if reserve > swa_size:
                    raise EngineError(
                        f"request {spec.rid} needs {reserve} SWA slots at once (of its "
                        f"{r.kv_len} KV slots); the SWA pool has {swa_size}"
                    )
            elif swa_size < limit:
                limit, pool = swa_size, "the SWA pool"
        if r.kv_len > limit:
            raise EngineError(f"request {spec.rid} needs {r.kv_len} KV slots; {pool} has {limit}")
        self._rids.add(spec.rid)
        heapq.heappush(self._pending, (r.arrival, self._seq, r))

    # -- driver -----------------------------------------------------------------------------

    def run(
        self, workload: Workload, *, name: str | None = None, progress: ProgressFn | None = None
    ) -> RunStats:
        """Serve every request of ``workload`` (and its follow-ups); return the figures.

        Results come in an order that depends on the workload alone: generation by
        generation (the initial requests, then their first follow-ups, ...), each in the
        order of the initial requests. On any exception (a request refused, a callback or
        the cache raising, an interrupt) every unfinished request gives back what it owns
        before the exception propagates: its KV slots past the tree's, its state slot and
        its lock; what finished stays cached. :meth:`check_slots` then holds and the engine
        can run again.
        """
        self._t0 = time.perf_counter()
        self._compile_s = 0.0
        self._compiles = self._steps = self._prefill_steps = self._decode_steps = 0
        self._evicted = 0
        self._seq = 0
        self._rids = set()
        self._pending = []
        self._waiting = []
        self._running = []
        self._done = []
        self._workload = workload
        self._progress = progress
        self._total = workload.total_requests
        if not self.memory.buffers_alive():
            raise EngineError(
                "the pools' device buffers are gone (donated to an update whose result was "
                "never stored: an interrupt outside a run?); make a new EngineMemory"
            )
        outer, self._sigint = self._sigint, _HeldSigint()
        try:
            with self._sigint:
                try:
                    self._serve(workload)
                except BaseException as exc:
                    try:
                        self._release_all()
                    except Exception as cleanup:  # the original error is the one to report
                        if hasattr(exc, "add_note"):  # Python >= 3.11
                            exc.add_note(
                                f"releasing the unfinished requests failed too: {cleanup!r}"
                            )
                    raise
        finally:
            self._sigint = outer
        return self._stats(name or type(self.cache).__name__, workload)

    def _warm_up_state_copy(self) -> None:
        """Compile the state pool's one-slot copy (``_cache_prompt``'s snapshot) before any
        run: only ``extend_step``'s compilations are timed and taken off the clock,
        and this one would land in a request's latency. It copies the padding slot onto
        itself, which writes nothing."""
        pool = self.memory.state_pool
        if pool is not None and self._state_cache:
            pad = np.zeros(1, np.int32)
            pool.copy_states(pad, pad)

    def _serve(self, workload: Workload) -> None:
        for i, spec in enumerate(workload.requests):
            self._push(spec, 0.0, (0, i))
        while self._pending or self._waiting or self._running:
            self._sigint.deliver()  # every request's records are whole here
            now = self._now()
            while self._pending and self._pending[0][0] <= now:
                self._waiting.append(heapq.heappop(self._pending)[2])
            self._admit()
            if any(r.in_prefill for r in self._running):
                self._prefill_step()
            elif self._running:
                self._decode_step()
            elif self._waiting:
                r = self._waiting[0]
                states = ""
                if self.memory.state_pool is not None:
                    states = f", {self.memory.state_available()} state slots free"
                raise EngineError(
                    f"request {r.spec.rid} needs {r.kv_len} KV slots and cannot be admitted "
                    f"with nothing running: {self._alloc.available_size()} free after evicting, "
                    f"{self.cache.protected_size()} locked in the cache{states}"
                )
            elif self._pending:  # nothing to do until the next arrival: a safe wait
                time.sleep(min(max(0.0, self._pending[0][0] - self._now()), _SIGINT_POLL_S))

    def _admit(self) -> None:
        # Requests held back for a shared prefix are passed over, but only so many per step:
        # a long queue (a replayed trace) must not cost a match per waiting request per step.
        limit = min(len(self._waiting), 4 * self.sched.max_running)
        i = 0
        while i < limit and len(self._running) < self.sched.max_running:
            r = self._waiting[i]
            verdict = self._try_admit(r)
            if verdict == "ok":
                self._waiting.pop(i)
                self._running.append(r)
                limit -= 1
            elif verdict == "wait":
                i += 1
            else:  # first come, first served: nobody overtakes a request short of memory
                break

    def check_slots(self) -> tuple[int, int, bool]:
        """``(free, in_cache, ok)``: every KV slot is free, in the cache or held by a running
        request, the counts add up to the pool size, no cache node is left locked, and the
        pools still hold live device buffers. With an SWA pool the same holds for the SWA
        side: free, live in the tree (a windowed tree's tombstones hold none), or held by a
        running request, which holds none for ``slots[cached_len:swa_evicted]`` (freed out
        of the window) nor for ``slots[swa_upto:]`` (not attached yet)."""
        alloc, cache, split = self._alloc, self.cache, self.memory.swa_pool is not None
        free = alloc.full_available_size() if split else alloc.available_size()  # type: ignore[union-attr]
        in_cache = cache.total_size()
        held = sum(len(r.slots) - r.cached_len for r in self._running)
        ok = free + in_cache + held == self.memory.kv_size and self.memory.buffers_alive()
        if split:  # the SWA side: free, live in the tree (windowed caches drop old ones), ours
            swa_in_cache = in_cache
            if self._window:
                swa_in_cache = cache.swa_evictable_size() + cache.swa_protected_size()
            swa_free = alloc.swa_available_size()  # type: ignore[union-attr]
            # ours but those whose SWA side a request freed (slots[cached_len:swa_evicted])
            # or never attached (slots[swa_upto:]): slots[max(cached_len, swa_evicted):swa_upto]
            swa_held = sum(
                max(0, r.swa_upto - max(r.cached_len, r.swa_evicted)) for r in self._running
            )
            ok = ok and swa_free + swa_in_cache + swa_held == self.memory.swa_size
        if not self._running:
            ok = ok and cache.protected_size() == 0 and cache.swa_protected_size() == 0
            if self.memory.state_pool is not None:
                in_tree = 0
                if self._state_cache:
                    get = self.cache.mamba_evictable_size  # type: ignore[attr-defined]
                    in_tree = get() + self.cache.mamba_protected_size()  # type: ignore[attr-defined]
                    ok = ok and self.cache.mamba_protected_size() == 0  # type: ignore[attr-defined]
                ok = ok and self.memory.state_available() + in_tree == self.memory.state_size
        return free, in_cache, ok

    def _stats(self, name: str, workload: Workload) -> RunStats:
        done = sorted(self._done, key=lambda r: r.order)
        ttft = np.array([r.t_first - r.arrival for r in done]) if done else np.zeros(1)
        free, in_cache, ok = self.check_slots()
        prompt_tokens = sum(r.prompt_len for r in done)
        missed = sum(r.computed for r in done)
        return RunStats(
            cache=name,
            workload=workload.name,
            requests=len(done),
            prompt_tokens=prompt_tokens,
            cached_tokens=prompt_tokens - missed,
            prefill_tokens=missed + sum(r.recomputed for r in done),
            generated_tokens=sum(len(r.output) for r in done),
            wall_s=self._now(),
            compile_s=self._compile_s,
            compiles=self._compiles,
            steps=self._steps,
            prefill_steps=self._prefill_steps,
            decode_steps=self._decode_steps,
            evicted_tokens=self._evicted,
            ttft_p50=float(np.percentile(ttft, 50)),
            ttft_p99=float(np.percentile(ttft, 99)),
            kv_slots=self.memory.kv_size,
            kv_free=free,
            kv_in_cache=in_cache,
            leak_free=ok,
            results=[
                RequestResult(
                    rid=r.spec.rid,
                    prompt=r.prompt,
                    prompt_len=r.prompt_len,
                    cached_tokens=r.prompt_len - r.computed,
                    output=np.asarray(r.output, dtype=np.int32),
                    arrival=r.arrival,
                    ttft=r.t_first - r.arrival,
                    latency=r.t_finish - r.arrival,
                    first_logits=r.first_logits,
                    extra_key=r.spec.extra_key,
                )
                for r in done
            ],
        )


__all__ = [
    "Engine",
    "EngineError",
    "RequestResult",
    "RunStats",
    "SchedulerConfig",
    "ideal_cached_tokens",
]
