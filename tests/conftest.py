"""Shared test helpers: a recording allocator, cache factories, hypothesis profiles.

Hypothesis profiles: ``ci`` (loaded by default; bounded so the whole suite runs in about 13
minutes on two cores: 12:41 for 8,435 tests at eda94c5), ``long`` (``pytest
--hypothesis-profile=long``; for soak runs) and ``memcheck`` (a few short runs, for the
valgrind run of ``.ci/memcheck``). Every state machine counts the steps it checked with
:func:`count_step`; the counts are printed at the end of the session ("stateful steps").
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from pymllm.mem_cache.errors import CacheError, InvalidFreeError

settings.register_profile(
    "ci",
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=3000,
    stateful_step_count=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "memcheck",  # under valgrind (.ci/memcheck): a few short runs of each state machine
    max_examples=8,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile("ci")


class RecordingAllocator:
    """Stands in for a KV pool allocator and keeps the books on every slot.

    ``alloc(n)`` hands out fresh slots 1, 2, 3, ... (never reused, so a slot freed twice is
    caught however far apart the two frees are; slot 0 is the pool's padding slot and is
    never handed out). ``free(indices)`` takes a 1-D ``np.int32`` array, as the caches
    promise, records it, and raises ``InvalidFreeError`` for a slot that was never handed
    out or is already free (recording nothing of that call).
    """

    def __init__(self) -> None:
        self.next_slot = 1
        self.freed: set[int] = set()
        self.free_calls: list[np.ndarray] = []

    def alloc(self, n: int) -> np.ndarray:
        out = np.arange(self.next_slot, self.next_slot + n, dtype=np.int32)
        self.next_slot += n
        return out

    def free(self, indices: Any) -> None:
        if not isinstance(indices, np.ndarray) or indices.dtype != np.int32 or indices.ndim != 1:
            raise TypeError(f"free() wants a 1-D np.int32 array, got {indices!r:.80}")
        slots = indices.tolist()
        for i, s in enumerate(slots):
            if not 1 <= s < self.next_slot:
                raise InvalidFreeError(f"slot {s} was never handed out")
            if s in self.freed or s in slots[:i]:
                raise InvalidFreeError(f"slot {s} freed twice")
        self.freed.update(slots)
        self.free_calls.append(indices.copy())

    @property
    def allocated(self) -> set[int]:
        return set(range(1, self.next_slot))

    @property
    def live(self) -> set[int]:
        """Slots handed out and not yet freed."""
        return self.allocated - self.freed

    @property
    def freed_sequence(self) -> list[list[int]]:
        return [c.tolist() for c in self.free_calls]

    def assert_all_free(self) -> None:
        assert not self.live, f"leaked slots: {sorted(self.live)[:20]}"


class RecordingSWAAllocator(RecordingAllocator):
    """A :class:`RecordingAllocator` with a sliding-window side, as
    ``SWATokenToKVPoolAllocator``: every full slot handed out has an SWA slot (numbered as
    the full slot; slots are never reused, so neither are SWA slots).

    ``free(indices)`` frees the full slots and whichever of their SWA slots are still held;
    ``free_swa(indices)`` frees only the SWA side of held full slots. Stricter than the real
    allocator, which skips SWA sides already freed: here that is ``InvalidFreeError``
    (nothing recorded), so a test proves that every SWA slot is freed exactly once.
    ``calls`` lists every successful call in order as ``(kind, slots)``, kind ``"free"`` or
    ``"free_swa"``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.swa_freed: set[int] = set()
        self.calls: list[tuple[str, list[int]]] = []

    def free(self, indices: Any) -> None:
        super().free(indices)
        slots = indices.tolist()
        self.swa_freed.update(slots)
        self.calls.append(("free", slots))

    def free_swa(self, indices: Any) -> None:
        if not isinstance(indices, np.ndarray) or indices.dtype != np.int32 or indices.ndim != 1:
            raise TypeError(f"free_swa() wants a 1-D np.int32 array, got {indices!r:.80}")
        slots = indices.tolist()
        for i, s in enumerate(slots):
            if not 1 <= s < self.next_slot or s in self.freed:
                raise InvalidFreeError(f"free_swa: full slot {s} is not held")
            if s in self.swa_freed or s in slots[:i]:
                raise InvalidFreeError(f"free_swa: SWA side of slot {s} freed twice")
        self.swa_freed.update(slots)
        self.calls.append(("free_swa", slots))

    @property
    def swa_live(self) -> set[int]:
        """Slots whose SWA side is handed out and not yet freed."""
        return self.allocated - self.swa_freed

    def assert_all_free(self) -> None:
        super().assert_all_free()
        assert not self.swa_live, f"leaked SWA slots: {sorted(self.swa_live)[:20]}"


