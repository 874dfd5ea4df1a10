# The compiled radix tree behind RadixCache.
#
# Design (see the .pxd for the structs):
# - nodes in one growable array of structs, addressed by slot; a free list recycles slots;
# - a node's key and value (KV slot indices) are C arrays it owns, sized to the node;
# - children are found through one open-addressing hash map keyed by
#   (parent slot, namespace, first page of the child's key), verified by a memcmp;
# - evictable leaves sit in an indexed binary min-heap ordered by (prio, last_access, uid)
#   (prio is the eviction policy's class: constant for LRU, hits for LFU, ...), kept
#   up to date incrementally on every touch/lock/unlock/evict, so evict never walks the tree;
# - every public method runs under the cache's own guard (_enter, below): the GIL alone is
#   not enough, because evict calls back into Python (allocator.free, on_node_evict) and
#   any object allocation may run a finalizer, and either can hand the GIL to another
#   thread in the middle of a call.
#
# A call that raises changes nothing. Bad input is rejected before anything is mutated;
# the capacity a mutation needs (nodes, map entries, heap slots) is reserved before it
# starts. The walk that match and insert share is read-only (_scan): what can still fail
# after it (a node's arrays, sized once the walk knows the match; the allocator's check of
# the slots an insert hands over) runs before the split at the match end, the recency
# updates and the new nodes, which cannot fail.

from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check, PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject, PyTypeObject
from cpython.list cimport PyList_Check
from cpython.set cimport PyFrozenSet_Check
from cpython.tuple cimport PyTuple_Check
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_XDECREF, Py_XINCREF
from posix.unistd cimport usleep
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memset

cimport cython
cimport numpy as cnp
import numpy as np
import os as _os
from decimal import Decimal as _Decimal
from fractions import Fraction as _Fraction
import sys
from hashlib import sha256 as _sha256
from os import urandom as _urandom

from pymllm.mem_cache._allocator cimport (
    PAGE_ALLOCATED,
    PAGE_CACHED,
    PAGE_FREE,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    _sequence_as_list,
    _size_arg,
)
from pymllm.mem_cache._copy cimport copy32, copy32_set_mode, first_outside, move32_down

from pymllm.mem_cache._allocator import _cannot_pickle, _reduce_owner, _refuse_deleted_array
from pymllm.mem_cache.base_prefix_cache import (
    _BOOL_TYPES,
    EvictResult,
    InsertResult,
    MatchResult,
    RadixKey,
    hash_token_ids,
)
from pymllm.mem_cache.errors import (
    AlreadyInitializedError,
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    NotInitializedError,
    ReentrantCallError,
    StaleNodeError,
)

cnp.import_array()

# Which of our allocators books the tree's slots as the cache's (RadixTreeCore._booking_kind).
cdef enum:
    BOOK_PLAIN = 1      # TokenToKVPoolAllocator
    BOOK_SWA = 2        # SWATokenToKVPoolAllocator


#: Valid ``eviction_policy`` names, in the order of the POLICY_* enum.
EVICTION_POLICIES = ("lru", "lfu", "fifo", "priority", "slru")

cdef int64_t TOKEN_LIMIT = 1 << 32


# ---------------------------------------------------------------------------------------
# Memory helpers
# ---------------------------------------------------------------------------------------

cdef int _grow(void** ptr, int64_t* cap, int64_t need, size_t elsize) except -1:
    """Ensure *ptr holds at least `need` elements; doubles capacity, zeroes new memory."""
    cdef int64_t old = cap[0]
    _grow_block(ptr, cap, need, elsize, False)
    if cap[0] > old:
        memset(<char*>ptr[0] + old * elsize, 0, (cap[0] - old) * elsize)
    return 0


# Blocks of 1 MiB and more (the node array, the heaps, the child map's tables: they grow
# with the tree) are mapped from the kernel directly, whatever malloc's settings: a new
# block's pages arrive zeroed as they are first touched, and a block grows by mremap, which
# moves page tables instead of copying (Linux; elsewhere a copy). malloc would copy a block
# it keeps in its heap (under its mmap threshold, up to 32 MiB, or any size where a program
# raised it) into fresh pages: 24 ms for a 29 MB node array on this machine, inside one
# insert.
cdef extern from *:
    """
    #include <sys/mman.h>
    #include <stdint.h>
    #ifndef PYMLLM_BIG_BYTES  /* a sanitizer build sets SIZE_MAX: every block from malloc */
    #define PYMLLM_BIG_BYTES ((size_t)1 << 20)
    #endif

    static void* pymllm_map_pages(size_t nbytes) {
        void* q = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        return q == MAP_FAILED ? NULL : q;
    }

    /* Resize a block of old_bytes (0: p is NULL) to new_bytes > old_bytes; NULL, with the
       old block intact, when out of memory. */
    static void* pymllm_big_resize(void* p, size_t old_bytes, size_t new_bytes) {
        void* q;
        if (new_bytes < PYMLLM_BIG_BYTES)
            return realloc(p, new_bytes);
        if (old_bytes >= PYMLLM_BIG_BYTES) {
    #if defined(__linux__)
            q = mremap(p, old_bytes, new_bytes, MREMAP_MAYMOVE);
            return q == MAP_FAILED ? NULL : q;
    #else
            q = pymllm_map_pages(new_bytes);
            if (q != NULL) {
                memcpy(q, p, old_bytes);
                munmap(p, old_bytes);
            }
            return q;
    #endif
        }
        q = pymllm_map_pages(new_bytes);
        if (q != NULL && p != NULL) {
            memcpy(q, p, old_bytes);
            free(p);
        }
        return q;
    }

    /* A zeroed block of nbytes. */
    static void* pymllm_big_zeroed(size_t nbytes) {
        return nbytes >= PYMLLM_BIG_BYTES ? pymllm_map_pages(nbytes) : calloc(1, nbytes);
    }

    static void pymllm_big_free(void* p, size_t nbytes) {
        if (p == NULL)
            return;
        if (nbytes >= PYMLLM_BIG_BYTES)
            munmap(p, nbytes);
        else
            free(p);
    }
    """
    void* _big_resize "pymllm_big_resize" (void* p, size_t old_bytes, size_t new_bytes) nogil
    void* _big_zeroed "pymllm_big_zeroed" (size_t nbytes) nogil
    void _big_free "pymllm_big_free" (void* p, size_t nbytes) nogil


cdef int _grow_block(void** ptr, int64_t* cap, int64_t need, size_t elsize,
                     bint big) except -1:
    """Ensure *ptr holds at least `need` elements, doubling the capacity; new elements are
    not initialized. `big`: a block that grows with the tree (see above), resized by
    _big_resize and freed by _big_free with its capacity in bytes; else realloc/free."""
    cdef int64_t new_cap = cap[0] if cap[0] > 0 else 16
    cdef void* p
    if need <= cap[0]:
        return 0
    while new_cap < need:
        new_cap *= 2
    if <uint64_t>new_cap > (<uint64_t>-1) // elsize:
        raise MemoryError("allocation size overflows")
    if big:
        p = _big_resize(ptr[0], cap[0] * elsize, new_cap * elsize)
    else:
        p = realloc(ptr[0], new_cap * elsize)
    if p == NULL:
        raise MemoryError(f"could not grow a buffer to {new_cap} elements")
    ptr[0] = p
    cap[0] = new_cap
    return 0


cdef inline int _big_regrow(void** ptr, int64_t* cap, int64_t need, size_t elsize) except -1:
    return _grow_block(ptr, cap, need, elsize, True)


# ---------------------------------------------------------------------------------------
# Hashing and comparison of token pages
# ---------------------------------------------------------------------------------------

# The garbage collector is held off while any cache call runs (a count over every cache of
# the interpreter, under the GIL): a collection there would run finalizers inside the call,
# and a finalizer that unlocks a request's node (dec_lock_ref) would be refused as
# re-entrant, its unlock lost. Collection resumes when the outermost call returns, if the
# collector was on when the first began (PyGC_Disable / PyGC_Enable, Python 3.10+); a
# gc.disable() or gc.enable() made in between (by a callback, or by another thread while a
# call waits in one) cannot be told from ours and is undone then. Finalizers that reference
# counting runs (a callback dropping the last reference) still run where that happens.
cdef extern from "Python.h":
    int PyGC_Disable()
    int PyGC_Enable()
    int PyErr_CheckSignals()

cdef int _gc_holds = 0
cdef int _gc_was_enabled = 0


cdef inline void _hold_gc() noexcept:
    global _gc_holds, _gc_was_enabled
    if _gc_holds == 0:
        _gc_was_enabled = PyGC_Disable()
    _gc_holds += 1


cdef inline void _release_gc() noexcept:
    global _gc_holds
    _gc_holds -= 1
    if _gc_holds == 0:
        if _gc_was_enabled:
            PyGC_Enable()
        else:  # off when the first call began: a callback's gc.enable() is undone too
            PyGC_Disable()


cdef bint _BIG_ENDIAN = sys.byteorder == "big"


# A hint to start loading p's cache line; PYMLLM_LIKELY marks the branch the hot loops take.
cdef extern from *:
    """
    #if defined(__GNUC__)
    #define pymllm_prefetch(p) __builtin_prefetch((const void*)(p))
    #define PYMLLM_LIKELY(x) __builtin_expect(!!(x), 1)
    #else
    #define pymllm_prefetch(p) ((void)(p))
    #define PYMLLM_LIKELY(x) (x)
    #endif
    """
    void _prefetch "pymllm_prefetch" (const void* p) noexcept nogil


# The child map's hash: SipHash-1-3 (the rounds Python's own str hash uses) keyed with 128
# random bits drawn for each tree. With an unkeyed hash anyone could compute offline which
# bucket a prompt's first page lands in, and crafted prompts that all land together would
# make every lookup, insert and removal near them walk the whole cluster (a review measured
# 150 us an insert at 1e5 such children, and one evict of them 3.7 s). The message is the
# bytes of (parent, namespace, the page's tokens), each 4 bytes little-endian.
cdef extern from *:
    """
    #define PYMLLM_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
    #define PYMLLM_SIPROUND                                                        \
        do {                                                                        \
            v0 += v1; v1 = PYMLLM_ROTL(v1, 13); v1 ^= v0; v0 = PYMLLM_ROTL(v0, 32); \
            v2 += v3; v3 = PYMLLM_ROTL(v3, 16); v3 ^= v2;                           \
            v0 += v3; v3 = PYMLLM_ROTL(v3, 21); v3 ^= v0;                           \
            v2 += v1; v1 = PYMLLM_ROTL(v1, 17); v1 ^= v2; v2 = PYMLLM_ROTL(v2, 32); \
        } while (0)

    /* SipHash-c-d of the 8 + 4 * ntok bytes (first, t[0], ..., t[ntok - 1]), each word
       little-endian: `first` is the message's first 8 bytes. */
    static inline uint64_t pymllm_siphash(uint64_t k0, uint64_t k1, uint64_t first,
                                          const uint32_t* t, int64_t ntok, int c, int d) {
        uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
        uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
        uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
        uint64_t v3 = k1 ^ 0x7465646279746573ULL;
        uint64_t m, b = ((uint64_t)(8 + 4 * ntok)) << 56;
        int64_t i;
        int r;
        m = first;
        v3 ^= m;
        for (r = 0; r < c; r++) PYMLLM_SIPROUND;
        v0 ^= m;
        for (i = 0; i + 2 <= ntok; i += 2) {
            m = (uint64_t)t[i] | ((uint64_t)t[i + 1] << 32);
            v3 ^= m;
            for (r = 0; r < c; r++) PYMLLM_SIPROUND;
            v0 ^= m;
        }
        if (i < ntok)
            b |= (uint64_t)t[i];
        v3 ^= b;
        for (r = 0; r < c; r++) PYMLLM_SIPROUND;
        v0 ^= b;
        v2 ^= 0xff;
        for (r = 0; r < d; r++) PYMLLM_SIPROUND;
        return v0 ^ v1 ^ v2 ^ v3;
    }
    """
    uint64_t _siphash "pymllm_siphash" (uint64_t k0, uint64_t k1, uint64_t first,
                                        const uint32_t* t, int64_t ntok, int c, int d) noexcept nogil


cdef inline uint64_t _page_hash(const uint64_t* key, nid_t parent, int32_t ns, const tok_t* t,
                                int64_t ntok) noexcept nogil:
    """The child map's hash of a page under (parent, ns), keyed by the tree's `key`."""
    return _siphash(key[0], key[1], <uint64_t>(<uint32_t>parent) | (<uint64_t>(<uint32_t>ns) << 32),
                    t, ntok, 1, 3)


def _siphash_for_test(uint64_t k0, uint64_t k1, uint64_t first, tokens, int c=1, int d=3):
    """Test hook: SipHash-c-d of the bytes (first, tokens...) as _page_hash computes it; for
    a 2-D `tokens`, of each row (a uint64 array)."""
    cdef cnp.ndarray arr = np.ascontiguousarray(tokens, dtype=np.uint32)
    cdef const uint32_t* p = <const uint32_t*>cnp.PyArray_DATA(arr)
    cdef int64_t i, rows, width
    cdef uint64_t[::1] out
    if arr.ndim == 1:
        return _siphash(k0, k1, first, p, arr.shape[0], c, d)
    rows, width = arr.shape[0], arr.shape[1]
    result = np.empty(rows, dtype=np.uint64)
    out = result
    for i in range(rows):
        out[i] = _siphash(k0, k1, first, p + i * width, width, c, d)
    return result


# Index of the first token where a and b differ (n if none): 64-token blocks are compared
# by a branch-free XOR/OR reduction the compiler vectorizes (AVX2 and baseline clones, as
# _copy.pxd's pymllm_first_outside), the block that differs is then searched token by token.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
    __attribute__((target_clones("avx2", "default")))
    #endif
    static int64_t pymllm_first_diff(const uint32_t* a, const uint32_t* b, int64_t n) {
        int64_t i = 0;
        size_t j;
        for (; i + 64 <= n; i += 64) {
            const uint32_t* pa = a + i;
            const uint32_t* pb = b + i;
            uint32_t acc = 0;
            for (j = 0; j < 64; j++)
                acc |= pa[j] ^ pb[j];
            if (acc)
                break;
        }
        for (; i < n; i++)
            if (a[i] != b[i])
                return i;
        return n;
    }
    """
    int64_t _first_diff "pymllm_first_diff" (const tok_t* a, const tok_t* b, int64_t n) noexcept nogil


# 64-bit tokens or indices narrowed to 32 bits while checked against a power-of-two limit:
# 64-entry blocks whose values are ORed, the OR then shifted (branch-free, so the compiler
# vectorizes both the check and the narrowing store), the bad block then searched entry by
# entry. Returns the index of the first entry with p[i] >> shift != 0 (as unsigned: a
# negative int64 is out of range too), n if none; out[0:that index] holds the entries.
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
    __attribute__((target_clones("avx2", "default")))
    #endif
    static int64_t pymllm_narrow64(const uint64_t* p, int64_t n, int shift, uint32_t* out) {
        int64_t i = 0;
        size_t j;
        for (; i + 64 <= n; i += 64) {
            const uint64_t* q = p + i;
            uint32_t* o = out + i;
            uint64_t acc = 0;
            for (j = 0; j < 64; j++) {
                acc |= q[j];
                o[j] = (uint32_t)q[j];
            }
            if (acc >> shift)
                break;
        }
        for (; i < n; i++) {
            if (p[i] >> shift)
                return i;
            out[i] = (uint32_t)p[i];
        }
        return n;
    }
    """
    int64_t _narrow64 "pymllm_narrow64" (const uint64_t* p, int64_t n, int shift, uint32_t* out) noexcept nogil


cdef inline bint _native_words(cnp.ndarray arr) noexcept:
    """A C-contiguous, aligned, native-order array of 8-byte integers (read as uint64_t)."""
    return (cnp.PyArray_ITEMSIZE(arr) == 8 and cnp.PyArray_ISNOTSWAPPED(arr)
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr))


cdef inline int64_t _common_positions(const tok_t* a, const tok_t* b, int64_t npos,
                                      int32_t width) noexcept nogil:
    """Number of leading positions on which a and b agree (npos at most)."""
    return _first_diff(a, b, npos * width) // width


# ---------------------------------------------------------------------------------------
# Child map: open addressing, linear probing, power-of-two capacity, explicit tombstones,
# grown incrementally (see ChildMap in the .pxd)
# ---------------------------------------------------------------------------------------

cdef MapEntry* _table_alloc(uint64_t capacity) except NULL:
    """A table of `capacity` empty buckets (MAP_EMPTY is 0)."""
    cdef void* p = _big_zeroed(capacity * sizeof(MapEntry))
    if p == NULL:
        raise MemoryError(f"child map: cannot allocate {capacity} buckets")
    return <MapEntry*>p


cdef void _table_free(MapEntry* t, uint64_t capacity) noexcept:
    _big_free(t, capacity * sizeof(MapEntry))


cdef int _map_init(ChildMap* m, uint64_t capacity) except -1:
    m.entries = _table_alloc(capacity)   # all MAP_EMPTY
    m.mask = capacity - 1
    m.used = 0
    m.filled = 0
    m.old = NULL
    m.old_mask = 0
    m.old_next = 0
    return 0


cdef void _map_release(ChildMap* m) noexcept:
    _table_free(m.entries, m.mask + 1)
    m.entries = NULL
    _table_free(m.old, m.old_mask + 1)
    m.old = NULL


cdef inline nid_t _table_find(const MapEntry* t, uint64_t mask, const Node* nodes,
                              nid_t parent, int32_t ns, const tok_t* page, int64_t ntok,
                              uint64_t h) noexcept nogil:
    cdef uint64_t i = h & mask
    cdef const MapEntry* e
    cdef const Node* c
    while True:
        e = &t[i]
        if e.child == MAP_EMPTY:
            return NIL
        if e.child > 0 and e.h == h and e.parent == parent:
            c = &nodes[e.child]
            if c.ns == ns and memcmp(c.key, page, ntok * sizeof(tok_t)) == 0:
                return e.child
        i = (i + 1) & mask


cdef inline nid_t _map_find(const ChildMap* m, const Node* nodes, nid_t parent, int32_t ns,
                            const tok_t* page, int64_t ntok, uint64_t h) noexcept nogil:
    cdef nid_t found = _table_find(m.entries, m.mask, nodes, parent, ns, page, ntok, h)
    if found == NIL and m.old != NULL:
        found = _table_find(m.old, m.old_mask, nodes, parent, ns, page, ntok, h)
    return found


cdef inline bint _bucket_put(MapEntry* t, uint64_t mask, nid_t parent, nid_t child,
                             uint64_t h) noexcept nogil:
    """Put an entry in table t; returns whether it took an empty bucket (not a deleted one)."""
    cdef uint64_t i = h & mask
    cdef bint was_empty
    while t[i].child > 0:
        i = (i + 1) & mask
    was_empty = t[i].child == MAP_EMPTY
    t[i].h = h
    t[i].parent = parent
    t[i].child = child
    return was_empty


cdef inline void _table_put(ChildMap* m, nid_t parent, nid_t child, uint64_t h) noexcept nogil:
    m.filled += _bucket_put(m.entries, m.mask, parent, child, h)


cdef inline void _map_put(ChildMap* m, nid_t parent, nid_t child, uint64_t h) noexcept nogil:
    """Add an entry; capacity must have been reserved (_map_reserve)."""
    _table_put(m, parent, child, h)
    m.used += 1


cdef inline MapEntry* _table_entry_of(MapEntry* t, uint64_t mask, nid_t child,
                                      uint64_t h) noexcept nogil:
    cdef uint64_t i = h & mask
    while t[i].child != MAP_EMPTY:
        if t[i].child == child:
            return &t[i]
        i = (i + 1) & mask
    return NULL


cdef inline MapEntry* _map_entry_of(ChildMap* m, nid_t child, uint64_t h) noexcept nogil:
    cdef MapEntry* e = _table_entry_of(m.entries, m.mask, child, h)
    if e == NULL and m.old != NULL:
        e = _table_entry_of(m.old, m.old_mask, child, h)
    return e


cdef void _map_drain(ChildMap* m, uint64_t buckets) noexcept:
    """Move up to `buckets` more buckets of the old table into the current one; free it
    once drained. A moved bucket is left deleted, so that the old table's probe chains
    still reach the entries not moved yet."""
    cdef uint64_t end = m.old_next + buckets
    cdef MapEntry* e
    if end > m.old_mask + 1:
        end = m.old_mask + 1
    while m.old_next < end:
        e = &m.old[m.old_next]
        if e.child > 0:
            _table_put(m, e.parent, e.child, e.h)
            e.child = MAP_DELETED
        m.old_next += 1
    if m.old_next > m.old_mask:
        _table_free(m.old, m.old_mask + 1)
        m.old = NULL


# Buckets drained per reservation (per reserved entry, and at least) and a new tree's map
# capacity. Only the tests change them (_set_map_tuning): a small map and a slow drain keep
# even a small tree's map mid-drain through many operations.
cdef uint64_t _DRAIN_PER_ENTRY = 8
cdef uint64_t _DRAIN_MIN = 64
cdef uint64_t _MAP_INITIAL = 128


def _set_hash_key(RadixTreeCore tree, uint64_t k0, uint64_t k1):
    """Test hook: key the child map's hash of a tree that holds no node with (k0, k1)."""
    if tree.nodes == NULL or tree.cmap.used != 0:
        raise ValueError("_set_hash_key: only an initialized tree with no node")
    tree.hash_key[0] = k0
    tree.hash_key[1] = k1


def _WAITING_for_test():
    """Test hook: a copy of the waiting threads' records (thread id -> cache)."""
    return dict(_WAITING)


def _page_hash_for_test(RadixTreeCore tree, tokens, int parent=0, int ns=0):
    """Test hook: the tree's child-map hash of the page `tokens` under (parent, ns)."""
    cdef cnp.ndarray arr = np.ascontiguousarray(tokens, dtype=np.uint32)
    return _page_hash(tree.hash_key, parent, ns, <const tok_t*>cnp.PyArray_DATA(arr),
                      arr.shape[0])


cdef void _probe_stats(const MapEntry* t, uint64_t mask, int64_t* out) noexcept:
    cdef uint64_t i, d
    if t == NULL:
        return
    for i in range(mask + 1):
        if t[i].child > 0:
            d = (i - t[i].h) & mask
            out[0] += 1
            out[1] += <int64_t>d
            if <int64_t>d > out[2]:
                out[2] = <int64_t>d


def _map_probe_stats(RadixTreeCore tree):
    """Test hook: (entries, summed distance, longest distance) of the child map's live
    entries from their home buckets (both tables while one drains): what a lookup walks."""
    cdef int64_t out[3]
    out[0] = out[1] = out[2] = 0
    _probe_stats(tree.cmap.entries, tree.cmap.mask, out)
    _probe_stats(tree.cmap.old, tree.cmap.old_mask, out)
    return out[0], out[1], out[2]


def _namespace_ids(RadixTreeCore tree):
    """Test hook: (ids ever handed out, ids free for reuse, namespaces registered now) of
    the tree's namespace table, the root namespace included."""
    return len(tree._ns_keys), len(tree._free_ns_ids()), len(tree._ns_ids)


def _namespace_hash(RadixTreeCore tree, extra_key, int32_t arity=0, key=None):
    """Test hook: the hash the tree's namespace registry files (extra_key, arity) under;
    with ``key=(k0, k1)``, the hash the registry would give it under that SipHash key
    (the tree's own key and registry untouched)."""
    cdef uint64_t k[2]
    if key is None:
        return _ns_key(tree.ns_hash_key, extra_key, arity).h
    k[0], k[1] = key
    return _ns_key(k, extra_key, arity).h


def _set_map_tuning(per_entry, minimum, initial_capacity):
    """Set the child map's drain rate (buckets per reserved entry, and at least) and the
    capacity new caches start with (a power of two >= 2); returns the previous triple.
    For tests."""
    global _DRAIN_PER_ENTRY, _DRAIN_MIN, _MAP_INITIAL
    cdef uint64_t p = per_entry, lo = minimum, cap = initial_capacity   # OverflowError < 0
    if cap < 2 or cap & (cap - 1):
        raise ValueError(f"initial_capacity: expected a power of two >= 2, got {initial_capacity}")
    previous = (_DRAIN_PER_ENTRY, _DRAIN_MIN, _MAP_INITIAL)
    _DRAIN_PER_ENTRY, _DRAIN_MIN, _MAP_INITIAL = p, lo, cap
    return previous


cdef int _map_reserve(ChildMap* m, int64_t extra) except -1:
    """Make room for `extra` more entries at a load (live + deleted) of at most 1/2.

    While an old table drains, each call moves 8 buckets per reserved entry (and 64 more):
    the current table, started at a load of at most 1/4 and never smaller than the old one,
    takes at least old capacity / 4 entries before it is full, by when the old table is
    empty. (Should it not be, its rest moves into the newest table; never three tables.)"""
    cdef uint64_t cap = m.mask + 1
    cdef uint64_t new_cap
    cdef MapEntry* fresh
    if m.old != NULL:
        _map_drain(m, _DRAIN_PER_ENTRY * <uint64_t>extra + _DRAIN_MIN)
    if <uint64_t>(m.filled + extra) * 2 <= cap:
        return 0
    new_cap = cap
    while <uint64_t>(m.used + extra) * 4 > new_cap:
        new_cap *= 2
    fresh = _table_alloc(new_cap)
    cdef int64_t filled = 0
    cdef uint64_t i
    if m.old != NULL:
        # not drained in time (the bound above rules it out at the default rates): the rest
        # of the oldest table goes straight into the new one, which holds every entry at a
        # load of at most 1/4
        for i in range(m.old_next, m.old_mask + 1):
            if m.old[i].child > 0:
                filled += _bucket_put(fresh, new_cap - 1, m.old[i].parent, m.old[i].child,
                                      m.old[i].h)
        _table_free(m.old, m.old_mask + 1)
    m.old = m.entries
    m.old_mask = m.mask
    m.old_next = 0
    m.entries = fresh
    m.mask = new_cap - 1
    m.filled = filled
    _map_drain(m, _DRAIN_PER_ENTRY * <uint64_t>extra + _DRAIN_MIN)
    return 0


# ---------------------------------------------------------------------------------------
# Indexed binary min-heap over node slots, ordered by (prio, last_access, uid)
# ---------------------------------------------------------------------------------------

cdef inline bint _before(const Node* nodes, nid_t a, nid_t b) noexcept nogil:
    if nodes[a].prio != nodes[b].prio:
        return nodes[a].prio < nodes[b].prio
    if nodes[a].last_access != nodes[b].last_access:
        return nodes[a].last_access < nodes[b].last_access
    return nodes[a].uid < nodes[b].uid


cdef inline void _run_clear(Run* r) noexcept nogil:
    """The run with no leaf in it."""
    r.head = NIL
    r.tail = NIL
    r.size = 0


cdef inline void _heap_set(Heap* hp, Node* nodes, int kind, int64_t pos, nid_t n) noexcept nogil:
    hp.data[pos] = n
    nodes[n].heap_pos[kind] = <int32_t>pos


cdef void _sift_up(Heap* hp, Node* nodes, int kind, int64_t pos) noexcept nogil:
    cdef nid_t n = hp.data[pos]
    cdef int64_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not _before(nodes, n, hp.data[parent]):
            break
        _heap_set(hp, nodes, kind, pos, hp.data[parent])
        pos = parent
    _heap_set(hp, nodes, kind, pos, n)


cdef void _sift_down(Heap* hp, Node* nodes, int kind, int64_t pos) noexcept nogil:
    cdef nid_t n = hp.data[pos]
    cdef int64_t child
    while True:
        child = 2 * pos + 1
        if child >= hp.size:
            break
        if child + 1 < hp.size and _before(nodes, hp.data[child + 1], hp.data[child]):
            child += 1
        if not _before(nodes, hp.data[child], n):
            break
        _heap_set(hp, nodes, kind, pos, hp.data[child])
        pos = child
    _heap_set(hp, nodes, kind, pos, n)


