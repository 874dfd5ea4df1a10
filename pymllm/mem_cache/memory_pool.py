"""Device pools: the KV cache the tree's slot indices name, the request table, Mamba states.

Ownership: a KV slot is either free in a :class:`TokenToKVPoolAllocator` or owned by one
caller (the scheduler, a request) or by the radix tree once inserted; the allocator books
which (``is_cached``) and refuses a caller's free of the tree's slots. :class:`KVPool` never
checks ownership; it stores whatever is written at a slot. Slot 0 (page 0 with pages) is the
padding slot: never handed out, the row every padded index list points at. Reads of it
return row 0, which stays all zeros: a write or copy routes each padding entry to a distinct
row past the buffer's end, which the scatter drops (:func:`scatter_rows`), so every index a
scatter sees is distinct, as its ``unique_indices=True`` promises.

Device side: each buffer set is a ``NamedTuple`` of ``jax.Array`` and every update is a pure
function ``(buffers, ...) -> buffers`` jitted with the buffers donated, so XLA updates them
in place (no copy of the cache). The module-level ``write_kv``/``read_kv``/... are meant to
be called inside a model's own jitted step; the classes keep the current buffers, call
per-pool jitted copies built once with the pool's shardings in and out, and rebind after
every call, so their methods run outside traced code (inside ``jax.jit`` or given a tracer
they raise ``InvalidValueError`` and change nothing). Never keep a reference to a pool's
buffers across one of its calls: it is deleted (donated).

Inputs: the pools' methods hold what they were passed at call time. Host (numpy) K/V,
states and slot lists are copied before a call returns (XLA:CPU would otherwise map an aligned
numpy array as the device buffer, and the asynchronously dispatched computation would read it
later), so a caller may reuse or overwrite its arrays as soon as a call returns. ``jax.Array``
inputs are immutable and are used without a copy. The module-level jitted functions are plain
``jax.jit`` functions and follow JAX's rules instead: pass them device arrays (a model step
does), or do not write to a numpy argument until their results are ready.

Index lists are padded with slot 0 up to :func:`bucket_size` (16, 24, 32, 48, 64, 96, ...:
powers of two and the midpoints between), so a serving loop compiles each update a handful
of times, not once per request size. For zero recompilation produce K/V at the bucket size
in the model step (pad the batch); host (numpy) K/V of any length are padded on the host.
A jitted call is also keyed on committed-ness and weak types: host, committed and weakly
typed K/V share one compilation per bucket (a weakly typed array is made strong first);
an uncommitted device array (``jnp.ones``, a step over uncommitted parameters) is taken as
it is, at the cost of one more the first time (committing it every call would cost more).

Interrupts: an update donates the old buffers when it is dispatched, and the pool stores the
new ones when it returns; a ``KeyboardInterrupt`` raised in between (Python raises a pending
Ctrl-C as a call returns) leaves the pool holding deleted buffers, and its next call raises
``BuffersDeletedError`` (as after a step that donated ``pool.buffers`` and did not hand its
result back). A loop that must survive Ctrl-C holds SIGINT around its updates and raises it
where its records are whole, as ``pymllm.engine`` does in a run (holding it around every
call here would cost two ``sigaction`` calls, 7 us on the development machine, a call).

Transfer guards: moving a call's host slot lists (and host K/V or states) to the device
is part of what a pool method or :func:`scatter_rows` does, so it counts as an explicit
transfer. Under ``jax.transfer_guard("disallow")`` or ``"log"`` they run and log nothing;
under ``"disallow_explicit"`` or ``"log_explicit"`` they are refused or logged as
``jax.device_put`` would be (a refused call raises JAX's error and changes nothing). The
guard's level is read once a call (0.3 us); the module-level jitted functions follow JAX's
rules, as above. The other direction is the caller's: a ``jax.Array`` passed where a pool,
an allocator or a cache reads slots or tokens on the host is read as JAX reads any array
into numpy, an implicit device-to-host transfer (on a GPU, a sync), which a
device-to-host guard refuses; pass host (numpy) slots, as the tree returns them, to keep a
guarded loop free of syncs (``bench/gpu_transfer_guard.py``).

Threads: slot allocation (``alloc``/``free`` of every pool) goes through the compiled
allocator and is atomic with respect to Python threads. The device buffers are not shared
safely: a donated write deletes the buffers that another thread may be reading, so one
thread (the model step) owns a pool's reads and writes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator as SWATokenToKVPoolAllocator
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator as TokenToKVPoolAllocator
from pymllm.mem_cache._allocator import (
    _cannot_pickle,
    _check_ints,
    _integer_slots,
    _reduce_owner,
    _refuse_bool_slots,
    _refuse_deleted_array,
)
from pymllm.mem_cache.errors import (
    AlreadyInitializedError,
    BuffersDeletedError,
    InvalidFreeError,
    InvalidValueError,
)

PAD_SLOT = 0
"""The padding slot: row 0 of every buffer, never allocated."""

_INT32_MAX = (1 << 31) - 1

_MAX_ROWS = 1 << 30
"""Most rows a device buffer may have: slots are int32, and a write's padding entries are
routed to rows past the last one (``rows + i``), which must be int32 too; 2**30 rows leave
room for any write of up to 2**30 entries."""

MIN_BUCKET = 16


def bucket_size(n: int) -> int:
    """Smallest bucket >= *n*: 16, 24, 32, 48, 64, 96, 128, ... (past 16, padding at most
    1.5x: n=17 pads to 24; any n up to 16 pads to 16). ``TypeError`` for a bool or a
    non-int, ``InvalidValueError`` for a negative *n*."""
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__} {n!r:.80}") from None
    if n < 0:
        raise InvalidValueError(f"n: expected a count >= 0, got {n}")
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    p = 1 << (n - 1).bit_length()
    mid = (p >> 1) + (p >> 2)
    return mid if n <= mid else p


def pad_slots(loc: Any, size: int | None = None) -> np.ndarray:
    """*loc* as a new ``np.int32`` array (never *loc* itself) padded with slot 0 to *size*
    (default ``bucket_size(len)``); the caller owns both.

    ``InvalidValueError`` for slots that are not integers or lie outside ``[0, 2**31)``
    (never wrapped or truncated into another slot), a bool among them included;
    ``TypeError`` for a *size* that is not an int."""
    _not_traced("loc", loc)
    slots = _slots("loc", _integer_slots("loc", loc).reshape(-1), 1 << 31)
    if size is not None and _positive("size", size, 0, TypeError) < len(slots):
        raise InvalidValueError(f"size: {size} is shorter than loc ({len(slots)} slots)")
    return _pad(slots, size)


def _pad(loc: np.ndarray, size: int | None = None) -> np.ndarray:
    """``pad_slots`` of slots already checked (1-D ``np.int32``): always a new array, even at
    a bucket size. The pools pass it to jitted calls, which on XLA:CPU may map a numpy
    argument instead of copying it and read it after the call returned: it must never be
    the caller's array (4 bytes a slot to copy, against a call's ~40 us of dispatch)."""
    size = bucket_size(len(loc)) if size is None else size
    out = np.zeros(size, dtype=np.int32)
    out[: len(loc)] = loc
    return out


# ---------------------------------------------------------------------------------------
# Pure device functions. Shapes: L layers, R = rows (size + page_size), n index entries.
# ---------------------------------------------------------------------------------------


class KVBuffers(NamedTuple):
    """The KV cache: ``k`` is ``[L, R, Hk, Dk]``, ``v`` is ``[L, R, Hv, Dv]``, one dtype."""

    k: jax.Array
    v: jax.Array


def _x64_off() -> bool:
    """Whether JAX holds 64-bit integers as 32-bit ones (``jax_enable_x64`` off)."""
    return bool(jax.dtypes.canonicalize_dtype(np.int64) != np.int64)


_IMPLICIT_ONLY_GUARDS = frozenset({"log", "disallow"})
"""Transfer-guard levels that act on implicit transfers only: a pool call's own transfers,
explicit by design, run under ``"allow"`` there."""

_R = TypeVar("_R")

# JAX's documented way to read a flag that has a context manager is this attribute, which
# its type stubs do not declare
_JAX_CONFIG: Any = jax.config


def _explicitly(f: Callable[..., _R], *args: Any) -> _R:
    """``f(*args)``, the host arrays among *args* moved to the device as an explicit
    transfer: under a guard on implicit transfers only (``"disallow"``, ``"log"``) the call
    runs with host-to-device transfers allowed; any other level applies as it stands."""
    if _JAX_CONFIG.jax_transfer_guard_host_to_device in _IMPLICIT_ONLY_GUARDS:
        with jax.transfer_guard_host_to_device("allow"):
            return f(*args)
    return f(*args)


def scatter_rows(loc: Any, rows: int, valid: Any = None) -> jax.Array:
    """int32 scatter indices for the integer slots *loc* (any shape; a list, a numpy or a
    jax array) into a buffer of *rows* rows: *loc* where *valid* (a bool mask of *loc*'s
    shape; default: where it is not the padding slot 0), and a distinct row past the
    buffer's end elsewhere, which a ``mode="drop"`` scatter skips.

    Every index is then distinct, as ``unique_indices=True`` promises (JAX leaves the
    result of a repeated index undefined, and padding repeats slot 0), and padding writes
    nothing: row 0 keeps its zeros, so masked reads of it stay finite. For use inside a
    jitted function (the pools' updates and a model step). As in any JAX scatter, a slot
    past the end is dropped and a negative one from ``-rows`` wraps; a slot wider than
    int32 (64-bit ints, which JAX's scatter, or without ``jax_enable_x64`` the conversion
    of a numpy array, would narrow onto another row) outside ``[-rows, rows)`` is routed
    past the end too. Raises
    ``InvalidValueError`` (when traced: shapes and *rows* are static) for a non-integer
    *loc*, a *valid* that is not a bool mask of its shape, or rows past the end
    (``rows .. rows + loc.size - 1``) beyond int32; also for a list of slots with one past
    int32 when x64 is off (JAX cannot hold it). Inside ``jax.jit``, pass int32 slots: with
    x64 off, JAX narrows a 64-bit numpy argument to its low 32 bits at the jit boundary,
    before this function sees it. Outside one, a host *loc* is moved to the device as an
    explicit transfer (see the module's note on transfer guards)."""
    return _explicitly(_scatter_rows, loc, rows, valid)


def _scatter_rows(loc: Any, rows: int, valid: Any) -> jax.Array:
    _refuse_deleted("loc", loc)
    # [True, 5] would read as rows 1 and 5; what the rest reads, as checked
    loc = _refuse_bool_slots("loc", loc)
    if isinstance(loc, (list, tuple)) and not loc:
        loc = np.zeros(0, np.int32)  # no slots, as everywhere else (JAX reads [] as float)
    elif not isinstance(loc, (int, list, tuple, jax.Array)) and not hasattr(loc, "__jax_array__"):
        # host data that is not numpy yet (a memoryview, an __array__ object): read as numpy
        # first, so a 64-bit slot is routed below rather than narrowed by jnp.asarray (a
        # Python int, as a list of them, and what JAX reads itself go to jnp.asarray)
        loc = np.asarray(loc)
        if loc.dtype.kind not in "iu":  # JAX would raise a bare TypeError for most
            raise InvalidValueError(f"loc: expected integer slot ids, got dtype {loc.dtype}")
        if not loc.dtype.isnative:  # JAX takes native byte order only; the values count
            loc = loc.astype(loc.dtype.newbyteorder("="))
    fits = None
    if (
        isinstance(loc, (np.ndarray, np.integer))
        and loc.dtype.kind in "iu"
        and loc.dtype.itemsize == 8
        and _x64_off()
    ):
        # jnp.asarray would keep the low 32 bits of each slot, onto another row: the range
        # routing is done here, on the host, before the narrowing
        host = np.asarray(loc)
        fits = (host >= (-rows if host.dtype.kind == "i" else 0)) & (host < rows)
        loc = np.where(fits, host, 0).astype(np.int32)
    elif isinstance(loc, (list, tuple)) and _x64_off():
        # a list of numpy 64-bit scalars would be narrowed too; one past int32 is refused,
        # as a list of Python ints is (JAX cannot convert it)
        try:
            host = np.asarray(loc)
        except Exception:  # tracers, ragged nesting: jnp.asarray below decides
            host = np.zeros(0, np.int32)
        if (
            host.dtype.kind in "iu"
            and host.size
            and (
                host.max() > _INT32_MAX or (host.dtype.kind == "i" and host.min() < -_INT32_MAX - 1)
            )
        ):
            raise InvalidValueError("loc: a slot id does not fit an integer dtype")
    try:
        loc = jnp.asarray(loc)
    except OverflowError:
        raise InvalidValueError("loc: a slot id does not fit an integer dtype") from None
    if not jnp.issubdtype(loc.dtype, jnp.integer):
        raise InvalidValueError(f"loc: expected integer slot ids, got dtype {loc.dtype}")
    if rows + loc.size - 1 > _INT32_MAX:
        raise InvalidValueError(f"loc: {loc.size} entries past {rows} rows do not fit int32")
    if valid is None:
        valid = loc != PAD_SLOT
    else:
        valid = jnp.asarray(valid)
        if valid.dtype != jnp.bool_ or valid.shape != loc.shape:
            raise InvalidValueError(
                f"valid: expected a bool mask of loc's shape {loc.shape}, got "
                f"{valid.dtype} {valid.shape}"
            )
    if fits is not None:
        valid = valid & jnp.asarray(fits)
    if loc.dtype != jnp.int32:
        if loc.dtype.itemsize >= 4:  # 32-bit unsigned or 64-bit: only [-rows, rows) as is
            lo = -rows if jnp.issubdtype(loc.dtype, jnp.signedinteger) else 0
            valid = valid & (loc >= lo) & (loc < rows)
        loc = jnp.where(valid, loc, 0).astype(jnp.int32)  # every kept value fits int32
    past = jnp.arange(loc.size, dtype=jnp.int32).reshape(loc.shape) + jnp.int32(rows)
    return jnp.where(valid, loc, past)


def _set_rows(buf: jax.Array, index: Any, rows: Any) -> jax.Array:
    """``buf.at[index].set(rows)`` of scatter_rows indices (dropped past the end)."""
    return buf.at[index].set(rows, mode="drop", unique_indices=True)


def _write_kv(buffers: KVBuffers, layer_id: Any, loc: Any, k: Any, v: Any) -> KVBuffers:
    loc = scatter_rows(loc, buffers.k.shape[1])
    return KVBuffers(
        _set_rows(buffers.k, (layer_id, loc), k.astype(buffers.k.dtype)),
        _set_rows(buffers.v, (layer_id, loc), v.astype(buffers.v.dtype)),
    )


def _write_kv_all(buffers: KVBuffers, loc: Any, k: Any, v: Any) -> KVBuffers:
    loc = scatter_rows(loc, buffers.k.shape[1])
    return KVBuffers(
        _set_rows(buffers.k, (slice(None), loc), k.astype(buffers.k.dtype)),
        _set_rows(buffers.v, (slice(None), loc), v.astype(buffers.v.dtype)),
    )


def _read_kv(buffers: KVBuffers, layer_id: Any, loc: Any) -> tuple[jax.Array, jax.Array]:
    return buffers.k[layer_id, loc], buffers.v[layer_id, loc]


def _read_kv_all(buffers: KVBuffers, loc: Any) -> tuple[jax.Array, jax.Array]:
    return buffers.k[:, loc], buffers.v[:, loc]


def _copy_kv(buffers: KVBuffers, src_loc: Any, dst_loc: Any) -> KVBuffers:
    dst = (slice(None), scatter_rows(dst_loc, buffers.k.shape[1]))
    return KVBuffers(
        _set_rows(buffers.k, dst, buffers.k[:, src_loc]),
        _set_rows(buffers.v, dst, buffers.v[:, src_loc]),
    )


def _layer(buffers: KVBuffers, layer_id: Any) -> tuple[jax.Array, jax.Array]:
    return buffers.k[layer_id], buffers.v[layer_id]


write_kv = jax.jit(_write_kv, donate_argnames=("buffers",))
write_kv.__doc__ = """Write one layer's K/V rows: ``buffers.k[layer_id, loc] = k`` (and V).

Args: ``buffers`` (:class:`KVBuffers`, **donated**: deleted by the call, use the result);
``layer_id`` int32 scalar (traced: one compilation serves every layer); ``loc`` int32
``[n]`` slots, distinct except for padding entries 0; ``k`` ``[n, Hk, Dk]``, ``v``
``[n, Hv, Dv]`` (cast to the buffer dtype). Returns the updated :class:`KVBuffers`, same
shapes, dtypes and shardings. Padding entries (slot 0) write nothing (row 0 stays zeros,
see :func:`scatter_rows`). Not checked: out-of-range ``loc`` is dropped by the scatter, a
negative one wraps (so pad with 0). Pass ``loc`` as int32: with ``jax_enable_x64`` off, JAX
narrows a 64-bit numpy ``loc`` to its low 32 bits as the call starts, so a slot past int32
lands on another row (the pools' methods check slots on the host first).
"""

write_kv_all = jax.jit(_write_kv_all, donate_argnames=("buffers",))
write_kv_all.__doc__ = """Write every layer's K/V rows in one call: ``buffers.k[:, loc] = k``.

Args: ``buffers`` (**donated**); ``loc`` int32 ``[n]``, distinct except for padding entries
0 (a 64-bit numpy ``loc`` is narrowed at the call with x64 off, as in :func:`write_kv`);
``k`` ``[L, n, Hk, Dk]``, ``v`` ``[L, n, Hv, Dv]``. Returns the updated
:class:`KVBuffers`. One call for all layers pays the dispatch cost once (about 40 us a call
on an H200), not once per layer.
"""

read_kv = jax.jit(_read_kv)
read_kv.__doc__ = """Gather one layer's K/V rows: ``(buffers.k[layer_id, loc], buffers.v[...])``.

Args: ``buffers`` (not donated); ``layer_id`` int32 scalar; ``loc`` int32 ``[n]``.
Returns ``k`` ``[n, Hk, Dk]`` and ``v`` ``[n, Hv, Dv]``, fresh arrays in the pool dtype.
Not checked (traced values cannot be): as in every JAX gather, a ``loc`` or ``layer_id``
past the end is clamped to the last row or layer and a negative one wraps, so it reads
another slot's K/V. :meth:`KVPool.get_kv` checks both before reading.
"""

read_kv_all = jax.jit(_read_kv_all)
read_kv_all.__doc__ = """Gather every layer's rows at ``loc``.

Args: ``buffers`` (not donated); ``loc`` int32 ``[n]``. Returns ``k`` ``[L, n, Hk, Dk]``
and ``v`` ``[L, n, Hv, Dv]``. Not checked: out-of-range ``loc`` is clamped or wrapped, as
in :func:`read_kv` (:meth:`KVPool.get_kv_all` checks it).
"""

copy_kv = jax.jit(_copy_kv, donate_argnames=("buffers",))
copy_kv.__doc__ = """Copy rows ``src_loc`` to ``dst_loc`` in every layer (defragmentation, forking).

Args: ``buffers`` (**donated**); ``src_loc``, ``dst_loc`` int32 ``[n]``, same length, the
non-padding ``dst_loc`` distinct. Every source row is read before any row is written.
Returns the updated :class:`KVBuffers`.
"""


# The pools' methods pad the caller's K/V (or states) to the bucket size before an update,
# and trim a gather's rows back to n after a read, each for every array of the call in one
# small jitted call (the update or gather itself compiles once per bucket; these once per
# distinct n). Eager slicing of the two arrays took 0.09 ms of host time on the development
# machine and 0.8 ms on an H200's host, against 6 us for the jitted trim (bench/RESULTS.md).


@functools.partial(jax.jit, static_argnames=("m", "axis"))
def _pad_rows(xs: tuple[jax.Array, ...], m: int, axis: int) -> tuple[jax.Array, ...]:
    """Each of *xs* with zero rows appended along *axis* up to length *m* (static). Not
    donated."""
    out = []
    for x in xs:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, m - x.shape[axis])
        out.append(jnp.pad(x, widths))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("n", "axis"))