class RecordingStates:
    """Stands in for a Mamba state pool that the test hands states from itself: records
    every state slot freed, in order (a list, so a state freed twice shows twice)."""

    def __init__(self) -> None:
        self.freed: list[int] = []

    def free(self, slots: np.ndarray) -> None:
        self.freed.extend(np.asarray(slots).tolist())


@pytest.fixture
def allocator() -> RecordingAllocator:
    return RecordingAllocator()


def cache_classes(impl: str) -> tuple[type, type]:
    """(cache class, node class) of one implementation: 'ref' or 'compiled'."""
    if impl == "ref":
        from reference_model import RefRadixCache, TreeNode

        return RefRadixCache, TreeNode
    # Deliberately not importorskip: a missing or broken build must fail the tests.
    from pymllm.mem_cache.radix_cache import RadixCache, TreeNode

    return RadixCache, TreeNode


IMPLS = ["ref", "compiled"]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_cache(impl: str, allocator: RecordingAllocator) -> Callable[..., Any]:
    """Factory for a cache of the parametrized implementation; the allocator defaults to the
    ``allocator`` fixture and ``evicted_ids`` collects every ``on_node_evict`` call."""
    cls, _ = cache_classes(impl)

    def make(page_size: int = 1, **kwargs: Any) -> Any:
        kwargs.setdefault("token_to_kv_pool_allocator", allocator)
        if "on_node_evict" not in kwargs:
            kwargs["on_node_evict"] = make.evicted_ids.append
        return cls(page_size=page_size, **kwargs)

    make.evicted_ids = []  # type: ignore[attr-defined]
    return make


@pytest.fixture
def node_class(impl: str) -> type:
    return cache_classes(impl)[1]


def assert_same_trees(
    ref: Any,
    compiled: Any,
    describe: Callable[[Any], Any],
    handles: dict[int, tuple[Any, Any]],
    size_names: tuple[str, ...],
) -> dict[int, Any]:
    """One comparison step of the stateful tests: both caches pass their own invariant
    checks, agree on every size counter and on every node (``describe`` gives the fields
    compared), and every handle either side ever returned is evicted on both or on neither.
    New nodes join ``handles``. Returns the reference's nodes by id."""
    ref._check_invariants()
    compiled._check_invariants()
    for name in size_names:
        r, c = getattr(ref, name)(), getattr(compiled, name)()
        assert r == c, f"{name}: ref {r} != compiled {c}"
    ref_nodes = {n.id: n for n in ref._iter_nodes()}
    c_nodes = {n.id: n for n in compiled._nodes()}
    assert sorted(ref_nodes) == sorted(c_nodes), "the trees hold different node ids"
    for node_id, rn in ref_nodes.items():
        dr, dc = describe(rn), describe(c_nodes[node_id])
        assert dr == dc, f"node {node_id}: ref {dr} != compiled {dc}"
        handles.setdefault(node_id, (rn, c_nodes[node_id]))
    for node_id, (hr, hc) in handles.items():
        assert hr.evicted == hc.evicted == (node_id != 0 and node_id not in ref_nodes)
    return ref_nodes


BIG_TOKEN = 2**32 - 1  # the largest valid token

