# cython: language_level=3
"""Host-side KV slot allocators at C speed.

The free list is an array of page ids with a moving head (``alloc`` takes from the head,
``need_sort=False`` frees append at the tail); with ``need_sort=True`` frees wait in a
release array and are merged back in ascending order when the free list runs short, so
allocations stay as low and as contiguous as the pool allows. One state byte per page makes
every free checked in O(1) per slot, always on: a double free, the padding slot 0, a slot
out of range or (with ``page_size`` 1) a slot listed twice raises ``InvalidFreeError`` and
frees nothing of the call. With pages, a call frees each page once, however many of its
slots it lists (the same slot twice included).

The state byte also says who owns an allocated slot: the caller that allocated it, or a
prefix cache. A ``RadixCache`` or ``MambaRadixCache`` over a ``TokenToKVPoolAllocator``, or
a ``RadixCache`` (with a window or without) over a ``SWATokenToKVPoolAllocator`` (on its
full side), of exactly these types, takes the slots it keeps in ``insert``: without a
window ``value[prefix_len:aligned]``, with one what it keeps of
``value[prev_prefix_len:aligned]`` (see ``RadixCache.insert``: it frees the rest itself).
They must be held by a caller, and with pages each page-aligned run must be one page, else
the insert raises ``InvalidValueError`` and takes nothing. The cache frees them when it
evicts them, resets, or is dropped; until then a caller's ``free`` (or ``free_swa``) of one
of them raises ``InvalidFreeError`` and ``clear()`` raises ``AllocatorStateError``. So
every slot is free, a caller's, or a cache's, and the allocator knows which
(``is_allocated``, ``is_cached``).

Thread safety: every public call is atomic with respect to other Python threads. A call
first converts its arguments (which may run Python code, e.g. copying a jax array to the
host) and makes its result array, then changes the allocator's state in one stretch of C
code that holds the GIL throughout and calls nothing in Python. A sequence of calls
(``available_size()`` then ``alloc()``) is not atomic: threads sharing an allocator
serialise such sequences themselves.
"""

from cpython.list cimport PyList_Check
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyTypeObject
from cpython.sequence cimport PySequence_Check
from cpython.tuple cimport PyTuple_Check
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cimport numpy as cnp

from pymllm.mem_cache._copy cimport copy32, copy32_set_mode, first_outside, move32_down

import operator
from array import array as _array_type

import numpy as np

from pymllm.mem_cache.errors import (
    AllocatorStateError,
    AlreadyInitializedError,
    CacheError,
    InvalidFreeError,
    InvalidValueError,
    NotInitializedError,
)

cnp.import_array()


cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil

# LSD radix sort of page ids: 11-bit digits, as many passes as the largest id needs.
cdef enum:
    RADIX_BITS = 11
    RADIX = 1 << RADIX_BITS
    ID_BITS = 32  # width of a page id (int32_t): no shift of one may reach it


cdef inline int _radix_passes(int32_t max_value) noexcept nogil:
    """Digits (passes) that values in [0, max_value] need, at least one. The shift is
    tested before it is used: an int32 shifted by 32 bits or more (the fourth digit, once
    max_value >= 2**22) is undefined in C."""
    cdef int passes = 1
    while RADIX_BITS * passes < ID_BITS and (max_value >> (RADIX_BITS * passes)) > 0:
        passes += 1
    return passes


def _radix_pass_count(int32_t max_value):
    """Test hook: the passes of the radix sort of page ids up to *max_value*."""
    return _radix_passes(max_value)


cdef int32_t* _radix_sort(int32_t* a, int32_t* tmp, int32_t n, int32_t max_value) noexcept:
    """Sorts a[0:n] (values in [0, max_value]) using tmp[0:n]; returns whichever of the two
    buffers holds the sorted result."""
    cdef int32_t counts[RADIX]
    cdef int32_t i, c, total
    cdef int shift = 0
    cdef int end = RADIX_BITS * _radix_passes(max_value)
    cdef int32_t* src = a
    cdef int32_t* dst = tmp
    cdef int32_t* swap
    while shift < end:
        memset(counts, 0, sizeof(counts))
        for i in range(n):
            counts[(src[i] >> shift) & (RADIX - 1)] += 1
        total = 0
        for i in range(RADIX):
            c = counts[i]
            counts[i] = total
            total += c
        for i in range(n):
            c = (src[i] >> shift) & (RADIX - 1)
            dst[counts[c]] = src[i]
            counts[c] += 1
        swap = src
        src = dst
        dst = swap
        shift += RADIX_BITS
    return src


cdef inline void _set_bits(uint64_t* bits, const int32_t* pages, int32_t n) noexcept:
    """Set the bits of pages[0:n]; runs within one word update it once (a read-modify-write
    per page would serialize on store forwarding)."""
    cdef int32_t i, w
    cdef int32_t cur = -1
    cdef uint64_t acc = 0
    for i in range(n):
        w = pages[i] >> 6
        if w != cur:
            if cur >= 0:
                bits[cur] |= acc
            cur = w
            acc = 0
        acc |= 1ULL << (pages[i] & 63)
    if cur >= 0:
        bits[cur] |= acc


cdef inline void _clear_bits(uint64_t* bits, const int32_t* pages, int32_t n) noexcept:
    cdef int32_t i, w
    cdef int32_t cur = -1
    cdef uint64_t acc = 0
    for i in range(n):
        w = pages[i] >> 6
        if w != cur:
            if cur >= 0:
                bits[cur] &= ~acc
            cur = w
            acc = 0
        acc |= 1ULL << (pages[i] & 63)
    if cur >= 0:
        bits[cur] &= ~acc


cdef inline void _fill_bit_range(uint64_t* bits, int32_t lo, int32_t n, bint value) noexcept:
    """Set (value) or clear the bits lo .. lo+n-1, whole words at a time."""
    cdef int32_t hi = lo + n  # exclusive
    cdef int32_t w0 = lo >> 6
    cdef int32_t w1 = (hi - 1) >> 6
    cdef uint64_t first = ~0ULL << (lo & 63)
    cdef uint64_t last = ~0ULL >> (63 - ((hi - 1) & 63))
    if n <= 0:
        return
    if w0 == w1:
        first &= last
        bits[w0] = (bits[w0] | first) if value else (bits[w0] & ~first)
        return
    bits[w0] = (bits[w0] | first) if value else (bits[w0] & ~first)
    if w1 > w0 + 1:
        memset(bits + w0 + 1, 0xFF if value else 0, (w1 - w0 - 1) * sizeof(uint64_t))
    bits[w1] = (bits[w1] | last) if value else (bits[w1] & ~last)


# Pages are booked in blocks of BLOCK: a block of consecutive ids (the common case: frees
# give back what one alloc took, and the free list keeps those runs) takes whole-range
# state and bitmap updates after branch-free checks the compiler vectorizes; any other
# block takes the per-page ones.
cdef enum:
    BLOCK = 64
    SUB = 16  # a block that is not one run is booked in sub-blocks of SUB pages


cdef inline bint _consecutive(const int32_t* p, int32_t n) noexcept:
    """p[0:n] == p[0], p[0] + 1, ..., p[0] + n - 1 (n >= 1), in 32-bit unsigned arithmetic
    (2**31 - 1 then -2**31 count as consecutive: callers bound p[0] + n - 1 first, in 64
    bits).
    No early exit, so it vectorizes; a whole block has a constant trip count, so no scalar
    prologue or epilogue. The counters are 32-bit, as the entries: with a 64-bit one the
    compiler built each vector of p0 + i from 64-bit lanes."""
    cdef uint32_t diff = 0
    cdef uint32_t p0 = <uint32_t>p[0]
    cdef const uint32_t* q = <const uint32_t*>p
    cdef uint32_t i
    if n == BLOCK:
        for i in range(<uint32_t>BLOCK):
            diff |= q[i] ^ (p0 + i)
    elif n == SUB:
        for i in range(<uint32_t>SUB):
            diff |= q[i] ^ (p0 + i)
    else:
        for i in range(<uint32_t>n):
            diff |= q[i] ^ (p0 + i)
    return diff == 0


cdef inline bint _all_in_state(const uint8_t* state, int32_t lo, int32_t n, uint8_t st) noexcept:
    """state[lo:lo+n] are all st (branch-free; indexed from a pointer so that it vectorizes)."""
    cdef uint8_t acc = 0
    cdef const uint8_t* q = state + lo
    cdef uint32_t i
    if n == BLOCK:
        for i in range(<uint32_t>BLOCK):
            acc |= q[i] ^ st
    elif n == SUB:
        for i in range(<uint32_t>SUB):
            acc |= q[i] ^ st
    else:
        for i in range(<uint32_t>n):
            acc |= q[i] ^ st
    return acc == 0


cdef inline void _fill_sequence(int32_t* dst, int32_t s0, int32_t n) noexcept:
    """dst[0:n] = s0, s0 + 1, ..., s0 + n - 1 (vectorizes, as _consecutive; a 32-bit
    counter for the same reason)."""
    cdef uint32_t* q = <uint32_t*>dst
    cdef uint32_t i
    for i in range(<uint32_t>n):
        q[i] = <uint32_t>s0 + i


cdef inline void _set_free_bits(uint64_t* bits, const int32_t* pages, int32_t n) noexcept:
    """Set the bits of pages[0:n]: range fills for blocks (or sub-blocks) that are runs."""
    cdef int32_t i = 0, k, j, m
    while i < n:
        k = min(<int32_t>BLOCK, n - i)
        if _consecutive(pages + i, k):
            _fill_bit_range(bits, pages[i], k, True)
        else:
            j = i
            while j < i + k:
                m = min(<int32_t>SUB, i + k - j)
                if _consecutive(pages + j, m):
                    _fill_bit_range(bits, pages[j], m, True)
                else:
                    _set_bits(bits, pages + j, m)
                j += m
        i += k