def _trim_rows(xs: tuple[jax.Array, ...], n: int, axis: int) -> tuple[jax.Array, ...]:
    """Each of *xs* cut to its first *n* (static) rows along *axis*. Not donated."""
    return tuple(jax.lax.slice_in_dim(x, 0, n, axis=axis) for x in xs)


# ---------------------------------------------------------------------------------------
# Validation helpers (host side, before anything is written).
# ---------------------------------------------------------------------------------------


class _SlotOwner:
    """Base of the pools, which own slots and device buffers that caches and callers point
    into: neither a second ``__init__`` nor a copy may give them a second owner (the
    compiled allocators and caches refuse the same way)."""

    __slots__ = ()

    def _refuse_second_init(self) -> None:
        """Called first by __init__ (through :func:`_init_once`): run again on a live pool,
        or from inside its own first run (an argument's ``__index__`` is Python code), it
        would replace the buffers and free lists under their users."""
        if getattr(self, "_initialized", False) or getattr(self, "_initializing", False):
            raise AlreadyInitializedError(
                f"{type(self).__name__} is already initialized; create a new one"
            )

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _reduce_owner(self, _SlotOwner)

    def __reduce__(self) -> Any:
        _cannot_pickle(self)


_Init = TypeVar("_Init", bound=Any)