# CPython 3.11 can run the cyclic collector inside any allocation of a tracked object, so
# inside a cache call's C code; 3.12 and later only schedule it there and collect at the
# interpreter's next check between bytecodes. Tests that provoke a collection in the middle
# of a call (gc.set_threshold(1)) can only reach their race on 3.11: elsewhere they would
# pass without exercising it, so they are skipped.
collects_inside_calls = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="CPython 3.12+ never collects inside an allocation made in C",
)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("raised", exception type): how one call ended, for comparing two
    implementations call by call."""
    try:
        return ("ok", fn())
    except (CacheError, TypeError, ValueError) as exc:
        return ("raised", type(exc))


def draw_key_maker(data: Any, ns: tuple[Any, int], tokens: list[Any]) -> Callable[[], Any]:
    """Draw a key form (list, or an int32/int64 array for plain tokens) and return a maker
    of fresh RadixKeys of that form, so an aliasing bug in either cache shows."""
    from hypothesis import strategies as st

    from pymllm.mem_cache import RadixKey

    forms = ["list"]
    if ns[1] == 0:
        forms.append("int64")
        if BIG_TOKEN not in tokens:
            forms.append("int32")
    form = data.draw(st.sampled_from(forms), label="key form")

    def make() -> Any:
        if form == "list":
            return RadixKey(list(tokens), ns[0])
        return RadixKey(np.array(tokens, dtype=form), ns[0])

    return make


# ------------------------------------------------------------------ shared by the state machines

STEP_COUNTS: Counter[str] = Counter()  # machine name -> steps checked in this session
RUN_COUNTS: Counter[str] = Counter()  # machine name -> runs (examples) started


def count_step(machine: str) -> None:
    """One checked step of *machine* (called from its invariant)."""
    STEP_COUNTS[machine] += 1


def count_run(machine: str) -> None:
    """One run (hypothesis example) of *machine* (called from its initialize rule)."""
    RUN_COUNTS[machine] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not STEP_COUNTS:
        return
    tr = terminalreporter
    tr.section("stateful steps")
    for name in sorted(STEP_COUNTS):
        tr.write_line(f"{name}: {STEP_COUNTS[name]} steps in {RUN_COUNTS[name]} runs")
    tr.write_line(f"total: {sum(STEP_COUNTS.values())} steps in {sum(RUN_COUNTS.values())} runs")


SWA_FIELDS = ("swa_lock_ref", "swa_tombstone")
MAMBA_FIELDS = ("mamba_value", "full_lock_ref", "mamba_lock_ref")
SIZES = (
    "evictable_size",
    "protected_size",
    "total_size",
    "swa_evictable_size",
    "swa_protected_size",
)
MAMBA_SIZES = (*SIZES, "mamba_evictable_size", "mamba_protected_size")


def describe_node(node: Any, fields: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """What the stateful tests compare of one node: parent id, tokens, namespace (type and
    value), KV value, lock_ref, clock stamp, hit count, then the given extra *fields*
    (:data:`SWA_FIELDS`, :data:`MAMBA_FIELDS`)."""
    key = node.key
    out = [
        node.parent.id,
        [tuple(t) if isinstance(t, tuple) else int(t) for t in key.token_ids],
        type(key.extra_key).__name__,
        key.extra_key,
        np.asarray(node.value).tolist(),
        node.lock_ref,
        node.last_access_time,
        node.hit_count,
    ]
    for name in fields:
        v = getattr(node, name)
        if name == "mamba_value":
            v = None if v is None else (str(v.dtype), v.tolist())
        elif name == "swa_tombstone":
            v = bool(v)
        out.append(v)
    return tuple(out)


def assert_slot_ledger(what: str, universe: Iterable[int], places: dict[str, Any]) -> None:
    """The ownership ledger: every slot of *universe* is in exactly one of *places* (name ->
    slots: free in the allocator, in the tree, held by one caller or request), none twice
    (not even twice in one place) and none outside the universe."""
    seen: dict[int, list[str]] = {}
    for place, slots in places.items():
        for s in slots:
            seen.setdefault(int(s), []).append(place)
    twice = {s: p for s, p in seen.items() if len(p) > 1}
    assert not twice, f"{what} slots in two places: {dict(sorted(twice.items())[:5])}"
    universe = set(universe)
    missing = universe - seen.keys()
    assert not missing, f"{what} slots leaked (in no place): {sorted(missing)[:20]}"
    stray = seen.keys() - universe
    assert not stray, f"{what} slots from nowhere: {sorted(stray)[:20]}"


class PairedCaches:
    """Helpers of a state machine that drives a reference model (``self.ref``) and a
    compiled cache (``self.c``) with the same calls: node handles by id, keys that share
    prefixes, scribbling over the caller's buffers.

    Subclasses set ``NAMESPACES`` ((extra_key, tuple width) pairs; width 0 is plain int
    tokens) and ``MAX_KEY_LEN``, and keep ``self.keys`` (every key inserted so far, as
    (namespace, tokens)) and ``self.handles`` (id -> (ref handle, compiled handle); stale
    handles stay on purpose).
    """

    NAMESPACES: list[tuple[Any, int]] = [(None, 0)]
    MAX_KEY_LEN = 24
    MAX_SUFFIX = 8
    keys: list[tuple[tuple[Any, int], list[Any]]]
    handles: dict[int, tuple[Any, Any]]
    ref: Any
    c: Any

    def _token(self, ns: tuple[Any, int]) -> Any:
        from hypothesis import strategies as st

        if ns[1]:
            return st.tuples(st.integers(0, 1), st.integers(0, 1))
        return st.sampled_from([0, 1, 2, 0, 1, 2, BIG_TOKEN])

    def _draw_key(
        self, data: Any, extend: bool = False, min_suffix: int = 0
    ) -> tuple[tuple[Any, int], list[Any]]:
        """A key that, half the time (always with *extend*), starts with part of an earlier
        key of its namespace, so that keys share prefixes, pages and eviction cascades."""
        from hypothesis import strategies as st

        if extend and self.keys:
            spaces = sorted({n for n, _ in self.keys}, key=repr)
            ns = spaces[data.draw(st.integers(0, len(spaces) - 1), label="namespace")]
        else:
            ns = self.NAMESPACES[
                data.draw(st.integers(0, len(self.NAMESPACES) - 1), label="namespace")
            ]
        earlier = [toks for (n, toks) in self.keys if n == ns]
        prefix: list[Any] = []
        if earlier and (extend or data.draw(st.booleans(), label="extend an earlier key")):
            base = earlier[data.draw(st.integers(0, len(earlier) - 1), label="earlier key")]
            # half the time the whole earlier key (Mamba states sit at the ends of inserted
            # keys); drawn from the end, so that the simplest choice is the whole key
            drop = st.one_of(st.just(0), st.integers(0, len(base)))
            prefix = base[: len(base) - data.draw(drop, label="cut")]
        suffix = data.draw(
            st.lists(self._token(ns), min_size=min_suffix, max_size=self.MAX_SUFFIX),
            label="suffix",
        )
        return ns, (prefix + suffix)[: self.MAX_KEY_LEN]

    def _register(self, ref_node: Any, c_node: Any) -> None:
        assert ref_node.id == c_node.id, f"last_node: ref {ref_node.id} != compiled {c_node.id}"
        self.handles[ref_node.id] = (ref_node, c_node)

    def _pick_handle(self, data: Any, pool: Iterable[int]) -> tuple[Any, Any]:
        from hypothesis import strategies as st

        ids = sorted(pool)
        return self.handles[ids[data.draw(st.integers(0, len(ids) - 1), label="node id")]]

    # -- bad calls shared by the comparison machines: each must fail the same way in both
    # caches and change nothing. Subclasses give the caller's slots and insert arguments.

    #: insert() arguments beyond key and value for a bad-key insert (never reached)
    BAD_KEY_INSERT_KWARGS: dict[str, Any] = {}

    def _caller_slots(self, n: int) -> np.ndarray:
        """*n* fresh KV slots, booked as the caller's (they are never inserted)."""
        raise NotImplementedError

    def _bad_value_insert_kwargs(self) -> dict[str, Any]:
        """insert() arguments beyond key and value for a bad-value insert."""
        return {}

    def _insert_bad_value(self, data: Any) -> None:
        from hypothesis import strategies as st

        from pymllm.mem_cache.errors import InvalidValueError

        ns, tokens = self._draw_key(data)
        make = draw_key_maker(data, ns, tokens)
        kinds = ["too long"]
        if tokens:
            kinds += ["too short", "negative"]
        kind = data.draw(st.sampled_from(kinds), label="bad value")
        slots = self._caller_slots(len(tokens) + 1)
        kwargs = self._bad_value_insert_kwargs()
        value = slots[: len(tokens)].astype(np.int64)
        if kind == "too long":
            value = slots.astype(np.int64)
        elif kind == "too short":
            value = value[:-1]
        else:
            value[data.draw(st.integers(0, len(tokens) - 1))] = -1
        out_r = outcome(lambda: self.ref.insert(make(), value.copy(), **kwargs))
        out_c = outcome(lambda: self.c.insert(make(), value.copy(), **kwargs))
        assert out_r == ("raised", InvalidValueError), out_r
        assert out_c == out_r, f"compiled: {out_c}"

    def _bad_key(self, data: Any) -> None:
        from hypothesis import strategies as st

        from pymllm.mem_cache import RadixKey
        from pymllm.mem_cache.errors import InvalidKeyError

        ns, tokens = self._draw_key(data)
        pos = data.draw(st.integers(0, len(tokens)), label="bad token position")
        bad_tokens: Any
        if ns[1] == 0:
            bad = data.draw(st.sampled_from([-1, 2**32, 2**40]), label="bad token")
            form = data.draw(st.sampled_from(["list", "int64"]), label="bad key form")
            bad_tokens = [*tokens[:pos], bad, *tokens[pos:]]
            if form == "int64":
                bad_tokens = np.array(bad_tokens, dtype=np.int64)
        else:
            pairs = [(0,), (0, 1, 1), (0, -1), (0, 2**32)]
            bad = data.draw(st.sampled_from(pairs), label="bad tuple")
            tokens = tokens or [(0, 0)]  # a lone (0,) would be a valid width-1 key
            bad_tokens = [*tokens[:pos], bad, *tokens[pos:]]
        n = len(bad_tokens)
        for call in ("match", "insert"):

            def run(cache: Any, call: str = call) -> Any:
                key = RadixKey(bad_tokens, ns[0])
                if call == "match":
                    return cache.match_prefix(key)
                value = np.arange(1, n + 1, dtype=np.int32)
                return cache.insert(key, value, **self.BAD_KEY_INSERT_KWARGS)

            out_r = outcome(lambda: run(self.ref))
            out_c = outcome(lambda: run(self.c))
            assert out_r == ("raised", InvalidKeyError), out_r
            assert out_c == out_r, f"{call}: compiled {out_c}"

    def _unlock_unheld(self, data: Any) -> None:
        # Stale handles, unlocked nodes and the root: never an unlock that the test owes.
        pool = [i for i, (r, _) in self.handles.items() if r.evicted or r.lock_ref == 0]
        h_r, h_c = self._pick_handle(data, pool)
        out_r = outcome(lambda: self.ref.dec_lock_ref(h_r))
        out_c = outcome(lambda: self.c.dec_lock_ref(h_c))
        assert out_r == out_c, f"dec_lock_ref({h_r.id}): ref {out_r} != compiled {out_c}"

    @staticmethod
    def _scribble(key: Any, value: Any) -> None:
        # The caches must have copied what they keep: overwrite the caller's buffers.
        if isinstance(key.token_ids, np.ndarray):
            key.token_ids[:] = 5
        if isinstance(value, np.ndarray):
            value[:] = 0