cdef void* _xmalloc(size_t nbytes) except NULL:
    cdef void* p = malloc(nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes for the slot allocator")
    return p


cdef cnp.ndarray _empty_int32(Py_ssize_t n):
    cdef cnp.npy_intp dims = n
    return cnp.PyArray_EMPTY(1, &dims, cnp.NPY_INT32, 0)


cdef cnp.ndarray _as_int32_slots(object indices, object error=InvalidFreeError,
                                 str name="indices"):
    """A 1-D C-contiguous int32 view/copy of *indices* (numpy, list, jax array, int).

    Values that do not fit int32 are out of range of every pool; they raise `error` here.
    *name* is the argument the messages name.
    """
    if (
        cnp.PyArray_Check(indices)
        and cnp.PyArray_TYPE(<cnp.ndarray>indices) == cnp.NPY_INT32
        and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>indices)   # '>i4' is int32 too
        and cnp.PyArray_NDIM(<cnp.ndarray>indices) == 1
        and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>indices)
        and cnp.PyArray_ISALIGNED(<cnp.ndarray>indices)   # read as int32 in C
    ):
        return <cnp.ndarray>indices
    arr = _integer_array(indices, name)  # a jax array is copied to the host here (a device sync)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    elif arr.ndim != 1:
        raise InvalidValueError(f"{name}: expected a 1-D array of slot ids, got shape {arr.shape}")
    if arr.size == 0:
        return _empty_int32(0)
    if arr.dtype == object:  # Python ints beyond 64 bits: out of range of every pool
        for v in arr:
            if not 0 <= v <= 0x7FFFFFFF:
                raise error(f"{name}: slot {v} is out of range [0, 2**31)")
    if arr.dtype != np.int32:
        # arr is our own copy (_integer_array): the check runs Python code (a
        # collection's callbacks), and a caller's value rewritten past int32 meanwhile
        # would wrap into another slot
        bad = np.flatnonzero((arr < 0) | (arr > 0x7FFFFFFF))
        if bad.size:
            raise error(f"{name}: slot {arr[bad[0]]} is out of range [0, 2**31)")
        arr = arr.astype(np.int32)
    return np.require(arr, np.int32, ["C", "A"])  # a copy if unaligned


cdef extern from "Python.h":
    void* PyType_GetSlot(PyTypeObject* tp, int slot)
    enum: Py_sq_item
    enum: Py_sq_length


_BOOL_TYPES = frozenset((bool, np.bool_))   # never a slot id or a token
# numpy reads these as one object (a scalar, a string, a dict) or as an array, never item
# by item as a list (and a list or tuple is read as itself)
cdef tuple _NOT_ITEM_SEQUENCES = (list, tuple, str, bytes, bytearray, memoryview, dict, int,
                                  float, complex, np.ndarray, np.generic)
# (not ``dtype``: numpy reads a sequence that merely has one item by item)
cdef tuple _ARRAY_ATTRS = ("__array__", "__array_interface__", "__array_struct__")


cdef bint _reads_as_items(object t) except -1:
    """Whether numpy reads an object of type *t* item by item, as it reads a list, though
    it is no list or tuple: a deque, a ``UserList``, a ``range``, an ``array.array``, any
    class with ``__getitem__`` and ``__len__`` (the sequence slots numpy's
    ``PySequence_Check`` and ``PySequence_Size`` read, not the metaclass's: an ``IntEnum``
    member is an int) and no array interface. A bool among its items would read as 0 or
    1, as in a list; a ``mappingproxy`` (no sequence slot) or a class with ``__getitem__``
    alone is one object to numpy."""
    return (
        PyType_GetSlot(<PyTypeObject*>t, Py_sq_item) != NULL
        and PyType_GetSlot(<PyTypeObject*>t, Py_sq_length) != NULL
        and not issubclass(t, _NOT_ITEM_SEQUENCES)
        and not any(hasattr(t, a) for a in _ARRAY_ATTRS)
    )


cpdef object _sequence_as_list(str name, object x, object error=InvalidValueError):
    """*x* itself, or a list of its items when numpy would read it item by item though it
    is no list, tuple or array (see ``_reads_as_items``): read once here, so that the
    checks for bools and deleted arrays see the items that are then converted. A sequence
    that cannot be read raises *error* naming *name* (out of memory, a recursion limit and
    the caches' own errors, such as a re-entered call, keep their type). An int, a slice,
    None, a list or an array costs one C check. Shared by the token hash, the allocators'
    general paths and the radix tree's key and value reads."""
    if (not PySequence_Check(x) or PyList_Check(x) or PyTuple_Check(x)
            or cnp.PyArray_Check(x) or not _reads_as_items(type(x))):
        return x
    try:
        len(x)
    except (MemoryError, RecursionError, CacheError):
        raise
    except Exception:
        return x    # no length: numpy reads it as one object (refused by the checks after)
    try:
        return list(x)
    except (MemoryError, RecursionError, CacheError):
        raise
    except Exception as exc:
        raise error(f"{name}: cannot read {type(x).__name__} ({exc!r:.80})") from exc


cdef bint _array_like(object t):
    """Whether items of type *t* are arrays (numpy's, JAX's, any type with a ``dtype``
    that is not a numpy scalar): a bool one among slots reads as 0 or 1."""
    return issubclass(t, np.ndarray) or (not issubclass(t, np.generic) and hasattr(t, "dtype"))


cdef int _holds_bool(object seq) except -1:
    """1 when the list or tuple *seq* (their subclasses too) holds a bool: Python's
    or numpy's, or a bool array (numpy's or JAX's; a 0-d one reads as 0 or 1), among its
    items or in nested lists at any depth; else 2 when it holds a nested sequence that is
    not a list or tuple (a deque, a ``UserList``: read here, and by numpy again, it could
    give other items each time; see _refuse_bool_slots); else 0. The items' types in one
    C loop (``set(map(type, ...))``); Python code per item only when some item is a list
    or an array, and then a loop over a stack, not recursion, that visits each list once
    (a list that holds itself, or one nested 200,000 deep, is safe)."""
    cdef int generic = 0
    types = set(map(type, seq))
    if _BOOL_TYPES & types:
        return 1
    if not any(issubclass(t, (list, tuple)) or _array_like(t) or _reads_as_items(t)
               for t in types):
        return 0
    stack = [seq]
    seen = {id(seq)}
    while stack:
        for x in stack.pop():
            if type(x) in _BOOL_TYPES:
                return 1
            if _array_like(type(x)):
                try:
                    if np.dtype(x.dtype) == np.bool_:
                        return 1
                except TypeError:  # a dtype numpy does not know: not numpy's bool
                    pass
            elif (isinstance(x, (list, tuple)) or _reads_as_items(type(x))) and id(x) not in seen:
                if not isinstance(x, (list, tuple)):
                    generic = 2
                seen.add(id(x))
                stack.append(x)
    return generic


def _refuse_bool_slots(str name, object indices):
    """``InvalidValueError`` when *indices* is a list, tuple or other sequence numpy reads
    item by item (a deque, a ``UserList``...) holding a bool (nested ones too): numpy would
    read ``[True, 5]`` as slots 1 and 5, and a bool is not a slot id. A numpy bool array
    needs no check (its dtype says so). Shared with memory_pool's slot checks.

    Returns what the caller reads from then on, as checked: *indices* itself, a sequence
    read once as a list, or, when lists hold other sequences (which could give other
    items when numpy reads them again), nested lists of the items read once."""
    items = _sequence_as_list(name, indices)
    if not isinstance(items, (list, tuple)):
        return indices
    found = _holds_bool(items)
    if found == 2:
        items = _read_nested_once(name, items)
        found = _holds_bool(items)
    if found == 1:
        raise InvalidValueError(f"{name}: expected integer slot ids, got a bool in {indices!r:.60}")
    return items


cdef list _read_nested_once(str name, object items):
    """*items* (a list or tuple holding sequences that are not lists or tuples) as nested
    lists of its scalars, each sequence read once (numpy's reading, as objects)."""
    try:
        obj = np.array(items, dtype=object)
    except RuntimeError:
        _refuse_deleted_array(name, items)
        raise
    except ValueError:
        raise InvalidValueError(
            f"{name}: expected a flat sequence of integer slot ids, got nested sequences "
            "that form no array (ragged, or nested too deep)"
        ) from None
    for v in obj.flat:
        t = type(v)
        if issubclass(t, (list, tuple)) or _reads_as_items(t):   # ragged: a sequence left
            raise InvalidValueError(
                f"{name}: expected a flat sequence of integer slot ids, got nested "
                "sequences that form no array (ragged)"
            )
    return obj.tolist()


cdef bint _is_deleted(object x):
    """Whether *x* is a jax array that an update donated (deleted)."""
    is_deleted = getattr(x, "is_deleted", None)
    try:
        return callable(is_deleted) and bool(is_deleted())
    except Exception:
        return False


def _refuse_deleted_array(str name, object x, object error=InvalidValueError):
    """``error`` naming *name* when *x* is a jax array that an update donated (deleted), or
    a list, tuple or other sequence (see ``_reads_as_items``) holding one, else nothing:
    numpy's conversion of one raises a bare ``RuntimeError``. The one refusal the
    allocators, the radix tree's key, value and state reads and the pools share. A
    sequence's items are read one by one only when one of their types has ``is_deleted``
    (a set of the item types, made in C, else)."""
    if _is_deleted(x):
        raise error(f"{name}: the array was deleted (an update donated it)")
    items = _sequence_as_list(name, x, error)
    if isinstance(items, (list, tuple)) and any(
        hasattr(t, "is_deleted") for t in set(map(type, items))  # the items' types, in C
    ):
        for i, item in enumerate(items):
            if _is_deleted(item):
                raise error(f"{name}: item {i} is a deleted array (an update donated it)")