cdef inline void _heap_push(Heap* hp, Node* nodes, int kind, nid_t n) noexcept nogil:
    """Capacity is the node capacity, grown with the node array, so a push never fails."""
    hp.size += 1
    _heap_set(hp, nodes, kind, hp.size - 1, n)
    _sift_up(hp, nodes, kind, hp.size - 1)


cdef inline void _heap_remove(Heap* hp, Node* nodes, int kind, nid_t n) noexcept nogil:
    cdef int64_t pos = nodes[n].heap_pos[kind]
    cdef nid_t last
    nodes[n].heap_pos[kind] = -1
    hp.size -= 1
    if pos == hp.size:
        return
    last = hp.data[hp.size]
    _heap_set(hp, nodes, kind, pos, last)
    if pos > 0 and _before(nodes, last, hp.data[(pos - 1) >> 1]):
        _sift_up(hp, nodes, kind, pos)
    else:
        _sift_down(hp, nodes, kind, pos)


cdef inline void _heap_touched(Heap* hp, Node* nodes, int kind, nid_t n) noexcept nogil:
    """Restore order after n's (prio, last_access) grew (it only moves down)."""
    if nodes[n].heap_pos[kind] >= 0:
        _sift_down(hp, nodes, kind, nodes[n].heap_pos[kind])


# ---------------------------------------------------------------------------------------
# Input conversion: keys to contiguous tok_t, values to contiguous idx_t
# ---------------------------------------------------------------------------------------

ctypedef struct NsSlot:
    int64_t ref             # root children in the namespace
    int32_t next_free       # the next id free for reuse (a free id's), or -1
    bint stuck              # its extra_key could not be found again to free the id


ctypedef struct KeyView:
    const tok_t* tok        # n * width tokens
    int64_t n               # positions
    int32_t width           # tok_t per position (1 for plain ints)
    int32_t arity           # 0 for plain int tokens, k for k-tuples


cdef extern from "Python.h":
    # borrowed-pointer forms of the C API, so a loop over a list's items does no refcounting
    PyObject** _seq_items "PySequence_Fast_ITEMS" (object)
    Py_ssize_t _seq_size "PySequence_Fast_GET_SIZE" (object)
    bint _is_exact_int "PyLong_CheckExact" (PyObject*)
    long long _as_long_long "PyLong_AsLongLongAndOverflow" (PyObject*, int*) except? -1


# An exact int in [0, 2**30) (one 30-bit digit, or zero; on 3.12+ a non-negative "compact"
# int) read from the object itself: a few instructions and no range check, instead of the
# ~35 of PyLong_AsLongLongAndOverflow, for every token of a list key and every index of a
# list value. Anything else returns 0 and takes the general path.
cdef extern from *:
    """
    #if PY_VERSION_HEX < 0x030B0000
    #include "longintrepr.h"
    #endif
    /* The grouped read below loads bytes 12-28 of a 3.11 int: its layout, 30-bit digits. */
    #if PY_VERSION_HEX < 0x030C0000 && defined(__SSE2__) && PyLong_SHIFT == 30 \
        && SIZEOF_VOID_P == 8 && !defined(Py_TRACE_REFS)
    #define PYMLLM_SSE_INTS 1
    #include <emmintrin.h>
    #include <stddef.h>
    _Static_assert(offsetof(PyVarObject, ob_size) == 16 && sizeof(Py_ssize_t) == 8
                   && offsetof(PyLongObject, ob_digit) == 24 && sizeof(digit) == 4,
                   "the PyLongObject layout the grouped read assumes");
    /* (x & mask) == 0 in SSE2 (ptest is SSE4.1) */
    static inline int pymllm_testz_sse2(__m128i x, __m128i mask) {
        return _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(x, mask), _mm_setzero_si128())) == 0xFFFF;
    }
    #endif
    static inline int pymllm_small_nonneg(PyObject* p, uint32_t* out) {
        if (!PYMLLM_LIKELY(PyLong_CheckExact(p)))
            return 0;
    #if PY_VERSION_HEX >= 0x030C0000
        {
            Py_ssize_t v;
            if (!PyUnstable_Long_IsCompact((PyLongObject*)p))
                return 0;
            v = PyUnstable_Long_CompactValue((PyLongObject*)p);
            if (v < 0)
                return 0;
            *out = (uint32_t)v;
            return 1;
        }
    #else
        {
            Py_ssize_t size = Py_SIZE(p);
            if (PYMLLM_LIKELY(size == 1)) {
                *out = (uint32_t)((PyLongObject*)p)->ob_digit[0];
                return 1;
            }
            if (size == 0) {
                *out = 0;
                return 1;
            }
            return 0;
        }
    #endif
    }

    /* Whether a, b, c and d are all small non-negative ints (pymllm_small_nonneg's test,
       one branch for the four); if so their values are in out[0:4]. */
    static inline int pymllm_small_nonneg4(PyObject* a, PyObject* b, PyObject* c, PyObject* d,
                                           uint32_t* out) {
        const uintptr_t t = (uintptr_t)&PyLong_Type;
        if (!PYMLLM_LIKELY((((uintptr_t)Py_TYPE(a) ^ t) | ((uintptr_t)Py_TYPE(b) ^ t)
                            | ((uintptr_t)Py_TYPE(c) ^ t) | ((uintptr_t)Py_TYPE(d) ^ t)) == 0))
            return 0;
    #if defined(PYMLLM_SSE_INTS)
        {
            /* Four exact ints, each at least 28 bytes (one digit is always allocated):
               bytes 12-28 of each hold ob_type's upper half (lane 0), ob_size (lanes 1-2)
               and ob_digit[0] (lane 3). One load an int reads its size and its digit; the
               four digits are stored with one store. */
            const __m128i one = _mm_set_epi32(0, 0, 1, 0);
            const __m128i lanes12 = _mm_set_epi32(0, -1, -1, 0);
            __m128i va = _mm_loadu_si128((const __m128i*)((const char*)a + 12));
            __m128i vb = _mm_loadu_si128((const __m128i*)((const char*)b + 12));
            __m128i vc = _mm_loadu_si128((const __m128i*)((const char*)c + 12));
            __m128i vd = _mm_loadu_si128((const __m128i*)((const char*)d + 12));
            __m128i ne = _mm_or_si128(_mm_or_si128(_mm_xor_si128(va, one), _mm_xor_si128(vb, one)),
                                      _mm_or_si128(_mm_xor_si128(vc, one), _mm_xor_si128(vd, one)));
            if (!PYMLLM_LIKELY(pymllm_testz_sse2(ne, lanes12)))
                return 0;
            _mm_storeu_si128((__m128i*)out,
                             _mm_unpackhi_epi64(_mm_unpackhi_epi32(va, vb), _mm_unpackhi_epi32(vc, vd)));
            return 1;
        }
    #elif PY_VERSION_HEX >= 0x030C0000
        {
            PyLongObject* la = (PyLongObject*)a;
            PyLongObject* lb = (PyLongObject*)b;
            PyLongObject* lc = (PyLongObject*)c;
            PyLongObject* ld = (PyLongObject*)d;
            Py_ssize_t va, vb, vc, vd;
            if (!PYMLLM_LIKELY(PyUnstable_Long_IsCompact(la) & PyUnstable_Long_IsCompact(lb)
                               & PyUnstable_Long_IsCompact(lc) & PyUnstable_Long_IsCompact(ld)))
                return 0;
            va = PyUnstable_Long_CompactValue(la);
            vb = PyUnstable_Long_CompactValue(lb);
            vc = PyUnstable_Long_CompactValue(lc);
            vd = PyUnstable_Long_CompactValue(ld);
            if (!PYMLLM_LIKELY((va | vb | vc | vd) >= 0))
                return 0;
            out[0] = (uint32_t)va;
            out[1] = (uint32_t)vb;
            out[2] = (uint32_t)vc;
            out[3] = (uint32_t)vd;
            return 1;
        }
    #else
        if (!PYMLLM_LIKELY((Py_SIZE(a) == 1) & (Py_SIZE(b) == 1) & (Py_SIZE(c) == 1)
                           & (Py_SIZE(d) == 1)))
            return 0;
        out[0] = (uint32_t)((PyLongObject*)a)->ob_digit[0];
        out[1] = (uint32_t)((PyLongObject*)b)->ob_digit[0];
        out[2] = (uint32_t)((PyLongObject*)c)->ob_digit[0];
        out[3] = (uint32_t)((PyLongObject*)d)->ob_digit[0];
        return 1;
    #endif
    }

    /* items[i:n] read four at a time while a whole group of four is small non-negative
       ints: returns where it stopped, a group with another item or the last n % 4 items,
       for the one-at-a-time loop. A key's ints are usually read from memory (a list made
       by the tokenizer, not read since): while it reads a group, it asks the CPU for the
       ints PYMLLM_INTS_AHEAD items on (two loads per group of four 32-byte ints, one per
       cache line when they lie in order, as a list's fresh ints do). Builds paired round
       by round: reading each of the issue-2 workload's 4,000 list keys once took 0.89x
       the time (quartiles 0.84-0.93, 30 rounds; 64 and 128 items on did no better), and
       the workload with list keys 0.95x (0.92-1.00, 60 rounds). */
    #define PYMLLM_INTS_AHEAD 32
    #if defined(__GNUC__) || defined(__clang__)
    #define PYMLLM_PREFETCH(p) __builtin_prefetch(p)
    #else
    #define PYMLLM_PREFETCH(p) ((void)0)
    #endif
    static inline Py_ssize_t pymllm_small_nonneg_run(PyObject** items, Py_ssize_t i,
                                                     Py_ssize_t n, uint32_t* out) {
        for (; i + 4 <= n; i += 4) {
            if (i + 4 + PYMLLM_INTS_AHEAD <= n) {  /* the items ahead are the list's */
                PYMLLM_PREFETCH(items[i + PYMLLM_INTS_AHEAD]);
                PYMLLM_PREFETCH(items[i + PYMLLM_INTS_AHEAD + 2]);
            }
            if (!pymllm_small_nonneg4(items[i], items[i + 1], items[i + 2], items[i + 3], out + i))
                break;
        }
        return i;
    }

    /* items[i:n] read while each is an exact tuple of `width` small non-negative ints into
       out[i * width:] (pairs of bigrams four ints at a time): returns the index of the first
       item that is not, for the general path (n if none). Nothing runs Python code. */
    static inline Py_ssize_t pymllm_small_nonneg_tuples(PyObject** items, Py_ssize_t i,
                                                        Py_ssize_t n, Py_ssize_t width,
                                                        uint32_t* out) {
        if (width == 2) {  /* bigram (EAGLE) keys: two tuples a step */
            for (; i + 2 <= n; i += 2) {
                PyObject* t0 = items[i];
                PyObject* t1 = items[i + 1];
                PyObject** e0;
                PyObject** e1;
                /* the types first: ob_size lies past the end of a 16-byte object */
                if (!PYMLLM_LIKELY(Py_IS_TYPE(t0, &PyTuple_Type) & Py_IS_TYPE(t1, &PyTuple_Type)))
                    break;
                if (!PYMLLM_LIKELY((Py_SIZE(t0) == 2) & (Py_SIZE(t1) == 2)))
                    break;
                e0 = ((PyTupleObject*)t0)->ob_item;
                e1 = ((PyTupleObject*)t1)->ob_item;
                if (!pymllm_small_nonneg4(e0[0], e0[1], e1[0], e1[1], out + 2 * i))
                    break;
            }
        }
        for (; i < n; i++) {
            PyObject* t = items[i];
            PyObject** e;
            Py_ssize_t j;
            if (!PYMLLM_LIKELY(Py_IS_TYPE(t, &PyTuple_Type) && Py_SIZE(t) == width))
                return i;
            e = ((PyTupleObject*)t)->ob_item;
            for (j = 0; j < width; j++)
                if (!PYMLLM_LIKELY(pymllm_small_nonneg(e[j], out + i * width + j)))
                    return i;
        }
        return n;
    }
    """
    bint _small_nonneg "pymllm_small_nonneg" (PyObject* p, uint32_t* out) noexcept
    Py_ssize_t _small_nonneg_tuples "pymllm_small_nonneg_tuples" (PyObject** items, Py_ssize_t i, Py_ssize_t n, Py_ssize_t width, uint32_t* out) noexcept
    Py_ssize_t _small_nonneg_run "pymllm_small_nonneg_run" (PyObject** items, Py_ssize_t i, Py_ssize_t n, uint32_t* out) noexcept


# Index of the first negative entry of p[0:n], n if none (every token of every key and
# value is read through it): _copy.pxd's vectorised range check.
cdef inline Py_ssize_t _first_negative(const int32_t* p, Py_ssize_t n) noexcept nogil:
    return first_outside(p, n, 0, 0x80000000u)


cdef object _as_index(object v, object error, str message):
    """v as an exact int, read the way ``operator.index`` reads it: an int subclass by its
    value (a copy: neither its own ``__index__`` nor its comparisons run later), any other
    object through ``__index__``. A bool (Python's or numpy's) or an object without
    ``__index__`` raises ``error`` with *message* and what v is; so does a deleted jax
    array (its ``__index__`` raises a bare ``RuntimeError``)."""
    if type(v) in _BOOL_TYPES or not (PyLong_Check(v) or hasattr(v, "__index__")):
        raise error(f"{message}, got {v!r:.60} ({type(v).__name__})")
    try:
        return PyNumber_Index(v)
    except RuntimeError:
        _refuse_deleted_array(message.partition(":")[0], v, error)
        raise


cdef inline tok_t _to_tok(object v) except? 0:
    cdef long long x
    cdef int overflow = 0
    if not PyLong_CheckExact(v):
        v = _as_index(v, InvalidKeyError, "token_ids: tokens must be integers")
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow or x < 0 or x >= TOKEN_LIMIT:
        raise InvalidKeyError(f"token_ids: token {v} is outside [0, 2**32)")
    return <tok_t>x


cdef inline idx_t _to_idx(object v) except? -1:
    cdef long long x
    cdef int overflow = 0
    if not PyLong_CheckExact(v):
        v = _as_index(v, InvalidValueError, "value: KV indices must be integers")
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow or x < 0 or x > INT32_MAX:
        raise InvalidValueError(f"value: KV index {v} is outside [0, 2**31)")
    return <idx_t>x


cdef inline cnp.ndarray _new_idx(int64_t n):
    """A new 1-D int32 numpy array of n (uninitialized) indices."""
    return cnp.PyArray_EMPTY(1, [n], cnp.NPY_INT32, 0)


cdef cnp.ndarray _copy_idx(const idx_t* src, int64_t n):
    """A new int32 numpy array holding n indices copied from src."""
    cdef cnp.ndarray out = _new_idx(n)
    copy32(cnp.PyArray_DATA(out), src, n)
    return out


cdef object _callable_method(object owner, str method, str name):
    """``owner.<method>``, which the tree calls later: ``TypeError`` now when it is not
    callable (``AttributeError`` when missing), before the caller changes anything."""
    fn = getattr(owner, method)
    if not callable(fn):
        raise TypeError(f"{name}.{method} is not callable: got {fn!r:.60}")
    return fn


cdef int _hand_over(object free_fn, const idx_t* src, int64_t n) except -1:
    """``free_fn(int32 array of src[0:n])``: one call, or, out of memory for one array of
    them all (an evict that ran out of memory midway hands over what it removed), calls
    on pieces of 4,096, so that the slots still reach their owner. As with one call, a
    piece whose call raises does not stop the others: the first error is raised after."""
    cdef int64_t i = 0, k
    try:
        arr = _copy_idx(src, n)
    except MemoryError:
        first = None
        while i < n:
            k = min(<int64_t>4096, n - i)
            try:
                free_fn(_copy_idx(src + i, k))
            except BaseException as exc:
                if first is None:
                    first = exc
            i += k
        if first is not None:
            raise first
        return 0
    free_fn(arr)
    return 0


# The three result dataclasses are built without their __init__ (a Python-level call) and
# without setattr (a name lookup per field): a fresh instance from the type's allocator,
# each field stored straight into its slot. The slot offsets are read once, here, from the
# classes' member descriptors (they are slots dataclasses); a class that lost its slots
# fails at import, not later.
cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    void Py_INCREF(object)
    PyObject* PyLong_FromLongLong(long long) except NULL
    object _generic_alloc "PyType_GenericAlloc" (PyTypeObject*, Py_ssize_t)

_MemberDescriptor = type(MatchResult.__dict__["indices"])


cdef Py_ssize_t _slot_offset(object cls, str name) except -1:
    d = cls.__dict__.get(name)
    if type(d) is not _MemberDescriptor:
        raise TypeError(f"{cls.__name__}.{name} is not a slot (RadixKey and the result "
                        "classes must keep their __slots__)")
    return (<PyMemberDescrObject*>d).d_member.offset


cdef Py_ssize_t _MR_INDICES = _slot_offset(MatchResult, "indices")
cdef Py_ssize_t _MR_LAST_NODE = _slot_offset(MatchResult, "last_node")
cdef Py_ssize_t _MR_PREFIX_LEN = _slot_offset(MatchResult, "prefix_len")
cdef Py_ssize_t _MR_BRANCHING = _slot_offset(MatchResult, "mamba_branching_seqlen")
cdef Py_ssize_t _IR_PREFIX_LEN = _slot_offset(InsertResult, "prefix_len")
cdef Py_ssize_t _IR_LAST_NODE = _slot_offset(InsertResult, "last_node")
cdef Py_ssize_t _IR_MAMBA_EXIST = _slot_offset(InsertResult, "mamba_exist")
cdef Py_ssize_t _ER_FULL = _slot_offset(EvictResult, "full_evicted")
cdef Py_ssize_t _ER_SWA = _slot_offset(EvictResult, "swa_evicted")
cdef Py_ssize_t _ER_MAMBA = _slot_offset(EvictResult, "mamba_evicted")
# A RadixKey's two fields are read the same way (a getattr by name costs a type lookup
# and a descriptor call, twice per match and per insert); a subclass, which may override
# them, and an instance whose slot was deleted take the getattr.
cdef Py_ssize_t _RK_TOKEN_IDS = _slot_offset(RadixKey, "token_ids")
cdef Py_ssize_t _RK_EXTRA_KEY = _slot_offset(RadixKey, "extra_key")
cdef PyTypeObject* _MR_TYPE = <PyTypeObject*>MatchResult  # the module keeps them alive
cdef PyTypeObject* _IR_TYPE = <PyTypeObject*>InsertResult
cdef PyTypeObject* _ER_TYPE = <PyTypeObject*>EvictResult


cdef inline object _key_field(object key, Py_ssize_t offset, str name):
    cdef PyObject* v
    if type(key) is RadixKey:
        v = (<PyObject**>((<char*><PyObject*>key) + offset))[0]
        if v != NULL:
            return <object>v
    return getattr(key, name)


cdef inline object _token_ids(object key):
    return _key_field(key, _RK_TOKEN_IDS, "token_ids")


cdef inline object _extra_key(object key):
    return _key_field(key, _RK_EXTRA_KEY, "extra_key")


cdef inline void _put(object obj, Py_ssize_t offset, object v) noexcept:
    """Store a new reference to v in a fresh instance's empty (NULL) slot."""
    Py_INCREF(v)
    (<PyObject**>((<char*><PyObject*>obj) + offset))[0] = <PyObject*>v


cdef inline void _put_int(object obj, Py_ssize_t offset, PyObject* v) noexcept:
    """Store v (a new reference, handed over) in a fresh instance's empty slot."""
    (<PyObject**>((<char*><PyObject*>obj) + offset))[0] = v


cdef inline void _replace(object obj, Py_ssize_t offset, object v) noexcept:
    """Store a new reference to v in a filled slot of obj, releasing the old one."""
    cdef PyObject** slot = <PyObject**>((<char*><PyObject*>obj) + offset)
    cdef PyObject* old = slot[0]
    Py_INCREF(v)
    slot[0] = <PyObject*>v
    Py_XDECREF(old)


cdef inline object _match_result(object indices, object last_node, int64_t prefix_len,
                                 object branching=None):
    _result_point()
    r = _generic_alloc(_MR_TYPE, 0)
    _put_int(r, _MR_PREFIX_LEN, PyLong_FromLongLong(prefix_len))
    _put(r, _MR_INDICES, indices)
    _put(r, _MR_LAST_NODE, last_node)
    _put(r, _MR_BRANCHING, branching)
    return r


cdef inline object _evict_result(int64_t full, int64_t swa=0, int64_t mamba=0):
    r = _generic_alloc(_ER_TYPE, 0)
    _put_int(r, _ER_FULL, PyLong_FromLongLong(full))
    _put_int(r, _ER_SWA, PyLong_FromLongLong(swa))
    _put_int(r, _ER_MAMBA, PyLong_FromLongLong(mamba))
    return r


cdef inline object _insert_result(int64_t prefix_len, object last_node, bint mamba_exist=False):
    _result_point()
    r = _generic_alloc(_IR_TYPE, 0)
    _put_int(r, _IR_PREFIX_LEN, PyLong_FromLongLong(prefix_len))
    _put(r, _IR_LAST_NODE, last_node)
    _put(r, _IR_MAMBA_EXIST, True if mamba_exist else False)
    return r


cdef inline Py_ssize_t _read_ints(PyObject** items, Py_ssize_t i, Py_ssize_t n,
                                  uint32_t* out, int64_t limit) noexcept:
    """Convert items[i:n] into out while they are exact ints in [0, limit); returns the index
    of the first item that is not (n if none), which the caller converts through Python.
    No Python code runs here, so the item array stays valid for the whole scan."""
    cdef PyObject* p
    cdef long long x
    cdef int overflow = 0
    cdef Py_ssize_t end
    while i < n:
        i = _small_nonneg_run(items, i, n, out)
        end = min(i + 4, n)  # the group that stopped the run, or the last items
        while i < end:
            p = items[i]
            if not _small_nonneg(p, &out[i]):
                if not _is_exact_int(p):
                    return i
                x = _as_long_long(p, &overflow)
                if overflow or x < 0 or x >= limit:
                    return i
                out[i] = <uint32_t>x
            i += 1
    return n


cdef int _same_length(object seq, Py_ssize_t n, object error, str name) except -1:
    """After an element's ``__index__`` (Python code) ran mid-conversion: the list must still
    hold n items (its item array is re-read after this), else ``error``."""
    if _seq_size(seq) != n:
        raise error(f"{name}: the sequence changed length while it was read ({n} -> {_seq_size(seq)})")
    return 0


cdef inline void _shrink(void** block, size_t nbytes) noexcept:
    """realloc *block down to nbytes (> 0); if that fails the block stays as it was."""
    cdef void* p = realloc(block[0], nbytes)
    if p != NULL:
        block[0] = p


# Test hooks: after this many more allocations of a kind, the next one raises MemoryError
# (once); -1: off. Node blocks (a new leaf's, a split's upper half's); a call's result (its
# node handle, its index array, the result object).
cdef int _node_fuse = -1
cdef int _result_fuse = -1


def _fail_node_arrays_after(int count):
    """Test hook: `count` more node blocks are allocated, then one allocation raises
    MemoryError (once); -1 turns it off."""
    global _node_fuse
    _node_fuse = count


def _fail_results_after(int count):
    """Test hook: `count` more allocations of a match's or insert's result (the node
    handle, the index array, the result object) succeed, then one raises MemoryError
    (once); -1 turns it off."""
    global _result_fuse
    _result_fuse = count


cdef int _burn(int* fuse, str hook) except -1:
    """Count an armed fuse down; at zero, disarm it and raise MemoryError."""
    if fuse[0] == 0:
        fuse[0] = -1
        raise MemoryError(f"out of memory (injected by {hook})")
    fuse[0] -= 1
    return 0


cdef inline int _result_point() except -1:
    """Where a result allocation happens: the _fail_results_after hook."""
    if _result_fuse >= 0:
        _burn(&_result_fuse, "_fail_results_after")
    return 0


cdef inline cnp.ndarray _result_idx(int64_t n):
    """_new_idx for a match's result array (the _fail_results_after hook counts it)."""
    _result_point()
    return _new_idx(n)


cdef inline int64_t _node_lead(const Node* x) noexcept nogil:
    """Positions of x's block before its key: a split's lower half starts past the part it
    gave the upper half (see _split_into). A block is laid out as lead + len positions of
    key, then as many of value, and x.value = x.key + len * width + lead."""
    return (<const tok_t*>x.value - x.key) - x.len * x.width


cdef inline void _free_node_block(Node* x) noexcept nogil:
    """free the block that holds x's key and value (the root has none)."""
    if x.key != NULL:   # no pointer arithmetic on the root's NULL
        free(<void*>(x.key - _node_lead(x) * x.width))
    x.key = NULL
    x.value = NULL


cdef int _alloc_node_arrays(int64_t n, int32_t w, tok_t** key, idx_t** value) except -1:
    """malloc a node's key (n positions of w tokens) and value (n slots) as one block,
    exactly sized: the key, then the value right after it. `key` points at the block's start
    until a split moves it on (_free_node_block frees the block); a match reads the two in
    one stream, and a node costs one malloc and one free. MemoryError, with nothing
    allocated, if it fails."""
    if _node_fuse >= 0:
        key[0] = NULL
        value[0] = NULL
        _burn(&_node_fuse, "_fail_node_arrays_after")
    key[0] = <tok_t*>malloc(n * (w + 1) * sizeof(tok_t))
    if key[0] == NULL:
        value[0] = NULL
        raise MemoryError(f"could not allocate a tree node of {n} positions")
    value[0] = <idx_t*>(key[0] + n * w)
    return 0


cdef int _alloc_swa_suffix(int64_t matched, int64_t aligned, int64_t es, int32_t w,
                           tok_t** k1, idx_t** v1, tok_t** k2, idx_t** v2) except -1:
    """Arrays for the nodes a sliding-window insert hangs below its match: a tombstone over
    [matched, es) when es > matched, and a live node over the rest up to aligned. None when
    nothing new is cached (all matched, or the whole suffix below es)."""
    if matched >= aligned or es >= aligned:
        return 0
    if es > matched:
        _alloc_node_arrays(es - matched, w, k1, v1)
    try:
        _alloc_node_arrays(aligned - (es if es > matched else matched), w, k2, v2)
    except BaseException:
        free(k1[0])     # the value lives in the key's block
        k1[0] = NULL
        v1[0] = NULL
        raise
    return 0


# The namespace registry's keys. A Python dict keyed by (extra_key, arity) walks every
# entry whose Python hash equals the key's, and int hashes are public arithmetic: the ints
# k + i * (2**61 - 1) all hash alike, as do -1 and -2, and a tuple's hash is an invertible
# mix of its items' hashes, so pairs of ints with one hash are cheap to make. Tenants or
# adapters named by such ints made every match and insert under them cost one __eq__ per
# colliding namespace. The registry hashes its keys with SipHash under a random key of the
# tree's instead: an int (a bool, an int subclass that compares as int does) by its value;
# a float, complex, Fraction, Decimal or numpy number by its exact ratio (an integral one
# as the equal int); a tuple (or a subclass that compares as tuple does: a namedtuple) by
# its length, tagged as a tuple's, and its items' keyed hashes; a frozenset by the sum of
# its items' keyed hashes (their order is the set's), tagged; anything else (str, bytes:
# already salted per process; a class of the caller's) by its own hash. Equal keys of these
# types thus keep one keyed hash, as equal extra_keys share a namespace, and unequal ones
# of these types share one only by chance: no kind's hash is built like another's (a
# tuple's is tagged, so () is not 0 and (d,) not 1/d), and -1 is hashed as itself, where
# Python hashes it as -2 (so that tuples over {-1, -2} would all collide). A key of the
# caller's own class that compares equal to -1, to an int past 2**61, to a tuple or to a
# frozenset may be kept apart from it (a cache miss, never a wrong hit), and so are a
# Decimal or numpy long double far from 1 (past the spans below) and the equal int,
# Fraction or float: equality stays Python's ==, so two keys share a namespace only if
# equal.
cdef Py_ssize_t _NS_HASH_DEPTH = 32    # tuples, frozensets nested deeper: their own hash
cdef long long _NS_HASH_SPAN = (1LL << 61) - 2   # Python's int hash is the value within
cdef uint32_t _NS_TUPLE_TAG = 0x656c7074          # a tuple's length is hashed with it
cdef uint32_t _NS_FROZENSET_TAG = 0x7465737a      # a frozenset's items' sum likewise