def load_bench(name: str) -> ModuleType:
    """The script ``bench/<name>.py`` as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pymllm_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_raises() -> Iterator[None]:
    """The suite's Ctrl-C tests raise SIGINT in the process and expect KeyboardInterrupt. A
    shell without job control starts a background job with SIGINT ignored, and those tests
    then failed with "DID NOT RAISE": the session restores Python's own handler first."""
    ignored = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    )
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


LIBC = ctypes.CDLL(None)
HAS_MALLINFO2 = hasattr(LIBC, "mallinfo2")  # glibc's
if HAS_MALLINFO2:
    LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes_in_use() -> int:
    """Bytes in use on the C heap: glibc malloc's arenas plus its mmap'ed blocks (0 where
    there is no ``mallinfo2``; tests that measure skip there)."""
    if not HAS_MALLINFO2:
        return 0
    info = LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class FlakyExtraKey:
    """An extra_key whose first `wrong` hashes miss (a lookup does not find its namespace),
    then hash right: an insert's lookup and its interning of the namespace can see two
    different hashes. Equal by name; `calls` counts its hashes."""

    def __init__(self, name: str = "ns", wrong: int = 0) -> None:
        self.name, self.wrong, self.calls = name, wrong, 0

    def __hash__(self) -> int:
        self.calls += 1
        if self.wrong > 0:
            self.wrong -= 1
            return 12345
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlakyExtraKey) and other.name == self.name