def _integer_slots(str name, object indices):
    """*indices* as a numpy array of integers, by the allocators' own reading (see
    ``_integer_array``): memory_pool's slot arguments are read the same way."""
    return _integer_array(indices, name)


cdef object _integer_array(object indices, str name="indices"):
    """*indices* as a numpy array of integers (any integer dtype), for the general paths
    of ``free``, ``is_allocated`` and ``alloc``'s prefix (*name* is the argument the
    messages name): a bool is not a slot id (``InvalidValueError``, also
    as an item of a list or tuple, which numpy would silently read as 0 or 1), and Python
    ints beyond 64 bits, or of both signs past int64 (which numpy reads as float64),
    come back as an object array of exact ints. Nesting that forms no array (ragged, or
    deeper than numpy's 64 dimensions) is ``InvalidValueError``. A sequence numpy would
    read item by item (a deque, a ``UserList``) is read once, as a list."""
    if (isinstance(indices, _array_type) and indices.typecode not in "bBhHiIlLqQ"
            and not len(indices)):
        # an array.array has a type of its own (read below as a list, whose emptiness
        # would say nothing): an empty one of floats or text is refused as a non-empty
        # one is
        raise InvalidValueError(
            f"{name}: expected integer slot ids, got an array.array of {indices.typecode!r}"
        )
    indices = _refuse_bool_slots(name, indices)   # a deque, a UserList...: read as a list
    try:
        arr = np.asarray(indices)
    except RuntimeError:
        _refuse_deleted_array(name, indices)
        raise
    except ValueError:  # lists of unequal lengths, or nested past numpy's 64 dimensions
        # (no repr of the input: one nested 200,000 deep would overflow the repr)
        raise InvalidValueError(
            f"{name}: expected a flat sequence of integer slot ids, got nested sequences "
            "that form no array (ragged, or nested too deep)"
        ) from None
    except TypeError as exc:
        if not isinstance(indices, (list, tuple)):
            raise
        # an item numpy cannot read (an array-like whose __array__ has no dtype to give)
        raise InvalidValueError(
            f"{name}: expected integer slot ids, got an item numpy cannot read ({exc})"
        ) from None
    if arr.size == 0 and arr.dtype.kind not in "iu":
        # an empty array of floats (or objects, text...) is refused as a non-empty one is,
        # and as the tree's value and the pools' index arrays are; an empty list or tuple,
        # which numpy reads as float64, is no slots (as integers, so read again it passes)
        if not isinstance(indices, (list, tuple)):
            raise InvalidValueError(f"{name}: expected integer slot ids, got dtype {arr.dtype}")
        arr = np.zeros(arr.shape, np.int64)
    if arr.dtype.kind == "f" and arr.size and not isinstance(indices, np.ndarray):
        # a sequence that numpy found no integer dtype for ([2**63, -1]); its floats, if
        # any, are refused below one by one
        arr = np.asarray(indices, dtype=object)
    if arr.dtype == object:
        exact = True
        for v in arr.flat:
            if type(v) is not int:
                if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                    raise InvalidValueError(
                        f"{name}: expected integer slot ids, got {type(v).__name__} {v!r:.60}"
                    )
                exact = False
        if not exact:
            # exact ints of the values checked: an int subclass's own __int__ or
            # __index__, which a later conversion would call, could give another value
            return np.fromiter(
                map(operator.index, arr.flat), dtype=object, count=arr.size
            ).reshape(arr.shape)
    elif arr.size and arr.dtype.kind not in "iu":
        raise InvalidValueError(f"{name}: expected integer slot ids, got dtype {arr.dtype}")
    if not isinstance(indices, (list, tuple)) or not arr.flags.owndata:
        # the caller's array, a view of its memory, or one an __array__ handed over and
        # may keep: the callers check the slots and then run Python code (numpy, a
        # collection's callbacks) before they use them, which could rewrite that array
        # in between; they get their own copy (a list we read is ours already)
        arr = arr.copy()
    return arr


cdef inline bint _mark_run(PageCore self, const int32_t* got, int32_t k) noexcept:
    """Pages got[0:k], just taken off the free list, become PAGE_ALLOCATED in one range
    update if they are a run; False (nothing changed) otherwise."""
    if _consecutive(got, k):
        memset(self.state + got[0], PAGE_ALLOCATED, k)
        _fill_bit_range(self.freebits, got[0], k, False)
        return True
    return False


cdef inline bint _free_run(PageCore self, const int32_t* slots, Py_ssize_t i, int32_t k,
                           int32_t* dst, uint8_t st, uint8_t owner) noexcept:
    """slots[i:i+k] as one range, if they are a run of slots in state `owner`: state set
    to st (and free bits set when st is PAGE_FREE), copied to dst[i:i+k]; False (nothing
    changed) otherwise."""
    cdef int32_t s0 = slots[i]
    # in 64 bits: s0 near 2**31 - 1 (a bad slot) must not wrap below num_pages
    if (i + k <= self.n_allocated and 1 <= s0 and <int64_t>s0 - 1 + k <= self.num_pages
            and _consecutive(slots + i, k)
            and _all_in_state(self.state, s0, k, owner)):
        memset(self.state + s0, st, k)
        if st == PAGE_FREE:
            _fill_bit_range(self.freebits, s0, k, True)
        _fill_sequence(dst + i, s0, k)
        return True
    return False


cdef str _not_owned(int32_t s, uint8_t st, uint8_t owner, int32_t ps, bint attach=False):
    """Why a free of slot s (its page in state st) was refused, the page's owner being
    expected to be `owner`; with `attach`, why ``alloc_swa`` refused it (the argument
    is ``full_indices`` then, and nothing was being freed)."""
    cdef str arg = "full_indices" if attach else "indices"
    if st == PAGE_CACHED:
        return (
            f"{arg}: slot {s} is owned by a prefix cache (a radix tree took it in insert); "
            "it goes back to the pool when the cache evicts it"
        )
    if st == PAGE_ALLOCATED:  # and owner is PAGE_CACHED: the cache's own free
        return f"{arg}: slot {s} is not owned by a prefix cache (a caller holds it)"
    return f"{arg}: slot {s} is not allocated" + ("" if attach else " (double free?)") + (
        f"; its page {s // ps} is free" if ps > 1 else ""
    )


cdef object _slot_refused(bint attach, str msg):
    """The exception for a slot `collect` refuses: ``InvalidFreeError`` in a free,
    ``InvalidValueError`` in ``alloc_swa`` (`attach`), which frees nothing."""
    return InvalidValueError(msg) if attach else InvalidFreeError(msg)


def _cannot_pickle(object owner):
    """``TypeError`` for pickling or copying a slot owner (an allocator, a cache, a pool) or
    a node handle: the copy would be a second owner of the same slots, or a handle to a node
    of no cache. Their ``__reduce__`` raises it, and so does their ``__reduce_ex__`` (through
    :func:`_reduce_owner`) at every protocol: at 0 and 1 Python would otherwise rebuild a
    base class from the object itself and fail with whatever that class's ``__init__`` says
    about such an argument."""
    raise TypeError(
        f"cannot pickle {type(owner).__name__!r} object: it is bound to the slots of a live "
        "cache or allocator"
    )


def _reduce_owner(object owner, type base):
    """``__reduce_ex__`` of a slot owner or handle whose compiled (or pool) base is *base*:
    the subclass's own ``__reduce__`` when it defines one (one that knows how to build an
    empty object of its configuration, which ``object.__reduce_ex__`` would call too), else
    :func:`_cannot_pickle`."""
    if type(owner).__reduce__ is not base.__reduce__:
        return owner.__reduce__()
    _cannot_pickle(owner)