cdef uint64_t _int_ns_hash(const uint64_t* key, object n) except? 0:
    """The keyed hash of the exact int *n* (its value's)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(n, &overflow)
    cdef Py_ssize_t words
    cdef cnp.ndarray buf
    if not overflow and -_NS_HASH_SPAN <= v <= _NS_HASH_SPAN:
        # Python's hash (so an equal number of a type not read as an int below, a user's
        # say, hashed by its own hash, lands with it), but for -1: Python hashes it as -2,
        # which no hash here copies (a tuple's items -1 and -2 would then collide, and
        # every tuple over them; a class equal to -1, its hash -2, is kept apart)
        return _siphash(key[0], key[1], <uint64_t>v, NULL, 0, 1, 3)
    words = (int.bit_length(n) + 1 + 31) // 32   # 4-byte words, the sign bit included
    buf = np.frombuffer(int.to_bytes(n, 4 * words, "little", signed=True), dtype="<u4")
    return _siphash(key[0], key[1], 1, <const uint32_t*>cnp.PyArray_DATA(buf), words, 1, 3)


# Decimals this far from 1 (10**1233 > 2**4096) are hashed by their own hash: their exact
# ratio would be an int of thousands of digits (Decimal('1e999999999') is a short key)
_INF = float("inf")
cdef int _DECIMAL_EXPONENT_SPAN = 1233
cdef int _FLOAT_EXPONENT_SPAN = 1100   # numpy's long doubles past float's range: likewise
# the numpy scalar types of numbers: their equality is their value's (bool_ is not one;
# timedelta64 is a signed integer type to numpy, but 1 ns equals 1000 ps and its int()
# of a second is a datetime.timedelta: it is hashed by its own hash, as datetime64 is)
_NUMPY_NUMBERS = frozenset(
    t for t in set(np.sctypeDict.values())
    if isinstance(t, type) and issubclass(t, np.number) and not issubclass(t, np.timedelta64)
)


cdef object _exact_ratio(object x):
    """``(numerator, denominator)`` of the number *x* when its type's equality is its
    value's and the ratio is cheap to get: a float, complex with no imaginary part,
    Fraction, Decimal or numpy number (their exact types only; a subclass may compare
    otherwise); else None, and *x* is hashed by its own hash. Equal numbers of these types
    have one ratio, so they share a namespace with each other and with the equal int."""
    t = type(x)
    if t is complex or (t in _NUMPY_NUMBERS and isinstance(x, np.complexfloating)):
        if x.imag != 0:
            return None
        x = x.real
        t = type(x)
    if t is float:
        if x != x or x == _INF or x == -_INF:
            return None
        return float.as_integer_ratio(x)
    if t is _Fraction:
        return (x.numerator, x.denominator)
    if t is _Decimal:
        if not x.is_finite() or abs(x.adjusted()) > _DECIMAL_EXPONENT_SPAN:
            return None
        return x.as_integer_ratio()
    if t in _NUMPY_NUMBERS:
        if isinstance(x, np.integer):
            return (int(x), 1)
        if not np.isfinite(x) or (x != 0 and abs(int(np.frexp(x)[1])) > _FLOAT_EXPONENT_SPAN):
            return None
        return x.as_integer_ratio()
    return None


cdef inline bint _plain(object t, object base):
    """Whether the subclass *t* of *base* compares and hashes as *base* does."""
    return t.__eq__ is base.__eq__ and t.__hash__ is base.__hash__


cdef inline uint64_t _ns_mix(const uint64_t* key, uint64_t h, uint64_t v) noexcept:
    """The keyed hash *h* extended by the 64-bit hash *v* (a tuple's next item, a ratio's
    denominator)."""
    cdef uint32_t words[2]
    words[0] = <uint32_t>v
    words[1] = <uint32_t>(v >> 32)
    return _siphash(key[0], key[1], h, words, 2, 1, 3)


cdef uint64_t _ns_hash(const uint64_t* key, object x, Py_ssize_t depth) except? 0:
    """The registry's keyed hash of the extra_key *x* (see above)."""
    cdef uint64_t h
    cdef Py_ssize_t i, n
    cdef object t = type(x)
    if t is str or t is bytes:
        return _siphash(key[0], key[1], <uint64_t>hash(x), NULL, 0, 1, 3)
    if t is int or t is bool or (PyLong_Check(x) and _plain(t, int)):
        return _int_ns_hash(key, int.__int__(x) if t is not int else x)
    if (t is tuple or (PyTuple_Check(x) and _plain(t, tuple))) and depth < _NS_HASH_DEPTH:
        n = len(<tuple>x)
        h = _siphash(key[0], key[1], <uint64_t>n, &_NS_TUPLE_TAG, 1, 1, 3)
        for i in range(n):
            h = _ns_mix(key, h, _ns_hash(key, (<tuple>x)[i], depth + 1))
        return h
    if (t is frozenset or (PyFrozenSet_Check(x) and _plain(t, frozenset))) and depth < _NS_HASH_DEPTH:
        h = 0   # equal sets hold equal items, in any order: a sum of their keyed hashes
        for item in <frozenset>x:
            h += _ns_hash(key, item, depth + 1)
        return _siphash(key[0], key[1], h, &_NS_FROZENSET_TAG, 1, 1, 3)
    ratio = _exact_ratio(x)
    if ratio is not None:
        if ratio[1] == 1:
            return _int_ns_hash(key, ratio[0])
        return _ns_mix(key, _int_ns_hash(key, ratio[0]), _int_ns_hash(key, ratio[1]))
    # anything else (an int or tuple subclass with its own equality too): its own hash
    return _siphash(key[0], key[1], <uint64_t>hash(x), NULL, 0, 1, 3)


@cython.final
@cython.freelist(8)
cdef class _NsKey:
    """A namespace's registry key: (extra_key, arity) with the tree's keyed hash of it."""
    cdef readonly object extra_key
    cdef readonly int32_t arity
    cdef Py_hash_t h

    def __hash__(self):
        return self.h

    def __eq__(self, other):
        if type(other) is not _NsKey:
            return NotImplemented
        cdef _NsKey o = <_NsKey>other
        if self.h != o.h or self.arity != o.arity:
            return False
        return self.extra_key is o.extra_key or bool(self.extra_key == o.extra_key)


cdef int _name_unhashable(object extra_key) except -1:
    """Called while a TypeError of hashing the extra_key is handled: raises it as "must be
    hashable" when the extra_key is unhashable; returns when the error came from elsewhere
    (the code of a number or item it holds, say), for the caller to re-raise as it was."""
    try:
        hash(extra_key)
    except TypeError:
        raise TypeError(
            f"extra_key: must be hashable, got {extra_key!r:.60} ({type(extra_key).__name__})"
        ) from None
    return 0


cdef _NsKey _ns_key(const uint64_t* key, object extra_key, int32_t arity):
    """The registry key of (extra_key, arity); ``TypeError`` for an unhashable extra_key."""
    cdef _NsKey k = _NsKey.__new__(_NsKey)
    cdef uint64_t h
    try:
        h = _ns_hash(key, extra_key, 0)
    except TypeError:
        _name_unhashable(extra_key)
        raise
    h = _siphash(key[0], key[1], h ^ (<uint64_t><uint32_t>arity), NULL, 0, 1, 3)
    k.extra_key = extra_key
    k.arity = arity
    k.h = <Py_hash_t>(h >> 1)   # never -1 (Python's error value)
    return k


cdef class _Scratch:
    """A growable C buffer reused across calls (no malloc per request)."""
    cdef void* data
    cdef int64_t cap
    cdef size_t elsize

    def __cinit__(self, size_t elsize):
        self.data = NULL
        self.cap = 0
        self.elsize = elsize

    def __dealloc__(self):
        free(self.data)

    cdef void release(self) noexcept:
        """Give the buffer back (it grows again from nothing on the next reserve)."""
        free(self.data)
        self.data = NULL
        self.cap = 0

    cdef inline void* reserve(self, int64_t n) except NULL:
        if n > self.cap and _scratch_fuse >= 0:  # test hook, checked on growth only
            _burn_scratch_fuse()
        _grow(&self.data, &self.cap, n if n > 0 else 1, self.elsize)
        return self.data


# Test hook: after this many more growths of any scratch buffer, the next one raises
# MemoryError (as a full machine would, midway through a call); -1: off.
cdef int _scratch_fuse = -1


def _fail_scratch_growth_after(int count):
    """Test hook: the scratch buffers grow `count` more times, then one growth raises
    MemoryError (once); -1 turns it off."""
    global _scratch_fuse
    _scratch_fuse = count


cdef int _burn_scratch_fuse() except -1:
    global _scratch_fuse
    if _scratch_fuse == 0:
        _scratch_fuse = -1
        raise MemoryError("out of memory (injected by _fail_scratch_growth_after)")
    _scratch_fuse -= 1
    return 0


# ---------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------

# Test hook: how many of the next tree initializations (__init__, reset) fail with
# MemoryError after their node array is allocated, as if memory ran out midway.
cdef int _fail_storage_inits = 0


def _fail_next_storage_inits(int count):
    """Test hook: the next `count` tree initializations raise MemoryError midway."""
    global _fail_storage_inits
    _fail_storage_inits = count


cdef int _count_down_storage_failure() except -1:
    global _fail_storage_inits
    _fail_storage_inits -= 1
    raise MemoryError("out of memory (injected by _fail_next_storage_inits)")


# The cache each thread waits for (a call of it running in another thread): _wait_idle
# follows these to refuse a wait that would never end.
cdef dict _WAITING = {}

# _owner of a cache that a thread was inside a call of when the process forked: that
# thread does not exist in the child, and the call will never end there.
cdef unsigned long _FORKED_OWNER = <unsigned long>-1

# pretty_print's deepest indentation, in levels
cdef int _PRINT_INDENT = 32


cdef str _one_line_repr(object obj):
    """``repr(obj)`` with its line breaks escaped: one node, one printed line."""
    cdef str r = repr(obj)
    return r.replace("\r", "\\r").replace("\n", "\\n") if "\n" in r or "\r" in r else r


cdef object _tree_size_arg(str name, object value):
    """A cache constructor's size (an int >= 1, as ``_size_arg`` checks), whose refusal of
    an allocator passed in its place (``RadixCache(alloc)``, ``RadixCache(1, alloc)``)
    says where the allocator goes."""
    if callable(getattr(type(value), "free", None)):
        raise InvalidValueError(
            f"{name}: expected an int >= 1, got the allocator {type(value).__name__}: pass "
            "it by keyword, token_to_kv_pool_allocator="
        )
    return _size_arg(name, value, 1)