def _init_once(init: _Init) -> _Init:
    """A pool's ``__init__``, run at most once to completion on an object: refused
    (``AlreadyInitializedError``) on a live pool and while it is running (re-entered from
    an argument's ``__index__``); one that raised may be run again."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        self._refuse_second_init()
        self._initializing = True
        try:
            init(self, *args, **kwargs)
        finally:
            self._initializing = False
        self._initialized = True

    return cast(_Init, wrapper)


def _live_buffers(pool: Any) -> Any:
    """*pool*'s buffers, or ``BuffersDeletedError`` when one of them is deleted (donated
    outside the pool and never handed back, or an update interrupted between its dispatch
    and its return), which JAX would report as a bare ``RuntimeError`` inside the call."""
    buffers = pool._buffers
    if any(b.is_deleted() for b in buffers):
        raise BuffersDeletedError(
            f"{type(pool).__name__}'s buffers are deleted: a step donated pool.buffers and "
            "its result was not handed back (pool.buffers = new), or an update was "
            "interrupted after donating them (its result is lost: make a new pool)"
        )
    return buffers


def _int_arg(name: str, value: Any, wrong_type: type[Exception] = InvalidValueError) -> int:
    """*value* as an int (``operator.index``: not a float, not a bool), else *wrong_type*
    naming *name*: a constructor's size or count raises ``InvalidValueError``, a call's
    argument a plain ``TypeError`` (see :mod:`pymllm.mem_cache.errors`)."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise wrong_type(f"{name} must be an int, got {value!r}") from None


def _positive(
    name: str, value: Any, minimum: int = 1, wrong_type: type[Exception] = InvalidValueError
) -> int:
    value = _int_arg(name, value, wrong_type)
    if value < minimum:
        raise InvalidValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _not_traced(name: str, x: Any) -> None:
    """``InvalidValueError`` for a tracer: the pools hold concrete buffers and run outside
    ``jax.jit``/``vmap``/...; a traced step calls :func:`write_kv` and the other module-level
    functions on ``pool.buffers`` and hands the result back with ``pool.buffers = ...``."""
    if isinstance(x, jax.core.Tracer):
        raise InvalidValueError(
            f"{name} is a tracer: call the pool outside jax.jit/vmap (inside a traced step, "
            "use write_kv/read_kv/... on pool.buffers)"
        )


def _refuse_deleted(name: str, x: Any) -> None:
    """``InvalidValueError`` for a deleted ``jax.Array`` (an update donated it), which
    numpy's and JAX's conversions refuse with a bare ``RuntimeError``."""
    if not isinstance(x, jax.core.Tracer):
        _refuse_deleted_array(name, x)


def _index_part(part: Any) -> Any:
    """One part of ``ReqToTokenPool.write``'s index, read once: an int, a slice of ints
    (each bound's ``__index__`` called once), ``None``/``...`` as they are, anything else
    as our own integer array (``InvalidValueError`` for a bool, a bool array or a bool in
    a list)."""
    if part is None or part is Ellipsis:
        return part
    if isinstance(part, slice):
        try:
            bounds = (part.start, part.stop, part.step)
            return slice(*(None if b is None else operator.index(b) for b in bounds))
        except TypeError as exc:
            raise InvalidValueError(f"index: bad slice {part!r:.60} ({exc})") from None
    if isinstance(part, (bool, np.bool_)):
        raise InvalidValueError(f"index: expected integer rows or columns, got a bool {part!r}")
    if isinstance(part, (int, np.integer)):
        return operator.index(part)
    items = _refuse_bool_slots("index", part)
    try:
        arr = np.array(items)
    except (ValueError, TypeError) as exc:
        raise InvalidValueError(f"index: cannot read {part!r:.60} ({exc})") from None
    if arr.dtype == np.bool_:
        raise InvalidValueError(
            f"index: expected integer rows or columns, got a bool mask {part!r:.60}"
        )
    if arr.ndim == 0 and arr.dtype == object:  # one object: an int-like (its __index__)
        try:
            return operator.index(part)
        except TypeError as exc:
            raise InvalidValueError(f"index: cannot read {part!r:.60} ({exc})") from None
    if arr.size == 0 and arr.dtype.kind not in "iu" and not isinstance(items, np.ndarray):
        return arr.astype(np.intp)  # [] or (): no rows or columns, as numpy reads them
    return arr


def _slots(name: str, loc: Any, rows: int) -> np.ndarray:
    """*loc* as a 1-D host int32 array of slots in ``[0, rows)``; a jax array syncs here."""
    _not_traced(name, loc)
    arr = _integer_slots(name, loc)  # a bool or a deleted array refused, big ints exact
    if arr.ndim != 1:
        raise InvalidValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    _check_ints(name, arr, 0, rows)
    return arr.astype(np.int32, copy=False)