class Flip:
    """A sequence of *good* items that reads *bad* from the *at*-th read of item 0 on (for
    code that reads its argument more than once)."""

    def __init__(self, good: list[Any], bad: list[Any], at: int) -> None:
        self.good, self.bad, self.at, self.reads = good, bad, at, 0

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, i: int) -> Any:
        if i >= len(self.good):
            raise IndexError(i)
        if i == 0:
            self.reads += 1
        return (self.bad if self.reads >= self.at else self.good)[i]


@contextlib.contextmanager
def collection_inside(func_name: str, action: Callable[[], None]) -> Iterator[list[bool]]:
    """Run *action* once, from the first garbage collection that starts while a function
    named *func_name* is on the stack (with a collection at nearly every allocation in
    the block): Python code that runs in the middle of a call, between two of its steps.
    Yields a list that holds True once *action* ran."""
    fired: list[bool] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase != "start" or fired:
            return
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name == func_name:
                action()
                fired.append(True)
                return
            f = f.f_back

    thresholds = gc.get_threshold()
    gc.collect()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        yield fired
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(callback)


def sha256_hex(*chunks: bytes) -> str:
    """The SHA-256 hex digest of *chunks* fed in order: what ``hash_token_ids`` must return
    for the bytes it packs."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """*env* (default: this process's environment) with the directory that holds the
    ``pymllm`` this process imported first on ``PYTHONPATH``: a child Python then tests
    the same build as its parent (the installed package in CI; a worktree or copy built
    in place, rather than whatever an editable install points at, when run from one)."""
    import pymllm

    env = dict(os.environ if env is None else env)
    root = str(Path(pymllm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_script(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a bench script as its users run it (``python bench/NAME.py ARGS``), in a fresh
    process outside the checkout that imports this process's ``pymllm`` (:func:`child_env`);
    returns the finished run (its exit status unchecked)."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
        env=child_env(),
    )


def run_child(code: str, timeout: float = 300, **env: str) -> str:
    """Run *code* in a fresh Python process (for cases that crash or limit the process) and
    return its stdout; a non-zero exit fails the test with the child's stderr.

    The child starts outside the checkout (``python -c`` puts the working directory first
    on sys.path, and the repository root may hold unbuilt sources) and imports the
    parent's ``pymllm`` (:func:`child_env`); *env* adds variables to its environment.
    *code* is dedented first."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
        env={**child_env(), **env},
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    return run.stdout