cdef class RadixTreeCore:
    """RadixTreeCore(page_size=1, sliding_window_size=None, token_to_kv_pool_allocator=None,
    on_node_evict=None, eviction_policy='lru')\n--\n
    Compiled radix tree: node storage, child map, eviction heap, locking.

    Not used directly: :class:`pymllm.mem_cache.radix_cache.RadixCache` is the public class.
    """

    cdef Node* nodes
    cdef int64_t cap                # node array capacity (the heap has the same)
    cdef int64_t hwm                # slots [hwm, cap) were never used (not initialized)
    cdef nid_t free_head            # first freed slot, NIL if none (then hwm is next)
    cdef int64_t live               # live nodes, root included
    cdef ChildMap cmap
    cdef uint64_t hash_key[2]       # the child map's SipHash key, random for each tree
    cdef Run run                    # evictable leaves, with `heap` (see _full_push)
    cdef Heap heap                  # HEAP_FULL: the evictable leaves not in the run
    cdef Heap aux_heap              # HEAP_AUX: droppable Mamba states (Mamba mode)
    cdef bint mamba                 # nodes may carry a Mamba state slot (aux_value)
    cdef bint swa                   # sliding window: aux_value 0 = live SWA KV, -1 = tombstone
    cdef int64_t window             # sliding_window_size (SWA mode)
    cdef int64_t _aux_evictable     # Mamba: unlocked states; SWA: live SWA tokens, unlocked
    cdef int64_t _aux_protected     # Mamba: locked states; SWA: live SWA tokens, SWA-locked
    cdef int64_t n_states_out       # states collected in _state_out by the current evict
    cdef int64_t ev_done            # KV indices collected in _idx_out by the current evict
    cdef int64_t ev_nodes           # nodes removed by the current evict (ids in _ev_uids)
    cdef object _late_exc           # an insert's argument error, raised after its value's
    # An evict's or a reset's hand-over, made before any node goes (each a Python object,
    # so that running out of memory for it cannot strand what the removed nodes held):
    cdef list _ev_uids              # the evicted nodes' ids, when on_node_evict is set
    cdef object _ev_free            # the allocator's free, when it is Python code
    cdef object _ev_free_swa        # its free_swa (windowed caches)
    cdef object _ev_free_states     # the state pool's free, when it is Python code
    cdef object _pending_exc        # a BaseException a node's removal caught, raised after
    cdef int64_t aux_freed          # SWA tokens freed by the current evict
    cdef int64_t n_swa_out          # indices tombstoned by the current evict (_swa_out)
    # Per namespace id: its root children, and the ids free for reuse linked through it,
    # so that releasing an id (in the middle of a node's removal) allocates nothing
    cdef NsSlot* ns_tab
    cdef int64_t ns_cap
    cdef int32_t ns_free_head
    cdef int64_t next_uid
    cdef int64_t clock
    cdef int64_t new_prio           # priority policy: what a node made by this insert starts at
    cdef int64_t _evictable
    cdef int64_t _protected
    cdef readonly int page_size
    cdef int policy                 # POLICY_* (eviction order: see _before and the .pxd)
    cdef unsigned long _owner       # thread inside a public call (0: none), see _enter
    cdef _Scratch _tok_scratch
    cdef _Scratch _val_scratch
    cdef _Scratch _idx_out
    cdef _Scratch _nid_scratch
    cdef _Scratch _flag_scratch     # the windowed insert: a flag per segment it revives
    cdef _Scratch _key_pin          # an insert's copy of a key read in place (_pin_key)
    cdef _Scratch _state_out
    cdef _Scratch _swa_out
    cdef uint64_t ns_hash_key[2]    # the namespace registry's SipHash key (_ns_key)
    cdef dict _ns_ids               # _NsKey(extra_key, arity) -> namespace id
    cdef list _ns_keys              # namespace id -> its _NsKey, or None when free
    cdef dict _swa_locks            # SWA: _lock_key(locked node's id, boundary) -> inc_lock_refs
    cdef dict _hash_cache           # slot -> list of page hashes (compute_node_hash)
    cdef readonly object token_to_kv_pool_allocator
    cdef readonly object on_node_evict
    cdef readonly object sliding_window_size
    cdef readonly object mamba_pool
    # The state pool when it is our own TokenToKVPoolAllocator (page size 1), or its
    # slot_allocator when that is one (MambaPool): it books the states the tree holds as the
    # cache's, as the KV allocator books KV slots (a strong reference the collector does
    # not clear, as _booking_allocator)
    cdef PyObject* _state_booking
    # Set by __del__ when it empties a dropped tree: {node id: lock count} of the nodes
    # locked then; unlocking one of those locks later is a no-op (see dec_lock_ref)
    cdef object _finalized_locks
    # The allocator again when it is our own TokenToKVPoolAllocator (it books the tree's
    # slots as the cache's), as a strong reference the collector does not clear: dropping
    # the tree hands its slots back through it, even when the tree dies in a cycle.
    cdef PyObject* _booking_allocator
    cdef int _booking_kind          # 0: none; BOOK_PLAIN or BOOK_SWA: its type

    def __reduce_ex__(self, protocol):
        return _reduce_owner(self, RadixTreeCore)

    def __reduce__(self):
        _cannot_pickle(self)

    def __cinit__(self, *args, **kwargs):
        self.hash_key[0] = int.from_bytes(_urandom(8), "little")
        self.hash_key[1] = int.from_bytes(_urandom(8), "little")
        self.ns_hash_key[0] = int.from_bytes(_urandom(8), "little")
        self.ns_hash_key[1] = int.from_bytes(_urandom(8), "little")
        self.nodes = NULL
        self.cap = 0
        self.hwm = 0
        self.cmap.entries = NULL
        self.cmap.old = NULL
        self.heap.data = NULL
        self.heap.cap = 0
        self.heap.size = 0
        _run_clear(&self.run)
        self.aux_heap.data = NULL
        self.aux_heap.cap = 0
        self.aux_heap.size = 0
        self.ns_tab = NULL
        self.ns_cap = 0
        self.ns_free_head = -1
        self._booking_allocator = NULL
        self._booking_kind = 0
        self._state_booking = NULL

    def __init__(self, page_size=1, sliding_window_size=None, token_to_kv_pool_allocator=None,
                 on_node_evict=None, eviction_policy="lru"):
        self._enter(True)
        try:
            if isinstance(self, MambaTreeCore):  # reached through a subclass's MRO
                raise TypeError(
                    f"{type(self).__name__} is a Mamba cache: MambaRadixCache.__init__ sets it up, "
                    "not RadixCache.__init__"
                )
            self.swa = False  # not left over from an __init__ that raised
            self.window = 0
            if sliding_window_size is not None:
                sliding_window_size = _tree_size_arg("sliding_window_size", sliding_window_size)
                if (token_to_kv_pool_allocator is not None
                        and not callable(getattr(token_to_kv_pool_allocator, "free_swa", None))):
                    raise TypeError(
                        "token_to_kv_pool_allocator: a sliding window needs an allocator with "
                        f"free_swa() (SWATokenToKVPoolAllocator), got {token_to_kv_pool_allocator!r:.80}"
                    )
                self.swa = True
                self.window = sliding_window_size
            self.sliding_window_size = sliding_window_size
            self._setup(page_size, token_to_kv_pool_allocator, on_node_evict, eviction_policy)
        finally:
            self._leave()

    cdef inline uint64_t _node_hash(self, nid_t parent, const Node* x) noexcept nogil:
        """The child map's hash of node x's first page as a child of `parent`."""
        return _page_hash(self.hash_key, parent, x.ns, x.key, self.page_size * x.width)

    cdef inline nid_t _child_with_page(self, nid_t parent, int32_t ns, const tok_t* page,
                                       int64_t ntok) noexcept nogil:
        """The child of `parent` in namespace `ns` whose first page is `page` (`ntok`
        tokens' words), or NIL."""
        return _map_find(&self.cmap, self.nodes, parent, ns, page, ntok,
                         _page_hash(self.hash_key, parent, ns, page, ntok))

    cdef int _check_fresh(self) except -1:
        """__init__ runs once: calling it again on a live cache would drop the tree without
        giving its KV slots back (reset() does that)."""
        if self.nodes != NULL:
            raise AlreadyInitializedError(
                f"{type(self).__name__} is already initialized; call reset() to empty it"
            )
        return 0

    cdef int _setup(self, object page_size, object allocator, object on_node_evict,
                    object eviction_policy) except -1:
        page_size = _tree_size_arg("page_size", page_size)
        if not isinstance(eviction_policy, str) or eviction_policy not in EVICTION_POLICIES:
            raise InvalidValueError(
                f"eviction_policy: expected one of {', '.join(EVICTION_POLICIES)}, "
                f"got {eviction_policy!r}"
            )
        self.policy = EVICTION_POLICIES.index(eviction_policy)
        if on_node_evict is not None and not callable(on_node_evict):
            raise TypeError(f"on_node_evict: expected a callable, got {on_node_evict!r}")
        if allocator is not None and not callable(getattr(allocator, "free", None)):
            # found here, not by the first evict (its nodes gone, their slots with no one)
            raise TypeError(
                "token_to_kv_pool_allocator: expected an allocator with free(int32 array), "
                f"got {allocator!r:.80}"
            )
        if isinstance(allocator, (TokenToKVPoolAllocator, SWATokenToKVPoolAllocator)):
            if allocator.page_size < 1:
                # made with __new__ (or its __init__ raised): its page_size is still 0
                raise NotInitializedError(
                    f"token_to_kv_pool_allocator: the {type(allocator).__name__} has no "
                    "slots: its __init__ did not run to completion"
                )
            if page_size % allocator.page_size:
                # the tree splits nodes at its own page boundaries: an allocator page would
                # end up in two nodes, and the first one evicted would free the other's slots
                raise InvalidValueError(
                    f"page_size: {page_size} is not a multiple of the allocator's page_size "
                    f"{allocator.page_size}"
                )
        self.page_size = page_size
        self.token_to_kv_pool_allocator = allocator
        Py_XDECREF(self._booking_allocator)   # an __init__ after a failed reset's
        self._booking_allocator = NULL
        self._booking_kind = 0
        if type(allocator) is TokenToKVPoolAllocator or type(allocator) is SWATokenToKVPoolAllocator:
            Py_XINCREF(<PyObject*>allocator)
            self._booking_allocator = <PyObject*>allocator
            self._booking_kind = BOOK_PLAIN if type(allocator) is TokenToKVPoolAllocator else BOOK_SWA
        self.on_node_evict = on_node_evict
        self._tok_scratch = _Scratch(sizeof(tok_t))
        self._val_scratch = _Scratch(sizeof(idx_t))
        self._idx_out = _Scratch(sizeof(idx_t))
        self._nid_scratch = _Scratch(sizeof(nid_t))
        self._flag_scratch = _Scratch(sizeof(int64_t))
        self._key_pin = _Scratch(sizeof(tok_t))
        self._state_out = _Scratch(sizeof(idx_t))
        self._swa_out = _Scratch(sizeof(idx_t))
        # node ids are never reused, not even by an __init__ after a failed reset(): a
        # handle names its node by (slot, id)
        self.next_uid = max(self.next_uid, 1)
        self._init_storage()
        return 0

    def __del__(self):
        """A dropped cache that holds slots or states only Python code can hand back (an
        allocator or a state pool other than this package's, which book what the tree
        holds) empties itself as ``reset()`` does. A finalizer runs before the collector
        clears anything in a reference cycle, so the allocator and the pool are still
        there. Booked slots and states need no Python: the deallocation frees them, in C.
        Errors are swallowed, as the interpreter may be shutting down."""
        if self.nodes == NULL:
            return
        if not ((self.token_to_kv_pool_allocator is not None and not self._booking_kind
                 and self._evictable + self._protected > 0)
                or (self.mamba and self.mamba_pool is not None and self._state_booking == NULL
                    and self._aux_evictable + self._aux_protected > 0)):
            return
        try:
            self._enter()
            try:
                # each node's own locks (its inc_lock_ref calls), not its lock_ref, which
                # also counts its descendants': an unlock through an ancestor stays refused
                self._finalized_locks = {self.nodes[i].uid: self.nodes[i].own_lock
                                         for i in range(1, self.hwm)
                                         if self.nodes[i].uid >= 0 and self.nodes[i].own_lock > 0}
                self._reset_locked()
            finally:
                self._leave()
        except BaseException:
            pass

    def __dealloc__(self):
        cdef int64_t i
        cdef Node* x
        cdef bint booked_kv = self._booking_allocator != NULL
        cdef bint booked_states = self._state_booking != NULL
        # What the tree still holds goes back, as reset() would (without on_node_evict),
        # node by node so that no memory is needed; what an owner refuses (an allocator
        # cleared meanwhile, a free that raises) is skipped. Booked slots and states go in
        # C. The rest went in __del__, which empties the tree, unless it could not: memory
        # ran out there, or the cache was brought back to life after it and dropped again (a
        # finalizer runs once). Then the owners' free is called here, unless the collector
        # has cleared the references to them (a cycle).
        kv_free = state_free = None
        if self.nodes != NULL and self.hwm > 1:
            try:
                if not booked_kv and self.token_to_kv_pool_allocator is not None:
                    kv_free = self.token_to_kv_pool_allocator.free
                if self.mamba and not booked_states and self.mamba_pool is not None:
                    state_free = self.mamba_pool.free
            except BaseException:
                pass
            for i in range(1, self.hwm):
                x = &self.nodes[i]
                if x.uid < 0:
                    continue
                if x.len > 0 and (booked_kv or kv_free is not None):
                    try:
                        if booked_kv:
                            self._free_booked(x.value, x.len)
                        else:
                            _hand_over(kv_free, x.value, x.len)
                    except BaseException:
                        pass
                if self.mamba and x.aux_value >= 0 and (booked_states or state_free is not None):
                    try:
                        if booked_states:
                            (<TokenToKVPoolAllocator>self._state_booking).free_c(
                                &x.aux_value, 1, PAGE_CACHED)
                        else:
                            _hand_over(state_free, <idx_t*>&x.aux_value, 1)
                    except BaseException:
                        pass
        Py_XDECREF(self._booking_allocator)
        self._booking_allocator = NULL
        Py_XDECREF(self._state_booking)
        self._state_booking = NULL
        self._release_storage()

    # -- thread guard -------------------------------------------------------------------

    cdef inline int _enter(self, bint init=False) except -1:
        """Start a public call: wait while another thread is inside one (it can only be
        parked in a Python callback, holding no GIL), refuse a re-entrant call from one of
        our own callbacks, and hold the garbage collector off until the call returns. The
        caller calls _leave in a finally clause. ``init``: __init__'s, which holds the guard
        the same way (a callback of this cache's own running call, a failed reset's
        allocator free, cannot run it under that call) and needs no tree but a fresh one."""
        cdef unsigned long me = PyThread_get_thread_ident()
        if self._owner != 0:  # first: an __init__ in another thread builds the tree
            self._wait_turn(me)
        if init:
            self._check_fresh()
        elif self.nodes == NULL or self._idx_out is None:
            self._not_initialized()
        self._owner = me
        _hold_gc()
        return 0

    cdef inline void _leave(self) noexcept:
        """End a public call (the finally clause of every one that _enter started)."""
        if self._late_exc is not None:  # an insert that failed before raising it
            self._late_exc = None
        self._owner = 0
        _release_gc()

    cdef inline int _await_idle(self) except -1:
        """Readers (size queries, node handles) wait while another thread is inside a
        public call, so they never see a half-done mutation; the thread inside (its own
        callbacks) reads freely, and may see its own call's mutation half done (an
        ``extra_key``'s ``__hash__`` during a node's removal)."""
        cdef unsigned long me
        if self._owner != 0:
            me = PyThread_get_thread_ident()
            if self._owner != me:
                self._wait_idle(me)
        if self.nodes == NULL:
            self._not_initialized()
        return 0

    cdef int _not_initialized(self) except -1:
        """Every public call starts here when there is no tree (nodes NULL): __init__ never
        ran (``__new__``, a subclass that skipped ``super().__init__()``) or it raised; or
        when the garbage collector has cleared the cache's references (it is destroying the
        cache, caught in a reference cycle, and code that runs meanwhile, such as another
        cache's allocator, still reaches it)."""
        if self.nodes != NULL:
            raise NotInitializedError(
                f"{type(self).__name__} is being destroyed: the garbage collector cleared it "
                "as part of a reference cycle"
            )
        raise NotInitializedError(
            f"{type(self).__name__} has no tree: its __init__ did not run to completion"
        )

    cdef int _wait_turn(self, unsigned long me) except -1:
        if self._owner == me:
            raise ReentrantCallError(
                "a cache method was called from a callback the cache runs inside one of its "
                "own calls (on_node_evict, the allocator's free, an extra_key's __hash__ or "
                "__eq__); defer the call until it returns"
            )
        return self._wait_idle(me)

    cdef int _wait_idle(self, unsigned long me) except -1:
        """Wait until no thread is inside a call of this cache. Unless that would never
        end: the thread inside waits, itself or through others, for a cache whose call
        this thread is inside (callbacks of two caches calling each other's cache from two
        threads). Under the GIL the wait is checked and recorded at once, so of the
        threads closing such a cycle the last one finds it and raises."""
        cdef unsigned long t = self._owner
        cdef Py_ssize_t hops = 0
        if t == _FORKED_OWNER:
            raise NotInitializedError(
                f"this {type(self).__name__} was inside a call in another thread when the "
                "process forked: that call never ends in this process and the tree may be "
                "half changed; make a new cache here"
            )
        while t != 0 and hops <= len(_WAITING):
            if t == me:
                raise ReentrantCallError(
                    f"a {type(self).__name__} call would wait for a thread that waits for a "
                    "cache this thread is inside a call of (callbacks of two caches calling "
                    "each other's cache from two threads): it would never return; defer the "
                    "call until the outer one returns"
                )
            other = _WAITING.get(t)
            if other is None:
                break
            t = (<RadixTreeCore>other)._owner
            hops += 1
        # a signal handler run while this thread waits can make it wait again (nested):
        # the inner wait restores the outer one's record
        outer = _WAITING.get(me)
        _WAITING[me] = self
        try:
            while self._owner != 0:
                with nogil:
                    usleep(20)
                # a signal (Ctrl-C) is handled here, not once the other thread's call ends
                if PyErr_CheckSignals() < 0:
                    return -1
        finally:
            if outer is None:
                del _WAITING[me]
            else:
                _WAITING[me] = outer
        return 0

    # -- storage lifecycle ------------------------------------------------------------

    cdef int _init_storage(self) except -1:
        """A fresh tree (the root alone). Out of memory it raises with no storage left
        (nodes NULL: every later call raises NotInitializedError), never half a tree."""
        self.hwm = 0  # _release_storage reads the node slots below hwm
        try:
            self.cap = 0
            _big_regrow(<void**>&self.nodes, &self.cap, 64, sizeof(Node))
            if _fail_storage_inits > 0:  # test hook: out of memory midway
                _count_down_storage_failure()
            self.heap.cap = 0
            _big_regrow(<void**>&self.heap.data, &self.heap.cap, self.cap, sizeof(nid_t))
            self.heap.size = 0
            _run_clear(&self.run)
            self.aux_heap.cap = 0
            _big_regrow(<void**>&self.aux_heap.data, &self.aux_heap.cap, self.cap, sizeof(nid_t))
            self.aux_heap.size = 0
            self._aux_evictable = 0
            self._aux_protected = 0
            _map_init(&self.cmap, _MAP_INITIAL)
            self.ns_cap = 0
            _grow(<void**>&self.ns_tab, &self.ns_cap, 8, sizeof(NsSlot))
            self.ns_free_head = -1
            # the old tree's namespaces and lock records are dropped only once the new tree
            # is whole (below): an extra_key's __del__ that reads the cache sees it so
            dropped = (self._ns_ids, self._ns_keys, self._swa_locks, self._hash_cache)
            root_ns = _ns_key(self.ns_hash_key, None, 0)
            self._ns_ids = {root_ns: 0}
            self._ns_keys = [root_ns]
            self._swa_locks = {}
            self._hash_cache = {}
            # no slot is initialized until _take_slot hands it out (hwm); the root: slot 0,
            # uid 0, permanently "locked" (never evictable)
            self.free_head = NIL
            self.hwm = 1
            self.clock = 0
            self.new_prio = 0
            self._init_node(ROOT, 0, NIL, 0, 1)
            self.live = 1
            self._evictable = 0
            self._protected = 0
        except BaseException:
            self._release_storage()
            raise
        dropped = None
        return 0

    cdef void _release_storage(self) noexcept:
        cdef int64_t i
        if self.nodes != NULL:
            for i in range(self.hwm):
                if self.nodes[i].uid >= 0:
                    _free_node_block(&self.nodes[i])
            _big_free(self.nodes, self.cap * sizeof(Node))
            self.nodes = NULL
            self.cap = 0
            self.hwm = 0
        _map_release(&self.cmap)
        _big_free(self.heap.data, self.heap.cap * sizeof(nid_t))
        self.heap.data = NULL
        self.heap.cap = 0
        _big_free(self.aux_heap.data, self.aux_heap.cap * sizeof(nid_t))
        self.aux_heap.data = NULL
        self.aux_heap.cap = 0
        free(self.ns_tab)
        self.ns_tab = NULL
        self.ns_free_head = -1

    cdef int _reserve_nodes(self, int64_t extra) except -1:
        """Make sure `extra` new nodes (and their heap and map entries) can be created.
        Growing the node array initializes none of the new slots (see hwm), and the large
        blocks grow by mremap (_big_regrow), so a large tree's growth costs no pass over its
        memory."""
        cdef int64_t need = self.live + extra
        _map_reserve(&self.cmap, extra)
        if need <= self.cap:
            return 0
        if self.cap + extra > INT32_MAX:
            raise MemoryError("the tree cannot hold more than 2**31 nodes")
        # the heaps first: a heap may be longer than the node array, never shorter (a push
        # never fails), so a MemoryError from any of the three leaves that intact (all three
        # double from the same capacity, so they end equal)
        _big_regrow(<void**>&self.heap.data, &self.heap.cap, need, sizeof(nid_t))
        _big_regrow(<void**>&self.aux_heap.data, &self.aux_heap.cap, need, sizeof(nid_t))
        _big_regrow(<void**>&self.nodes, &self.cap, need, sizeof(Node))
        return 0

    cdef inline void _init_node(self, nid_t n, int64_t uid, nid_t parent, int32_t ns,
                                int32_t width) noexcept:
        cdef Node* x = &self.nodes[n]
        x.uid = uid
        x.parent = parent
        x.num_children = 0
        x.ns = ns
        x.width = width
        x.len = 0
        x.key = NULL
        x.value = NULL
        x.last_access = self.clock
        if self.policy == POLICY_FIFO:
            x.prio = self.clock
        elif self.policy == POLICY_PRIORITY:
            x.prio = self.new_prio  # an insert's new nodes take its priority, even a negative one
        else:
            x.prio = 0
        x.hit_count = 0
        x.lock_ref = 0
        x.heap_pos[0] = -1
        x.heap_pos[1] = -1
        x.run_prev = NIL
        x.run_next = NIL
        x.aux_lock_ref = 0
        x.own_lock = 0
        x.aux_value = -1
        x.end_pos = 0
        x.next_free = NIL

    cdef nid_t _take_slot(self) noexcept:
        """Pop a free slot; _reserve_nodes must have been called."""
        cdef nid_t n = self.free_head
        if n != NIL:
            self.free_head = self.nodes[n].next_free
        else:   # no freed slot: the first never-used one
            n = <nid_t>self.hwm
            self.hwm += 1
        self.live += 1
        return n

    cdef void _drop_slot(self, nid_t n) noexcept:
        cdef Node* x = &self.nodes[n]
        _free_node_block(x)
        x.uid = -1
        x.next_free = self.free_head
        self.free_head = n
        self.live -= 1

    # -- namespaces -----------------------------------------------------------------

    cdef int32_t _find_ns(self, object extra_key, int32_t arity) except -2:
        """Namespace id of (extra_key, arity), or -1 when no node has it."""
        if extra_key is None and arity == 0:
            return 0
        return self._lookup_ns(_ns_key(self.ns_hash_key, extra_key, arity))

    cdef int32_t _lookup_ns(self, _NsKey ns_key) except -2:
        """The namespace id registered under ns_key, or -1. The look-up runs no hash (the
        key carries its own) but may run the extra_key's ``__eq__`` against keys whose
        hash it meets; what that raises stays as it is."""
        return self._ns_ids.get(ns_key, -1)

    cdef int32_t _find_ns_late(self, object extra_key, int32_t arity) except -2:
        """_find_ns for an insert, run before its value is read (the look-up runs the
        extra_key's Python code, which could rewrite a value array already checked). An
        error is kept in _late_exc (unless an earlier one is there) and -1 returned: the
        insert raises it once the value is checked, so a bad value is reported first, as
        the caches always did."""
        try:
            return self._find_ns(extra_key, arity)
        except Exception as exc:
            if self._late_exc is None:
                self._late_exc = exc
            return -1

    cdef int _raise_late(self) except -1:
        """Raise the error an insert kept for after its key and value checks, if any."""
        if self._late_exc is not None:
            exc, self._late_exc = self._late_exc, None
            raise exc
        return 0

    cdef int32_t _intern_ns(self, object extra_key, int32_t arity) except -1:
        """The namespace id of (extra_key, arity), registered if new. Everything that can
        raise (the extra_key's __hash__ and __eq__, Python code; out of memory) runs before
        the registry changes, and nothing after its last step allocates, so an error
        leaves it as it was."""
        if extra_key is None and arity == 0:
            return 0
        # one registry key (one hash of the extra_key) for the look-up and the entry
        cdef _NsKey ns_key = _ns_key(self.ns_hash_key, extra_key, arity)
        cdef int32_t ns = self._lookup_ns(ns_key)
        if ns >= 0:
            return ns
        cdef bint reused = self.ns_free_head >= 0
        if reused:
            ns = self.ns_free_head
        else:
            ns = len(self._ns_keys)
            _grow(<void**>&self.ns_tab, &self.ns_cap, ns + 1, sizeof(NsSlot))
            self._ns_keys.append(None)  # the id's slot, empty until it is taken below
        cdef long got = -1
        try:
            # the key carries its hash; the extra_key's __eq__ may run (and raise), and an
            # __eq__ that now finds an entry the look-up did not is answered by that entry
            # (stored over, it would leave that namespace's id unreachable)
            got = self._ns_ids.setdefault(ns_key, ns)
        finally:
            if got != ns and not reused:  # raised, or another entry's: the id goes back
                self._ns_keys.pop()       # just appended: shrinks in place
        if got != ns:
            return <int32_t>got
        if reused:
            self.ns_free_head = self.ns_tab[ns].next_free
        self._ns_keys[ns] = ns_key      # the slot held None: nothing allocated, nothing freed
        self.ns_tab[ns].ref = 0
        self.ns_tab[ns].next_free = -1
        self.ns_tab[ns].stuck = False
        return ns

    cdef int _ns_release_one(self, int32_t ns) except -1:
        """Drop a reference to namespace ns; the last one frees its id for reuse. Runs in
        the middle of a node's removal, so nothing here may raise, and nothing but the
        registry's update allocates (the free ids are linked through the C table). That
        update looks up ns's own registry key, its keyed hash kept in it (the extra_key's
        __hash__ does not run again), and the entry it takes out must be ns's own for ns
        to be freed. The extra_key's __eq__ may run, against keys whose hash it meets: one
        whose equality changed since (or raises),
        or memory running out there, leaves ns registered, empty and never reused (no other
        extra_key can land in its nodes); an entry of another namespace that the changed key
        hit instead is put back (or, if even that fails, that namespace is never reused
        either). An interrupt there (KeyboardInterrupt, SystemExit: not an Exception) is
        held back and raised once the evict has handed everything over."""
        cdef NsSlot* t = &self.ns_tab[ns]
        cdef long got = -1
        t.ref -= 1
        if t.ref == 0 and ns != 0:
            try:
                got = self._ns_ids.pop(self._ns_keys[ns])
                if got != ns:   # another namespace's entry: it goes back
                    self._ns_ids[self._ns_keys[got]] = got
            except BaseException as exc:
                if 0 < got < len(self._ns_keys) and got != ns:
                    self.ns_tab[got].stuck = True   # its key is no longer registered
                if not isinstance(exc, Exception) and self._pending_exc is None:
                    self._pending_exc = exc
                got = -1
            if got != ns:
                self.ns_tab[ns].stuck = True
                return 0
            t = &self.ns_tab[ns]
            t.stuck = False
            t.next_free = self.ns_free_head
            self.ns_free_head = ns
            self._ns_keys[ns] = None
        return 0

    cdef list _free_ns_ids(self):
        """The namespace ids free for reuse, next to be reused first (for the checks)."""
        cdef list ids = []
        cdef int32_t ns = self.ns_free_head
        while ns >= 0:
            assert len(ids) < len(self._ns_keys), "namespace free list: a cycle"
            ids.append(ns)
            ns = self.ns_tab[ns].next_free
        return ids

    # -- input conversion ---------------------------------------------------------------

    cdef const KeyView* _pin_key(self, const KeyView* kv, KeyView* pinned) except NULL:
        """*kv*, or *pinned* set to a copy of it when its tokens are the caller's memory (an
        array read in place). An insert that takes a new namespace reads its key through
        this from then on: _intern_ns runs the extra_key's ``__hash__``/``__eq__`` after the
        key's last check, and that code could resize (free) or rewrite the caller's array."""
        cdef tok_t* t
        if kv.tok == <const tok_t*>self._tok_scratch.data:   # converted: already ours
            return kv
        t = <tok_t*>self._key_pin.reserve(kv.n * kv.width)
        copy32(t, kv.tok, kv.n * kv.width)
        pinned[0] = kv[0]
        pinned.tok = t
        return pinned

    cdef int _check_key_kept(self, object owner, const KeyView* kv) except -1:
        """``InvalidKeyError`` when the array a key is read from in place (*owner*, from
        _load_key) no longer holds kv.tok's tokens: Python code the call ran after reading
        the key (an extra_key's ``__hash__``/``__eq__``, a value item's ``__index__``)
        resized it, and kv.tok may point at freed memory. A few compares; called after each
        such step, before the key is read again and before the tree changes."""
        cdef cnp.ndarray arr
        if owner is None:
            return 0
        arr = <cnp.ndarray>owner
        if (<const void*>cnp.PyArray_DATA(arr) == <const void*>kv.tok
                and <size_t>cnp.PyArray_NBYTES(arr) >= <size_t>kv.n * sizeof(tok_t)):
            return 0
        raise InvalidKeyError(
            "token_ids: the key's array was resized while the call ran Python code (the "
            "extra_key's __hash__ or __eq__, a value's __index__); nothing changed"
        )

    cdef object _load_key(self, object key, KeyView* kv):
        """Fill kv from a RadixKey; returns the object that owns kv.tok (keep it alive, and
        pass it to _check_key_kept after any Python code the call runs)."""
        if not isinstance(key, RadixKey):
            raise TypeError(f"key: expected a RadixKey, got {key!r:.60} ({type(key).__name__})")
        return self._load_tokens(_token_ids(key), kv)

    cdef object _load_tokens(self, object token_ids, KeyView* kv):
        cdef Py_ssize_t n, i, j, width
        cdef tok_t* buf
        cdef object t
        cdef PyObject** elems
        kv.arity = 0
        kv.width = 1
        # a deque, a UserList...: read once as a list (numpy would read a bool as 0 or 1);
        # a list, tuple or array comes back as it is (a C call, a few type checks)
        token_ids = _sequence_as_list("token_ids", token_ids, InvalidKeyError)
        # a list or tuple, a subclass too: read from its items as stored (its own __len__
        # and __getitem__ are not asked, as for the values and in hash_token_ids)
        if PyList_Check(token_ids) or PyTuple_Check(token_ids):
            n = _seq_size(token_ids)
            kv.n = n
            if n == 0:
                kv.tok = <tok_t*>self._tok_scratch.reserve(1)
                return None
            t = <object>_seq_items(token_ids)[0]
            if PyTuple_Check(t):    # a tuple subclass (a namedtuple) too: read as a tuple
                width = _seq_size(t)
                if width == 0:
                    raise InvalidKeyError("token_ids: tuple tokens must not be empty, got ()")
                buf = <tok_t*>self._tok_scratch.reserve(n * width)
                i = _small_nonneg_tuples(_seq_items(token_ids), 0, n, width, buf)
                while i < n:  # token i is not an exact tuple of small ints: read it here
                    t = <object>_seq_items(token_ids)[i]
                    if not PyTuple_Check(t) or _seq_size(t) != width:
                        raise InvalidKeyError(
                            f"token_ids: token {i} is {t!r}, but tuple tokens must all have "
                            f"{width} elements"
                        )
                    elems = _seq_items(t)
                    for j in range(width):
                        if not _small_nonneg(elems[j], &buf[i * width + j]):
                            buf[i * width + j] = _to_tok(<object>elems[j])  # t holds the tuple
                            _same_length(token_ids, n, InvalidKeyError, "token_ids")
                    i = _small_nonneg_tuples(_seq_items(token_ids), i + 1, n, width, buf)
                kv.width = <int32_t>width
                kv.arity = <int32_t>width
            else:
                buf = <tok_t*>self._tok_scratch.reserve(n)
                i = _read_ints(_seq_items(token_ids), 0, n, buf, TOKEN_LIMIT)
                while i < n:
                    t = <object>_seq_items(token_ids)[i]
                    if PyTuple_Check(t):
                        raise InvalidKeyError(
                            f"token_ids: token {i} is a tuple but token 0 is not; "
                            "tuple and int tokens cannot mix"
                        )
                    buf[i] = _to_tok(t)
                    # its __index__ ran Python code: the list is read afresh from i + 1
                    _same_length(token_ids, n, InvalidKeyError, "token_ids")
                    i = _read_ints(_seq_items(token_ids), i + 1, n, buf, TOKEN_LIMIT)
            kv.tok = buf
            return None
        if cnp.PyArray_Check(token_ids):
            return self._load_token_array(token_ids, kv)
        try:
            arr = np.asarray(token_ids)
        except ValueError as exc:
            raise InvalidKeyError(f"token_ids: cannot read {type(token_ids).__name__}: {exc}")
        except RuntimeError:
            _refuse_deleted_array("token_ids", token_ids, InvalidKeyError)
            raise
        return self._load_token_array(arr, kv)

    cdef object _load_token_array(self, cnp.ndarray arr, KeyView* kv):
        cdef Py_ssize_t n, i
        cdef const int32_t* p32
        cdef const int64_t* p64
        cdef tok_t* buf
        cdef int typenum = cnp.PyArray_TYPE(arr)
        if arr.ndim != 1:
            raise InvalidKeyError(
                f"token_ids: expected a 1-D array, got shape {tuple((<object>arr).shape)} "
                "(use a list of tuples for multi-token positions)"
            )
        if not cnp.PyArray_ISINTEGER(arr):
            raise InvalidKeyError(f"token_ids: expected integer tokens, got dtype {arr.dtype}")
        n = arr.shape[0]
        kv.n = n
        kv.width = 1
        kv.arity = 0
        if n == 0:
            kv.tok = <tok_t*>self._tok_scratch.reserve(1)
            return None
        if ((typenum == cnp.NPY_INT32 or typenum == cnp.NPY_UINT32)
                and cnp.PyArray_ISNOTSWAPPED(arr) and cnp.PyArray_IS_C_CONTIGUOUS(arr)
                and cnp.PyArray_ISALIGNED(arr)):    # C reads int32 only at aligned addresses
            if typenum == cnp.NPY_INT32:
                p32 = <const int32_t*>cnp.PyArray_DATA(arr)
                i = _first_negative(p32, n)
                if i < n:
                    raise InvalidKeyError(f"token_ids: token {p32[i]} is outside [0, 2**32)")
            kv.tok = <const tok_t*>cnp.PyArray_DATA(arr)   # zero-copy path
            return arr
        buf = <tok_t*>self._tok_scratch.reserve(n)
        if _native_words(arr):  # int64 (numpy's default) or uint64: checked and narrowed in C
            i = _narrow64(<const uint64_t*>cnp.PyArray_DATA(arr), n, 32, buf)
            if i < n:
                raise InvalidKeyError(f"token_ids: token {arr[i]} is outside [0, 2**32)")
            kv.tok = buf
            return None
        if typenum == cnp.NPY_UINT64 or typenum == cnp.NPY_ULONGLONG:
            if n and arr.max() >= TOKEN_LIMIT:
                raise InvalidKeyError(f"token_ids: token {int(arr.max())} is outside [0, 2**32)")
        a64 = np.require(arr, np.int64, ["C", "A"])  # read as int64_t: aligned
        p64 = <const int64_t*>cnp.PyArray_DATA(a64)
        for i in range(n):
            if p64[i] < 0 or p64[i] >= TOKEN_LIMIT:
                raise InvalidKeyError(f"token_ids: token {p64[i]} is outside [0, 2**32)")
            buf[i] = <tok_t>p64[i]
        kv.tok = buf
        return None

    cdef object _load_value(self, object value, const KeyView* kv, const idx_t** out):
        """Point *out at len(key) KV indices; returns the owner of that memory."""
        cdef object t
        cdef Py_ssize_t n = kv.n, i
        cdef idx_t* buf
        cdef const int32_t* p32
        cdef const int64_t* p64
        if value is None:
            if kv.arity != 0:
                raise InvalidValueError(
                    "value: None (use the token ids as values) needs plain int tokens, "
                    f"not {kv.arity}-tuples"
                )
            buf = <idx_t*>self._val_scratch.reserve(n)
            for i in range(n):
                if kv.tok[i] > <uint32_t>INT32_MAX:
                    raise InvalidValueError(f"value: KV index {kv.tok[i]} is outside [0, 2**31)")
                buf[i] = <idx_t>kv.tok[i]
            out[0] = buf
            return None
        value = _sequence_as_list("value", value)   # as the keys (_load_tokens)
        if PyList_Check(value) or PyTuple_Check(value):     # a subclass too, as the keys
            if _seq_size(value) != n:
                raise InvalidValueError(
                    f"value: expected {n} KV indices (one per token), got {_seq_size(value)}"
                )
            buf = <idx_t*>self._val_scratch.reserve(n)
            i = _read_ints(_seq_items(value), 0, n, <uint32_t*>buf, <int64_t>INT32_MAX + 1)
            while i < n:
                t = <object>_seq_items(value)[i]    # our own reference while __index__ runs
                buf[i] = _to_idx(t)
                # its __index__ ran Python code: the list is read afresh from i + 1
                _same_length(value, n, InvalidValueError, "value")
                i = _read_ints(_seq_items(value), i + 1, n, <uint32_t*>buf,
                               <int64_t>INT32_MAX + 1)
            out[0] = buf
            return None
        cdef cnp.ndarray arr
        if cnp.PyArray_Check(value):
            arr = value
        else:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise InvalidValueError(f"value: cannot read {type(value).__name__}: {exc}")
            except RuntimeError:
                _refuse_deleted_array("value", value)
                raise
        cdef int typenum = cnp.PyArray_TYPE(arr)
        if arr.ndim != 1:
            raise InvalidValueError(f"value: expected a 1-D array, got shape {tuple((<object>arr).shape)}")
        if not cnp.PyArray_ISINTEGER(arr):
            raise InvalidValueError(f"value: expected integer KV indices, got dtype {arr.dtype}")
        if arr.shape[0] != n:
            raise InvalidValueError(
                f"value: expected {n} KV indices (one per token), got {arr.shape[0]}"
            )
        if n == 0:
            out[0] = <idx_t*>self._val_scratch.reserve(1)
            return None
        if (typenum == cnp.NPY_INT32 and cnp.PyArray_ISNOTSWAPPED(arr)
                and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)):
            p32 = <const int32_t*>cnp.PyArray_DATA(arr)
            i = _first_negative(p32, n)
            if i < n:
                raise InvalidValueError(f"value: KV index {p32[i]} is outside [0, 2**31)")
            out[0] = <const idx_t*>p32
            return arr
        buf = <idx_t*>self._val_scratch.reserve(n)
        if _native_words(arr):  # int64 or uint64: checked and narrowed in C
            i = _narrow64(<const uint64_t*>cnp.PyArray_DATA(arr), n, 31, <uint32_t*>buf)
            if i < n:
                raise InvalidValueError(f"value: KV index {arr[i]} is outside [0, 2**31)")
            out[0] = buf
            return None
        if (typenum == cnp.NPY_UINT64 or typenum == cnp.NPY_ULONGLONG) and arr.max() > INT32_MAX:
            raise InvalidValueError(f"value: KV index {int(arr.max())} is outside [0, 2**31)")
        a64 = np.require(arr, np.int64, ["C", "A"])  # read as int64_t: aligned
        p64 = <const int64_t*>cnp.PyArray_DATA(a64)
        for i in range(n):
            if p64[i] < 0 or p64[i] > INT32_MAX:
                raise InvalidValueError(f"value: KV index {p64[i]} is outside [0, 2**31)")
            buf[i] = <idx_t>p64[i]
        out[0] = buf
        return None

    cdef nid_t _slot_of(self, object node) except -2:
        """Validate a TreeNode handle and return its slot."""
        cdef TreeNode h
        if not isinstance(node, TreeNode):
            raise TypeError(f"node: expected a TreeNode, got {node!r:.60} ({type(node).__name__})")
        h = <TreeNode>node
        if h._tree is not self:
            raise StaleNodeError(f"node: {node!r} belongs to another cache")
        if self._stale(h._slot, h._uid):
            raise StaleNodeError(f"node: node {h._uid} was evicted; match the key again")
        return h._slot

    cdef inline bint _stale(self, nid_t slot, int64_t uid) noexcept:
        """Whether a handle (slot, uid) no longer names a live node: its slot was freed or
        reused, or it never named one (a negative uid is a free slot's)."""
        return uid < 0 or slot >= self.hwm or self.nodes[slot].uid != uid

    cdef bint _finalized_unlock(self, object node) except -1:
        """Whether unlocking *node* undoes a lock its node held when this cache's finalizer
        emptied the tree (the cache was dropped, and a request's ``__del__`` that unlocks
        its node runs after the cache's own, in the same garbage): then that lock is
        counted off and the unlock is a no-op. Each such lock is undone once."""
        cdef TreeNode h
        if not isinstance(node, TreeNode):
            return False
        h = <TreeNode>node
        if h._tree is not self:
            return False
        held = self._finalized_locks.get(h._uid, 0)
        if held <= 0:
            return False
        self._finalized_locks[h._uid] = held - 1
        return True

    cdef inline TreeNode _handle(self, nid_t n):
        return self._aim(self._blank_handle(), n)   # aimed twice: two stores, no call

    cdef inline TreeNode _blank_handle(self):
        """A handle for a call's result, allocated before the tree changes (out of memory
        then, nothing has) and aimed at its node after. Until then it names the root, so
        that Python code running in between (a callback, the collector's get_objects)
        only ever finds a valid handle."""
        cdef TreeNode h
        _result_point()
        if self.mamba:
            h = MambaTreeNode.__new__(MambaTreeNode)
        else:
            h = TreeNode.__new__(TreeNode)
        return self._aim(h, ROOT)

    cdef inline TreeNode _aim(self, TreeNode h, nid_t n):
        """Point h at the live node in slot n (never a free slot: its uid -1 would make a
        handle every check takes for live; they refuse a negative uid too)."""
        h._tree = self
        h._slot = n
        h._uid = self.nodes[n].uid
        return h

    # -- the walk shared by match and insert --------------------------------------------

    cdef nid_t _split(self, nid_t x, int64_t m) except NIL:
        """Split node x after m positions; returns the new upper node. Capacity reserved.
        Out of memory for the upper node's arrays: MemoryError, x left as it was."""
        cdef tok_t* ukey
        cdef idx_t* uvalue
        _alloc_node_arrays(m, self.nodes[x].width, &ukey, &uvalue)
        return self._split_into(x, m, ukey)

    cdef nid_t _split_into(self, nid_t x, int64_t m, tok_t* ukey) noexcept:
        """_split with the upper node's block already allocated (by _alloc_node_arrays, for
        m positions of x's width): it cannot fail. The upper node takes the block. Needs
        0 < m < x's length (every caller splits strictly inside the node: a lower half of
        no positions would shrink its block to nothing)."""
        cdef idx_t* uvalue = <idx_t*>(ukey + m * self.nodes[x].width)
        cdef nid_t u = self._take_slot()
        cdef Node* X = &self.nodes[x]
        cdef Node* U = &self.nodes[u]
        cdef int32_t w = X.width
        cdef int64_t rest = X.len - m
        cdef int64_t lead
        cdef tok_t* block
        cdef MapEntry* e
        cdef uint64_t h_old = self._node_hash(X.parent, X)
        self._init_node(u, self.next_uid, X.parent, X.ns, w)
        self.next_uid += 1
        U.len = m
        U.key = ukey
        U.value = uvalue
        copy32(U.key, X.key, m * w)
        copy32(U.value, X.value, m)
        # The lower half keeps its block and starts m positions further into it: a split
        # copies the m positions above it, not the node (a short match inside a long node
        # costs what it matched). Once the positions its block skips outnumber those it
        # holds, it is laid out again at the block's start (key, then value: both move
        # down) and the block shrunk: that move is shorter than the splits that made the
        # skipped part copied, and a block never holds more than twice its node's positions
        # (a split near the end of a long node leaves a short node with a short block).
        X.key = X.key + m * w
        X.value = X.value + m
        X.len = rest
        lead = _node_lead(X)
        if lead > rest:
            block = X.key - lead * w
            move32_down(block, X.key, rest * w)
            move32_down(block + rest * w, <const tok_t*>X.value, rest)
            _shrink(<void**>&block, rest * (w + 1) * sizeof(tok_t))
            X.key = block
            X.value = <idx_t*>(block + rest * w)
        U.last_access = X.last_access
        U.prio = X.prio             # same hits, insertion time, priority and segment
        U.hit_count = X.hit_count
        U.lock_ref = X.lock_ref     # every lock through X also locked the part above it
        U.num_children = 1          # a split never invents a Mamba state: U has none
        U.end_pos = X.end_pos - rest
        if self.swa:
            # SWA KV and SWA locks cover whole nodes, so both halves share X's
            U.aux_value = X.aux_value
            U.aux_lock_ref = X.aux_lock_ref
            if U.aux_value >= 0 and U.aux_lock_ref == 0:
                _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, u)
        e = _map_entry_of(&self.cmap, x, h_old)
        e.child = u
        X.parent = u
        _map_put(&self.cmap, u, x, self._node_hash(u, X))
        if self._hash_cache:
            self._split_hash_cache(x, u, m)
        return u

    cdef void _split_hash_cache(self, nid_t x, nid_t u, int64_t m) noexcept:
        """Hand the upper node u the first m // page_size of x's cached page hashes. Each
        list is kept last page first (see _node_hashes), so u's pages are the list's tail:
        u takes a copy of the tail and x drops it, O(pages given), not O(x's pages). Called
        by a split that cannot fail: out of memory, every cached hash is dropped (they are
        recomputed when asked for) rather than any list left wrong."""
        cdef list rev
        cdef Py_ssize_t cut
        try:
            rev = self._hash_cache.get(x)
            if rev is not None:
                cut = len(rev) - m // self.page_size
                self._hash_cache[u] = rev[cut:]
                del rev[cut:]
        except BaseException:
            self._hash_cache.clear()

    cdef void _forget_hashes(self, nid_t n) noexcept:
        """Drop node n's cached page hashes (n is leaving the tree). Cannot fail: out of
        memory for the slot's key, the whole cache is dropped instead."""
        try:
            self._hash_cache.pop(n, None)
        except BaseException:
            self._hash_cache.clear()

    cdef int64_t _scan(self, const KeyView* kv, int32_t ns, int64_t limit, nid_t* last,
                       int64_t* path_len, nid_t* part_node, int64_t* part_m) except -1:
        """Follow kv from the root over at most `limit` positions, changing nothing: records
        the wholly matched nodes in the nid scratch and returns their length; *last is the
        deepest of them. When the match goes on inside the next node, *part_node is that
        node and *part_m the page-aligned length matched in it (else NIL and 0). Only
        reserving the scratch can raise (MemoryError)."""
        cdef int64_t P = self.page_size
        cdef int32_t w = kv.width
        cdef int64_t pos = 0, m, avail
        cdef nid_t cur = ROOT, child
        cdef nid_t* path = <nid_t*>self._nid_scratch.reserve(limit // P + 1)
        cdef Node* c
        path_len[0] = 0
        part_node[0] = NIL
        part_m[0] = 0
        cdef uint64_t h = 0, h_next
        if limit >= P:
            h = _page_hash(self.hash_key, ROOT, ns, kv.tok, P * w)
        while limit - pos >= P:
            child = _map_find(&self.cmap, self.nodes, cur, ns, kv.tok + pos * w, P * w, h)
            if child == NIL:
                break
            c = &self.nodes[child]
            # Start the loads this node will need while its key is compared: its slots
            # (copied out by match) and, should the whole node match, the bucket of the
            # next lookup. Both overlap cache misses that would otherwise come one by one.
            _prefetch(c.value)
            if limit - pos - c.len >= P:
                h_next = _page_hash(self.hash_key, child, ns, kv.tok + (pos + c.len) * w, P * w)
                _prefetch(&self.cmap.entries[h_next & self.cmap.mask])
            else:
                h_next = 0
            avail = limit - pos
            m = _common_positions(c.key, kv.tok + pos * w, c.len if c.len < avail else avail, w)
            m -= m % P
            if m < c.len:   # the key diverges (or ends) inside the node: nothing below
                part_node[0] = child
                part_m[0] = m
                break
            path[path_len[0]] = child
            path_len[0] += 1
            pos += m
            cur = child
            h = h_next
        last[0] = cur
        return pos

    # -- the evictable leaves: the run and the heap (see the .pxd) ------------------------

    cdef inline void _full_push(self, nid_t n) noexcept:
        """n becomes an evictable leaf: at the run's end if it orders after the run's last
        leaf (or the run is empty), else into the heap. Never fails (capacity reserved)."""
        cdef Node* x = &self.nodes[n]
        cdef nid_t t = self.run.tail
        if t != NIL and not _before(self.nodes, t, n):
            _heap_push(&self.heap, self.nodes, HEAP_FULL, n)
            return
        x.run_prev = t
        x.run_next = NIL
        if t == NIL:
            self.run.head = n
        else:
            self.nodes[t].run_next = n
        self.run.tail = n
        x.heap_pos[HEAP_FULL] = IN_RUN
        self.run.size += 1

    cdef inline void _full_remove(self, nid_t n) noexcept:
        """n is no longer an evictable leaf (nothing when it was not one)."""
        cdef Node* x = &self.nodes[n]
        if x.heap_pos[HEAP_FULL] >= 0:
            _heap_remove(&self.heap, self.nodes, HEAP_FULL, n)
        elif x.heap_pos[HEAP_FULL] == IN_RUN:
            if x.run_prev == NIL:
                self.run.head = x.run_next
            else:
                self.nodes[x.run_prev].run_next = x.run_next
            if x.run_next == NIL:
                self.run.tail = x.run_prev
            else:
                self.nodes[x.run_next].run_prev = x.run_prev
            x.run_prev = NIL
            x.run_next = NIL
            x.heap_pos[HEAP_FULL] = -1
            self.run.size -= 1

    cdef inline void _full_touched(self, nid_t n) noexcept:
        """Restore the order after n's (prio, last_access) grew. A leaf in the run stays
        where it is while it still orders before the next one (FIFO's: a touch changes
        last_access only, below the prio); else it moves to the run's end if it now orders
        after the run's last leaf (under LRU, every touched leaf), to the heap if not. A
        leaf in the heap moves to the run's end likewise, or sifts down in the heap."""
        cdef Node* x = &self.nodes[n]
        cdef int32_t pos = x.heap_pos[HEAP_FULL]
        cdef nid_t t = self.run.tail
        if pos == -1:
            return
        if pos == IN_RUN and (x.run_next == NIL or _before(self.nodes, n, x.run_next)):
            return
        if pos >= 0 and t != NIL and not _before(self.nodes, t, n):
            _sift_down(&self.heap, self.nodes, HEAP_FULL, pos)
            return
        self._full_remove(n)
        self._full_push(n)

    cdef inline nid_t _full_first(self) noexcept:
        """The next leaf to evict (the policy's first), NIL when none."""
        cdef nid_t h = self.run.head
        if self.heap.size == 0:
            return h
        if h == NIL or _before(self.nodes, self.heap.data[0], h):
            return self.heap.data[0]
        return h

    cdef void _touch_path(self, int64_t n_path, bint count_hit) noexcept:
        """Refresh the first n_path nodes of the nid scratch (a walk's path): recency, and
        with count_hit the hit count (and the LFU/SLRU priority that follows it)."""
        cdef nid_t* path = <nid_t*>self._nid_scratch.data
        cdef int64_t i
        cdef nid_t n
        cdef Node* c
        for i in range(n_path):
            n = path[i]
            c = &self.nodes[n]
            c.last_access = self.clock
            if count_hit:
                c.hit_count += 1
                if self.policy == POLICY_LFU:
                    c.prio = c.hit_count
                elif self.policy == POLICY_SLRU:
                    c.prio = 1      # promoted to the protected segment
            self._full_touched(n)
            _heap_touched(&self.aux_heap, self.nodes, HEAP_AUX, n)

    cdef nid_t _split_end(self, nid_t part_node, int64_t part_m, nid_t* last,
                          int64_t* path_len) except NIL:
        """After _scan: split part_node where the match ends inside it (part_m > 0) and
        append the upper half to the path as the new *last. Capacity reserved; out of
        memory, MemoryError and nothing changed."""
        cdef nid_t u
        if part_m == 0:
            return last[0]
        u = self._split(part_node, part_m)
        (<nid_t*>self._nid_scratch.data)[path_len[0]] = u
        path_len[0] += 1
        last[0] = u
        return u

    # -- public API ---------------------------------------------------------------------

    def match_prefix(self, key):
        """Find the longest cached prefix of *key* (whole pages when page_size > 1).

        Returns ``MatchResult(indices, last_node, prefix_len)``: ``indices`` is a new 1-D
        int32 numpy array of the KV slots of the first ``prefix_len`` tokens. They stay
        owned by the tree: call :meth:`inc_lock_ref` on ``last_node`` before the next
        :meth:`evict` if you read them later. A match ending inside a node splits it, so
        ``last_node`` always ends exactly at ``prefix_len``. Recency and hit counts of the
        matched nodes are refreshed. Bad keys raise and change nothing. Over this package's
        allocators, ``allocator.alloc(need, prefix=indices)`` returns these slots followed
        by ``need`` new ones (the caller's), the value for :meth:`insert`, in one array.

        With a sliding window W, a prefix is usable only if its path has no tombstone or
        its last W tokens all hold SWA KV; the result is cut back to the longest usable
        prefix (at a node boundary).
        """
        self._enter()
        try:
            return self._match_prefix_locked(key)
        finally:
            self._leave()

    cdef object _match_prefix_locked(self, key):
        cdef KeyView kv
        cdef nid_t last, part_node
        cdef int64_t n_path, matched, part_m, n_use, total
        cdef int32_t ns
        cdef cnp.ndarray out
        owner = self._load_key(key, &kv)
        ns = self._find_ns(_extra_key(key), kv.arity)
        self._check_key_kept(owner, &kv)
        self._reserve_nodes(1)
        h = self._blank_handle()
        if ns < 0 or kv.n < self.page_size:
            return self._miss(h)
        matched = self._scan(&kv, ns, kv.n, &last, &n_path, &part_node, &part_m)
        # the result covers the path's first n_use segments: the wholly matched nodes, then
        # the partial node's matched part (the upper half of its split)
        n_use = n_path + (1 if part_m > 0 else 0)
        if self.swa:
            n_use = self._swa_usable(n_path, part_node, part_m)
        if n_use == 0:
            total = 0
        elif n_use > n_path:
            total = matched + part_m
        else:
            total = self.nodes[(<nid_t*>self._nid_scratch.data)[n_use - 1]].end_pos
        # everything that can fail first (the result; the split allocates before it changes
        # the tree): then the tree changes (split, clock, recency, hits) and the result is
        # filled in
        out = _result_idx(total)
        r = _match_result(out, h, total)
        self._split_end(part_node, part_m, &last, &n_path)
        self.clock += 1
        self._touch_path(n_path, True)
        self._fill_path_indices(out, n_use)
        self._aim(h, (<nid_t*>self._nid_scratch.data)[n_use - 1] if n_use > 0 else ROOT)
        return r

    cdef object _miss(self, TreeNode h):
        """A match of nothing (a namespace the tree lacks, a key shorter than a page): an
        empty result at the root (h already names it), built before the clock ticks."""
        r = _match_result(_result_idx(0), h, 0)
        self.clock += 1
        return r

    cdef void _fill_path_indices(self, cnp.ndarray out, int64_t n_path) noexcept:
        """Copy the KV indices of the first n_path nodes of the path (the nid scratch) into
        out, one after the other."""
        cdef idx_t* dst = <idx_t*>cnp.PyArray_DATA(out)
        cdef nid_t* path = <nid_t*>self._nid_scratch.data
        cdef int64_t i, off = 0
        for i in range(n_path):
            copy32(dst + off, self.nodes[path[i]].value, self.nodes[path[i]].len)
            off += self.nodes[path[i]].len

    cdef int64_t _swa_usable(self, int64_t n_path, nid_t part_node, int64_t part_m) noexcept:
        """How many leading segments of a scanned path (its n_path nodes, then part_m
        positions of part_node when part_m > 0) form the longest usable SWA prefix: no
        tombstone on it, or at least `window` live tokens since the last tombstone (the
        count restarts at every tombstone)."""
        cdef nid_t* path = <nid_t*>self._nid_scratch.data
        cdef int64_t i, best = 0, live_since = -1   # -1: no tombstone seen yet
        cdef Node* x
        for i in range(n_path + (1 if part_m > 0 else 0)):
            x = &self.nodes[path[i] if i < n_path else part_node]
            if x.aux_value < 0:
                live_since = 0
            elif live_since >= 0:
                live_since += x.len if i < n_path else part_m
            if live_since < 0 or live_since >= self.window:
                best = i + 1
        return best

    def insert(self, key, value=None, prev_prefix_len=0, swa_evicted_seqlen=0, priority=0,
               **kwargs):
        """Insert *key* with its KV slot indices *value* (one per token).

        ``value`` may be a numpy array, a list or a jax array; ``None`` uses the token ids
        themselves (plain int keys only). The key is cut to whole pages
        (``aligned = len(key) // page_size * page_size``).

        Ownership after the call: the tree owns ``value[prefix_len:aligned]``; the caller
        still owns the unaligned tail ``value[aligned:]`` and the indices of
        ``value[:prefix_len]`` it allocated itself: those tokens were already cached under
        the tree's own indices, so the caller frees its duplicates (usually
        ``value[match.prefix_len:prefix_len]``), while the tree's own indices it passed back
        (a match's) stay the tree's. Returns ``InsertResult(prefix_len, last_node)`` with
        ``last_node`` ending at ``aligned`` (with a window, see below). The slots the tree
        takes are not locked: a request that goes on reading them (decode, the next chunk)
        locks ``last_node`` before any ``evict`` can run, or that ``evict`` can hand them
        to another request (with a window, it re-matches instead: see the end). Bad input
        raises and changes nothing, as does a key array another thread rewrites while the
        insert reads it so that the new leaf would start with a page the tree already has
        there (``InvalidKeyError``; any other rewrite is cached as read; a windowed insert
        reads a copy of the key and the value).

        Over a ``TokenToKVPoolAllocator`` or ``SWATokenToKVPoolAllocator`` (of exactly
        that type: a subclass is used like any other allocator, through its own Python
        ``free``, with no booking) the allocator books the slots the tree takes (with a
        window: keeps) as the cache's (``allocator.is_cached``): a caller's ``free`` of one
        raises until the tree evicts it (or is reset, or dropped). The slots taken must be allocated and held
        by a caller: a free slot, one a cache already owns (say, a matched prefix passed
        again past ``prefix_len``), with ``page_size`` 1 a slot listed twice, or with pages
        a page-aligned run that is not the slots of one page in order (as ``alloc`` hands
        them out) raises ``InvalidValueError`` and changes nothing: every slot keeps its owner,
        and the tree is as it was (no split, no recency or hit count refreshed), as when
        memory runs out or the allocator's ``free`` raises.
        ``prev_prefix_len`` and ``swa_evicted_seqlen`` only matter with a sliding window
        (there ``prev_prefix_len`` must be a multiple of ``page_size``, at most the key's
        length, else ``InvalidValueError``).
        ``priority`` only matters with ``eviction_policy="priority"``: the nodes this insert
        makes start at ``priority`` (a negative one too) and every node on the path from the
        root to ``last_node`` is raised to at least it (lower priorities are evicted first;
        a node's priority never drops).

        With a sliding window the tree settles every index of ``value[prev_prefix_len:
        aligned]`` itself, so the caller frees none of them: ``value[:prev_prefix_len]`` is
        the caller's protected prefix (the tree's own indices, from ``match_prefix``) and is
        left alone (it must be cached: a ``prev_prefix_len`` beyond what the tree holds of
        the key raises ``InvalidValueError``); beyond it, a duplicate of a live node is
        freed (``allocator.free``); a tombstoned node whose range starts at or beyond
        ``swa_evicted_seqlen`` is revived with the incoming indices (its old ones are freed)
        unless it is locked (a request still reads its full KV), otherwise the incoming
        duplicate is freed; the new suffix is stored, as a tombstone up to
        ``swa_evicted_seqlen`` rounded up to a page (over this package's
        ``SWATokenToKVPoolAllocator`` the tree frees whatever SWA KV the tombstone's tokens
        still hold, such as the rest of a tree page larger than the allocator's; over
        another allocator the caller frees the SWA side up to that rounded position, or
        those SWA slots stay allocated until the node is evicted whole) and live after
        it; a suffix lying
        wholly below ``swa_evicted_seqlen`` is not cached and its indices are freed (then
        ``last_node`` ends where the cached prefix does, at ``prefix_len``). The caller's
        duplicates are freed before the tree changes, in one ``allocator.free`` call: if
        it raises, the tree has taken none of ``value`` and the caller still owns all of
        it. The revived tombstones' old slots are freed in a second call once the tree
        holds the incoming ones (the tree never keeps a slot it has handed over): should
        that one raise, the insert is done, the slots it was handed are the allocator's to
        keep or lose (as with ``evict``) and its exception propagates. Over this package's
        ``SWATokenToKVPoolAllocator`` both calls are in C: the duplicates first (a refused
        one, say a slot of a tombstone this insert revives, raises ``InvalidFreeError``
        with nothing changed), then the old slots, which cannot be refused.

        Chunked prefill with a window: a request that caches a chunk and goes on runs
        ``again = match_prefix(chunk_key)`` after the insert, locks ``again.last_node`` (then
        drops its older lock), and from then on reads ``again.indices`` for the first
        ``again.prefix_len`` positions. Its slots past ``prev_prefix_len`` are the tree's to
        settle, so any position the re-match does not cover must be computed again in newly
        allocated slots: a duplicate over a tombstone that another request holds locked was
        freed, and a live tail shorter than the window after a tombstone was cached but is
        not matched. The unaligned tail ``value[aligned:]`` stays the caller's.
        """
        if kwargs:
            raise TypeError(f"insert() got unexpected keyword arguments {sorted(kwargs)}")
        self._enter()
        try:
            return self._insert_locked(key, value, prev_prefix_len, swa_evicted_seqlen, priority)
        finally:
            self._leave()

    cdef object _insert_locked(self, key, value=None, prev_prefix_len=0, swa_evicted_seqlen=0,
                               priority=0):
        cdef KeyView kv
        cdef const idx_t* vals
        cdef nid_t last
        cdef int64_t prio = _int64("priority", priority)
        cdef int64_t ppl = 0, es = 0
        h = self._blank_handle()    # the result's, allocated before the tree changes
        # Every argument that can run Python code is read before the value, whose array
        # the insert then reads in place: the scalars (an __index__), then the namespace
        # (the extra_key's __hash__ and __eq__). Such code could rewrite a checked array.
        # A bad scalar is still reported after a bad key or value, as documented.
        self._late_exc = None
        if self.swa:
            try:
                ppl = _nonneg_int("prev_prefix_len", prev_prefix_len)
                es = _nonneg_int("swa_evicted_seqlen", swa_evicted_seqlen)
            except Exception as exc:
                self._late_exc = exc
        owner = self._load_key(key, &kv)
        # the extra_key read once (a subclass's property is Python code), before the value
        extra_key = _extra_key(key)
        cdef int32_t ns = self._find_ns_late(extra_key, kv.arity)
        self._check_key_kept(owner, &kv)
        vowner = self._load_value(value, &kv, &vals)
        self._check_key_kept(owner, &kv)
        self._raise_late()
        self.new_prio = prio
        if self.swa:
            r = self._insert_swa(&kv, vals, extra_key, ns, ppl, es, h, &last)
        else:
            r = self._insert_kv(&kv, vals, extra_key, ns, h, &last)
        if self.policy == POLICY_PRIORITY:
            self._raise_priority(last, prio)
        self._aim(h, last)
        if self._pending_exc is not None:   # the windowed insert's late free raised
            exc, self._pending_exc = self._pending_exc, None
            raise exc
        return r

    cdef void _raise_priority(self, nid_t n, int64_t p) noexcept:
        """Raise n and its ancestors to priority >= p (it only grows: heaps sift down). The
        nodes this insert made already start at p (new_prio)."""
        cdef Node* x
        while n != ROOT:
            x = &self.nodes[n]
            if x.prio < p:
                x.prio = p
                self._full_touched(n)
                _heap_touched(&self.aux_heap, self.nodes, HEAP_AUX, n)
            n = x.parent

    cdef object _insert_swa(self, const KeyView* kv, const idx_t* vals, object extra_key,
                            int32_t ns, int64_t ppl, int64_t es, TreeNode h, nid_t* out_last):
        """The windowed insert (see insert); returns its InsertResult, with the handle h
        (the caller aims it at *out_last). Everything that can fail (bad arguments,
        memory, the allocator's checks and its free) runs before the tree changes: the walk
        is read-only and works on the path as it will be once the splits at
        prev_prefix_len and at the match end are made; those splits (their blocks allocated
        up front), the recency updates, the revivals and the new nodes come last."""
        cdef int64_t P = self.page_size
        cdef int64_t aligned = kv.n - kv.n % P
        cdef int64_t n_path, matched, part_m, i, s0, e, off, seg, n_free = 0
        cdef int64_t tomb_len, matched_live = 0, same, n_seg, n_full
        cdef int32_t w = kv.width
        cdef nid_t last, part_node, x_ppl = NIL, u
        cdef nid_t* path
        cdef Node* x
        cdef idx_t* dup
        cdef tok_t* k1 = NULL
        cdef tok_t* k2 = NULL
        cdef idx_t* v1 = NULL
        cdef idx_t* v2 = NULL
        cdef tok_t* b_ppl = NULL    # the upper block of the split at prev_prefix_len
        cdef tok_t* b_end = NULL    # the upper block of the split at the match end
        cdef idx_t* unused
        cdef int64_t m_ppl = 0, m_end = 0
        cdef bint allocated
        cdef int64_t* revive
        cdef idx_t* tree_old        # the revived tombstones' own slots, to free
        cdef idx_t* kept            # the revived parts' incoming slots; booking: then the
                                    # new suffix's (every incoming slot the tree keeps)
        cdef int64_t n_old = 0, n_kept = 0
        cdef idx_t* swa_live        # the new tombstone's slots still holding SWA KV (booked)
        cdef int64_t n_swa_live = 0
        cdef KeyView pinned
        if ppl > kv.n or ppl % P:
            raise InvalidValueError(
                f"prev_prefix_len: expected a multiple of page_size {P} in [0, {kv.n}], got {ppl}"
            )
        # past the key's end it is all the same (and rounding 2**63 - 1 up would overflow)
        es = (min(es, kv.n) + P - 1) // P * P
        if ns < 0 and ppl > 0:
            raise InvalidValueError(
                f"prev_prefix_len: {ppl}, but the tree holds no prefix of this key (a new "
                "namespace): value[:prev_prefix_len] would be taken as new"
            )
        if aligned == 0:
            r = _insert_result(0, h)
            self.clock += 1
            out_last[0] = ROOT
            return r
        if ns < 0 and es >= aligned:
            # nothing of a new namespace gets cached: no namespace id is taken
            r = _insert_result(0, h)
            if self.token_to_kv_pool_allocator is not None:
                self.token_to_kv_pool_allocator.free(_copy_idx(vals, aligned))
            self.clock += 1
            out_last[0] = ROOT
            return r
        self._reserve_nodes(4)      # a split at prev_prefix_len, one at the match end, 2 new
        # duplicates in [0, 2 * aligned); booked, the revived tombstones' own slots and the
        # kept ones (unbooked too: the revived parts' slots) after them, then the new
        # tombstone's slots that still hold SWA KV, then a copy of the value
        cdef int64_t n_dup = 4 * aligned
        dup = <idx_t*>self._idx_out.reserve(n_dup + 2 * aligned)
        tree_old = dup + 2 * aligned
        kept = dup + 3 * aligned
        swa_live = dup + n_dup
        self._nid_scratch.reserve(aligned // P + 3)   # the path, and the two splits' halves
        revive = <int64_t*>self._flag_scratch.reserve(aligned // P + 1)   # a flag per segment
        # The insert reads its copies of the slots and the key from here on. It reads each
        # several times (duplicates, kept and booked slots, the new nodes' blocks), and the
        # caller's arrays could change in between: taking a new namespace runs the
        # extra_key's Python code, and another thread may write them (numpy copies
        # without the GIL). From one copy, what the tree keeps, what it books and what it
        # frees agree, and the new nodes start with the page the walk found missing.
        copy32(dup + n_dup + aligned, vals, aligned)
        vals = dup + n_dup + aligned
        kv = self._pin_key(kv, &pinned)
        allocated = ns < 0
        if allocated:
            # a new namespace matches nothing: the new nodes' arrays are allocated before
            # the namespace is taken (all or nothing)
            _alloc_swa_suffix(0, aligned, es, w, &k1, &v1, &k2, &v2)
            if self._booking_kind:
                # booked: the slots are checked before the namespace is taken (a refused
                # insert leaves no namespace behind), and taken for good below
                self._adopt_or_free(vals, aligned, k1, k2)
            try:
                # the result (it matches nothing) before the namespace is taken: out of
                # memory for it, no empty namespace is left registered
                r = _insert_result(0, h)
                ns = self._intern_ns(extra_key, kv.arity)
            except BaseException:
                self._disown(vals, aligned)
                free(k1); free(k2)  # the values live in the keys' blocks
                raise
            self._disown(vals, aligned)
        try:
            matched = self._scan(kv, ns, aligned, &last, &n_path, &part_node, &part_m)
            path = <nid_t*>self._nid_scratch.data
            if matched + part_m < ppl:
                raise InvalidValueError(
                    f"prev_prefix_len: {ppl}, but the tree holds only {matched + part_m} tokens "
                    "of this key: value[:prev_prefix_len] would be taken as new"
                )
            # Nodes never straddle the caller's protected prefix: the node holding position
            # ppl inside it is split there (the partial node counts up to the match end).
            n_seg = n_path + (1 if part_m > 0 else 0)
            for i in range(n_seg):
                x = &self.nodes[path[i] if i < n_path else part_node]
                s0 = x.end_pos - x.len
                e = x.end_pos if i < n_path else matched + part_m
                if s0 < ppl < e:
                    x_ppl = path[i] if i < n_path else part_node
                    m_ppl = ppl - s0
                    break
            # both splits in the partial node: the one at ppl first, then its lower half's
            m_end = part_m - m_ppl if m_ppl > 0 and x_ppl == part_node else part_m
            matched += part_m
            if not allocated:
                _alloc_swa_suffix(matched, aligned, es, w, &k1, &v1, &k2, &v2)
            if m_ppl > 0:
                _alloc_node_arrays(m_ppl, w, &b_ppl, &unused)
            if m_end > 0:
                _alloc_node_arrays(m_end, w, &b_end, &unused)
            if not allocated or matched > 0:    # not built above, or the namespace was there
                r = _insert_result(matched, h)
        except BaseException:
            free(k1); free(k2); free(b_ppl); free(b_end)
            raise
        # First decide, changing nothing, which indices are duplicates and free them: should
        # the allocator raise, the tree has taken none of the caller's indices. Each node of
        # the path counts from ppl on (the lower half of its split there), the partial node
        # up to the match end (the upper half of its split there).
        for i in range(n_seg):
            revive[i] = 0
            x = &self.nodes[path[i] if i < n_path else part_node]
            s0 = x.end_pos - x.len
            e = x.end_pos if i < n_path else matched
            seg = e - (s0 if s0 > ppl else ppl)
            if seg <= 0:
                continue
            off = e - seg - s0
            s0 += off
            # an incoming index equal to the node's own at that position is the tree's own
            # slot handed back (prev_prefix_len too short), never a duplicate to free
            same = _count_equal(x.value + off, vals + s0, seg)
            if x.aux_value < 0 and s0 >= es and same == 0 and x.lock_ref == 0:
                # the tombstone is revived with the incoming indices; its old ones are freed
                # (only when unlocked: a request holding it still reads its full KV) on
                # their own, after the caller's duplicates
                copy32(tree_old + n_old, x.value + off, seg)
                n_old += seg
                revive[i] = 1
                copy32(kept + n_kept, vals + s0, seg)   # what the revived part will hold
                n_kept += seg
            elif same < seg:
                n_free += _copy_differing(dup + n_free, x.value + off, vals + s0, seg)
        if matched < aligned and es >= aligned:
            # the whole new suffix lost its SWA KV: not worth caching
            copy32(dup + n_free, vals + matched, aligned - matched)
            n_free += aligned - matched
        elif matched < aligned:
            # the new nodes' tokens and slots go into their blocks now: the allocator's free
            # below may run Python code, and the tree reads none of the caller's arrays
            # after it (the revived parts read their copy in `kept`)
            matched_live = matched
            if es > matched:
                tomb_len = es - matched
                copy32(k1, kv.tok + matched * w, tomb_len * w)
                copy32(v1, vals + matched, tomb_len)
                matched_live = es
            copy32(k2, kv.tok + matched_live * w, (aligned - matched_live) * w)
            copy32(v2, vals + matched_live, aligned - matched_live)
            if self._booking_kind:
                copy32(kept + n_kept, vals + matched, aligned - matched)
                n_kept += aligned - matched
                n_swa_live = self._swa_still_live(vals, matched, matched_live, swa_live)
        old_free = None
        try:
            if n_old > 0 and not self._booking_kind and self.token_to_kv_pool_allocator is not None:
                # the revived tombstones' old slots go once the tree has changed (below):
                # their free is found, and checked, while nothing has
                old_free = _callable_method(
                    self.token_to_kv_pool_allocator, "free", "token_to_kv_pool_allocator")
            if self._booking_kind:
                # Booked: the slots the tree keeps must be a caller's (taken first,
                # checked), and so must every duplicate the caller hands back: freed while
                # the revived tombstones' own slots are still the tree's, so that one of
                # those among the duplicates is refused (with pages a free frees each page
                # once, so the same page twice in one call would pass). Then the
                # tombstones' slots are freed as the caller's: just disowned, distinct, in
                # range, that free cannot be refused.
                self._adopt(kept, n_kept)
                if n_free > 0:
                    try:
                        (<SWATokenToKVPoolAllocator>self._booking_allocator).free_c(
                            dup, n_free, PAGE_ALLOCATED)
                    except BaseException:
                        self._disown(kept, n_kept)
                        raise
                if n_old > 0:
                    self._disown(tree_old, n_old)
                    (<SWATokenToKVPoolAllocator>self._booking_allocator).free_c(
                        tree_old, n_old, PAGE_ALLOCATED)
                if n_swa_live > 0:
                    # the new tombstone keeps no SWA KV: what its tokens still hold (the
                    # cache's slots now, just taken) is freed, which cannot be refused
                    (<SWATokenToKVPoolAllocator>self._booking_allocator).free_swa_c(
                        swa_live, n_swa_live, PAGE_CACHED)
            elif n_free > 0 and self.token_to_kv_pool_allocator is not None:
                self.token_to_kv_pool_allocator.free(_copy_idx(dup, n_free))
        except BaseException:
            free(k1); free(k2); free(b_ppl); free(b_end)
            raise
        # Then change the tree: nothing below raises. The splits' upper halves join the
        # path; a segment's node is then its path node (the lower half of the split at
        # ppl), or for the partial node's segment, the deepest matched node
        n_full = n_path
        if m_ppl > 0:
            u = self._split_into(x_ppl, m_ppl, b_ppl)   # x_ppl keeps the part from ppl on
            path[n_path] = u
            n_path += 1
        # (a split at ppl inside the partial node leaves m_end > 0, since ppl < the match's
        # end there: the deepest node is then the second split's upper half)
        if m_end > 0:
            last = self._split_into(part_node, m_end, b_end)
            path[n_path] = last
            n_path += 1
        self.clock += 1
        self._touch_path(n_path, False)
        off = 0
        for i in range(n_seg):
            if revive[i]:
                u = path[i] if i < n_full else last
                x = &self.nodes[u]
                copy32(x.value, kept + off, x.len)
                off += x.len
                x.aux_value = 0
                self._aux_evictable += x.len
                _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, u)
        if matched < aligned and es < aligned:     # the blocks were filled above
            if es > matched:
                last = self._link_leaf(last, ns, w, k1, v1, es - matched, False)
                k1 = NULL
                v1 = NULL
            last = self._link_leaf(last, ns, w, k2, v2, aligned - matched_live, True)
            k2 = NULL
            v2 = NULL
        free(k1); free(k2)
        out_last[0] = last
        if old_free is not None:
            # A Python allocator: the revived tombstones' old slots go only now that the
            # tree holds the incoming ones. Were they freed with the duplicates, a free
            # that raised (an interrupt once the slots were freed) left them in the
            # unchanged tree as well: two owners. Its exception is raised once the insert's
            # handle is aimed (_insert_locked).
            try:
                _hand_over(old_free, tree_old, n_old)
            except BaseException as exc:
                self._pending_exc = exc
        return r

    cdef object _insert_kv(self, const KeyView* kv, const idx_t* vals, object extra_key,
                           int32_t ns, TreeNode h, nid_t* out_last):
        """Store validated key/values; returns the InsertResult (its prefix_len the length
        that was already cached, its handle h, which the caller aims at *out_last) and sets
        *out_last to the node ending at the page-aligned key end. `ns` is the
        namespace _find_ns gave, before the value was read (-1: new). Everything that
        can fail (memory, the allocator's check of the slots) comes before the tree
        changes: the walk is read-only, and the split at the match end, the recency
        updates and the new leaf come after."""
        cdef nid_t last, part_node
        cdef int64_t n_path, matched, part_m
        cdef int64_t aligned = kv.n - kv.n % self.page_size
        cdef int32_t w = kv.width
        cdef tok_t* new_key = NULL
        cdef idx_t* new_val = NULL
        cdef int64_t taken = 0      # slots of new_val adopted so far
        cdef KeyView pinned
        if aligned == 0:
            r = _insert_result(0, h)
            self.clock += 1
            out_last[0] = ROOT
            return r
        self._reserve_nodes(2)
        self._nid_scratch.reserve(aligned // self.page_size + 1)   # the walk's path
        r = None
        if ns < 0:
            # a new namespace matches nothing: the leaf takes the whole key, and its arrays
            # and slots are taken before the namespace is (all or nothing). The slots are
            # copied first and taken from the copy: interning runs the extra_key's Python
            # code, which could change the caller's array (or let a thread change it); so
            # could it the key's, which is read from a copy from here on
            kv = self._pin_key(kv, &pinned)
            _alloc_node_arrays(aligned, w, &new_key, &new_val)
            copy32(new_val, vals, aligned)
            self._adopt_or_free(new_val, aligned, new_key)  # new_val is in new_key's block
            taken = aligned
            try:
                # the result (it matches nothing) before the namespace is taken: out of
                # memory for it, no empty namespace is left registered
                r = _insert_result(0, h)
                ns = self._intern_ns(extra_key, kv.arity)
            except BaseException:
                self._disown(new_val, aligned)
                free(new_key)
                raise
        try:
            matched = self._scan(kv, ns, aligned, &last, &n_path, &part_node, &part_m)
            matched += part_m
            if taken and matched > 0:
                # _intern_ns found an existing namespace after all (an extra_key whose hash
                # or equality changed between its two lookups): that prefix is cached, so
                # its slots stay the caller's (duplicates), and the leaf takes the rest
                self._disown(new_val, matched)
                taken -= matched
                new_val += matched  # the leaf's slots; _link_leaf lays its block out
            if matched < aligned and new_key == NULL:
                # sized to the leaf, not the key: a short leaf under a long cached prefix
                # must not hold arrays as long as the whole key
                _alloc_node_arrays(aligned - matched, w, &new_key, &new_val)
                copy32(new_val, vals + matched, aligned - matched)
                self._adopt(new_val, aligned - matched)
                taken = aligned - matched
            if r is None or matched > 0:    # not built above, or the namespace was there
                r = _insert_result(matched, h)
            if matched < aligned:
                copy32(new_key, kv.tok + matched * w, (aligned - matched) * w)
                self._check_leaf_page(last, part_node, part_m, ns, new_key, w)
            self._split_end(part_node, part_m, &last, &n_path)
        except BaseException:
            self._disown(new_val, taken)
            free(new_key)   # NULL when none
            raise
        self.clock += 1
        self._touch_path(n_path, False)
        if matched == aligned:
            free(new_key)   # NULL, or a fresh namespace's arrays, unused
            out_last[0] = last
            return r
        # a new leaf for the rest under `last` (its key and slots were copied above)
        out_last[0] = self._link_leaf(last, ns, w, new_key, new_val, aligned - matched, True)
        return r

    cdef int _check_leaf_page(self, nid_t last, nid_t part_node, int64_t part_m, int32_t ns,
                              const tok_t* page, int32_t w) except -1:
        """An insert's new leaf, its key copied from the caller's array, must start with the
        page the walk found missing: neither a child of `last` nor, when the match ends
        inside part_node (split at part_m), part_node's rest may start with it. The walk
        and the copy read the caller's array twice with no Python code between, but
        another thread may write it meanwhile (numpy copies without the GIL), and the leaf
        would then be a second child with the same first page. InvalidKeyError then,
        before the tree changes."""
        cdef int64_t ntok = self.page_size * w
        cdef bint taken
        if part_m > 0:
            taken = memcmp(self.nodes[part_node].key + part_m * w, page,
                           ntok * sizeof(tok_t)) == 0
        else:
            taken = self._child_with_page(last, ns, page, ntok) != NIL
        if taken:
            raise InvalidKeyError(
                "insert: the key changed while the insert read it (another thread wrote "
                "the array); nothing was inserted"
            )
        return 0

    cdef int _adopt(self, const idx_t* vals, int64_t n) except -1:
        """The slots vals[0:n] become the tree's: with our own allocators, it checks that a
        caller holds each (allocated, owned by no cache) and records the cache as their
        owner (InvalidValueError, nothing taken, otherwise). Other allocators track no
        owners."""
        if self._booking_kind == BOOK_PLAIN:
            (<TokenToKVPoolAllocator>self._booking_allocator).adopt_c(vals, n)
        elif self._booking_kind == BOOK_SWA:
            (<SWATokenToKVPoolAllocator>self._booking_allocator).adopt_c(vals, n)
        return 0

    cdef int64_t _swa_still_live(self, const idx_t* vals, int64_t lo, int64_t hi,
                                 idx_t* out) noexcept:
        """Over this package's SWATokenToKVPoolAllocator: copy to `out` the slots of
        vals[lo:hi] (the tokens a windowed insert stores in a new tombstone) whose SWA side
        is still allocated, and return how many; 0 over any other allocator. The caller
        frees the SWA KV up to swa_evicted_seqlen, which the tree rounds up to its page: the
        rest of that page (with a tree page larger than the allocator's), or tokens past
        what the caller freed, would keep SWA slots that no size counts and no evict
        frees. A slot past the pool is skipped (the allocator refuses it when taking it)."""
        cdef int64_t i, n = 0, end
        cdef const int32_t* to_swa
        if self._booking_kind != BOOK_SWA or hi <= lo:
            return 0
        alloc = <SWATokenToKVPoolAllocator>self._booking_allocator
        to_swa = alloc.mapping
        end = cnp.PyArray_DIM(<cnp.ndarray>alloc._mapping, 0)
        for i in range(lo, hi):
            if vals[i] < end and to_swa[vals[i]] != 0:
                out[n] = vals[i]
                n += 1
        return n

    cdef int _adopt_or_free(self, const idx_t* vals, int64_t n, void* block,
                            void* block2=NULL) except -1:
        """_adopt(vals, n) for an insert whose new node arrays are allocated: when the
        slots are refused, those blocks (free()able, NULL for none) go before the error
        propagates."""
        try:
            self._adopt(vals, n)
        except BaseException:
            free(block); free(block2)
            raise
        return 0

    cdef void _disown(self, const idx_t* vals, int64_t n) noexcept:
        """Undo _adopt(vals, n) (an insert that could not finish): the caller's again."""
        if self._booking_kind == BOOK_PLAIN:
            (<TokenToKVPoolAllocator>self._booking_allocator).disown_c(vals, n)
        elif self._booking_kind == BOOK_SWA:
            (<SWATokenToKVPoolAllocator>self._booking_allocator).disown_c(vals, n)

    cdef int _free_booked(self, const idx_t* vals, int64_t n) except -1:
        """Free slots the tree owns (booked as the cache's) through the allocator's C entry
        point (both sides with a window)."""
        if self._booking_kind == BOOK_PLAIN:
            (<TokenToKVPoolAllocator>self._booking_allocator).free_c(vals, n, PAGE_CACHED)
        else:
            (<SWATokenToKVPoolAllocator>self._booking_allocator).free_c(vals, n, PAGE_CACHED)
        return 0

    cdef nid_t _link_leaf(self, nid_t parent, int32_t ns, int32_t w, tok_t* key, idx_t* value,
                          int64_t n, bint live) noexcept:
        """Hang a new leaf owning key/value (n positions) under parent. In SWA mode it holds
        live SWA KV unless `live` is False (a tombstone). Capacity must be reserved. `key`
        is its block's start; a block made for more positions (an insert whose namespace
        turned up only when it was taken matches part of its key after all) has its value
        moved down to the key's end and is shrunk, as _node_lead reads every block."""
        cdef nid_t leaf
        cdef Node* L
        cdef Node* par
        if value != <idx_t*>(key + n * w):
            move32_down(key + n * w, <const tok_t*>value, n)
            _shrink(<void**>&key, n * (w + 1) * sizeof(tok_t))
            value = <idx_t*>(key + n * w)
        leaf = self._take_slot()
        self._init_node(leaf, self.next_uid, parent, ns, w)
        self.next_uid += 1
        L = &self.nodes[leaf]
        L.len = n
        L.key = key
        L.value = value
        par = &self.nodes[parent]
        L.end_pos = par.end_pos + n
        self._full_remove(parent)
        par.num_children += 1
        if parent == ROOT:
            self.ns_tab[ns].ref += 1
        _map_put(&self.cmap, parent, leaf, self._node_hash(parent, L))
        self._full_push(leaf)
        self._evictable += n
        if self.swa and live:
            L.aux_value = 0
            _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, leaf)
            self._aux_evictable += n
        return leaf

    def evict(self, num_tokens, swa_num_tokens=0):
        """Evict unlocked leaves in the eviction policy's order (least recently used first
        by default) until at least *num_tokens* tokens are freed or nothing evictable is left
        (whole nodes, so it may free more).

        A parent whose last child goes becomes a candidate itself. The freed KV slots go
        back in one ``allocator.free(int32 array)`` call (for a ``TokenToKVPoolAllocator``
        or ``SWATokenToKVPoolAllocator`` of exactly that type, straight through its C entry
        point, no array; a subclass's own ``free`` is called); ``on_node_evict(node_id)``
        is called for each evicted node, after the tree is consistent again. Cost is
        proportional to what is evicted (heap pops), never a walk over the tree.
        ``swa_num_tokens`` is ignored without a sliding window; ``num_tokens`` <= 0 (and,
        with a window, ``swa_num_tokens`` <= 0) evicts nothing. Returns
        ``EvictResult(full_evicted, swa_evicted)``, the tokens whose full and SWA KV slots
        were freed. Without an allocator (``token_to_kv_pool_allocator=None``) the evicted
        slots are handed to no one: such a tree models hit rates, it does not manage a
        pool.

        With a sliding window, a second phase then drops SWA KV, in policy order, until at
        least *swa_num_tokens* SWA tokens are freed, over the nodes whose SWA KV is not
        locked: one that has children or whose full KV is locked becomes a tombstone (its
        SWA KV freed, its full KV kept), an unlocked leaf goes whole, and
        the full KV of such a leaf counts in ``full_evicted`` too (``evict(0, n)`` can
        return ``full_evicted > 0``). The SWA side goes back in one ``free_swa`` call,
        before the ``free`` call of the full side.

        Ownership: the evicted slots (and Mamba states) leave the tree; they are handed to
        the allocator (and the state pool) in that call. If a callback raises, the others
        still run (every slot and state is handed over, every node reported) and the first
        exception is raised afterwards: the nodes are gone either way, and what a raising
        allocator did with the slots it was handed is up to it. Out of host memory midway
        (or interrupted), the evict stops: the nodes removed so far are handed over and
        reported the same way, then the error is raised; the tree is consistent and no
        slot is lost.
        """
        self._enter()
        try:
            return self._evict_locked(num_tokens, swa_num_tokens)
        finally:
            self._leave()

    cdef object _evict_locked(self, num_tokens, swa_num_tokens=0):
        cdef int64_t done, swa_done
        cdef int64_t want = _count("num_tokens", num_tokens)
        cdef int64_t swa_want = _count("swa_num_tokens", swa_num_tokens)
        cdef nid_t n
        cdef Node* x
        cdef idx_t* out
        self._start_evict()
        try:
            self._evict_full(want)
            # SWA phase: tombstone SWA-unlocked nodes in policy order (an unlocked leaf goes
            # whole); each step takes one node off the SWA heap, so the loop ends
            while self.swa and self.aux_freed < swa_want and self.aux_heap.size > 0:
                n = self.aux_heap.data[0]
                x = &self.nodes[n]
                if x.num_children == 0 and x.lock_ref == 0:
                    self._collect_and_remove(n)
                else:
                    out = <idx_t*>self._swa_out.reserve(self.n_swa_out + x.len)
                    copy32(out + self.n_swa_out, x.value, x.len)
                    self.n_swa_out += x.len
                    _heap_remove(&self.aux_heap, self.nodes, HEAP_AUX, n)
                    self._aux_evictable -= x.len
                    self.aux_freed += x.len
                    x.aux_value = -1
        except BaseException:
            self._hand_over_partial()
            raise
        done, swa_done = self.ev_done, self.aux_freed
        self._after_evict(self.ev_done, self.ev_nodes)
        return _evict_result(done, swa_done) if self.swa else _evict_result(done)

    cdef int _bind_hand_over(self) except -1:
        """Look up, before any node is removed, what _after_evict will call: the owners'
        Python ``free`` methods (a bound method is a new object) and an empty list for the
        evicted ids. Booked owners are called in C and need none."""
        a = self.token_to_kv_pool_allocator
        try:
            # each checked callable too: replaced since the constructor checked it, it would
            # fail only once its nodes are gone, their slots with no one
            if a is not None and not self._booking_kind:
                self._ev_free = _callable_method(a, "free", "token_to_kv_pool_allocator")
            if a is not None and self.swa and self._booking_kind != BOOK_SWA:
                self._ev_free_swa = _callable_method(a, "free_swa", "token_to_kv_pool_allocator")
            if self.mamba and self.mamba_pool is not None and self._state_booking == NULL:
                self._ev_free_states = _callable_method(self.mamba_pool, "free", "mamba_pool")
            if self.on_node_evict is not None:
                self._ev_uids = []
        except BaseException:
            self._unbind_hand_over()
            raise
        return 0

    cdef void _unbind_hand_over(self) noexcept:
        """Drop what _bind_hand_over made once it is used (or cannot be): a bound method is
        a reference to its owner, which the collector would otherwise see the cache hold (a
        dropped cache's cycle would outlive the collection), and the ids of a large evict
        would stay in memory until the next one."""
        self._ev_free = None
        self._ev_free_swa = None
        self._ev_free_states = None
        self._ev_uids = None

    cdef int _start_evict(self) except -1:
        """Zero the current evict's progress (what _after_evict hands over)."""
        self._bind_hand_over()
        self.ev_done = 0
        self.ev_nodes = 0
        self.n_states_out = 0
        self.aux_freed = 0
        self.n_swa_out = 0
        self._pending_exc = None
        return 0

    cdef int _hand_over_partial(self) noexcept:
        """An evict stopped midway (out of memory growing a scratch buffer, or an
        interrupt): the nodes already removed are gone, so what they held still goes to
        the allocator, the state pool and on_node_evict, as after a whole evict, and the
        error in flight is the one the caller gets (an error of these hand-overs is
        dropped: every stage runs regardless, see _after_evict)."""
        try:
            self._after_evict(self.ev_done, self.ev_nodes)
        except BaseException:
            pass
        return 0

    cdef int _evict_full(self, int64_t want) except -1:
        """Pop leaves in policy order until `want` tokens are collected in _idx_out."""
        cdef nid_t n
        while self.ev_done < want:
            n = self._full_first()
            if n == NIL:
                break
            self._collect_and_remove(n)
        return 0

    cdef int _collect_and_remove(self, nid_t n) except -1:
        """Copy leaf n's KV into _idx_out, note its id (for on_node_evict), remove it; then
        the same for every parent this leaves a childless, unlocked tombstone (SWA: no leaf
        stays a tombstone, its full KV alone serves no match). A loop, not recursion: such a chain
        is as long as the tree is deep. Every buffer a removal writes to is grown before the
        node changes, so a MemoryError leaves the node in the tree and the progress
        (ev_done, ev_nodes, the states collected) exact."""
        cdef Node* x
        cdef idx_t* out
        cdef nid_t parent
        while True:
            out = <idx_t*>self._idx_out.reserve(self.ev_done + self.nodes[n].len)
            if self.mamba:  # _remove_leaf may move the node's state to _state_out
                self._state_out.reserve(self.n_states_out + 1)
            if self.on_node_evict is not None:  # the id as an int, made while n is there
                self._ev_uids.append(self.nodes[n].uid)
            x = &self.nodes[n]
            parent = x.parent
            copy32(out + self.ev_done, x.value, x.len)
            self.ev_nodes += 1
            self.ev_done += x.len
            self._remove_leaf(n)
            x = &self.nodes[parent]
            if not (self.swa and parent != ROOT and x.aux_value < 0 and x.num_children == 0
                    and x.lock_ref == 0):
                return 0
            n = parent

    cdef int _after_evict(self, int64_t n_idx, int64_t n_nodes) except -1:
        """Hand the evicted slots to the allocator (one call), the evicted Mamba states to
        the state pool (one call), and report evicted nodes. The nodes are already gone, so
        every stage runs even when an earlier one raises (a skipped stage would leak what it
        hands over); the first exception is raised once all have run."""
        cdef int64_t i
        first = self._pending_exc   # an interrupt a node's removal held back
        self._pending_exc = None
        # SWA-only frees first: a node tombstoned and then removed in one call is in both
        # lists, and free_swa needs its full slots still allocated
        if self.n_swa_out > 0 and self.token_to_kv_pool_allocator is not None:
            try:
                if self._booking_kind == BOOK_SWA:
                    (<SWATokenToKVPoolAllocator>self._booking_allocator).free_swa_c(
                        <idx_t*>self._swa_out.data, self.n_swa_out, PAGE_CACHED)
                else:
                    _hand_over(self._ev_free_swa, <idx_t*>self._swa_out.data, self.n_swa_out)
            except BaseException as exc:
                if first is None:
                    first = exc
        self.n_swa_out = 0
        if n_idx > 0 and self.token_to_kv_pool_allocator is not None:
            try:
                if self._booking_kind:
                    # our own allocator: straight to its C entry point, no array, no Python
                    self._free_booked(<idx_t*>self._idx_out.data, n_idx)
                else:
                    _hand_over(self._ev_free, <idx_t*>self._idx_out.data, n_idx)
            except BaseException as exc:
                if first is None:
                    first = exc
        n_states = self.n_states_out
        self.n_states_out = 0
        if n_states > 0 and self.mamba_pool is not None:
            try:
                if self._state_booking != NULL:  # booked: as the cache's, straight in C
                    (<TokenToKVPoolAllocator>self._state_booking).free_c(
                        <idx_t*>self._state_out.data, n_states, PAGE_CACHED)
                else:
                    _hand_over(self._ev_free_states, <idx_t*>self._state_out.data, n_states)
            except BaseException as exc:
                if first is None:
                    first = exc
        if self.on_node_evict is not None and n_nodes > 0:
            ids = self._ev_uids     # made as the nodes were removed: nothing to allocate
            for i in range(n_nodes):
                try:
                    self.on_node_evict(ids[i])
                except BaseException as exc:
                    if first is None:
                        first = exc
        self._unbind_hand_over()
        if first is not None:
            raise first
        return 0

    cdef int _drop_state(self, nid_t n) except -1:
        """Move node n's (unlocked) Mamba state to _state_out."""
        cdef Node* x = &self.nodes[n]
        cdef idx_t* st = <idx_t*>self._state_out.reserve(self.n_states_out + 1)
        st[self.n_states_out] = x.aux_value
        self.n_states_out += 1
        if x.heap_pos[HEAP_AUX] >= 0:
            _heap_remove(&self.aux_heap, self.nodes, HEAP_AUX, n)
        self._aux_evictable -= 1
        x.aux_value = -1
        return 0

    cdef int _remove_leaf(self, nid_t n) except -1:
        """Unlink an unlocked leaf and recycle its slot (its value was copied out)."""
        cdef Node* x = &self.nodes[n]
        cdef nid_t parent = x.parent
        cdef int32_t ns = x.ns
        cdef MapEntry* e = _map_entry_of(
            &self.cmap, n, self._node_hash(parent, x))
        e.child = MAP_DELETED
        self.cmap.used -= 1
        self._full_remove(n)
        if x.aux_value >= 0:
            if self.mamba:
                self._drop_state(n)
            else:   # SWA: a live leaf's SWA KV goes with its full KV
                if x.heap_pos[HEAP_AUX] >= 0:
                    _heap_remove(&self.aux_heap, self.nodes, HEAP_AUX, n)
                self._aux_evictable -= x.len
                self.aux_freed += x.len
        self._evictable -= x.len
        self.nodes[parent].num_children -= 1
        if self._hash_cache:
            self._forget_hashes(n)
        self._drop_slot(n)
        if parent == ROOT:
            # after the slot is dropped: the namespace's last reference to its extra_key
            # may go here, and the extra_key's __del__ (Python code) then sees the node gone
            # (its handle stale), not a live node whose namespace is already empty
            self._ns_release_one(ns)
        x = &self.nodes[parent]
        if parent != ROOT and x.num_children == 0 and x.lock_ref == 0:
            self._full_push(parent)
        return 0

    def inc_lock_ref(self, node):
        """Lock *node* and its ancestors: their KV cannot be evicted until unlocked.

        Tokens of nodes going from 0 to 1 lock move from ``evictable_size()`` to
        ``protected_size()``. Locking the root is a no-op. Returns None (the token to hand
        back to :meth:`dec_lock_ref`). A stale handle raises ``StaleNodeError``.

        With a sliding window W the SWA KV is locked only over the nearest W live tokens
        (whole nodes, stopping at a tombstone), and the return value is the boundary token
        to pass back as ``dec_lock_ref(node, swa_boundary_id)``: the prefix position where
        the SWA lock stopped (0 when the W tokens end exactly at the root), or None when it
        reached the root with fewer than W live tokens (``dec_lock_ref`` takes 0 and None
        alike). Positions, unlike node ids, survive the splits that other requests cause
        while the lock is held.
        """
        self._enter()
        try:
            return self._inc_lock_ref_locked(node)
        finally:
            self._leave()

    cdef object _inc_lock_ref_locked(self, node):
        cdef nid_t n = self._slot_of(node)
        cdef nid_t m
        cdef Node* x
        cdef int64_t acc = 0
        if not self.swa or n == ROOT:
            self._lock(n)
            return None
        # the lock's record first (the one step here that allocates): a failure locks nothing
        boundary = None
        m = n
        while m != ROOT:
            x = &self.nodes[m]
            if x.aux_value < 0:
                boundary = x.end_pos
                break
            acc += x.len
            if acc >= self.window:
                boundary = x.end_pos - x.len
                break
            m = x.parent
        key = _lock_key(self.nodes[n].uid, 0 if boundary is None else <int64_t>boundary)
        self._swa_locks[key] = self._swa_locks.get(key, 0) + 1
        self._lock(n)
        m = n
        while m != ROOT:
            x = &self.nodes[m]
            if x.end_pos <= (0 if boundary is None else <int64_t>boundary):
                break
            if x.aux_lock_ref == 0:
                self._aux_evictable -= x.len
                self._aux_protected += x.len
                _heap_remove(&self.aux_heap, self.nodes, HEAP_AUX, m)
            x.aux_lock_ref += 1
            m = x.parent
        return boundary

    cdef int _lock(self, nid_t n) except -1:
        """One lock of n (an inc_lock_ref of n itself: own_lock) and of each ancestor."""
        cdef Node* x
        if n != ROOT:
            self.nodes[n].own_lock += 1
        while n != ROOT:
            x = &self.nodes[n]
            if x.lock_ref == 0:
                self._evictable -= x.len
                self._protected += x.len
                self._full_remove(n)
            x.lock_ref += 1
            n = x.parent
        return 0

    def dec_lock_ref(self, node, swa_boundary_id=None):
        """Undo one :meth:`inc_lock_ref` of *node*.

        Raises ``LockStateError`` (and changes nothing) when the node holds no lock, when
        its locks are all its descendants' (an unlock through an ancestor would strand the
        descendant's lock: unlock the node that was locked), or when ``swa_boundary_id`` is
        not what ``inc_lock_ref`` returned: with a sliding window, when it matches no held
        SWA lock; without one, and for the root, when it is not None. With a window, a
        ``swa_boundary_id`` that is neither None nor a possible token (a boundary position)
        raises as an argument does: ``TypeError`` for a non-integer, ``InvalidValueError``
        for a negative or huge int.
        Unlocking the root is a no-op, and so is undoing a lock that a dropped cache's
        finalizer found held when it handed everything back (a request's ``__del__`` may
        run after the cache's, when both are collected together).
        """
        # before _enter: after the finalizer, the tree may be gone (rebuilding it failed)
        if self._finalized_locks is not None and self._finalized_unlock(node):
            return None
        self._enter()
        try:
            return self._dec_lock_ref_locked(node, swa_boundary_id)
        finally:
            self._leave()

    cdef object _dec_lock_ref_locked(self, node, swa_boundary_id=None):
        cdef nid_t n = self._slot_of(node)
        cdef nid_t m
        cdef int64_t boundary
        cdef Node* x
        if self.swa and n != ROOT:
            if self.nodes[n].lock_ref <= 0:
                raise LockStateError(f"node: node {self.nodes[n].uid} is not locked")
            boundary = 0 if swa_boundary_id is None else _nonneg_int("swa_boundary_id",
                                                                       swa_boundary_id)
            # exactly a lock this node holds: other requests' SWA locks on the same nodes
            # must not be taken for it (each inc_lock_ref is recorded with its boundary)
            key = _lock_key(self.nodes[n].uid, boundary)
            held = self._swa_locks.get(key, 0)
            m = n
            while m != ROOT and self.nodes[m].end_pos > boundary:
                if self.nodes[m].aux_lock_ref <= 0:
                    held = 0
                m = self.nodes[m].parent
            if held <= 0:
                raise LockStateError(
                    f"swa_boundary_id: {swa_boundary_id!r} does not match an SWA lock of node "
                    f"{self.nodes[n].uid} (pass what its inc_lock_ref returned)"
                )
            self._check_unlockable(n)
            if held == 1:
                del self._swa_locks[key]
            else:
                self._swa_locks[key] = held - 1
            m = n
            while m != ROOT and self.nodes[m].end_pos > boundary:
                x = &self.nodes[m]
                x.aux_lock_ref -= 1
                if x.aux_lock_ref == 0:
                    self._aux_protected -= x.len
                    self._aux_evictable += x.len
                    _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, m)
                m = x.parent
        else:
            if swa_boundary_id is not None:
                # inc_lock_ref gave None (no window, or the root): a token from elsewhere is
                # a scheduler's mistake that would pass here and fail only later, once a
                # window is turned on or the lock is taken on a node
                raise LockStateError(
                    f"swa_boundary_id: got {swa_boundary_id!r:.60}, but "
                    + ("this cache has no sliding window" if not self.swa
                       else "the root's lock token is None")
                    + ": pass what inc_lock_ref returned (None)"
                )
            self._check_unlockable(n)
        self._release_locks(n)

    cdef void _release_locks(self, nid_t n) noexcept:
        """Drop one lock of n and each ancestor; _check_unlockable(n) must have passed."""
        cdef Node* x
        if n != ROOT:
            self.nodes[n].own_lock -= 1
        while n != ROOT:
            x = &self.nodes[n]
            x.lock_ref -= 1
            if x.lock_ref == 0:
                self._protected -= x.len
                self._evictable += x.len
                if x.num_children == 0:
                    self._full_push(n)
            n = x.parent

    cdef int _check_unlockable(self, nid_t n) except -1:
        """LockStateError unless an inc_lock_ref of n itself is still held (checked before
        any release, so that a failed unlock changes nothing). Then every ancestor holds a
        lock too: a node's lock_ref is its own locks plus its children's."""
        cdef Node* x = &self.nodes[n]
        if n == ROOT or x.own_lock > 0:
            return 0
        if x.lock_ref <= 0:
            raise LockStateError(f"node: node {x.uid} is not locked")
        # undoing a descendant's lock here would leave the descendant holding a lock its
        # ancestors no longer count, and the descendant's own unlock would then fail
        raise LockStateError(
            f"node: node {x.uid} holds only its descendants' locks ({x.lock_ref}); "
            "unlock the node inc_lock_ref locked"
        )

    def evictable_size(self):
        """Tokens in unlocked nodes (O(1))."""
        self._await_idle()
        return self._evictable

    def protected_size(self):
        """Tokens in locked nodes (O(1))."""
        self._await_idle()
        return self._protected

    def total_size(self):
        """Tokens in the tree (O(1))."""
        self._await_idle()
        return self._evictable + self._protected

    def swa_evictable_size(self):
        """Live SWA tokens in nodes without an SWA lock (O(1); 0 without a window)."""
        self._await_idle()
        return self._aux_evictable if self.swa else 0

    def swa_protected_size(self):
        """Live SWA tokens in SWA-locked nodes (O(1); 0 without a window)."""
        self._await_idle()
        return self._aux_protected if self.swa else 0

    def reset(self):
        """Free every tree-owned KV slot (one ``allocator.free`` call) and every stored
        Mamba state (one ``mamba_pool.free`` call, or straight into the allocator of a pool
        that books them), and empty the tree.

        Locked nodes go too: their slots return to the allocator like the others', so a
        request still reading them must not go on (check ``protected_size() == 0`` to flush
        only when no request holds a lock, as a server's cache flush does). Handles held by
        callers become stale (``dec_lock_ref`` of one raises ``StaleNodeError``);
        ``on_node_evict`` is not called. Node ids are not reused afterwards. If memory runs
        out while the empty tree is rebuilt, the slots and states are handed over all the
        same and ``MemoryError`` propagates; the cache then raises ``NotInitializedError``
        until ``__init__`` is called again. As with ``evict``, the tree is empty whatever
        the pools' ``free`` does: when a Python ``free`` (of an allocator subclass or a
        state pool) raises, the slots it was handed are its to keep or lose, and its
        exception propagates. A ``free`` that is no longer callable (replaced since the
        cache was built) is refused first (``TypeError``, nothing changed).
        """
        self._enter()
        try:
            return self._reset_locked()
        finally:
            self._leave()

    cdef object _reset_locked(self):
        cdef int64_t i, total = 0, n_states = 0
        cdef idx_t* out
        cdef idx_t* st
        cdef Node* x
        self._bind_hand_over()
        try:
            out = <idx_t*>self._idx_out.reserve(self._evictable + self._protected + 1)
            st = <idx_t*>self._state_out.reserve(self._aux_evictable + self._aux_protected + 1)
        except BaseException:
            self._unbind_hand_over()
            raise
        for i in range(1, self.hwm):
            x = &self.nodes[i]
            if x.uid >= 0:
                copy32(out + total, x.value, x.len)
                total += x.len
                if self.mamba and x.aux_value >= 0:
                    st[n_states] = x.aux_value
                    n_states += 1
        self._release_storage()
        try:
            self._init_storage()
        finally:  # the slots and states copied out above leave the tree either way
            self.n_states_out = n_states
            try:
                self._after_evict(total, 0)
            finally:
                # the scratch buffers go too: the copy-out above sized one to the whole
                # tree, and an emptied cache should hold no memory of its peak
                self._release_scratch()

    cdef void _release_scratch(self) noexcept:
        self._tok_scratch.release()
        self._val_scratch.release()
        self._idx_out.release()
        self._nid_scratch.release()
        self._flag_scratch.release()
        self._key_pin.release()
        self._state_out.release()
        self._swa_out.release()

    cdef int64_t _scratch_bytes(self) noexcept:
        cdef _Scratch b
        cdef int64_t total = 0
        for b in (self._tok_scratch, self._val_scratch, self._idx_out, self._nid_scratch,
                  self._flag_scratch, self._key_pin, self._state_out, self._swa_out):
            total += b.cap * <int64_t>b.elsize
        return total

    # -- introspection --------------------------------------------------------------------

    @property
    def root_node(self):
        """Handle of the root (id 0): never evicted; locking it is a no-op."""
        self._await_idle()
        return self._handle(ROOT)

    def compute_node_hash(self, node):
        """One chained SHA-256 hex digest per page of *node*'s key.

        The chain is seeded with the parent's last page hash (children of the root are
        unseeded), so equal pages at different positions hash differently. Cached on the
        node and kept valid across splits. The hashes cover tokens only, not the key's
        ``extra_key``: equal tokens in two namespaces hash alike, so a store of pages keyed
        by these hashes keys them by the namespace too.
        """
        self._enter()
        try:
            return self._compute_node_hash_locked(node)
        finally:
            self._leave()

    cdef object _compute_node_hash_locked(self, node):
        cdef nid_t n = self._slot_of(node)
        return self._node_hashes(n)[::-1]

    cdef list _node_hashes(self, nid_t n):
        """Page hashes of node n, last page first (as cached: a split then cuts the upper
        node's pages off the list's end), computed and cached from the nearest ancestor whose
        hashes are cached, top down. A loop, not recursion: the path is as long as the tree
        is deep."""
        cdef list hashes = []
        cdef list todo = []
        cdef nid_t m = n
        cdef object prior = None
        while m != ROOT:
            cached = self._hash_cache.get(m)
            if cached is not None:
                hashes = cached
                prior = hashes[0] if hashes else None
                break
            todo.append(m)
            m = self.nodes[m].parent
        cdef Py_ssize_t start, step
        cdef Node* x
        cdef cnp.ndarray arr
        for m in reversed(todo):
            # hash_token_ids's bytes (each token, each tuple element, as a little-endian
            # uint32; the prior digest's raw bytes first), hashed from a copy of the key:
            # no list of ints, and none of hash_token_ids's input checks (tree tokens are
            # valid, the prior is our own digest)
            x = &self.nodes[m]
            arr = cnp.PyArray_EMPTY(1, [x.len * x.width], cnp.NPY_UINT32, 0)
            copy32(cnp.PyArray_DATA(arr), x.key, x.len * x.width)
            if _BIG_ENDIAN:
                arr = arr.byteswap()
            step = self.page_size * x.width
            hashes = []
            for start in range(0, x.len * x.width, step):
                h = _sha256()
                if prior is not None:
                    h.update(bytes.fromhex(prior))
                h.update(arr[start:start + step])
                prior = h.hexdigest()
                hashes.append(prior)
            hashes.reverse()
            self._hash_cache[m] = hashes
        return hashes

    cdef object _node_tokens(self, nid_t n):
        """The node's own key as a list of ints or of tuples. Every field is read, and the
        tokens copied, before any object the collector tracks is made: a collection can
        run finalizers that change the tree (reuse the slot, move the node array)."""
        cdef Node* x = &self.nodes[n]
        cdef int64_t length = x.len
        cdef int32_t arity = (<_NsKey>self._ns_keys[x.ns]).arity
        cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, [length * x.width], cnp.NPY_UINT32, 0)
        copy32(cnp.PyArray_DATA(arr), x.key, length * x.width)   # a numpy array is untracked
        if arity == 0:
            return arr.tolist()
        return [tuple(row) for row in arr.reshape(length, arity).tolist()]

    cdef object _node_value(self, nid_t n):
        return _copy_idx(self.nodes[n].value, self.nodes[n].len)

    cdef dict _children_slots(self):
        """Map parent slot -> list of child slots, each list in node id order, the order
        the nodes were made (an O(tree log tree) debugging aid; slot order would follow
        which freed slots were reused). Only under the call guard (_enter), which holds
        the collector off: the loop allocates, and a finalizer's reset() would shrink the
        node array under it."""
        cdef int64_t i
        live = [(self.nodes[i].uid, i) for i in range(1, self.hwm) if self.nodes[i].uid >= 0]
        live.sort()
        kids = {}
        for _, i in live:
            kids.setdefault(self.nodes[i].parent, []).append(i)
        return kids

    def _storage_state(self):
        """Capacities and growth state of the node array and the child map (for tests)."""
        return {
            "node_capacity": self.cap,
            "slots_used": self.hwm,          # slots ever handed out; the rest untouched
            "live": self.live,
            "map_capacity": self.cmap.mask + 1,
            "map_draining": self.cmap.old != NULL,
            "map_old_capacity": self.cmap.old_mask + 1 if self.cmap.old != NULL else 0,
            "map_old_drained": self.cmap.old_next if self.cmap.old != NULL else 0,
            "scratch_bytes": self._scratch_bytes(),
        }

    def _nodes(self):
        """Handles of every node but the root, in slot order (O(tree), for tests)."""
        self._enter()
        try:
            return self._nodes_locked()
        finally:
            self._leave()

    cdef object _nodes_locked(self):
        cdef int64_t i
        return [self._handle(<nid_t>i) for i in range(1, self.hwm) if self.nodes[i].uid >= 0]

    def children(self, node):
        """Handles of *node*'s children, oldest first (by node id, the order the nodes were
        made). O(tree): a debugging aid, not for hot paths."""
        self._enter()
        try:
            return self._children_locked(node)
        finally:
            self._leave()

    cdef object _children_locked(self, node):
        cdef nid_t n = self._slot_of(node)
        return [self._handle(c) for c in self._children_slots().get(n, [])]

    def pretty_print(self):
        """Print the tree, one node per line, indented by depth: two spaces a level up to
        _PRINT_INDENT levels, then the depth itself (so that a deep chain prints in space
        linear in its nodes). A child of the root whose key has an ``extra_key`` ends with
        ``extra_key=`` and its repr, so that namespaces with equal tokens tell apart (the
        reprs are taken after the tree is released: a repr that calls the cache works). A
        repr that spans lines prints its line breaks escaped (``\\n``, ``\\r``), so that
        every node stays one line. A node's children follow it oldest first (by node id,
        the order the nodes were made), each with its own subtree."""
        self._enter()
        try:
            lines = self._pretty_print_locked()
        finally:
            self._leave()
        print("\n".join([line if type(line) is str
                         else f"{line[0]}  extra_key={_one_line_repr(line[1])}"
                         for line in lines]))

    cdef list _pretty_print_locked(self):
        """The printout's lines; a child of the root in a namespace is (line, extra_key)."""
        kids = self._children_slots()
        lines = []
        stack = [(ROOT, 0)]
        while stack:
            n, depth = stack.pop()
            if n != ROOT:
                x = self._handle(n)
                if depth - 1 <= _PRINT_INDENT:
                    line = f"{'  ' * (depth - 1)}{x!r}"
                else:
                    line = f"{'  ' * _PRINT_INDENT}(depth {depth}) {x!r}"
                extra_key = None
                if depth == 1:  # from the registry (x.key would copy the node's tokens)
                    extra_key = (<_NsKey>self._ns_keys[self.nodes[n].ns]).extra_key
                lines.append(line if extra_key is None else (line, extra_key))
            for c in reversed(kids.get(n, [])):
                stack.append((c, depth + 1))
        lines.append(
            f"#tokens: {self.total_size()} (evictable {self._evictable}, "
            f"protected {self._protected})"
        )
        return lines

    cdef int _check_map(self) except -1:
        """Both tables' live entries add up to `used`; `filled` counts the current table's
        non-empty buckets; each table keeps an empty bucket (its probes end)."""
        cdef uint64_t i
        cdef int64_t live = 0, filled = 0
        for i in range(self.cmap.mask + 1):
            if self.cmap.entries[i].child != MAP_EMPTY:
                filled += 1
                live += self.cmap.entries[i].child > 0
        assert filled == self.cmap.filled, f"map filled {self.cmap.filled} != {filled}"
        assert filled * 2 <= <int64_t>(self.cmap.mask + 1), "map over half full"
        if self.cmap.old != NULL:
            assert self.cmap.old_next <= self.cmap.old_mask
            for i in range(self.cmap.old_mask + 1):
                live += self.cmap.old[i].child > 0
                assert i >= self.cmap.old_next or self.cmap.old[i].child <= 0
        assert live == self.cmap.used, f"map live entries {live} != {self.cmap.used}"
        return 0

    def _evictable_layout(self):
        """(leaves in the run, leaves in the heap): where the evictable leaves are kept
        (for tests)."""
        self._await_idle()
        return self.run.size, self.heap.size

    def _check_invariants(self):
        """Walk the whole structure and recompute every counter (O(tree); for tests)."""
        self._enter()
        try:
            return self._check_invariants_locked()
        finally:
            self._leave()

    cdef int _check_hash_values(self) except -1:
        """Every cached page hash is the one ``hash_token_ids`` chains over the pages of the
        node's path from the root (recomputed here through that public function, not the
        cache's own byte packing): a split that kept the wrong half of a list shows."""
        cdef dict chain = {ROOT: None}       # node -> its last page's hash (None: the root)
        cdef list path
        cdef nid_t m
        for i in list(self._hash_cache):
            path = []
            m = <nid_t>i
            while m not in chain:
                path.append(m)
                m = self.nodes[m].parent
            for m in reversed(path):
                prior = chain[self.nodes[m].parent]
                tokens = self._node_tokens(m)
                want = []
                for start in range(0, len(tokens), self.page_size):
                    prior = hash_token_ids(tokens[start:start + self.page_size], prior)
                    want.append(prior)
                chain[m] = prior
                cached = self._hash_cache.get(m)  # i's, or an ancestor's met on i's path
                if cached is not None:
                    assert cached == want[::-1], f"node {self.nodes[m].uid}: stale page hashes"
        return 0

    cdef int _check_swa_lock_records(self) except -1:
        """Every node's SWA lock count is what the recorded inc_lock_refs add up to: each
        record (node, boundary, count) SWA-locks the node and its ancestors that end past
        the boundary, and holds full locks on them."""
        cdef int64_t i
        cdef nid_t m
        slot_of = {self.nodes[i].uid: i for i in range(1, self.hwm) if self.nodes[i].uid >= 0}
        expected = {}
        for key, count in self._swa_locks.items():
            uid, boundary = _lock_key_parts(key)
            assert count > 0, f"SWA lock record {uid}/{boundary} with count {count}"
            assert uid in slot_of, f"SWA lock record of a removed node {uid}"
            m = slot_of[uid]
            assert self.nodes[m].lock_ref >= count, f"SWA lock record of node {uid}: no full lock"
            while m != ROOT and self.nodes[m].end_pos > boundary:
                expected[m] = expected.get(m, 0) + count
                m = self.nodes[m].parent
        for i in range(1, self.hwm):
            if self.nodes[i].uid >= 0:
                assert self.nodes[i].aux_lock_ref == expected.get(i, 0), (
                    f"node {self.nodes[i].uid}: SWA lock {self.nodes[i].aux_lock_ref} != "
                    f"{expected.get(i, 0)} from the lock records"
                )
        return 0

    cdef int _check_run(self, int64_t in_run) except -1:
        """The run: linked both ways from head to tail, in ascending policy order, holding
        exactly the in_run leaves whose heap_pos says IN_RUN."""
        cdef nid_t n = self.run.head, prev = NIL
        cdef int64_t count = 0
        while n != NIL:
            assert self.nodes[n].uid >= 0, f"run: slot {n} is free"
            assert self.nodes[n].heap_pos[HEAP_FULL] == IN_RUN, f"run: node {self.nodes[n].uid}"
            assert self.nodes[n].run_prev == prev, f"run: node {self.nodes[n].uid}'s back link"
            if prev != NIL:
                assert _before(self.nodes, prev, n), f"run: node {self.nodes[n].uid} out of order"
            prev = n
            n = self.nodes[n].run_next
            count += 1
            assert count <= self.run.size, "run: longer than its size (a cycle?)"
        assert prev == self.run.tail, "run: tail"
        assert count == self.run.size == in_run, f"run: {count} linked, size {self.run.size}, {in_run} marked"
        return 0

    cdef object _check_invariants_locked(self):
        cdef int64_t i, evictable = 0, protected = 0, live = 0, in_heap = 0, child_sum
        cdef int64_t aux_ev = 0, aux_pr = 0, in_aux = 0, in_run = 0
        cdef Node* x
        cdef Node* p
        cdef nid_t found
        kids = self._children_slots()
        ns_count = {}
        assert self.nodes[ROOT].uid == 0 and self.nodes[ROOT].parent == NIL
        for i in range(self.hwm):
            x = &self.nodes[i]
            if x.uid < 0:
                # a free slot is in no eviction order: every removal takes it out first
                assert x.heap_pos[HEAP_FULL] == -1 and x.heap_pos[HEAP_AUX] == -1, (
                    f"free slot {i}: still in an eviction order")
                continue
            live += 1
            assert x.num_children == len(kids.get(i, [])), f"node {x.uid}: child count"
            if i == ROOT:
                continue
            p = &self.nodes[x.parent]
            assert p.uid >= 0, f"node {x.uid}: parent slot {x.parent} is free"
            assert x.len > 0 and x.len % self.page_size == 0, f"node {x.uid}: len {x.len}"
            # a split's lower half may start into its block, never by more than it holds
            assert 0 <= _node_lead(x) <= x.len, f"node {x.uid}: block lead {_node_lead(x)}"
            assert x.uid < self.next_uid
            assert x.lock_ref >= 0
            child_sum = 0
            for c in kids.get(i, []):
                child_sum += self.nodes[<nid_t>c].lock_ref
                assert self.nodes[<nid_t>c].ns == x.ns, f"node {x.uid}: child in another ns"
            # no unlock passes through a node that was not locked itself, so its count is
            # exactly its own locks plus its children's
            assert x.lock_ref == x.own_lock + child_sum, f"node {x.uid}: lock count"
            if x.lock_ref > 0:
                protected += x.len
            else:
                evictable += x.len
            should = x.num_children == 0 and x.lock_ref == 0
            assert (x.heap_pos[HEAP_FULL] != -1) == should, f"node {x.uid}: heap membership"
            if self.mamba:
                assert x.lock_ref >= x.aux_lock_ref >= 0, f"node {x.uid}: mamba lock"
                assert x.own_lock >= x.aux_lock_ref, f"node {x.uid}: state lock without a lock"
                if x.aux_value >= 0:
                    if x.aux_lock_ref > 0:
                        aux_pr += 1
                    else:
                        aux_ev += 1
                else:
                    assert x.aux_lock_ref == 0, f"node {x.uid}: locked missing state"
                aux_should = x.aux_value >= 0 and x.aux_lock_ref == 0
                assert (x.heap_pos[HEAP_AUX] >= 0) == aux_should, f"node {x.uid}: aux heap"
                if aux_should:
                    in_aux += 1
                    assert self.aux_heap.data[x.heap_pos[HEAP_AUX]] == i
            elif self.swa:
                assert x.lock_ref >= x.aux_lock_ref >= 0, f"node {x.uid}: swa lock"
                assert x.end_pos == p.end_pos + x.len, f"node {x.uid}: end_pos"
                if x.aux_value >= 0:
                    if x.aux_lock_ref > 0:
                        aux_pr += x.len
                    else:
                        aux_ev += x.len
                else:
                    assert x.aux_lock_ref == 0, f"node {x.uid}: SWA-locked tombstone"
                    assert x.num_children > 0 or x.lock_ref > 0 or x.heap_pos[HEAP_FULL] != -1
                aux_should = x.aux_value >= 0 and x.aux_lock_ref == 0
                assert (x.heap_pos[HEAP_AUX] >= 0) == aux_should, f"node {x.uid}: swa heap"
                if aux_should:
                    in_aux += 1
                    assert self.aux_heap.data[x.heap_pos[HEAP_AUX]] == i
            else:
                assert x.aux_value == -1 and x.heap_pos[HEAP_AUX] == -1
            if should and x.heap_pos[HEAP_FULL] >= 0:
                in_heap += 1
                assert self.heap.data[x.heap_pos[HEAP_FULL]] == i
            elif should:
                in_run += 1
            else:
                assert x.run_prev == NIL and x.run_next == NIL, f"node {x.uid}: run links"
            found = _map_find(&self.cmap, self.nodes, x.parent, x.ns, x.key,
                              self.page_size * x.width,
                              self._node_hash(x.parent, x))
            assert found == i, f"node {x.uid}: not found through the child map"
            if x.parent == ROOT:
                ns_count[x.ns] = ns_count.get(x.ns, 0) + 1
            assert self._ns_keys[x.ns] is not None
        assert live == self.live, f"live nodes {live} != {self.live}"
        for i, rev in self._hash_cache.items():  # one hash per page, of live non-root nodes
            x = &self.nodes[<nid_t>i]
            assert 0 < i < self.hwm and x.uid >= 0, f"page hashes cached for free slot {i}"
            assert len(rev) == x.len // self.page_size, f"node {x.uid}: {len(rev)} page hashes"
        self._check_hash_values()
        assert evictable == self._evictable, f"evictable {evictable} != {self._evictable}"
        assert protected == self._protected, f"protected {protected} != {self._protected}"
        assert in_heap == self.heap.size, f"heap size {self.heap.size} != {in_heap}"
        self._check_run(in_run)
        assert self.cmap.used == live - 1, f"map entries {self.cmap.used} != {live - 1}"
        self._check_map()
        for i in range(1, self.heap.size):
            assert not _before(self.nodes, self.heap.data[i], self.heap.data[(i - 1) >> 1])
        assert aux_ev == self._aux_evictable, f"aux evictable {aux_ev} != {self._aux_evictable}"
        assert aux_pr == self._aux_protected, f"aux protected {aux_pr} != {self._aux_protected}"
        assert in_aux == self.aux_heap.size, f"aux heap {self.aux_heap.size} != {in_aux}"
        for i in range(1, self.aux_heap.size):
            assert not _before(self.nodes, self.aux_heap.data[i],
                               self.aux_heap.data[(i - 1) >> 1])
        for ns_id, cnt in ns_count.items():
            assert self.ns_tab[ns_id].ref == cnt, f"namespace {ns_id}: {self.ns_tab[ns_id].ref} != {cnt}"
        free_ids = self._free_ns_ids()
        assert len(free_ids) == len(set(free_ids)), f"namespace free list {free_ids}"
        for ns_key, ns_id in self._ns_ids.items():  # each entry is its namespace's own
            assert self._ns_keys[ns_id] is ns_key, f"namespace {ns_id}: registry entry"
        registered = set(self._ns_ids.values())
        assert len(registered) == len(self._ns_ids), "namespace registry: an id twice"
        for ns_id, ns_key in enumerate(self._ns_keys):
            assert (ns_key is None) == (ns_id in free_ids), f"namespace {ns_id}: free list"
            if ns_key is not None and not self.ns_tab[ns_id].stuck:
                assert ns_id in registered, f"namespace {ns_id}: not in the registry"
                if ns_id != 0:
                    assert ns_count.get(ns_id, 0) > 0, f"namespace {ns_id} has no root child"
        free_count = 0
        f = self.free_head
        while f != NIL:
            assert self.nodes[f].uid == -1
            free_count += 1
            f = self.nodes[f].next_free
        assert free_count == self.hwm - live, f"free list {free_count} != {self.hwm - live}"
        assert self.hwm <= self.cap <= min(self.heap.cap, self.aux_heap.cap)
        if self.swa:
            self._check_swa_lock_records()
        if self._booking_kind and self.hwm > 1:
            # every slot the tree holds is one the allocator books as a cache's
            held = np.concatenate([self._node_value(i) for i in range(1, self.hwm)
                                   if self.nodes[i].uid >= 0] or [_new_idx(0)])
            cached = self.token_to_kv_pool_allocator.is_cached(held)
            assert cached.all(), f"slot {held[~cached][0]} held by the tree, not booked as cached"
        if self._state_booking != NULL:
            states = np.array([self.nodes[i].aux_value for i in range(1, self.hwm)
                               if self.nodes[i].uid >= 0 and self.nodes[i].aux_value >= 0],
                              dtype=np.int32)
            cached = (<TokenToKVPoolAllocator>self._state_booking).is_cached(states)
            assert cached.all(), f"state {states[~cached][0]} held by the tree, not booked"