cdef class PageCore:
    def __cinit__(self, int32_t num_pages, int32_t page_size, bint need_sort):
        self.pages = NULL
        self.release = NULL
        self.held = NULL
        self.scratch = NULL
        self.state = NULL
        self.freebits = NULL
        if num_pages < 0:
            raise InvalidValueError(f"size: expected >= 0, got {num_pages} pages")
        if page_size < 1:
            raise InvalidValueError(f"page_size: expected an int >= 1, got {page_size!r}")
        # the padding page first: the slots end before this bound, kept in int32 too
        cdef int64_t end = (<int64_t>num_pages + 1) * page_size
        if end > 0x7FFFFFFF:
            raise InvalidValueError(
                f"size: {num_pages} pages of {page_size} slots do not fit int32 slot ids (after "
                f"the padding page they end before slot {end}, which must be at most 2**31 - 1)"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.need_sort = need_sort
        cdef size_t n = <size_t>num_pages
        # Twice the pages: with need_sort=False frees append at the tail, and compacting
        # only when the tail reaches the end keeps that amortized O(1) per page.
        self.pages = <int32_t*>_xmalloc(2 * n * sizeof(int32_t))
        self.scratch = <int32_t*>_xmalloc(2 * n * sizeof(int32_t))
        self.release = <int32_t*>_xmalloc(n * sizeof(int32_t))
        self.held = <int32_t*>_xmalloc(n * sizeof(int32_t))
        self.state = <uint8_t*>_xmalloc((n + 1) * sizeof(uint8_t))
        self.n_words = <int32_t>((n + 1 + 63) // 64)
        self.freebits = <uint64_t*>_xmalloc(self.n_words * sizeof(uint64_t))
        self.reset()

    def __dealloc__(self):
        free(self.pages)
        free(self.release)
        free(self.held)
        free(self.scratch)
        free(self.state)
        free(self.freebits)

    cdef void reset(self) noexcept:
        cdef int32_t i
        memset(self.state, PAGE_FREE, self.num_pages + 1)
        self.state[PAD_PAGE] = PAGE_RESERVED
        memset(self.freebits, 0, self.n_words * sizeof(uint64_t))
        for i in range(self.num_pages):
            self.pages[i] = i + 1
            self.freebits[(i + 1) >> 6] |= 1ULL << ((i + 1) & 63)
        self.head = 0
        self.tail = self.num_pages
        self.n_release = 0
        self.n_held = 0
        self.n_allocated = 0
        self.group_depth = 0
        self.merges[0] = self.merges[1] = self.merges[2] = 0

    cdef int32_t free_pages_count(self) noexcept:
        return self.tail - self.head + self.n_release

    cdef int32_t* take_pages(self, int32_t need) noexcept:
        cdef int32_t i, j, k, m, p
        cdef int32_t* got
        if need > self.tail - self.head + self.n_release:
            return NULL
        if need > self.tail - self.head:
            self.merge()
        got = self.pages + self.head
        if need > 0 and self.need_sort and got[need - 1] - got[0] == need - 1:
            # A sorted run of consecutive pages: whole-range state and bitmap updates.
            memset(self.state + got[0], PAGE_ALLOCATED, need)
            _fill_bit_range(self.freebits, got[0], need, False)
        else:
            i = 0
            while i < need:
                k = min(<int32_t>BLOCK, need - i)
                if not _mark_run(self, got + i, k):
                    j = i
                    while j < i + k:
                        m = min(<int32_t>SUB, i + k - j)
                        if not _mark_run(self, got + j, m):
                            for p in range(j, j + m):
                                self.state[got[p]] = PAGE_ALLOCATED
                            _clear_bits(self.freebits, got + j, m)
                        j += m
                i += k
        self.head += need
        self.n_allocated += need
        return got

    cdef int32_t collect(
        self, const int32_t* slots, Py_ssize_t n, uint8_t owner, bint attach=False
    ) except -1:
        cdef Py_ssize_t i, j
        cdef int32_t s, p, count = 0
        cdef int32_t ps = self.page_size
        cdef int32_t hi = (self.num_pages + 1) * ps
        cdef uint8_t st
        cdef str arg = "full_indices" if attach else "indices"
        for i in range(n):
            s = slots[i]
            if s < ps or s >= hi:
                for j in range(count):
                    self.state[self.scratch[j]] = owner
                if 0 <= s < ps:
                    raise _slot_refused(attach,
                        f"{arg}: slot {s} is the reserved padding slot (page 0); it is never "
                        "allocated" + (" and takes no SWA side" if attach else " and cannot be freed")
                    )
                raise _slot_refused(attach, f"{arg}: slot {s} is out of range [{ps}, {hi})")
            p = s if ps == 1 else s // ps
            st = self.state[p]
            if st == owner:
                self.state[p] = PAGE_PENDING
                self.scratch[count] = p
                count += 1
            elif st == PAGE_PENDING and ps > 1:
                pass  # another slot of a page this call already frees
            else:
                for j in range(count):
                    self.state[self.scratch[j]] = owner
                if st == PAGE_PENDING:
                    raise _slot_refused(attach, f"{arg}: slot {s} is listed twice in one "
                                        + ("alloc_swa()" if attach else "free()"))
                raise _slot_refused(attach, _not_owned(s, st, owner, ps, attach))
        return count

    cdef int adopt(self, const int32_t* slots, Py_ssize_t n) except -1:
        """Every page of slots[0:n] goes from PAGE_ALLOCATED (a caller's) to PAGE_CACHED
        (a prefix cache's), or InvalidValueError with every state as it was. With page_size
        1, in blocks of BLOCK: a block that is a run of allocated slots in one range
        update, else slot by slot, each flipped as it is checked (a slot listed twice finds
        itself flipped). With pages, the
        slots go a page at a time: each page-aligned run of page_size slots must be the
        slots of one page in order, as alloc hands them out (a page split over two runs
        could end up in two nodes, and the first evicted would free the other's slots),
        and a page listed twice is caught by its PAGE_PENDING mark."""
        cdef Py_ssize_t i, j, end
        cdef int32_t s, k
        cdef int32_t ps = self.page_size
        cdef int32_t hi = (self.num_pages + 1) * ps
        cdef uint8_t st = PAGE_ALLOCATED
        if n == 0:
            return 0
        if ps == 1:
            # blocks of BLOCK: a run of allocated slots in one range update, else slot by
            # slot; i ends at the first bad slot, or at n
            i = 0
            while i < n:
                k = <int32_t>min(<Py_ssize_t>BLOCK, n - i)
                s = slots[i]
                if (1 <= s and <int64_t>s - 1 + k <= self.num_pages
                        and _consecutive(slots + i, k)
                        and _all_in_state(self.state, s, k, PAGE_ALLOCATED)):
                    memset(self.state + s, PAGE_CACHED, k)
                    i += k
                    continue
                end = i + k
                while i < end:
                    s = slots[i]
                    if s < 1 or s >= hi:
                        st = PAGE_RESERVED
                        break
                    st = self.state[s]
                    if st != PAGE_ALLOCATED:
                        break
                    self.state[s] = PAGE_CACHED
                    i += 1
                if i < end:
                    break
            if i >= n:
                return 0
            for j in range(i):  # roll back: the slots flipped so far are the caller's again
                self.state[slots[j]] = PAGE_ALLOCATED
            if st == PAGE_CACHED:
                for j in range(i):
                    if slots[j] == s:
                        st = PAGE_PENDING
        else:
            if n % ps:
                raise InvalidValueError(
                    f"value: {n} slots are not a whole number of pages (page_size {ps})"
                )
            i = 0
            while i < n:
                s = slots[i]
                if s < ps or s >= hi:
                    st = PAGE_RESERVED
                    break
                if s % ps or not _consecutive(slots + i, ps):
                    st = PAGE_HELD  # stands for "not one page"
                    break
                st = self.state[s // ps]
                if st != PAGE_ALLOCATED:
                    break
                self.state[s // ps] = PAGE_PENDING
                i += ps
            if i >= n:
                j = 0
                while j < n:
                    self.state[slots[j] // ps] = PAGE_CACHED
                    j += ps
                return 0
            j = 0
            while j < i:  # roll back: the pages marked so far are the caller's again
                self.state[slots[j] // ps] = PAGE_ALLOCATED
                j += ps
            if st == PAGE_HELD and (s % ps or not _consecutive(slots + i, ps)):
                raise InvalidValueError(
                    f"value: slots {[slots[j] for j in range(i, i + ps)]} are not the slots "
                    f"of one page in order (page_size {ps}: each page-aligned run of {ps} "
                    "must be one page, as alloc hands them out)"
                )
        if st == PAGE_PENDING:
            raise InvalidValueError(
                f"value: slot {s} is listed twice" if ps == 1
                else f"value: page {s // ps} is listed twice"
            )
        if st == PAGE_CACHED:
            raise InvalidValueError(
                f"value: slot {s} is already owned by a prefix cache (the tree takes "
                "value[prefix_len:aligned], which must be slots a caller holds)"
            )
        if st == PAGE_RESERVED:
            raise InvalidValueError(
                f"value: slot {s} is not a slot the allocator hands out "
                f"(its pool is [{ps}, {hi}))"
            )
        raise InvalidValueError(
            f"value: slot {s} is not allocated (freed?): the tree takes only slots a "
            "caller holds"
        )

    cdef void set_owner(self, const int32_t* slots, Py_ssize_t n, uint8_t st) noexcept:
        cdef Py_ssize_t i
        cdef int32_t ps = self.page_size
        if ps == 1:
            for i in range(n):
                self.state[slots[i]] = st
        else:
            for i in range(n):
                self.state[slots[i] // ps] = st

    cdef int32_t* free_dst(self, int32_t count) noexcept:
        """Where the next `count` freed pages go (held / release / tail of the free list)."""
        if self.group_depth > 0:
            return self.held + self.n_held
        if self.need_sort:
            return self.release + self.n_release
        if self.tail + count > 2 * <int64_t>self.num_pages:
            move32_down(self.pages, self.pages + self.head, self.tail - self.head)
            self.tail -= self.head
            self.head = 0
        return self.pages + self.tail

    cdef void commit(self, const int32_t* pages, int32_t count) noexcept:
        cdef int32_t i
        cdef uint8_t st = PAGE_HELD if self.group_depth > 0 else PAGE_FREE
        cdef int32_t* dst = self.free_dst(count)
        if dst != pages:
            copy32(dst, pages, count)
        for i in range(count):
            self.state[dst[i]] = st
        self.placed(dst, count, False)

    cdef void placed(self, int32_t* dst, int32_t count, bint bits_done) noexcept:
        """Books `count` pages just written at free_dst(count), their state already set."""
        if self.group_depth > 0:
            self.n_held += count
        else:
            if not bits_done:
                _set_free_bits(self.freebits, dst, count)
            if self.need_sort:
                self.n_release += count
            else:
                self.tail += count
        self.n_allocated -= count

    cdef int32_t free_slots(self, const int32_t* slots, Py_ssize_t n, uint8_t owner) except -1:
        """page_size == 1: validate and free slots[0:n] in one pass (rolled back on error).
        Blocks, then sub-blocks, that are runs are booked as ranges; other slots one by one."""
        cdef Py_ssize_t i, j, end, bad = -1
        cdef int32_t s, k
        cdef int32_t hi = self.num_pages
        cdef uint8_t st = PAGE_HELD if self.group_depth > 0 else PAGE_FREE
        # More slots than are allocated: one of them is bad before the buffer fills up.
        cdef int32_t* dst = self.free_dst(<int32_t>min(n, self.n_allocated))
        i = 0
        while i < n and bad < 0:
            k = <int32_t>min(<Py_ssize_t>BLOCK, n - i)
            if _free_run(self, slots, i, k, dst, st, owner):
                i += k
                continue
            end = i + k
            while i < end and bad < 0:
                k = <int32_t>min(<Py_ssize_t>SUB, end - i)
                if not _free_run(self, slots, i, k, dst, st, owner):
                    for j in range(i, i + k):
                        s = slots[j]
                        if (s < 1 or s > hi or self.state[s] != owner
                                or j >= self.n_allocated):
                            bad = j
                            break
                        self.state[s] = st
                        dst[j] = s
                    if st == PAGE_FREE:
                        _set_bits(self.freebits, dst + i, <int32_t>((bad if bad >= 0 else i + k) - i))
                i += k
        if bad >= 0:
            # roll back: every slot booked so far is allocated again
            for j in range(bad):
                self.state[dst[j]] = owner
            if st == PAGE_FREE:
                _clear_bits(self.freebits, dst, <int32_t>bad)
            s = slots[bad]
            if s == PAD_PAGE:
                raise InvalidFreeError(
                    "indices: slot 0 is the reserved padding slot; it is never allocated and cannot "
                    "be freed"
                )
            if s < 1 or s > hi:
                raise InvalidFreeError(f"indices: slot {s} is out of range [1, {hi + 1})")
            for j in range(bad):
                if dst[j] == s:
                    raise InvalidFreeError(f"indices: slot {s} is listed twice in one free()")
            raise InvalidFreeError(_not_owned(s, self.state[s], owner, 1))
        self.placed(dst, <int32_t>n, True)
        return <int32_t>n

    cdef void merge(self) noexcept:
        cdef int32_t n_live = self.tail - self.head
        cdef int32_t n_rel = self.n_release
        cdef int32_t i, j, k, p, n, passes
        cdef int32_t* live
        cdef int32_t* rel
        cdef int32_t* swap
        cdef uint64_t word
        cdef int64_t sort_cost, scan_cost
        if n_rel == 0 and (self.need_sort or n_live == 0):
            return
        # Radix-sort the releases and merge them with the sorted live run, or rebuild the
        # whole list from the state bytes, whichever touches less memory.
        passes = _radix_passes(self.num_pages)
        sort_cost = passes * (2 * <int64_t>n_rel + RADIX)
        scan_cost = self.n_words + 2 * (<int64_t>n_live + n_rel)
        # Releases are often already ascending (a freed run that was allocated together).
        i = 1
        while i < n_rel and self.release[i - 1] < self.release[i]:
            i += 1
        if i >= n_rel:
            sort_cost = 0
        if self.need_sort and sort_cost < scan_cost:
            rel = self.release
            self.merges[0 if sort_cost == 0 else 1] += 1
            if sort_cost > 0:
                rel = _radix_sort(self.release, self.scratch, n_rel, self.num_pages)
            if rel == self.scratch:  # keep the sorted run out of the merge's output buffer
                copy32(self.release, self.scratch, n_rel)
                rel = self.release
            live = self.pages + self.head
            i = 0
            j = 0
            k = 0
            while i < n_live and j < n_rel:
                if live[i] < rel[j]:
                    self.scratch[k] = live[i]
                    i += 1
                else:
                    self.scratch[k] = rel[j]
                    j += 1
                k += 1
            if i < n_live:
                copy32(self.scratch + k, live + i, n_live - i)
                k += n_live - i
            if j < n_rel:
                copy32(self.scratch + k, rel + j, n_rel - j)
                k += n_rel - j
            swap = self.pages
            self.pages = self.scratch
            self.scratch = swap
        else:
            # Every PAGE_FREE page, ascending, off the free bitmap.
            self.merges[2] += 1
            k = 0
            for i in range(self.n_words):
                word = self.freebits[i]
                while word:
                    self.pages[k] = (i << 6) + __builtin_ctzll(word)
                    k += 1
                    word &= word - 1
        self.head = 0
        self.tail = k
        self.n_release = 0

    cdef void end_group(self) noexcept:
        cdef int32_t n = self.n_held
        self.n_held = 0
        self.group_depth = 0
        self.commit(self.held, n)
        # commit() counted these pages as leaving the allocated state a second time.
        self.n_allocated += n

    def _check(self, str name):
        """Recompute every counter from the arrays; AssertionError on any disagreement."""
        cdef int32_t i, p
        counts = [0, 0, 0, 0, 0, 0]
        for i in range(self.num_pages + 1):
            assert self.state[i] <= PAGE_CACHED, f"{name}: bad state byte at page {i}"
            counts[self.state[i]] += 1
        assert self.state[0] == PAGE_RESERVED, f"{name}: page 0 not reserved"
        assert counts[PAGE_RESERVED] == 1, f"{name}: reserved pages {counts[PAGE_RESERVED]}"
        assert counts[PAGE_PENDING] == 0, f"{name}: pending pages outside free()"
        assert (
            counts[PAGE_ALLOCATED] + counts[PAGE_CACHED] == self.n_allocated
        ), f"{name}: n_allocated drifted"
        assert counts[PAGE_HELD] == self.n_held, f"{name}: n_held drifted"
        assert counts[PAGE_FREE] == self.free_pages_count(), f"{name}: free count drifted"
        assert 0 <= self.head <= self.tail <= 2 * <int64_t>self.num_pages, f"{name}: head/tail"
        for i in range(self.num_pages + 1):
            assert (
                (self.freebits[i >> 6] >> (i & 63)) & 1) == (self.state[i] == PAGE_FREE
            ), f"{name}: free bit of page {i}"
        seen = set()
        for i in range(self.head, self.tail):
            p = self.pages[i]
            assert self.state[p] == PAGE_FREE and p not in seen, f"{name}: free list page {p}"
            seen.add(p)
            if self.need_sort and i > self.head:
                assert self.pages[i - 1] < p, f"{name}: free list not sorted at {i}"
        for i in range(self.n_release):
            p = self.release[i]
            assert self.state[p] == PAGE_FREE and p not in seen, f"{name}: release page {p}"
            seen.add(p)
        for i in range(self.n_held):
            assert self.state[self.held[i]] == PAGE_HELD, f"{name}: held page {self.held[i]}"
        assert self.n_held == 0 or self.group_depth > 0, f"{name}: held pages, no group"

    def _allocated_pages(self):
        cdef int32_t i
        return np.asarray(
            [i for i in range(self.num_pages + 1)
             if self.state[i] == PAGE_ALLOCATED or self.state[i] == PAGE_CACHED],
            dtype=np.int32,
        )



cdef void _pages_to_slots(int32_t* o, const int32_t* pages, int32_t n_pages,
                          int32_t ps) noexcept:
    """Write the slots of pages[0:n_pages] to o (n_pages * ps of them)."""
    cdef int32_t i, j, base
    if ps == 1:
        copy32(o, pages, n_pages)
    else:
        for i in range(n_pages):
            base = pages[i] * ps
            for j in range(ps):
                o[i * ps + j] = base + j


cdef cnp.ndarray _prefix_slots(PageCore core, object prefix):
    """``alloc``'s *prefix* as a 1-D C-contiguous int32 array (a view when it is one), each
    slot inside the pool (``[page_size, size + page_size)``: not the padding page), else
    ``InvalidValueError``. One vectorised pass over the prefix for its bounds. It does not
    check who owns the slots: reading each one's state byte, scattered over the pool, cost
    1.4 us a request on the issue-2 workload, more than the copy it saves."""
    cdef cnp.ndarray arr = _as_int32_slots(prefix, InvalidValueError, "prefix")
    cdef const int32_t* p = <const int32_t*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(arr, 0)
    cdef int32_t lo = core.page_size
    cdef uint32_t span = <uint32_t>(core.num_pages * core.page_size)   # slots lo..lo+span-1
    i = first_outside(p, n, lo, span)
    if i < n:
        raise InvalidValueError(
            f"prefix: slot {p[i]} is outside the pool's slots [{lo}, {lo + span})"
        )
    return arr


cdef cnp.ndarray _alloc_result(PageCore core, cnp.ndarray prefix, int32_t need, Py_ssize_t* k):
    """The result array of ``alloc(n, prefix)`` (*prefix* checked by ``_prefix_slots``, or
    None): the prefix copied to its head (its length in k[0]), room for ``need`` pages
    after it. Made before any slot changes hands, so that a failure here changes nothing."""
    cdef cnp.ndarray out
    k[0] = 0 if prefix is None else cnp.PyArray_DIM(prefix, 0)
    out = _empty_int32(k[0] + <Py_ssize_t>need * core.page_size)
    if k[0]:
        copy32(<int32_t*>cnp.PyArray_DATA(out), <const int32_t*>cnp.PyArray_DATA(prefix), k[0])
    return out


def _check_ints(str name, object arr, lo, hi):
    """``InvalidValueError`` unless the numpy array *arr* (any shape; empty passes) holds
    integers in ``[lo, hi)``: an integer dtype, or the object array of exact ints that
    ``_integer_array`` makes of ints past 64 bits. Shared with memory_pool's slot checks."""
    if arr.size == 0:
        return
    if arr.dtype == object and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.flat
    ):
        for v in arr.flat:
            if not lo <= v < hi:
                raise InvalidValueError(f"{name}: slot {v} is outside [{lo}, {hi})")
        return
    if arr.dtype.kind not in "iu":
        raise InvalidValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.min() < lo or arr.max() >= hi:
        bad = arr[(arr < lo) | (arr >= hi)].flat[0]
        raise InvalidValueError(f"{name}: slot {bad} is outside [{lo}, {hi})")


cdef int _check_fresh(object allocator, object core) except -1:
    """__init__ runs once: calling it again would forget every allocated slot (their
    owners would then free slots the allocator hands out again); clear() frees them all."""
    if core is not None:
        raise AlreadyInitializedError(
            f"{type(allocator).__name__} is already initialized; call clear() to free every slot"
        )
    return 0


cdef int _not_initialized(object allocator) except -1:
    """What every public call of an allocator without its page core raises: __init__ never
    ran (``__new__``, a subclass that skipped ``super().__init__()``) or it raised."""
    raise NotInitializedError(
        f"{type(allocator).__name__} has no slots: its __init__ did not run to completion"
    )


cdef inline PageCore _live_core(TokenToKVPoolAllocator a):
    """a's page core, or NotInitializedError: the check every public call makes."""
    if a.core is None:
        _not_initialized(a)
    return a.core


cdef object _allocated_mask(PageCore core, int32_t page_size, object indices,
                            bint cached_only=False):
    """is_allocated of both allocators: a flat boolean mask, True where the slot lies in an
    allocated page (a caller's or a prefix cache's; with `cached_only`, a prefix cache's);
    any integer is a fair question; slots outside the pool are False.
    ``InvalidValueError`` for anything but integers (a float is never rounded to a slot)."""
    arr = _integer_array(indices).reshape(-1)
    if arr.dtype == object:  # ints beyond 64 bits: outside the pool (-1 stands for them)
        arr = np.array([x if -(1 << 63) <= x < (1 << 63) else -1 for x in arr], dtype=np.int64)
    # uint64 from 2**63 wraps negative: outside the pool too
    cdef cnp.ndarray a64 = np.require(arr, np.int64, ["C", "A"])  # read as int64_t: aligned
    cdef cnp.ndarray out = np.empty(cnp.PyArray_SIZE(a64), dtype=np.bool_)
    cdef const int64_t* v = <const int64_t*>cnp.PyArray_DATA(a64)
    cdef uint8_t* o = <uint8_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t i
    cdef int64_t ps = page_size, last = core.num_pages
    cdef uint8_t st
    # read the page states in C, holding the GIL: numpy's gather releases it on large
    # arrays, and another thread's alloc or free would then show in half the answer
    for i in range(cnp.PyArray_SIZE(a64)):
        st = core.state[v[i] // ps] if v[i] >= ps and v[i] // ps <= last else PAGE_FREE
        o[i] = st == PAGE_CACHED or (st == PAGE_ALLOCATED and not cached_only)
    return out


cdef int _refuse_clear_while_cached(PageCore core, int32_t page_size) except -1:
    """clear() of either allocator: AllocatorStateError while a prefix cache holds slots (it
    would keep handing them out as cached KV after they were handed out again)."""
    cdef int32_t i, held = 0
    for i in range(core.num_pages + 1):
        held += core.state[i] == PAGE_CACHED
    if held:
        raise AllocatorStateError(
            f"clear(): a prefix cache holds {held * page_size} slots of this pool; "
            "reset() the cache (or drop it) first"
        )
    return 0


cdef object _size_arg(str name, object value, int minimum):
    """A constructor's size argument: an int (not a float, not a bool) in [minimum, 2**31),
    else ``InvalidValueError``."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidValueError(f"{name}: expected an int >= {minimum}, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InvalidValueError(
            f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r:.60}"
        ) from None
    if not minimum <= value <= 0x7FFFFFFF:
        raise InvalidValueError(f"{name}: expected an int in [{minimum}, 2**31), got {value}")
    return value


cdef bint _flag_arg(str name, object value) except -1:
    """A constructor's on/off argument: True or False (numpy's too), else
    ``InvalidValueError`` (``need_sort="no"`` would otherwise read as on)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidValueError(f"{name}: expected True or False, got {type(value).__name__} {value!r:.60}")
    return bool(value)


cdef int32_t _check_alloc_size(object n, int32_t ps) except -1:
    cdef int overflow = 0
    cdef long long x
    if PyLong_CheckExact(n):  # the common case, in C
        x = PyLong_AsLongLongAndOverflow(n, &overflow)
        if not overflow and 0 <= x <= 0x7FFFFFFF and x % ps == 0:
            return <int32_t>(x // ps)
    if isinstance(n, bool):  # free(True) is refused too: a bool is not a slot count
        raise TypeError("n: expected an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__} {n!r:.60}") from None
    if n < 0:
        raise InvalidValueError(f"n: cannot allocate {n} slots")
    if n % ps:
        raise InvalidValueError(f"n: {n} is not a whole number of pages (page_size={ps})")
    return <int32_t>(n // ps) if n <= 0x7FFFFFFF else 0x7FFFFFFF


cdef class TokenToKVPoolAllocator:
    """TokenToKVPoolAllocator(size, page_size=1, need_sort=True)\n--\n
    Hands out KV slots ``1..size`` (slot 0 is the padding slot, never handed out).

    With ``page_size`` P > 1 the unit is the page: ``size`` is cut to whole pages, page 0
    (slots ``0..P-1``) is the padding page, and the slots handed out are ``P..size+P-1``
    (pages ``1..size // P``), so a KV buffer needs ``size + P`` rows (``KVPool`` sizes
    itself so).

    ``alloc(n)`` returns ``n`` slots as a fresh 1-D ``np.int32`` array that the caller then
    owns, or ``None`` when fewer than ``n`` slots are available (nothing changes then);
    ``alloc(n, prefix=m.indices)`` returns the prefix's slots (copied, owners unchanged)
    followed by the ``n`` new ones, the value of a request's insert in one array. With
    ``page_size > 1`` it hands out whole pages: ``n`` must be a multiple of ``page_size``
    and each run of ``page_size`` slots is one page, contiguous. ``free(indices)`` gives
    slots back (numpy array of any integer dtype, list, int or jax array; int32 numpy is the
    fast path): they are the allocator's again. Slots a prefix cache took in ``insert`` are
    not the caller's to free (``InvalidFreeError``): the cache frees them. With pages, a
    freed slot frees its whole page. A slot that is not the caller's to free (free already,
    a cache's, padding, out of range, or with ``page_size`` 1 listed twice) raises
    ``InvalidFreeError``; indices that are not slot ids at all (floats, bools, a 2-D array)
    raise ``InvalidValueError``. Both are ``ValueError`` and free nothing of that call. With
    ``need_sort`` (default) freed slots are handed out again lowest first, once the current
    free list runs out. Each call is atomic with respect to Python threads (see the module
    docstring).
    """

    def __reduce_ex__(self, protocol):
        return _reduce_owner(self, TokenToKVPoolAllocator)

    def __reduce__(self):
        _cannot_pickle(self)

    def __init__(self, size, page_size=1, need_sort=True):
        _check_fresh(self, self.core)
        page_size = _size_arg("page_size", page_size, 1)
        size = _size_arg("size", size, 0)
        need_sort = _flag_arg("need_sort", need_sort)
        core = PageCore(size // page_size, page_size, need_sort)
        # again: the arguments' __index__ (Python code) may have run __init__ to completion
        _check_fresh(self, self.core)
        self.core = core
        self.size = self.core.num_pages * page_size
        self.page_size = page_size

    @property
    def need_sort(self):
        return _live_core(self).need_sort

    @property
    def num_pages(self):
        return _live_core(self).num_pages

    def available_size(self):
        """Slots that ``alloc`` can hand out now (slots freed inside an open group wait)."""
        return _live_core(self).free_pages_count() * self.page_size

    def alloc(self, n, prefix=None):
        """``n`` fresh slots (1-D ``np.int32``, caller-owned) or ``None`` if unavailable.

        With *prefix* (slots, e.g. a match's ``MatchResult.indices``) the one array returned
        is ``prefix`` followed by the ``n`` fresh slots: the value a request's ``insert``
        takes, with no ``np.concatenate``. Only the ``n`` fresh slots change hands (they
        are the caller's); the prefix's keep their owner, the cache or the caller. The
        prefix is copied as given: that its slots are still allocated is the caller's to
        ensure, as with ``np.concatenate`` (lock the match's node before any ``evict``,
        else the evict may free them and this very call hand them out again). A prefix
        slot outside the pool's slots raises ``InvalidValueError`` and nothing changes,
        whether or not ``n`` slots are free."""
        cdef PageCore core = _live_core(self)
        cdef int32_t need = _check_alloc_size(n, self.page_size)
        cdef cnp.ndarray pre = None if prefix is None else _prefix_slots(core, prefix)
        cdef cnp.ndarray out
        cdef int32_t* pages
        cdef Py_ssize_t k
        if need > core.free_pages_count():
            return None
        # the result array first: if it cannot be made, no slot has changed hands
        out = _alloc_result(core, pre, need, &k)
        pages = core.take_pages(need)
        if pages == NULL:  # defensive: only Python code run by making the array could
            return None    # have taken the slots (numpy arrays do not start the collector)
        _pages_to_slots(<int32_t*>cnp.PyArray_DATA(out) + k, pages, need, self.page_size)
        return out

    def free(self, indices):
        """Return *indices* to the pool. A slot not the caller's to free raises
        ``InvalidFreeError``, indices that are not slot ids ``InvalidValueError``; either
        way nothing is freed."""
        _live_core(self)
        cdef cnp.ndarray arr = _as_int32_slots(indices)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        if n == 0:
            return
        self.free_c(<const int32_t*>cnp.PyArray_DATA(arr), n, PAGE_ALLOCATED)

    cdef int free_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1:
        cdef PageCore core = _live_core(self)
        if self.page_size == 1:
            core.free_slots(data, n, owner)
        else:
            core.commit(core.scratch, core.collect(data, n, owner))
        return 0

    cdef int adopt_c(self, const int32_t* data, Py_ssize_t n) except -1:
        return _live_core(self).adopt(data, n)

    cdef void disown_c(self, const int32_t* data, Py_ssize_t n) noexcept:
        if self.core is not None:
            self.core.set_owner(data, n, PAGE_ALLOCATED)

    def free_group_begin(self):
        """Hold back frees until the matching ``free_group_end()`` (groups nest).

        Frees inside the group are still validated at once; the slots only become
        allocatable again when the outermost group ends.
        """
        cdef PageCore core = _live_core(self)
        core.group_depth += 1

    def free_group_end(self):
        """Close a group; when the outermost closes, its freed slots become allocatable.

        Raises ``AllocatorStateError`` without an open group."""
        cdef PageCore core = _live_core(self)
        if core.group_depth <= 0:
            raise AllocatorStateError("free_group_end() without free_group_begin()")
        core.group_depth -= 1
        if core.group_depth == 0:
            core.end_group()

    def merge_and_sort_free(self):
        """Fold pending frees into the free list, which becomes ascending."""
        _live_core(self).merge()

    def clear(self):
        """Every slot free again (``1..size``; with pages, ``P..size+P-1``): slots callers
        held are the allocator's now (an open free group is dropped).

        Refused (``AllocatorStateError``, nothing changes) while a prefix cache holds slots
        of this pool: it would keep handing them out as cached KV after they were handed
        out again. ``reset()`` the cache (or drop it) first."""
        cdef PageCore core = _live_core(self)
        _refuse_clear_while_cached(core, self.page_size)
        core.reset()

    def is_allocated(self, indices):
        """Boolean mask: which of *indices* are allocated slots (owned by a caller, or by a
        prefix cache that took them in insert)."""
        return _allocated_mask(_live_core(self), self.page_size, indices)

    def is_cached(self, indices):
        """Boolean mask: which of *indices* a prefix cache owns (a ``RadixCache`` or
        ``MambaRadixCache`` over this allocator took them in ``insert``; they come back when
        it evicts them, and ``free`` refuses them meanwhile). Over an instance of a subclass
        a cache books nothing (it calls the subclass's own ``free``): all False."""
        return _allocated_mask(_live_core(self), self.page_size, indices, True)

    def _check_invariants(self):
        _live_core(self)._check("allocator")

    def _merge_counts(self):
        """Test hook: merges so far by path (already sorted, radix sort, bitmap scan)."""
        cdef PageCore core = _live_core(self)
        return tuple(core.merges[i] for i in range(3))

    def __repr__(self):
        if self.core is None:
            return "TokenToKVPoolAllocator(uninitialized)"
        return (
            f"TokenToKVPoolAllocator(size={self.size}, page_size={self.page_size}, "
            f"available={self.available_size()})"
        )


cdef class SWATokenToKVPoolAllocator:
    """SWATokenToKVPoolAllocator(size, swa_size, page_size=1, need_sort=True)\n--\n
    Allocates a full-attention slot and a sliding-window slot per token.

    ``alloc(n)`` returns ``n`` full slots (``np.int32``, caller-owned) and records, for each,
    the SWA slot allocated with it (``translate_loc_from_full_to_swa``); ``None`` when
    either side cannot serve ``n`` (nothing changes). ``alloc(n, prefix=...)``: the
    prefix's full slots, copied, then the ``n`` new ones. ``alloc(n, swa=False)`` takes
    full slots alone (mapped to 0, only the full side need serve ``n``), and
    ``alloc_swa(full)`` attaches SWA slots to such caller-owned full slots later, when
    their KV is about to be written. ``free(full)`` frees both sides;
    ``free_swa(full)`` frees only the SWA side of still-allocated full slots (slots whose
    SWA side is already gone, or was never attached, are skipped, so a tombstoned node can
    later be freed whole).
    Full slots that are not allocated raise ``InvalidFreeError`` in both, indices that are
    not slot ids ``InvalidValueError``; either way nothing is freed.
    ``available_size()`` is the smaller side. Each call is atomic with respect to Python
    threads (see the module docstring).
    """

    def __reduce_ex__(self, protocol):
        return _reduce_owner(self, SWATokenToKVPoolAllocator)

    def __reduce__(self):
        _cannot_pickle(self)

    def __init__(self, size, swa_size, page_size=1, need_sort=True):
        _check_fresh(self, self.full)
        page_size = _size_arg("page_size", page_size, 1)
        size = _size_arg("size", size, 0)
        swa_size = _size_arg("swa_size", swa_size, 0)
        need_sort = _flag_arg("need_sort", need_sort)
        # everything that can fail first: an __init__ that raises leaves no half allocator
        full = PageCore(size // page_size, page_size, need_sort)
        swa = PageCore(swa_size // page_size, page_size, need_sort)
        mapping = np.zeros((full.num_pages + 1) * page_size, dtype=np.int32)
        # again: the arguments' __index__ (Python code) may have run __init__ to completion
        _check_fresh(self, self.full)
        self.full = full
        self.swa = swa
        self.size = full.num_pages * page_size
        self.swa_size = swa.num_pages * page_size
        self.page_size = page_size
        self._mapping = mapping
        self.mapping = <int32_t*>cnp.PyArray_DATA(mapping)

    cdef int _live(self) except -1:
        """NotInitializedError unless __init__ completed: the check every public call makes."""
        if self.full is None:
            _not_initialized(self)
        return 0

    @property
    def full_to_swa_index_mapping(self):
        """Read-only view: ``mapping[full_slot]`` is its SWA slot, 0 where none.

        It follows the allocator (no copy) and cannot be made writeable: its base is the
        allocator itself, no array, and numpy refuses ``flags.writeable = True`` over a
        base that is not writeable (a writeable base would let a caller re-map slots, and
        ``free`` would then hand back another request's SWA slots)."""
        self._live()
        cdef cnp.npy_intp n = cnp.PyArray_DIM(<cnp.ndarray>self._mapping, 0)
        cdef cnp.ndarray view = cnp.PyArray_SimpleNewFromData(1, &n, cnp.NPY_INT32, self.mapping)
        cnp.PyArray_CLEARFLAGS(view, cnp.NPY_ARRAY_WRITEABLE)
        cnp.set_array_base(view, self)  # keeps the allocator, and so its array, alive
        return view

    def available_size(self):
        return min(self.full_available_size(), self.swa_available_size())

    def full_available_size(self):
        self._live()
        return self.full.free_pages_count() * self.page_size

    def swa_available_size(self):
        self._live()
        return self.swa.free_pages_count() * self.page_size

    def alloc(self, n, prefix=None, swa=True):
        """``n`` fresh full slots (``np.int32``, caller-owned, each with an SWA slot) or
        ``None`` when either side cannot serve ``n`` (nothing changes). *prefix* (full
        slots) as in ``TokenToKVPoolAllocator.alloc``: the result is ``prefix`` then the
        fresh slots, copied as given (full slots inside the pool).

        With ``swa=False`` only the full side is checked and taken: the fresh full slots
        are the caller's with no SWA side (``mapping`` 0, ``translate_loc_from_full_to_swa``
        gives 0) until ``alloc_swa`` attaches one. ``free`` and ``free_swa`` skip the
        missing SWA sides, and so does a prefix cache that takes such slots as a
        tombstone (below ``swa_evicted_seqlen``), so they can go anywhere a full slot
        whose SWA side was freed can. ``swa`` must be True or False (``InvalidValueError``)."""
        self._live()
        cdef bint with_swa = _flag_arg("swa", swa)
        cdef int32_t ps = self.page_size
        cdef int32_t need = _check_alloc_size(n, ps)
        cdef int32_t i, j, fb, sb
        cdef Py_ssize_t k
        cdef cnp.ndarray pre = None if prefix is None else _prefix_slots(self.full, prefix)
        cdef int32_t swa_need = need if with_swa else 0
        if need > self.full.free_pages_count() or swa_need > self.swa.free_pages_count():
            return None
        # the result array first: if it cannot be made, no slot has changed hands
        cdef cnp.ndarray out = _alloc_result(self.full, pre, need, &k)
        if need > self.full.free_pages_count() or swa_need > self.swa.free_pages_count():
            return None  # defensive, as in TokenToKVPoolAllocator.alloc
        cdef int32_t* full_pages = self.full.take_pages(need)
        _pages_to_slots(<int32_t*>cnp.PyArray_DATA(out) + k, full_pages, need, ps)
        if not with_swa:
            return out  # free full pages are mapped to 0 already (freeing one unmaps it)
        cdef int32_t* swa_pages = self.swa.take_pages(need)
        for i in range(need):
            fb = full_pages[i] * ps
            sb = swa_pages[i] * ps
            for j in range(ps):
                self.mapping[fb + j] = sb + j
        return out

    def alloc_swa(self, full_indices):
        """Attach an SWA slot to each of *full_indices* (full slots the caller owns) that
        has none, whole pages (a slot's page gets one SWA page); True when done.

        Ownership: the full slots stay the caller's; the SWA slots attached are the
        caller's too, through them (``free`` or ``free_swa`` of the full slots gives them
        back, and a prefix cache that takes the full slots in ``insert`` takes them too).
        ``False``, and nothing changes, when the SWA side has fewer free pages than the
        pages to attach. Every slot must be the caller's and have no SWA side yet: a slot
        not allocated, a prefix cache's, already having an SWA side (one from ``alloc``, or
        one attached before), the padding slot or out of range, or (page size 1) listed
        twice raise ``InvalidValueError``, as do indices that are not slot ids; nothing
        changes then either. An empty list returns True."""
        self._live()
        cdef cnp.ndarray arr = _as_int32_slots(full_indices, InvalidValueError, "full_indices")
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        if n == 0:
            return True
        return self.alloc_swa_c(<const int32_t*>cnp.PyArray_DATA(arr), n) == 1

    cdef int alloc_swa_c(self, const int32_t* data, Py_ssize_t n) except -1:
        """alloc_swa on data[0:n]: 1 attached, 0 the SWA side is short (nothing changed)."""
        cdef int32_t ps = self.page_size
        cdef int32_t i, j, fb, sb, count, bad = -1
        cdef int32_t* swa_pages
        # the caller's pages, each once, into full.scratch (marked PAGE_PENDING)
        count = self.full.collect(data, n, PAGE_ALLOCATED, True)
        for i in range(count):
            if self.mapping[self.full.scratch[i] * ps] != 0:
                bad = self.full.scratch[i]
                break
        # validation only: the full pages stay the caller's, whatever happens next
        for i in range(count):
            self.full.state[self.full.scratch[i]] = PAGE_ALLOCATED
        if bad >= 0:
            raise InvalidValueError(
                f"full_indices: slot {bad * ps} already has an SWA side (slot "
                f"{self.mapping[bad * ps]})" if ps == 1 else
                f"full_indices: page {bad} (slots {bad * ps}..{bad * ps + ps - 1}) already "
                f"has an SWA side (SWA slots from {self.mapping[bad * ps]})"
            )
        if count > self.swa.free_pages_count():
            return 0
        swa_pages = self.swa.take_pages(count)
        for i in range(count):
            fb = self.full.scratch[i] * ps
            sb = swa_pages[i] * ps
            for j in range(ps):
                self.mapping[fb + j] = sb + j
        return 1

    cdef int32_t _swa_pages_of(self, int32_t count) noexcept:
        """Unmap the full pages in full.scratch[0:count]; their live SWA pages go to
        swa.scratch. Returns how many."""
        cdef int32_t i, fb, s, k = 0
        cdef int32_t ps = self.page_size
        for i in range(count):
            fb = self.full.scratch[i] * ps
            s = self.mapping[fb]
            if s != 0:
                self.swa.scratch[k] = s // ps
                k += 1
                memset(self.mapping + fb, 0, ps * sizeof(int32_t))
        return k

    def free(self, indices):
        """Free full slots and their SWA slots; ``InvalidFreeError``: nothing freed. Slots a
        prefix cache took in ``insert`` are refused: the cache frees them."""
        self._live()
        cdef cnp.ndarray arr = _as_int32_slots(indices)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        if n == 0:
            return
        self.free_c(<const int32_t*>cnp.PyArray_DATA(arr), n, PAGE_ALLOCATED)

    cdef int free_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1:
        self._live()
        cdef int32_t count = self.full.collect(data, n, owner)
        cdef int32_t k = self._swa_pages_of(count)
        self.full.commit(self.full.scratch, count)
        self.swa.commit(self.swa.scratch, k)
        return 0

    def free_swa(self, indices):
        """Free only the SWA side of allocated full slots; the full slots stay the caller's.

        Full slots whose SWA side was already freed (or never attached: ``alloc(n,
        swa=False)``) are skipped. A full slot that is not
        allocated, or that a prefix cache took (it frees their SWA side itself), raises
        ``InvalidFreeError`` and nothing is freed.
        """
        self._live()
        cdef cnp.ndarray arr = _as_int32_slots(indices)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        if n == 0:
            return
        self.free_swa_c(<const int32_t*>cnp.PyArray_DATA(arr), n, PAGE_ALLOCATED)

    cdef int free_swa_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1:
        self._live()
        cdef int32_t count = self.full.collect(data, n, owner)
        cdef int32_t i
        cdef int32_t k = self._swa_pages_of(count)
        # Validation only: the full pages stay their owner's.
        for i in range(count):
            self.full.state[self.full.scratch[i]] = owner
        self.swa.commit(self.swa.scratch, k)
        return 0

    cdef int adopt_c(self, const int32_t* data, Py_ssize_t n) except -1:
        self._live()
        return self.full.adopt(data, n)

    cdef void disown_c(self, const int32_t* data, Py_ssize_t n) noexcept:
        if self.full is not None:
            self.full.set_owner(data, n, PAGE_ALLOCATED)

    def translate_loc_from_full_to_swa(self, full_indices):
        """SWA slots of *full_indices* (``np.int32``, same shape; 0 where the SWA side is
        freed). ``InvalidValueError`` for non-integer slots or slots outside the pool (a
        negative slot would otherwise index from the end)."""
        self._live()
        idx = _integer_array(full_indices, "full_indices")
        if idx.size == 0:
            return np.zeros(idx.shape, dtype=np.int32)
        _check_ints("full_indices", idx, 0, len(self._mapping))
        # idx is our own copy (_integer_array), read as int64 (a copy if it is not): Python
        # code in the calls here (a collection's callbacks) cannot change it
        cdef cnp.ndarray i64 = np.require(idx, np.int64, ["C", "A"])
        cdef cnp.ndarray out = np.empty((<object>i64).shape, dtype=np.int32)
        cdef const int64_t* src = <const int64_t*>cnp.PyArray_DATA(i64)
        cdef int32_t* dst = <int32_t*>cnp.PyArray_DATA(out)
        cdef Py_ssize_t i
        cdef int64_t v, size = cnp.PyArray_DIM(<cnp.ndarray>self._mapping, 0)
        # a C gather holding the GIL (numpy's releases it on large arrays: a free in
        # another thread would then show in part of the answer). Each slot is bounded
        # again as the gather reads it: a guard in C beside the check above in numpy
        for i in range(cnp.PyArray_SIZE(out)):
            v = src[i]
            if v < 0 or v >= size:
                raise InvalidValueError(
                    f"full_indices: slot {v} is outside [0, {size}): the array changed "
                    "while the call ran"
                )
            dst[i] = self.mapping[v]
        return out

    def free_group_begin(self):
        self._live()
        self.full.group_depth += 1
        self.swa.group_depth += 1

    def free_group_end(self):
        """Close a group (both sides); see ``TokenToKVPoolAllocator.free_group_end``."""
        self._live()
        if self.full.group_depth <= 0:
            raise AllocatorStateError("free_group_end() without free_group_begin()")
        self.full.group_depth -= 1
        self.swa.group_depth -= 1
        if self.full.group_depth == 0:
            self.full.end_group()
            self.swa.end_group()

    def merge_and_sort_free(self):
        self._live()
        self.full.merge()
        self.swa.merge()

    def clear(self):
        """Every slot of both sides free again; refused (``AllocatorStateError``) while a
        prefix cache holds slots, as ``TokenToKVPoolAllocator.clear``."""
        self._live()
        _refuse_clear_while_cached(self.full, self.page_size)
        self.full.reset()
        self.swa.reset()
        # in C, with the GIL held: numpy's fill of a large array lets other threads run,
        # and an alloc between the resets and the fill would lose its SWA mapping
        memset(self.mapping, 0, <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>self._mapping))

    def is_allocated(self, indices):
        """Boolean mask: which of *indices* are allocated full slots (a caller's or a prefix
        cache's)."""
        self._live()
        return _allocated_mask(self.full, self.page_size, indices)

    def is_cached(self, indices):
        """Boolean mask: which of *indices* are full slots a prefix cache owns."""
        self._live()
        return _allocated_mask(self.full, self.page_size, indices, True)

    def _check_invariants(self):
        cdef int32_t p, s
        cdef int32_t ps = self.page_size
        self._live()
        self.full._check("full")
        self.swa._check("swa")
        mapped = 0
        swa_pages = set()
        for p in range(self.full.num_pages + 1):
            s = self.mapping[p * ps]
            for j in range(ps):
                expect = (s + j) if s else 0
                assert self.mapping[p * ps + j] == expect, f"mapping of page {p} not a page"
            if s:
                assert self.full.state[p] in (PAGE_ALLOCATED, PAGE_CACHED), (
                    f"freed full page {p} mapped"
                )
                assert self.swa.state[s // ps] == PAGE_ALLOCATED, f"swa page {s // ps} free"
                assert s // ps not in swa_pages, f"swa page {s // ps} mapped twice"
                swa_pages.add(s // ps)
                mapped += 1
        assert mapped == self.swa.n_allocated, "swa pages allocated != full pages mapped"

    def __repr__(self):
        if self.full is None:
            return "SWATokenToKVPoolAllocator(uninitialized)"
        return (
            f"SWATokenToKVPoolAllocator(size={self.size}, swa_size={self.swa_size}, "
            f"page_size={self.page_size}, available={self.available_size()})"
        )


def _copy_set_mode(int mode):
    """Which copy this module's slot and token copies take where glibc's is slow (dst 1-63
    bytes past src modulo 4 KiB, ``_copy.pxd``): 1 the stepped loop, 0 memcpy, -1 by CPU
    vendor (the default: the loop on AMD x86-64 only). Returns the mode in force before.
    For tests and benchmarks; the radix tree module has its own (``_radix_tree``)."""
    return copy32_set_mode(mode)


def _copy_int32(cnp.ndarray dst not None, cnp.ndarray src not None):
    """Copy ``src`` into ``dst`` with the routine the compiled modules copy slot and token
    arrays with (``_copy.pxd``); for its tests and its benchmark. Both must be 1-D
    C-contiguous native int32 arrays of one length that do not overlap."""
    cdef cnp.ndarray a
    for name, a in (("dst", dst), ("src", src)):
        if not (cnp.PyArray_TYPE(a) == cnp.NPY_INT32 and cnp.PyArray_ISNOTSWAPPED(a)
                and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_IS_C_CONTIGUOUS(a)):
            raise InvalidValueError(f"{name}: expected a 1-D C-contiguous int32 array")
    if not cnp.PyArray_ISWRITEABLE(dst):
        raise InvalidValueError("dst: read-only")
    cdef Py_ssize_t n = cnp.PyArray_DIM(src, 0)
    if cnp.PyArray_DIM(dst, 0) != n:
        raise InvalidValueError(f"dst and src differ in length ({cnp.PyArray_DIM(dst, 0)} != {n})")
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    cdef char* s = <char*>cnp.PyArray_DATA(src)
    if n > 0 and d < s + 4 * n and s < d + 4 * n:
        raise InvalidValueError("dst and src overlap")
    copy32(d, s, n)