def _check_distinct(name: str, loc: np.ndarray) -> None:
    """``InvalidValueError`` when a slot other than the padding slot 0 appears twice in
    *loc* (checked slots, 1-D ``np.int32``): the scatters promise XLA distinct indices
    (``unique_indices=True``), and which of two values lands is undefined (on GPU it can
    differ from run to run). Increasing slots (the allocator's order) cost one O(n) pass;
    others a sort. Measured on CPU, slots in random order: 6 us at 16 slots, 24 us at 4,096,
    0.4 ms at 65,536, against 0.4-0.5 ms, 9-24 ms and 150-770 ms for the ``set_kv_buffer``
    call itself (131,072 slots, 4 layers, 8x128 f32; jax or numpy K/V)."""
    if len(loc) < 2 or bool((loc[1:] > loc[:-1]).all()):
        return
    s = np.sort(loc)
    dup = s[1:][(s[1:] == s[:-1]) & (s[1:] != PAD_SLOT)]
    if dup.size:
        raise InvalidValueError(
            f"{name}: slot {dup[0]} appears more than once (only the padding slot 0 may repeat)"
        )


def _check_array(name: str, x: Any, shape: tuple[int, ...], dtype: Any) -> None:
    _not_traced(name, x)
    if not isinstance(x, (np.ndarray, jax.Array)):  # not just a shape and a dtype
        raise InvalidValueError(f"{name} must be an array, got {type(x).__name__}")
    _refuse_deleted(name, x)
    if tuple(x.shape) != shape:
        raise InvalidValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if jnp.dtype(x.dtype) != jnp.dtype(dtype):
        raise InvalidValueError(f"{name} must have dtype {jnp.dtype(dtype)}, got {x.dtype}")


def _dtype(name: str, dtype: Any) -> np.dtype:
    """*dtype* as a numeric dtype that JAX stores as such, else ``InvalidValueError``.

    A 64-bit dtype with ``jax_enable_x64`` off is refused, not narrowed: JAX would create
    32-bit buffers (with only a warning), and the pool would then describe, size and check
    against a dtype it does not hold."""
    try:
        d = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name}: {dtype!r:.60} is not a dtype") from None
    if not jnp.issubdtype(d, jnp.number):
        raise InvalidValueError(f"{name} must be a numeric dtype, got {d}")
    stored = jax.dtypes.canonicalize_dtype(d)
    if stored != d:
        raise InvalidValueError(
            f"{name}: {d} needs jax_enable_x64 (JAX would store {stored}); pass {stored}, "
            "or enable x64 before creating the pool"
        )
    return d


def _check_buffer(name: str, x: Any, shape: tuple[int, ...], dtype: Any, sharding: Any) -> None:
    """A buffer handed back to a pool: a live ``jax.Array`` of the pool's shape, dtype and
    sharding (equivalent: same devices and layout of shards, so the next donated update
    uses it in place, never reshards it by a whole-cache copy or fails in ``jit``)."""
    if not isinstance(x, jax.Array):
        raise InvalidValueError(f"{name} must be a jax.Array, got {type(x).__name__}")
    _check_array(name, x, shape, dtype)
    have = x.sharding
    if have != sharding and not have.is_equivalent_to(sharding, len(shape)):
        raise InvalidValueError(
            f"{name} has sharding {x.sharding}, the pool's is {sharding} (return the "
            "buffers from a step with the pool's shardings, e.g. out_shardings=pool.shardings)"
        )


def _placed(x: Any, sharding: Any) -> jax.Array:
    """*x* on *sharding*, strongly typed. A jitted call is keyed on its arguments' weak
    types (and committed-ness) besides their shapes and dtypes: a weakly typed
    ``jnp.full(shape, 2.0)`` compiled the update (and its padding) once more per bucket,
    so such an array is rebuilt strong over its own device buffers first (no copy, no
    compilation: ``astype`` would compile a conversion per shape). A ``jax.Array`` laid
    out on *sharding* is then used as it is (immutable; ``jax.device_put`` would build a
    new array, 20-60 us on CPU and on an H200's host): an uncommitted one (``jnp.ones``,
    a step over uncommitted parameters) compiles the update once more per bucket, the
    first time, rather than paying a conversion on every call (measured: 15-50 us a call
    with fresh arrays). Anything else goes through ``jax.device_put``."""
    if isinstance(x, jax.Array):
        if x.weak_type:
            shards = [s.data for s in x.addressable_shards]
            x = jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)
        if x.sharding == sharding:
            return x
    return jax.device_put(x, sharding)


def _pad_pair(a: Any, b: Any, m: int, axis: int, shardings: tuple[Any, Any]) -> tuple[Any, Any]:
    """*a* and *b* (a call's K and V, or conv and temporal states: the same length) with
    zero rows appended along *axis* up to length *m*, as arrays the caller cannot change
    afterwards. A ``jax.Array`` is first placed on its sharding of *shardings* (see
    ``_placed``: its padding then compiles as the update does); two of them short of *m*
    are padded in one jitted call."""
    if isinstance(a, jax.Array):
        a = _placed(a, shardings[0])
    if isinstance(b, jax.Array):
        b = _placed(b, shardings[1])
    if (
        isinstance(a, jax.Array)
        and isinstance(b, jax.Array)
        and a.shape[axis] != m
        and b.shape[axis] != m
    ):
        pa, pb = _pad_rows((a, b), m=m, axis=axis)
        return pa, pb
    return _pad_to(a, m, axis), _pad_to(b, m, axis)


def _pad_to(x: Any, m: int, axis: int) -> Any:
    """*x* with zero rows appended along *axis* up to length *m*, as an array the caller
    cannot change afterwards. A ``jax.Array`` is immutable: returned as is at length *m*,
    else padded on device (one small compilation per distinct input length). Anything else
    is host data the caller may overwrite once the call returns: always a new numpy array
    (padded on the host, no compilation; copied even at length *m*), because XLA:CPU maps
    aligned numpy memory as a device buffer instead of copying it, and
    ``device_put(may_alias=False)`` does not prevent that for numpy input (JAX 0.10)."""
    n = x.shape[axis]
    if isinstance(x, jax.Array):
        return x if n == m else _pad_rows((x,), m=m, axis=axis)[0]
    x = np.asarray(x)
    if n == m:
        return x.copy()
    shape = list(x.shape)
    shape[axis] = m
    out = np.zeros(shape, dtype=x.dtype)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, n)
    out[tuple(idx)] = x
    return out


def _layer_id(layer_id: Any, layer_num: int) -> np.int32:
    i = _int_arg("layer_id", layer_id, TypeError)
    if not 0 <= i < layer_num:
        raise InvalidValueError(f"layer_id: {i} is out of range [0, {layer_num})")
    return np.int32(i)


def _shape(name: str, dims: Any) -> tuple[int, ...]:
    """A state shape: a sequence of ints >= 1 (a float or a negative is refused, never
    truncated)."""
    try:
        items = list(dims)
    except TypeError:
        raise InvalidValueError(f"{name} must be a sequence of ints, got {dims!r}") from None
    return tuple(_positive(f"{name}[{i}]", d) for i, d in enumerate(items))


def _rows(size: Any, rows: int) -> int:
    """*rows*, the buffer rows a pool of *size* slots needs, unless they exceed
    ``_MAX_ROWS`` (``InvalidValueError``, raised before anything is allocated)."""
    if rows > _MAX_ROWS:
        raise InvalidValueError(
            f"size: {size} slots need {rows} buffer rows, more than 2**30 (slots are int32, "
            "and a write routes its padding past the last row)"
        )
    return rows


_Buffers = TypeVar("_Buffers", "KVBuffers", "MambaBuffers")


def _as_buffers(cls: type[_Buffers], new: Any) -> _Buffers:
    """*new* (a ``cls`` or any pair of arrays) as a ``cls``, else ``InvalidValueError``."""
    if isinstance(new, cls):
        return new
    try:
        return cls(*new)
    except TypeError:
        raise InvalidValueError(
            f"buffers must be a {cls.__name__} ({', '.join(cls._fields)}), got {new!r:.60}"
        ) from None


_T = TypeVar("_T", bound=tuple[Any, ...])


def _concrete(new: _T) -> _T:
    """*new*, the arrays an update or a read returned, unless the pool was called from a
    traced function (host arguments, no tracer among them): the call was then traced, not
    run, and its result is tracers. An update's the pool must not keep (every later call
    would fail); a read's would hold the pool's contents at trace time, baked into the
    compiled function as constants (every later call of it would return those, however
    the pool changed since). ``InvalidValueError`` then; nothing ran, so the pool still
    holds its buffers."""
    if isinstance(new[0], jax.core.Tracer):
        raise InvalidValueError(
            "the pool was called inside a traced function: call it outside jax.jit/vmap "
            "(inside a traced step, use write_kv/read_kv/... on pool.buffers)"
        )
    return new


def _dispatch(f: Callable[..., _T], *args: Any) -> _T:
    """A pool's jitted call: ``f(*args)`` with the pool's own transfers explicit
    (:func:`_explicitly`), its result checked to be concrete (:func:`_concrete`)."""
    return _concrete(_explicitly(f, *args))