# Not @cython.no_gc: a handle refers to its cache, and a cache's owner (a scheduler whose
# on_node_evict callback the cache holds) often keeps handles; the collector must see that
# reference to free such a cycle (tests/test_handles_gc.py). no_gc_clear: the collector
# breaks the cycle elsewhere, so a handle the cache made never loses its _tree. One made
# with TreeNode.__new__ (its __init__ refuses) has none: it names no node of any cache, so
# it reads as evicted, and everything that reads its node raises StaleNodeError.
@cython.no_gc_clear
cdef class TreeNode:
    """A handle to a node of a compiled radix tree.

    Holding a handle does not keep the node alive: once the node is evicted, ``evicted`` is
    True, locking it raises ``StaleNodeError`` and so do its other attributes, except ``id``
    (and ``repr``, which says evicted). Handles compare equal when they name the same node.
    """

    cdef RadixTreeCore _tree
    cdef nid_t _slot
    cdef int64_t _uid

    def __reduce_ex__(self, protocol):
        return _reduce_owner(self, TreeNode)

    def __reduce__(self):
        _cannot_pickle(self)

    def __init__(self):
        raise TypeError("TreeNode handles are returned by the cache; they cannot be created")

    cdef inline Node* _node(self) except NULL:
        if self._tree is None:
            raise StaleNodeError("node: a handle made with TreeNode.__new__ names no node")
        self._tree._await_idle()
        if self._tree._stale(self._slot, self._uid):
            raise StaleNodeError(f"node {self._uid} was evicted")
        return &self._tree.nodes[self._slot]

    @property
    def id(self):
        """The node's id: unique in its cache, never reused (0 is the root)."""
        return self._uid

    @property
    def evicted(self):
        if self._tree is None:  # made with __new__: no node
            return True
        if self._tree.nodes == NULL:  # a reset that ran out of memory: every node is gone
            return True
        self._tree._await_idle()
        return self._tree._stale(self._slot, self._uid)

    @property
    def key(self):
        """The node's own tokens (not the whole prefix) as a RadixKey. Its ``extra_key``
        is its namespace's: the first of the equal extra_keys (``==`` and same hash, say
        ``1`` and ``True``) that the tree took, which all share that namespace."""
        self._node()
        if self._slot == ROOT:
            return RadixKey([], None)
        x = self._node()
        extra_key = (<_NsKey>self._tree._ns_keys[x.ns]).extra_key
        return RadixKey(self._tree._node_tokens(self._slot), extra_key)

    @property
    def value(self):
        """A copy of the node's KV slot indices (int32); the tree keeps owning them."""
        self._node()
        return self._tree._node_value(self._slot)

    @property
    def parent(self):
        cdef RadixTreeCore t = self._tree
        self._node()
        # the new handle first: allocating it can run the collector, and a finalizer can
        # change the tree (evict this node's parent, reuse its slot); so the node and its
        # parent are read after it
        h = t._blank_handle()
        cdef Node* x = self._node()
        if x.parent == NIL:
            return None
        return t._aim(h, x.parent)

    @property
    def lock_ref(self):
        return self._node().lock_ref

    @property
    def last_access_time(self):
        """Logical clock of the last match/insert that touched this node."""
        return self._node().last_access

    @property
    def hit_count(self):
        return self._node().hit_count

    @property
    def swa_tombstone(self):
        """True when the node's SWA KV was freed (sliding window caches only)."""
        cdef Node* x = self._node()  # StaleNodeError first, whatever the cache kind
        return self._tree.swa and x.aux_value < 0 and self._slot != ROOT

    @property
    def swa_lock_ref(self):
        """SWA lock count (sliding window caches only; 0 otherwise)."""
        cdef Node* x = self._node()  # StaleNodeError first, whatever the cache kind
        return x.aux_lock_ref if self._tree.swa else 0

    def __eq__(self, other):
        if not isinstance(other, TreeNode):
            return NotImplemented
        return (<TreeNode>other)._tree is self._tree and (<TreeNode>other)._uid == self._uid

    def __hash__(self):
        return hash((id(self._tree), self._uid))

    def __repr__(self):
        if self.evicted:  # answers without a tree too (a reset that ran out of memory)
            return f"TreeNode(id={self._uid}, evicted)"
        cdef Node* x = self._node()
        if self._slot == ROOT:
            return "TreeNode(id=0, root)"
        # read the node before making Python objects: an allocation may run the collector,
        # whose callbacks may change the tree (and move its node array)
        cdef int64_t n = x.len, lock_ref = x.lock_ref, last_access = x.last_access
        toks = self._tree._node_tokens(self._slot)
        head = ", ".join(map(str, toks[:8])) + (", ..." if len(toks) > 8 else "")
        return (f"TreeNode(id={self._uid}, len={n}, key=[{head}], lock_ref={lock_ref}, "
                f"last_access={last_access})")


cdef class MambaTreeNode(TreeNode):
    """A handle to a node of a MambaRadixCache: a TreeNode plus its Mamba state slot."""

    @property
    def mamba_value(self):
        """The node's state slot as a length-1 int32 array, or None when it holds none.
        The tree keeps owning the slot."""
        cdef Node* x = self._node()
        if x.aux_value < 0:
            return None
        return np.array([x.aux_value], dtype=np.int32)

    @property
    def mamba_lock_ref(self):
        return self._node().aux_lock_ref

    @property
    def full_lock_ref(self):
        return self._node().lock_ref


cdef class MambaTreeCore(RadixTreeCore):
    """MambaTreeCore(page_size=1, token_to_kv_pool_allocator=None, mamba_pool=None,
    on_node_evict=None, eviction_policy='lru')\n--\n
    Compiled core of MambaRadixCache: the same tree, plus one optional SSM state slot per
    node (the state after the node's last token), a second heap of droppable states and
    a state lock count per node. Public class: ``pymllm.mem_cache.MambaRadixCache``."""

    def __init__(self, page_size=1, token_to_kv_pool_allocator=None, mamba_pool=None,
                 on_node_evict=None, eviction_policy="lru"):
        self._enter(True)
        try:
            if mamba_pool is not None and not callable(getattr(mamba_pool, "free", None)):
                raise TypeError(f"mamba_pool: expected an object with free(slots), got {mamba_pool!r}")
            # our allocator as the pool itself, or behind one (MambaPool.slot_allocator); read
            # first, as the pool's Python code may raise: then no tree is built
            books = (mamba_pool
                     if isinstance(mamba_pool, (TokenToKVPoolAllocator, SWATokenToKVPoolAllocator))
                     else getattr(mamba_pool, "slot_allocator", None))
            if isinstance(books, (TokenToKVPoolAllocator, SWATokenToKVPoolAllocator)) and (
                    books.page_size != 1):
                # a state is one slot, and a paged pool frees whole pages: freeing one state
                # would free its page's other slots, another request's or another node's
                raise InvalidValueError(
                    f"mamba_pool: a {type(books).__name__} that holds states must have "
                    f"page_size 1 (a state is one slot), got page_size {books.page_size}"
                )
            self.mamba = True
            self.mamba_pool = mamba_pool
            self.sliding_window_size = None
            self._setup(page_size, token_to_kv_pool_allocator, on_node_evict, eviction_policy)
            Py_XDECREF(self._state_booking)   # an __init__ after a failed reset's
            self._state_booking = NULL
            if type(books) is TokenToKVPoolAllocator:
                Py_XINCREF(<PyObject*>books)
                self._state_booking = <PyObject*>books
        finally:
            self._leave()

    def match_prefix(self, key):
        """Longest cached prefix of *key* that ends at a node holding a Mamba state.

        ``indices``/``prefix_len``/``last_node`` describe that prefix (the KV stays owned
        by the tree). ``mamba_branching_seqlen`` is the page-aligned length of the longer
        KV-only match when there is one (save a state there and the next request with this
        prefix hits), else None. Matching never splits a node (a split could not carry a
        state). Every fully matched node gets its recency and hit count refreshed.
        """
        self._enter()
        try:
            return self._match_prefix_mamba(key)
        finally:
            self._leave()

    cdef object _match_prefix_mamba(self, key):
        cdef KeyView kv
        cdef nid_t last = ROOT, part_node
        cdef int64_t n_path, kv_len, part_m, k, state_len
        cdef int32_t ns
        cdef nid_t* path
        cdef cnp.ndarray out
        owner = self._load_key(key, &kv)
        ns = self._find_ns(_extra_key(key), kv.arity)
        self._check_key_kept(owner, &kv)
        h = self._blank_handle()
        if ns < 0 or kv.n < self.page_size:
            return self._miss(h)
        kv_len = self._scan(&kv, ns, kv.n, &last, &n_path, &part_node, &part_m)
        kv_len += part_m
        path = <nid_t*>self._nid_scratch.data
        k = n_path - 1
        while k >= 0 and self.nodes[path[k]].aux_value < 0:
            k -= 1
        last = path[k] if k >= 0 else ROOT
        state_len = self.nodes[last].end_pos
        # the result first (out of memory, nothing has changed), then the clock and the
        # wholly matched nodes' recency and hits (no split: it could not carry a state)
        out = _result_idx(state_len)
        r = _match_result(out, h, state_len, kv_len if kv_len > state_len else None)
        self.clock += 1
        self._touch_path(n_path, True)
        self._fill_path_indices(out, k + 1)
        self._aim(h, last)
        return r

    def insert(self, key, value=None, mamba_value=None, priority=0, **kwargs):
        """Insert KV as :meth:`RadixCache.insert` does and attach *mamba_value* (one state
        slot: an int or a length-1 array, the state after the key's last token) to the node
        ending at the key's end, splitting there if needed.

        Returns ``InsertResult(prefix_len, last_node, mamba_exist)``; ``mamba_exist`` says a
        state was already stored at the key's end. Ownership: KV as in RadixCache; the state
        slot passes to the tree unless ``mamba_exist`` is True (another state was already
        stored at that point), in which case it stays the caller's to free; the node's own
        slot handed back is not another state (``mamba_exist`` False, the tree keeps it).
        Without a *mamba_value* there is nothing to free: ``mamba_exist`` True says the
        state at that point need not be saved. A state needs a non-empty key of whole pages. Over a pool that
        books states (``MambaPool``), a state slot that is free, out of range or another
        node's raises ``InvalidValueError``. Bad input changes nothing.
        ``priority`` as in :meth:`RadixCache.insert` (``eviction_policy="priority"``).
        """
        if kwargs:
            raise TypeError(f"insert() got unexpected keyword arguments {sorted(kwargs)}")
        self._enter()
        try:
            return self._insert_mamba(key, value, mamba_value, priority)
        finally:
            self._leave()

    cdef object _insert_mamba(self, key, value=None, mamba_value=None, priority=0):
        cdef KeyView kv
        cdef const idx_t* vals
        cdef nid_t last
        cdef int64_t state = -1
        cdef int64_t prio = _int64("priority", priority)
        h = self._blank_handle()    # the result's, allocated before the tree changes
        cdef Node* x
        self._late_exc = None
        if mamba_value is not None:
            # Python code (an __array__, an __index__) runs before the value is read, and a
            # bad state is reported after a bad key or value, as documented
            try:
                state = _parse_state_slot(mamba_value)
            except Exception as exc:
                self._late_exc = exc
        owner = self._load_key(key, &kv)
        extra_key = _extra_key(key)     # read once, before the value (see _insert_locked)
        cdef int32_t ns = self._find_ns_late(extra_key, kv.arity)
        self._check_key_kept(owner, &kv)
        vowner = self._load_value(value, &kv, &vals)
        self._check_key_kept(owner, &kv)
        self._raise_late()
        if mamba_value is not None:
            if kv.n == 0 or kv.n % self.page_size:
                raise InvalidValueError(
                    f"mamba_value: a state is the one after the key's last token, so the key "
                    f"must end on a page boundary (page_size {self.page_size}), got {kv.n} "
                    "tokens"
                )
        cdef bint adopted = False
        cdef idx_t slot = <idx_t>state   # parsed into [0, 2**31), or -1 when none
        if state >= 0 and self._state_booking != NULL:
            adopted = self._book_state(&kv, ns, slot)
        self.new_prio = prio
        try:
            r = self._insert_kv(&kv, vals, extra_key, ns, h, &last)
        except BaseException:
            if adopted:  # the state stays the caller's
                (<TokenToKVPoolAllocator>self._state_booking).disown_c(&slot, 1)
            raise
        exist = False
        if state >= 0:
            x = &self.nodes[last]
            if self._state_booking != NULL and not adopted:
                # already the cache's: the node's own state handed back (_book_state found
                # it at this key's end, and no Python code has run since): the tree keeps
                # it where it is, and the caller must not free it (mamba_exist False)
                pass
            elif x.aux_value >= 0:
                # the node's own state handed back is no second one: the caller must not free it
                exist = x.aux_value != state
                if adopted and exist:
                    (<TokenToKVPoolAllocator>self._state_booking).disown_c(&slot, 1)
            else:
                x.aux_value = <int32_t>state
                x.aux_lock_ref = 0
                self._aux_evictable += 1
                _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, last)
        else:
            # no state passed: the flag says whether one is stored at the key's end (a
            # chunk cached again without a state need not save one there); a key that ends
            # inside a page has no state at its end (the node's is a page earlier)
            exist = (last != ROOT and kv.n % self.page_size == 0
                     and self.nodes[last].aux_value >= 0)
        if self.policy == POLICY_PRIORITY:
            self._raise_priority(last, prio)
        self._aim(h, last)
        if exist:
            _replace(r, _IR_MAMBA_EXIST, True)
        return r

    cdef bint _book_state(self, const KeyView* kv, int32_t ns, idx_t state) except -1:
        """Check *state* against the pool's books before the insert changes anything, and
        take it as the cache's when it is a caller's (True: the insert gives it back with
        disown if the node turns out to hold a state, or the insert fails). A state the
        cache already holds passes only as the node's own, handed back at that node's key
        (False); a free or out-of-range slot raises InvalidValueError."""
        cdef TokenToKVPoolAllocator books = <TokenToKVPoolAllocator>self._state_booking
        cdef uint8_t st = PAGE_FREE
        cdef nid_t end
        if 1 <= state <= books.core.num_pages:
            st = books.core.state[state]
        if st == PAGE_ALLOCATED:
            books.adopt_c(&state, 1)
            return True
        if st == PAGE_CACHED:
            end = self._find_end(kv, ns)
            if end != NIL and self.nodes[end].aux_value == state:
                return False
            raise InvalidValueError(
                f"mamba_value: state slot {state} already belongs to the cache (another node's "
                "state); pass a state slot allocated from the pool"
            )
        raise InvalidValueError(
            f"mamba_value: state slot {state} is not allocated in the pool (free, or out of "
            f"range [1, {books.size}])"
        )

    cdef nid_t _find_end(self, const KeyView* kv, int32_t ns) noexcept:
        """The node ending exactly at kv's page-aligned end, or NIL: a read-only walk (no
        clock, no split, no heap change)."""
        cdef int64_t P = self.page_size
        cdef int64_t aligned = kv.n - kv.n % P
        cdef int64_t pos = 0
        cdef int32_t w = kv.width
        cdef nid_t cur = ROOT, child
        cdef Node* c
        if ns < 0 or aligned == 0:
            return NIL
        while pos < aligned:
            child = self._child_with_page(cur, ns, kv.tok + pos * w, P * w)
            if child == NIL:
                return NIL
            c = &self.nodes[child]
            if c.len > aligned - pos or _common_positions(c.key, kv.tok + pos * w, c.len, w) < c.len:
                return NIL
            pos += c.len
            cur = child
        return cur

    def evict(self, num_tokens, swa_num_tokens=0, mamba_num=None):
        """Full eviction of unlocked leaves, in the eviction policy's order, until
        *num_tokens* KV tokens are freed (their states go too), then Mamba-only eviction
        until *mamba_num* states are freed in all (the seed's second argument
        ``swa_num_tokens`` means the same here): the unlocked state first in policy order
        (least recently used by default) is dropped; an unlocked leaf losing its state is
        removed whole; any other node only loses its state (an inner node, or a locked
        leaf whose lock holds its KV alone: one taken before the state was saved).

        KV slots go back in one ``allocator.free`` call, states in one ``mamba_pool.free``
        call (a pool that books states, ``MambaPool`` or a ``TokenToKVPoolAllocator``, gets
        them straight into its allocator: an override of its ``free`` is not called).
        Returns ``EvictResult(full_evicted, mamba_evicted=...)``. Each step removes a heap
        entry, so the loop ends; cost is proportional to what is evicted. A raising callback
        does not stop the others (as in :meth:`RadixCache.evict`).
        """
        self._enter()
        try:
            return self._evict_mamba(num_tokens, swa_num_tokens, mamba_num)
        finally:
            self._leave()

    cdef object _evict_mamba(self, num_tokens, swa_num_tokens=0, mamba_num=None):
        cdef int64_t want, want_states, done, states
        cdef nid_t n
        cdef Node* x
        if mamba_num is None:
            mamba_num = swa_num_tokens
        elif swa_num_tokens:
            raise TypeError(
                f"mamba_num: give the Mamba state count once (mamba_num or the 2nd argument), "
                f"got swa_num_tokens={swa_num_tokens!r} and mamba_num={mamba_num!r}"
            )
        want_states = _count("mamba_num", mamba_num)
        want = _count("num_tokens", num_tokens)
        self._start_evict()
        try:
            self._evict_full(want)
            while self.n_states_out < want_states and self.aux_heap.size > 0:
                n = self.aux_heap.data[0]
                x = &self.nodes[n]
                if x.num_children == 0 and x.lock_ref == 0:
                    self._collect_and_remove(n)
                else:
                    self._drop_state(n)
        except BaseException:
            self._hand_over_partial()
            raise
        done, states = self.ev_done, self.n_states_out
        self._after_evict(self.ev_done, self.ev_nodes)
        return _evict_result(done, 0, states)

    def inc_lock_ref(self, node):
        """Lock the KV of *node* and its ancestors, and *node*'s own Mamba state if it has
        one. Returns the token to pass back to :meth:`dec_lock_ref`: True when the state was
        locked, False when the node had none. A stale handle raises ``StaleNodeError``."""
        self._enter()
        try:
            return self._inc_lock_ref_mamba(node)
        finally:
            self._leave()

    cdef object _inc_lock_ref_mamba(self, node):
        cdef nid_t n = self._slot_of(node)
        cdef Node* x = &self.nodes[n]
        self._lock(n)
        if n == ROOT:
            return False
        if x.aux_value < 0:
            return False
        if x.aux_lock_ref == 0:
            self._aux_evictable -= 1
            self._aux_protected += 1
            _heap_remove(&self.aux_heap, self.nodes, HEAP_AUX, n)
        x.aux_lock_ref += 1
        return True

    def dec_lock_ref(self, node, swa_boundary_id=None):
        """Undo one :meth:`inc_lock_ref`. Pass its token (as ``swa_boundary_id``, the
        seed's name for the opaque lock token): True releases a state lock, False none. A
        state saved on the node after it was locked belongs to whichever lock took it, so
        without the token (None) a state lock is released only if the node holds one, which
        can release another request's: keep the token. ``LockStateError`` (nothing changed)
        when the node, or (token True) its state, holds no lock, when every lock taken on
        the node holds its state and the token is False, and when the node's locks are all
        its descendants' (unlock the node that was locked: undoing a descendant's lock
        through an ancestor could leave a state lock no KV lock covers). Unlocking the root
        is a no-op (``inc_lock_ref`` gave False for it; True raises)."""
        if self._finalized_locks is not None and self._finalized_unlock(node):
            return None  # before _enter, as in RadixTreeCore.dec_lock_ref
        self._enter()
        try:
            return self._dec_lock_ref_mamba(node, swa_boundary_id)
        finally:
            self._leave()

    cdef object _dec_lock_ref_mamba(self, node, swa_boundary_id=None):
        cdef nid_t n = self._slot_of(node)
        cdef Node* x = &self.nodes[n]
        cdef bint release_state
        if n != ROOT and x.lock_ref <= 0:
            raise LockStateError(f"node: node {x.uid} is not locked")
        if swa_boundary_id is None:
            release_state = x.aux_lock_ref > 0
        elif isinstance(swa_boundary_id, (bool, np.bool_)):  # a token kept in numpy too
            release_state = bool(swa_boundary_id)
            if release_state and x.aux_lock_ref <= 0:
                raise LockStateError(
                    f"swa_boundary_id: got {swa_boundary_id!r} (a state lock), but node {x.uid} "
                    "holds no state lock"
                )
        else:
            raise TypeError(
                f"swa_boundary_id: expected the bool token of inc_lock_ref, got {swa_boundary_id!r}"
            )
        if n != ROOT and x.own_lock <= 0:
            # its locks are its descendants': undoing one here would leave the descendant
            # holding a lock the node no longer counts, and a state lock taken on the node
            # later could then lose its cover when the descendant unlocks
            raise LockStateError(
                f"node: node {x.uid} holds only its descendants' locks ({x.lock_ref}); "
                "unlock the node inc_lock_ref locked"
            )
        if n != ROOT and not release_state and x.own_lock <= x.aux_lock_ref:
            # every lock taken on the node holds its state: one without would leave a state
            # lock no full lock covers (evict would then free a state counted as locked)
            raise LockStateError(
                f"swa_boundary_id: got {swa_boundary_id!r} (no state lock), but each of node "
                f"{x.uid}'s {x.own_lock} lock(s) holds its state: pass inc_lock_ref's token"
            )
        self._check_unlockable(n)
        if n != ROOT and release_state:
            x.aux_lock_ref -= 1
            if x.aux_lock_ref == 0:
                self._aux_protected -= 1
                self._aux_evictable += 1
                _heap_push(&self.aux_heap, self.nodes, HEAP_AUX, n)
        self._release_locks(n)

    def mamba_evictable_size(self):
        """Stored states that are not locked (O(1))."""
        self._await_idle()
        return self._aux_evictable

    def mamba_protected_size(self):
        """Stored states that are locked (O(1))."""
        self._await_idle()
        return self._aux_protected