def _device_buffers(x: jax.Array) -> set[tuple[int, int]]:
    """``(device id, address)`` of each device buffer behind *x*: two ``jax.Array`` objects
    can stand for one buffer (``jax.device_put`` of an array already placed so)."""
    return {(s.device.id, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards}


def _one_buffer(x: jax.Array, y: jax.Array) -> bool:
    """Whether *x* and *y* share device memory. JAX has no views, so arrays of different
    shapes never do: that case costs a shape comparison."""
    return x is y or (x.shape == y.shape and not _device_buffers(x).isdisjoint(_device_buffers(y)))


def _refuse_own_buffers(name: str, x: Any, buffers: tuple[jax.Array, ...]) -> None:
    """``InvalidValueError`` when the input *x* is one of the pool's own *buffers*: the
    update donates them, so it cannot also read them (XLA refuses the call)."""
    if isinstance(x, jax.Array) and any(_one_buffer(x, b) for b in buffers):
        raise InvalidValueError(
            f"{name} is one of the pool's own buffers, which the update donates (pass a copy)"
        )


_RENAMED_ERRORS = (InvalidFreeError, InvalidValueError, TypeError)


def _free_named(allocator: TokenToKVPoolAllocator, slots: Any) -> None:
    """``allocator.free(slots)``, its errors naming the argument as the pools call it."""
    try:
        allocator.free(slots)
    except _RENAMED_ERRORS as exc:
        if type(exc) not in _RENAMED_ERRORS:  # a subclass (another error): as it is
            raise
        msg = str(exc)
        raise type(exc)(
            "slots: " + (msg[len("indices: ") :] if msg.startswith("indices: ") else msg)
        ) from None


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
    """A zero buffer created on device with its final sharding (no host copy)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


# ---------------------------------------------------------------------------------------
# KVPool
# ---------------------------------------------------------------------------------------


class KVPool(_SlotOwner):
    """Per-layer K and V buffers on device, indexed by KV slot.

    ``k`` buffer: ``[layer_num, rows, k_head_num, k_head_dim]``, ``v`` buffer:
    ``[layer_num, rows, v_head_num, v_head_dim]`` (K and V dims independent: MHA, GQA, MQA,
    MLA-shaped), ``rows = size // page_size * page_size + page_size``; row(s) of page 0 are
    padding. With a :class:`jax.sharding.Mesh`, each buffer is sharded over its head axis
    along the mesh axis *head_axis* (tensor parallel) when the head count divides the axis
    size, else replicated; without one, it lives on *device* (default: the first device).
    *head_axis* without a mesh, or a mesh and a device together, is an ``InvalidValueError``
    (never silently ignored). *dtype* is any numeric dtype JAX stores as such: a 64-bit one
    needs ``jax_enable_x64`` and is refused without it (JAX would make 32-bit buffers), so
    :attr:`dtype` is always the dtype the buffers hold. The buffers have at most
    ``2**30`` rows (slots are int32, and a write routes its padding entries to rows past
    the last one, :func:`scatter_rows`): a larger *size* is an ``InvalidValueError``,
    raised before anything is allocated.

    The pool owns its buffers and donates them on every write; :attr:`buffers` is only
    valid until the pool's next update. A model step that takes :attr:`buffers`, donates
    them and returns new ones hands them back with ``pool.buffers = new``.

    Arguments (slots, K/V) are only lent for the call: the pool holds what they contained
    at call time and keeps no reference to the caller's memory, so the caller may overwrite
    or reuse its arrays as soon as a method returns. Host (numpy) inputs are copied once on
    the host (the copy that bucket padding makes anyway when the length is not a bucket
    size); ``jax.Array`` inputs, immutable, are not copied. Slot lists stay the caller's:
    the pool never takes ownership of a slot.

    On the CPU backend prefer ``dtype=jnp.float32``: XLA:CPU has no native bf16 scatter and
    converts the whole bf16 buffer to f32 and back around every write (O(cache) per call).
    GPUs scatter bf16 natively (see ``bench/RESULTS.md`` for H200 figures).
    """

    @_init_once
    def __init__(
        self,
        size: int,
        layer_num: int,
        k_head_num: int,
        k_head_dim: int,
        *,
        v_head_num: int | None = None,
        v_head_dim: int | None = None,
        dtype: Any = jnp.bfloat16,
        page_size: int = 1,
        mesh: Mesh | None = None,
        head_axis: str | None = None,
        device: jax.Device | None = None,
    ) -> None:
        if mesh is not None and not isinstance(mesh, Mesh):
            raise InvalidValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r:.60}")
        if mesh is None and head_axis is not None:
            raise InvalidValueError(f"head_axis {head_axis!r} given without a mesh")
        if mesh is not None and device is not None:
            raise InvalidValueError("device: pass a mesh or a device, not both")
        if device is not None and not isinstance(device, jax.Device):
            raise InvalidValueError(f"device must be a jax.Device, got {device!r:.60}")
        self.page_size = _positive("page_size", page_size)
        self.size = _positive("size", size, 0) // self.page_size * self.page_size
        self.layer_num = _positive("layer_num", layer_num)
        self.head_num = _positive("k_head_num", k_head_num)
        self.head_dim = _positive("k_head_dim", k_head_dim)
        self.v_head_num = _positive("v_head_num", k_head_num if v_head_num is None else v_head_num)
        self.v_head_dim = _positive("v_head_dim", k_head_dim if v_head_dim is None else v_head_dim)
        self.dtype = _dtype("dtype", dtype)
        self.rows = _rows(size, self.size + self.page_size)
        self.mesh = mesh

        rep: Sharding
        k_buf: Sharding
        v_buf: Sharding
        k_row: Sharding
        v_row: Sharding
        if mesh is None:
            rep = SingleDeviceSharding(device if device is not None else jax.devices()[0])
            k_buf = v_buf = k_row = v_row = rep
        else:
            if head_axis is None:
                if len(mesh.axis_names) != 1:
                    raise InvalidValueError(
                        f"mesh has axes {mesh.axis_names}: pass head_axis= to pick one"
                    )
                head_axis = mesh.axis_names[0]
            if head_axis not in mesh.axis_names:
                raise InvalidValueError(f"head_axis {head_axis!r} not in {mesh.axis_names}")
            tp = mesh.shape[head_axis]
            rep = NamedSharding(mesh, P())

            def spec(heads: int, lead: int) -> Sharding:
                if heads % tp:
                    return rep
                return NamedSharding(mesh, P(*([None] * lead), head_axis, None))

            k_buf, v_buf = spec(self.head_num, 2), spec(self.v_head_num, 2)
            k_row, v_row = spec(self.head_num, 1), spec(self.v_head_num, 1)
        self.head_axis = head_axis
        # the buffers' sharding tree: their NamedTuple holding a Sharding per buffer
        self.shardings = cast(Any, KVBuffers)(k_buf, v_buf)
        self._rep = rep
        self._row_shardings = (k_row, v_row)

        bs = self.shardings
        self._write = jax.jit(
            _write_kv,
            donate_argnums=0,
            in_shardings=(bs, rep, rep, k_row, v_row),
            out_shardings=bs,
        )
        self._write_all = jax.jit(
            _write_kv_all,
            donate_argnums=0,
            in_shardings=(bs, rep, k_buf, v_buf),
            out_shardings=bs,
        )
        self._read = jax.jit(_read_kv, in_shardings=(bs, rep, rep), out_shardings=(k_row, v_row))
        self._read_all = jax.jit(_read_kv_all, in_shardings=(bs, rep), out_shardings=(k_buf, v_buf))
        self._copy = jax.jit(
            _copy_kv, donate_argnums=0, in_shardings=(bs, rep, rep), out_shardings=bs
        )
        self._get_layer = jax.jit(_layer, in_shardings=(bs, rep))
        # Layer ids live on device once: a host scalar per call would be one more transfer.
        self._layer_ids = tuple(jax.device_put(np.int32(i), rep) for i in range(self.layer_num))

        self._buffers = KVBuffers(
            _zeros(self.k_shape, self.dtype, k_buf), _zeros(self.v_shape, self.dtype, v_buf)
        )

    # -- shapes and sizes ------------------------------------------------------------

    @property
    def k_shape(self) -> tuple[int, int, int, int]:
        return (self.layer_num, self.rows, self.head_num, self.head_dim)

    @property
    def v_shape(self) -> tuple[int, int, int, int]:
        return (self.layer_num, self.rows, self.v_head_num, self.v_head_dim)

    def _shard_bytes(self) -> list[tuple[int, int]]:
        """``(bytes of one shard, devices holding a shard)`` of the K and the V buffer."""
        out = []
        for shape, sharding in zip((self.k_shape, self.v_shape), self.shardings, strict=True):
            shard = int(np.prod(sharding.shard_shape(shape))) * self.dtype.itemsize
            out.append((shard, len(sharding.device_set)))
        return out

    def mem_bytes(self) -> int:
        """Bytes the K and V buffers hold on all devices together: what the pool allocates.

        A replicated buffer (heads that do not divide the mesh axis, or a mesh axis other
        than *head_axis*) counts once per device that holds a copy, so on a mesh this can
        exceed the logical size ``layer_num * rows * (Hk*Dk + Hv*Dv) * itemsize``; on one
        device it is that size. :meth:`mem_bytes_per_device` is what one device must fit."""
        return sum(shard * devices for shard, devices in self._shard_bytes())

    def mem_bytes_per_device(self) -> int:
        """Bytes of K and V on each device of the pool (every device holds one shard of
        each buffer, all of one size): what must fit in one device's memory."""
        return sum(shard for shard, _ in self._shard_bytes())

    @property
    def buffers(self) -> KVBuffers:
        """The current buffers; deleted by the pool's next update (donation)."""
        return self._buffers

    @buffers.setter
    def buffers(self, new: KVBuffers) -> None:
        """Hand the pool the buffers a donated step returned; the pool owns them from now on.

        ``InvalidValueError`` (the pool keeps its buffers) unless ``k`` and ``v`` are two
        live ``jax.Array`` over distinct device buffers, of the pool's shapes, dtype and
        shardings (:attr:`shardings`; on one device: that device). The checks read the
        arrays' metadata and device addresses only: the setter does not wait for the step
        that computes them."""
        new = _as_buffers(KVBuffers, new)
        _check_buffer("buffers.k", new.k, self.k_shape, self.dtype, self.shardings.k)
        _check_buffer("buffers.v", new.v, self.v_shape, self.dtype, self.shardings.v)
        if _one_buffer(new.k, new.v):
            raise InvalidValueError("buffers.k and buffers.v are the same array (device buffer)")
        self._buffers = new

    # -- stateful conveniences -------------------------------------------------------

    def _refuse_padding_page(self, name: str, loc: np.ndarray) -> None:
        """``InvalidValueError`` for a slot written in page 0 other than the padding slot 0
        itself (``1 .. page_size - 1``): those rows are padding too, never handed out, and
        stay zeros."""
        if self.page_size > 1 and len(loc):
            inside = loc[(loc > PAD_SLOT) & (loc < self.page_size)]
            if inside.size:
                raise InvalidValueError(
                    f"{name}: slot {inside[0]} is in the padding page 0 (slots 0..."
                    f"{self.page_size - 1}); pad with slot 0"
                )

    def _prep_rows(
        self, loc: Any, k: Any, v: Any, lead: tuple[int, ...], shardings: tuple[Any, Any]
    ) -> tuple[np.ndarray, Any, Any, int]:
        loc = _slots("loc", loc, self.rows)
        self._refuse_padding_page("loc", loc)
        _check_distinct("loc", loc)
        n = len(loc)
        axis = len(lead)
        _check_array("k", k, (*lead, n, self.head_num, self.head_dim), self.dtype)
        _check_array("v", v, (*lead, n, self.v_head_num, self.v_head_dim), self.dtype)
        m = bucket_size(n)
        return (_pad(loc, m), *_pad_pair(k, v, m, axis, shardings), n)

    def set_kv_buffer(self, layer_id: int, loc: Any, k: Any, v: Any) -> None:
        """Write ``k`` ``[n, Hk, Dk]`` and ``v`` ``[n, Hv, Dv]`` at slots ``loc`` ``[n]`` of
        one layer. Everything is checked first (layer range, slot range, distinct slots
        except the padding slot 0, no other slot of the padding page 0, shapes, dtype); an
        error writes nothing. Slots stay owned
        by whoever owned them; the pool holds the K/V passed at call time, and the caller
        may reuse ``loc``, ``k`` and ``v`` as soon as this returns."""
        layer = self._layer_ids[_layer_id(layer_id, self.layer_num)]
        loc, k, v, n = self._prep_rows(loc, k, v, (), self._row_shardings)
        if n == 0:
            _live_buffers(self)  # lost buffers are reported by any call, an empty one too
            return
        k = _placed(k, self._row_shardings[0])
        v = _placed(v, self._row_shardings[1])
        self._buffers = _dispatch(self._write, _live_buffers(self), layer, loc, k, v)

    def set_kv_all(self, loc: Any, k: Any, v: Any) -> None:
        """Write every layer at once: ``k`` ``[L, n, Hk, Dk]``, ``v`` ``[L, n, Hv, Dv]``.

        Checks and ownership as :meth:`set_kv_buffer`."""
        loc, k, v, n = self._prep_rows(
            loc, k, v, (self.layer_num,), (self.shardings.k, self.shardings.v)
        )
        if n == 0:
            _live_buffers(self)
            return
        k = _placed(k, self.shardings.k)
        v = _placed(v, self.shardings.v)
        buffers = _live_buffers(self)
        _refuse_own_buffers("k", k, buffers)
        _refuse_own_buffers("v", v, buffers)
        self._buffers = _dispatch(self._write_all, buffers, loc, k, v)

    def get_kv(self, layer_id: int, loc: Any) -> tuple[jax.Array, jax.Array]:
        """``(k [n, Hk, Dk], v [n, Hv, Dv])`` at slots ``loc`` of one layer (fresh arrays).

        The gather runs at the bucket size; trimming to ``n`` is one small jitted call,
        compiled once per distinct ``n``. Inside a jitted step call :func:`read_kv` with
        padded slots instead. The rows are those of ``loc`` at call time (the caller may
        reuse ``loc`` at once); the arrays returned are the caller's, independent of later
        writes.
        """
        layer = self._layer_ids[_layer_id(layer_id, self.layer_num)]
        loc = _slots("loc", loc, self.rows)
        n = len(loc)
        k, v = _dispatch(self._read, _live_buffers(self), layer, _pad(loc))
        return (k, v) if n == k.shape[0] else _trim_rows((k, v), n=n, axis=0)

    def get_kv_all(self, loc: Any) -> tuple[jax.Array, jax.Array]:
        """``(k [L, n, Hk, Dk], v [L, n, Hv, Dv])`` at slots ``loc`` of every layer (as
        :meth:`get_kv`)."""
        loc = _slots("loc", loc, self.rows)
        n = len(loc)
        k, v = _dispatch(self._read_all, _live_buffers(self), _pad(loc))
        return (k, v) if n == k.shape[1] else _trim_rows((k, v), n=n, axis=1)

    def get_kv_buffer(self, layer_id: int) -> tuple[jax.Array, jax.Array]:
        """A copy of one layer's whole K and V buffers, ``[rows, H, D]`` each."""
        layer = self._layer_ids[_layer_id(layer_id, self.layer_num)]
        return _concrete(self._get_layer(_live_buffers(self), layer))

    def get_key_buffer(self, layer_id: int) -> jax.Array:
        return self.get_kv_buffer(layer_id)[0]

    def get_value_buffer(self, layer_id: int) -> jax.Array:
        return self.get_kv_buffer(layer_id)[1]

    def copy(self, src_loc: Any, dst_loc: Any) -> None:
        """Copy the K/V rows at ``src_loc`` to ``dst_loc`` in every layer (jitted, donated).

        Both 1-D, same length, in range, ``dst_loc`` distinct except the padding slot 0 and
        outside the rest of the padding page 0 (``src_loc`` may repeat: one row forked into
        several); an error copies nothing. No slot changes owner: ``dst_loc`` should be the
        caller's (its rows are overwritten), ``src_loc`` may be anyone's, the tree's too
        (forking a cached prefix: lock its node so that no evict frees the rows before the
        copy is dispatched). The caller may reuse both arrays as soon as this returns.
        """
        src = _slots("src_loc", src_loc, self.rows)
        dst = _slots("dst_loc", dst_loc, self.rows)
        if len(src) != len(dst):
            raise InvalidValueError(
                f"src_loc/dst_loc: lengths differ, src_loc has {len(src)} slots, dst_loc {len(dst)}"
            )
        self._refuse_padding_page("dst_loc", dst)
        _check_distinct("dst_loc", dst)
        if len(src) == 0:
            _live_buffers(self)
            return
        m = bucket_size(len(src))
        self._buffers = _dispatch(self._copy, _live_buffers(self), _pad(src, m), _pad(dst, m))

    def __repr__(self) -> str:
        if not getattr(self, "_initialized", False):  # __new__, or an __init__ that raised
            return "KVPool(uninitialized)"
        return (
            f"KVPool(size={self.size}, layers={self.layer_num}, k={self.head_num}x"
            f"{self.head_dim}, v={self.v_head_num}x{self.v_head_dim}, {self.dtype}, "
            f"page_size={self.page_size}, {self.mem_bytes() / 2**30:.2f} GiB)"
        )


# ---------------------------------------------------------------------------------------
# ReqToTokenPool
# ---------------------------------------------------------------------------------------


class ReqToTokenPool(_SlotOwner):
    """Host table ``req_to_token[slot, pos]`` (``np.int32``): the KV slot of each token of
    each running request.

    Request slots are ``1..max_reqs``; row 0 stays all zeros (it points every position at the
    KV padding slot) and pads a batch in :meth:`to_device`. ``alloc(n)`` hands out request
    slots the caller owns until ``free``; the table rows are not cleared on either.
    """

    @_init_once
    def __init__(self, max_reqs: int, max_context_len: int) -> None:
        self.size = _positive("max_reqs", max_reqs)
        self.max_context_len = _positive("max_context_len", max_context_len)
        self.req_to_token = np.zeros((self.size + 1, self.max_context_len), dtype=np.int32)
        self._slots = TokenToKVPoolAllocator(self.size, need_sort=False)

    def available_size(self) -> int:
        return self._slots.available_size()

    def alloc(self, n: int = 1) -> np.ndarray | None:
        """*n* request slots (``np.int32``, caller-owned) or ``None`` (nothing changes)."""
        return self._slots.alloc(n)

    def free(self, slots: Any) -> None:
        """Give request slot(s) back; ``InvalidFreeError`` (nothing freed) if not owned."""
        _free_named(self._slots, slots)

    def write(self, index: Any, values: Any) -> None:
        """``req_to_token[index] = values`` (numpy indexing, e.g. ``(slot, slice(a, b))``).

        ``InvalidValueError`` (nothing written) when the rows are not request slots
        ``1..max_reqs`` (row 0 is the padding row every batch is padded with; a negative
        row would index from the end), when a column is a bool or a bool mask (numpy would
        read ``True`` as a new axis, the whole row), when the values are not integer KV
        slots in ``[0, 2**31)`` (never wrapped into another slot), or when they do not fit
        the index.
        """
        row = index[0] if isinstance(index, tuple) and index else index
        _not_traced("index", row)
        _not_traced("values", values)
        for part in index if isinstance(index, tuple) else (index,):  # the columns too
            _refuse_deleted("index", part)
        # Each part read once, into ints, slices of ints and our own arrays: the checks
        # and the write see the same index (numpy would read a sequence again, call a
        # column's __index__ after the checks, and that code could change a row array).
        # A bool anywhere in the rows or columns is refused: a scalar, a bool array, one
        # in a list.
        parts = tuple(
            _index_part(part) for part in (index if isinstance(index, tuple) else (index,))
        )
        row = parts[0] if parts else index
        _refuse_deleted("values", values)
        try:
            rows = np.arange(self.size + 1)[row] if isinstance(row, slice) else np.asarray(row)
        except (ValueError, TypeError) as exc:  # a zero slice step, a bad slice bound
            raise InvalidValueError(f"index: bad request rows {row!r:.60} ({exc})") from exc
        if rows.dtype.kind not in "iu":  # even when empty: numpy would take a bool mask
            raise InvalidValueError(f"index: expected request slot rows, got {row!r:.60}")
        _check_ints("index", rows, 1, self.size + 1)  # request slots; row 0 pads batches
        vals = _integer_slots("values", values)  # our own copy, bools refused
        _check_ints("values", vals, 0, 1 << 31)  # KV slots, never wrapped into int32
        try:
            self.req_to_token[parts if isinstance(index, tuple) else row] = vals
        except (IndexError, ValueError, TypeError, OverflowError) as exc:
            raise InvalidValueError(
                f"index/values: cannot write {values!r:.60} at {index!r:.60} of a "
                f"{self.req_to_token.shape} table ({exc})"
            ) from exc

    def clear(self) -> None:
        """Every request slot free and the table zeroed."""
        self._slots.clear()
        self.req_to_token[:] = 0

    def to_device(self, slots: Any, max_len: int | None = None, sharding: Any = None) -> jax.Array:
        """Rows *slots* as one device array in one host-to-device transfer.

        Shape ``[bucket_size(len(slots)), cols]``: padding rows are row 0 (zeros); ``cols`` is
        ``min(bucket_size(max_len), max_context_len)`` or the full width without *max_len*
        (``TypeError`` unless *max_len* is an int, ``InvalidValueError`` below 1). The rows
        are gathered into a new host array first: the device array holds the table as it
        was at call time, and later :meth:`write` calls do not reach it. The caller owns the result.
        ``InvalidValueError`` when *sharding* is not a sharding or device the rows can take.
        """
        rows = _pad(_slots("slots", slots, self.size + 1))
        cols = (
            self.max_context_len
            if max_len is None
            else min(bucket_size(_positive("max_len", max_len, 1, TypeError)), self.max_context_len)
        )
        host = self.req_to_token[rows, :cols]
        try:
            out = jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
        except (ValueError, TypeError) as exc:  # not a sharding, or one the rows cannot take
            raise InvalidValueError(
                f"sharding: cannot place the rows on {sharding!r:.80} ({exc})"
            ) from exc
        return _concrete((out,))[0]


# ---------------------------------------------------------------------------------------
# MambaPool
# ---------------------------------------------------------------------------------------


class MambaBuffers(NamedTuple):
    """Recurrent states: ``conv`` ``[L, R, *conv_shape]``, ``temporal``
    ``[L, R, *temporal_shape]``; ``R = size + 1``, row 0 padding."""

    conv: jax.Array
    temporal: jax.Array


def _copy_states(buffers: MambaBuffers, src: Any, dst: Any) -> MambaBuffers:
    at = (slice(None), scatter_rows(dst, buffers.conv.shape[1]))
    return MambaBuffers(*(_set_rows(b, at, b[:, src]) for b in buffers))


def _reset_states(buffers: MambaBuffers, slots: Any) -> MambaBuffers:
    at = (slice(None), scatter_rows(slots, buffers.conv.shape[1]))
    return MambaBuffers(*(_set_rows(b, at, jnp.zeros((), b.dtype)) for b in buffers))


def _read_states(buffers: MambaBuffers, slots: Any) -> MambaBuffers:
    return MambaBuffers(*(b[:, slots] for b in buffers))


def _write_states(buffers: MambaBuffers, slots: Any, conv: Any, temporal: Any) -> MambaBuffers:
    at = (slice(None), scatter_rows(slots, buffers.conv.shape[1]))
    return MambaBuffers(
        _set_rows(buffers.conv, at, conv.astype(buffers.conv.dtype)),
        _set_rows(buffers.temporal, at, temporal.astype(buffers.temporal.dtype)),
    )


copy_states = jax.jit(_copy_states, donate_argnames=("buffers",))
copy_states.__doc__ = """Copy state rows ``src`` to ``dst`` in every layer of both buffers.

Args: ``buffers`` (:class:`MambaBuffers`, **donated**); ``src``, ``dst`` int32 ``[n]``
(non-padding ``dst`` distinct). Returns the updated :class:`MambaBuffers`.
"""

reset_states = jax.jit(_reset_states, donate_argnames=("buffers",))
reset_states.__doc__ = """Zero the state rows ``slots`` (int32 ``[n]``, non-padding entries
distinct) in every layer.

Args: ``buffers`` (**donated**). Returns the updated :class:`MambaBuffers`.
"""


class MambaPool(_SlotOwner):
    """State pool of Mamba/GDN layers: one conv state and one recurrent ("temporal") state
    per layer and slot, on device.

    Slots ``1..size`` serve both running requests and the radix cache's tracked states;
    ``alloc(n)`` returns ``np.int32`` slots the caller owns (their contents are whatever was
    left there: call :meth:`reset_states` or :meth:`copy_states` before reading), or
    ``None``. ``free(slots)`` returns them (``InvalidFreeError``, nothing freed, on a bad
    free). Updates donate the buffers, as in :class:`KVPool`, and arguments are only lent
    for the call as there: the pool holds the states and slots passed at call time (host
    arrays copied, ``jax.Array`` used as is), and the caller may reuse its arrays as soon as
    a method returns. Slots written (``dst``, ``slots``) must be distinct except the
    padding slot 0; every error is raised before anything changes. *conv_dtype* and
    *temporal_dtype* are checked as :class:`KVPool`'s *dtype* (64-bit only with x64 on).
    *size* is at most ``2**30 - 1`` (``size + 1`` rows, as :class:`KVPool`'s limit).
    """

    @_init_once
    def __init__(
        self,
        size: int,
        layer_num: int,
        conv_state_shape: tuple[int, ...],
        temporal_state_shape: tuple[int, ...],
        *,
        conv_dtype: Any = jnp.bfloat16,
        temporal_dtype: Any = jnp.float32,
        device: jax.Device | None = None,
    ) -> None:
        self.size = _positive("size", size)
        self.layer_num = _positive("layer_num", layer_num)
        self.conv_state_shape = _shape("conv_state_shape", conv_state_shape)
        self.temporal_state_shape = _shape("temporal_state_shape", temporal_state_shape)
        self.conv_dtype = _dtype("conv_dtype", conv_dtype)
        self.temporal_dtype = _dtype("temporal_dtype", temporal_dtype)
        if device is not None and not isinstance(device, jax.Device):
            raise InvalidValueError(f"device must be a jax.Device, got {device!r:.60}")
        self.rows = _rows(size, self.size + 1)
        sh = SingleDeviceSharding(device if device is not None else jax.devices()[0])
        self._sharding = sh
        shardings = cast(Any, MambaBuffers)(sh, sh)  # a Sharding per buffer
        self._allocator = TokenToKVPoolAllocator(self.size, need_sort=False)
        self._copy = jax.jit(
            _copy_states,
            donate_argnums=0,
            in_shardings=(shardings, sh, sh),
            out_shardings=shardings,
        )
        self._reset = jax.jit(
            _reset_states, donate_argnums=0, in_shardings=(shardings, sh), out_shardings=shardings
        )
        self._write = jax.jit(
            _write_states,
            donate_argnums=0,
            in_shardings=(shardings, sh, sh, sh),
            out_shardings=shardings,
        )
        self._read = jax.jit(_read_states, in_shardings=(shardings, sh))
        self._buffers = MambaBuffers(
            _zeros((self.layer_num, self.rows, *self.conv_state_shape), self.conv_dtype, sh),
            _zeros(
                (self.layer_num, self.rows, *self.temporal_state_shape), self.temporal_dtype, sh
            ),
        )

    @property
    def buffers(self) -> MambaBuffers:
        """The current buffers; deleted by the pool's next update (donation)."""
        return self._buffers

    @buffers.setter
    def buffers(self, new: MambaBuffers) -> None:
        """Hand the pool the buffers a donated step returned; the pool owns them from now on.

        ``InvalidValueError`` (the pool keeps its buffers) unless ``conv`` and ``temporal``
        are two live ``jax.Array`` over distinct device buffers, of the pool's shapes and
        dtypes on its device. The checks read the arrays' metadata and device addresses
        only: the setter does not wait for the step that computes them."""
        new = _as_buffers(MambaBuffers, new)
        _check_buffer(
            "buffers.conv", new.conv, self._buffers.conv.shape, self.conv_dtype, self._sharding
        )
        _check_buffer(
            "buffers.temporal",
            new.temporal,
            self._buffers.temporal.shape,
            self.temporal_dtype,
            self._sharding,
        )
        if _one_buffer(new.conv, new.temporal):
            raise InvalidValueError(
                "buffers.conv and buffers.temporal are the same array (device buffer)"
            )
        self._buffers = new

    def mem_bytes(self) -> int:
        """Bytes of the conv and temporal buffers (all on the pool's one device)."""
        return sum(b.size * b.dtype.itemsize for b in self._buffers)

    def available_size(self) -> int:
        return self._allocator.available_size()

    @property
    def slot_allocator(self) -> TokenToKVPoolAllocator:
        """The allocator behind :meth:`alloc` and :meth:`free`. A ``MambaRadixCache`` over
        this pool books the states it holds through it, as the cache's: :meth:`free` of
        such a state raises ``InvalidFreeError`` and :meth:`clear` ``AllocatorStateError``
        until the cache evicts it, and an insert refuses a state that is free or already
        the cache's (``InvalidValueError``). The cache frees its states straight into it."""
        return self._allocator

    def alloc(self, n: int = 1) -> np.ndarray | None:
        """*n* state slots (``np.int32``, caller-owned) or ``None`` (nothing changes)."""
        return self._allocator.alloc(n)

    def free(self, slots: Any) -> None:
        """Give state slots back (numpy, list, int or jax array); contents untouched.
        ``InvalidFreeError`` (nothing freed) for a slot that is not allocated, or that a
        ``MambaRadixCache`` holds (it frees its states itself, see :attr:`slot_allocator`)."""
        _free_named(self._allocator, slots)

    def clear(self) -> None:
        """Every slot free (device contents untouched). ``AllocatorStateError`` (nothing
        changed) while a ``MambaRadixCache`` holds states: reset or drop it first."""
        self._allocator.clear()

    def copy_states(self, src: Any, dst: Any) -> None:
        """Copy states ``src`` -> ``dst`` (same length, ``dst`` distinct; the caller owns
        ``dst``)."""
        s = _slots("src", src, self.rows)
        d = _slots("dst", dst, self.rows)
        if len(s) != len(d):
            raise InvalidValueError(
                f"src/dst: lengths differ, src has {len(s)} slots, dst {len(d)}"
            )
        _check_distinct("dst", d)
        buffers = _live_buffers(self)  # lost buffers are reported by an empty call too
        if len(s):
            m = bucket_size(len(s))
            self._buffers = _dispatch(self._copy, buffers, _pad(s, m), _pad(d, m))

    def reset_states(self, slots: Any) -> None:
        """Zero the states of *slots* (distinct) in every layer."""
        s = _slots("slots", slots, self.rows)
        _check_distinct("slots", s)
        buffers = _live_buffers(self)
        if len(s):
            self._buffers = _dispatch(self._reset, buffers, _pad(s))

    def set_states(self, slots: Any, conv: Any, temporal: Any) -> None:
        """Write ``conv`` ``[L, n, *conv_shape]`` and ``temporal`` ``[L, n, *temporal_shape]``
        at *slots* ``[n]`` (distinct) of every layer; the buffers are donated."""
        s = _slots("slots", slots, self.rows)
        _check_distinct("slots", s)
        n = len(s)
        _check_array("conv", conv, (self.layer_num, n, *self.conv_state_shape), self.conv_dtype)
        _check_array(
            "temporal",
            temporal,
            (self.layer_num, n, *self.temporal_state_shape),
            self.temporal_dtype,
        )
        buffers = _live_buffers(self)
        if n:
            m = bucket_size(n)
            conv, temporal = _pad_pair(conv, temporal, m, 1, (self._sharding, self._sharding))
            conv = _placed(conv, self._sharding)
            temporal = _placed(temporal, self._sharding)
            _refuse_own_buffers("conv", conv, buffers)
            _refuse_own_buffers("temporal", temporal, buffers)
            self._buffers = _dispatch(self._write, buffers, _pad(s, m), conv, temporal)

    def get_states(self, slots: Any) -> MambaBuffers:
        """``MambaBuffers(conv [L, n, ...], temporal [L, n, ...])`` of *slots* (fresh).

        The gather runs at the bucket size; trimming to ``n`` is one small jitted call, as
        in :meth:`KVPool.get_kv`."""
        s = _slots("slots", slots, self.rows)
        out = _dispatch(self._read, _live_buffers(self), _pad(s))
        n = len(s)
        return out if n == out.conv.shape[1] else MambaBuffers(*_trim_rows(out, n=n, axis=1))


# ---------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------


def make_full_attention_net_mem_pool(
    size: int,
    layer_num: int,
    head_num: int,
    head_dim: int,
    *,
    v_head_num: int | None = None,
    v_head_dim: int | None = None,
    dtype: Any = jnp.bfloat16,
    page_size: int = 1,
    need_sort: bool = True,
    mesh: Mesh | None = None,
    head_axis: str | None = None,
    device: jax.Device | None = None,
) -> tuple[KVPool, TokenToKVPoolAllocator]:
    """A :class:`KVPool` of *size* slots and the allocator that hands them out; *mesh*,
    *head_axis* and *device* place the pool as :class:`KVPool`'s do.

    With ``page_size`` P > 1, *size* is cut to whole pages (``size // P * P`` slots are
    handed out, as :class:`TokenToKVPoolAllocator` does), and a cache over this allocator
    takes ``page_size=P`` (or a multiple of it) too: ``RadixCache(page_size=P, ...)``,
    whose default of 1 it refuses."""
    pool = KVPool(
        size,
        layer_num,
        head_num,
        head_dim,
        v_head_num=v_head_num,
        v_head_dim=v_head_dim,
        dtype=dtype,
        page_size=page_size,
        mesh=mesh,
        head_axis=head_axis,
        device=device,
    )
    return pool, TokenToKVPoolAllocator(size, page_size=page_size, need_sort=need_sort)


def make_req_to_token_pool(max_reqs: int, max_context_len: int) -> ReqToTokenPool:
    """A :class:`ReqToTokenPool` of *max_reqs* request slots of *max_context_len* tokens."""
    return ReqToTokenPool(max_reqs, max_context_len)


__all__ = [
    "PAD_SLOT",
    "KVBuffers",
    "KVPool",
    "MambaBuffers",
    "MambaPool",
    "ReqToTokenPool",
    "SWATokenToKVPoolAllocator",
    "TokenToKVPoolAllocator",
    "bucket_size",
    "copy_kv",
    "copy_states",
    "make_full_attention_net_mem_pool",
    "make_req_to_token_pool",
    "pad_slots",
    "read_kv",
    "read_kv_all",
    "reset_states",
    "scatter_rows",
    "write_kv",
    "write_kv_all",
]