cdef inline int64_t _count_equal(const idx_t* a, const idx_t* b, int64_t n) noexcept nogil:
    cdef int64_t i, c = 0
    for i in range(n):
        c += a[i] == b[i]
    return c


cdef inline int64_t _copy_differing(idx_t* dst, const idx_t* own, const idx_t* incoming,
                                    int64_t n) noexcept nogil:
    """Copy incoming[i] where it differs from own[i]; returns how many were copied."""
    cdef int64_t i, k = 0
    for i in range(n):
        if incoming[i] != own[i]:
            dst[k] = incoming[i]
            k += 1
    return k


cdef int64_t _count(str name, object v) except? -1:
    """An eviction count: any int (<= 0 means nothing); bools and floats are rejected."""
    cdef long long x
    cdef int overflow = 0
    if PyLong_CheckExact(v):
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if not overflow:
            return max(-1, min(x, (<int64_t>1) << 62))
    v = _as_index(v, TypeError, f"{name}: expected an int")
    return max(-1, min(v, (<int64_t>1) << 62))


cdef int64_t _int64(str name, object v) except? -1:
    """Any int that fits in 64 bits; bools and floats are rejected."""
    cdef int overflow = 0
    cdef long long x
    if PyLong_CheckExact(v):  # the common case, without the __index__ protocol
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if not overflow:
            return x
    v = _as_index(v, TypeError, f"{name}: expected an int")
    if not -(1 << 63) <= v < (1 << 63):
        raise InvalidValueError(f"{name}: expected a 64-bit int, got {v}")
    return v


cdef inline object _lock_key(int64_t uid, int64_t boundary):
    """The key of an SWA lock in _swa_locks: one int (no tuple) for every realistic node id
    and boundary, a tuple beyond."""
    if uid < (<int64_t>1 << 31) and boundary < (<int64_t>1 << 32):
        return (uid << 32) | boundary
    return (uid, boundary)


cdef tuple _lock_key_parts(object key):
    """(node id, boundary) of a _lock_key."""
    return key if isinstance(key, tuple) else (key >> 32, key & 0xFFFFFFFF)


cdef int64_t _nonneg_int(str name, object v) except -1:
    cdef int overflow = 0
    cdef long long x
    if PyLong_CheckExact(v):
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if not overflow and x >= 0:
            return x
    v = _as_index(v, TypeError, f"{name}: expected an int")
    if not 0 <= v < (1 << 63):
        raise InvalidValueError(f"{name}: expected an int in [0, 2**63), got {v}")
    return v


cdef int64_t _parse_state_slot(object mamba_value) except -1:
    """One Mamba state slot from an int or a length-1 integer array/list."""
    if isinstance(mamba_value, bool):
        raise TypeError(
            f"mamba_value: expected an int slot or a length-1 int array, got {mamba_value!r}"
        )
    if isinstance(mamba_value, int):
        mamba_value = PyNumber_Index(mamba_value)   # an exact int (a subclass's value)
    else:
        try:
            arr = np.asarray(mamba_value)
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"mamba_value: cannot read {mamba_value!r}: {exc}")
        except RuntimeError:
            _refuse_deleted_array("mamba_value", mamba_value)
            raise
        if arr.dtype.kind not in "iu" or arr.size != 1 or arr.ndim > 1:
            raise InvalidValueError(
                f"mamba_value: expected one integer state slot, got {mamba_value!r}"
            )
        mamba_value = int(arr.reshape(-1)[0])
    if mamba_value < 0 or mamba_value > INT32_MAX:
        raise InvalidValueError(f"mamba_value: state slot {mamba_value} is outside [0, 2**31)")
    return mamba_value


def _copy_set_mode(int mode):
    """This module's copy routine, as ``_allocator._copy_set_mode`` sets its own: 1 the
    stepped loop in the 4 KiB-aliasing window, 0 memcpy, -1 by CPU vendor (the default).
    Returns the mode in force before. For tests and benchmarks."""
    return copy32_set_mode(mode)


def _after_fork_in_child():
    """``os.register_at_fork(after_in_child=...)``. Only the forking thread lives on in a
    child process: a call that another thread was inside (parked in a Python callback)
    never ends there. Each such cache is marked so that its calls raise instead of waiting
    for ever (its tree may be half changed), the garbage collector holds those calls took
    are released (the collector was otherwise off for the child's whole life, cache or
    not), and other threads' wait records go. Costs nothing unless a call was running."""
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef RadixTreeCore core
    for t in [t for t in _WAITING if t != me]:
        del _WAITING[t]
    if _gc_holds == 0:
        return
    import gc
    for obj in gc.get_objects():
        if isinstance(obj, RadixTreeCore):
            core = <RadixTreeCore>obj
            if core._owner != 0 and core._owner != me and core._owner != _FORKED_OWNER:
                core._owner = _FORKED_OWNER
                _release_gc()


_os.register_at_fork(after_in_child=_after_fork_in_child)
