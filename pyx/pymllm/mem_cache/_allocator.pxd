# cython: language_level=3
"""The contract of the host-side slot allocators (implementation: ``_allocator.pyx``).

Everything is counted in *pages* inside; a page is ``page_size`` consecutive slots and
page ``p`` covers slots ``[p * page_size, (p + 1) * page_size)``. Page 0 (slot 0 when
``page_size == 1``) is the reserved padding page: never handed out, never freed.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


# The reserved padding page/slot id: an in-bounds trash row in every device buffer.
cdef enum:
    PAD_PAGE = 0


# Per-page state, one byte each in ``PageCore.state``.
cdef enum PageState:
    PAGE_FREE = 0       # allocatable: in pages[head:tail] or in release[:n_release]
    PAGE_ALLOCATED = 1  # owned by a caller
    PAGE_HELD = 2       # freed inside an open free group: not allocatable until it closes
    PAGE_PENDING = 3    # transient, inside one free() call, between validation and commit
    PAGE_RESERVED = 4   # the padding page 0
    PAGE_CACHED = 5     # owned by a prefix cache: a radix tree took it in insert (adopt)


cdef class PageCore:
    """Free list + allocation state of ``num_pages`` pages (ids ``1..num_pages``)."""
    cdef int32_t* pages       # free page ids, capacity 2 * num_pages; live: pages[head:tail]
    cdef int32_t* release     # pages freed since the last merge (need_sort only)
    cdef int32_t* held        # pages freed inside the open free group
    cdef int32_t* scratch     # one free() call's unique pages before commit; merge's output
    cdef uint8_t* state       # PageState of every page id 0..num_pages
    cdef uint64_t* freebits   # bit p set <=> state[p] == PAGE_FREE: merge() scans 64 a word
    cdef int32_t n_words      # words of `freebits`
    cdef readonly int32_t num_pages  # pages 1..num_pages are allocatable
    cdef readonly int32_t page_size  # slots per page (>= 1)
    cdef readonly bint need_sort     # frees wait in `release`, merged sorted on demand
    cdef int64_t head         # first live entry of `pages` (64-bit: `pages` holds 2 * num_pages)
    cdef int64_t tail         # one past the last live entry of `pages`
    cdef int32_t n_release    # entries of `release`
    cdef int32_t n_held       # entries of `held`
    cdef int32_t n_allocated  # pages in state PAGE_ALLOCATED or PAGE_CACHED
    cdef int group_depth      # nesting depth of free_group_begin(); > 0 holds frees back
    cdef int64_t merges[3]    # test hook: merges by already-sorted, radix-sort, bitmap scan

    cdef void reset(self) noexcept
    cdef int32_t free_pages_count(self) noexcept
    # Takes `need` pages off the free list and marks them allocated; returns a pointer to
    # their ids, valid until this core's next call. NULL (nothing changed) when fewer than
    # `need` are allocatable.
    cdef int32_t* take_pages(self, int32_t need) noexcept
    # Validates slots[0:n] (each in a page in state `owner`: PAGE_ALLOCATED for a caller's
    # free, PAGE_CACHED for a prefix cache's) and collects the unique pages they touch into
    # `scratch` (marked PAGE_PENDING). Returns their count; raises InvalidFreeError with
    # every state as it was before the call (InvalidValueError naming `full_indices` with
    # `attach`: SWATokenToKVPoolAllocator.alloc_swa validates the slots it attaches to).
    cdef int32_t collect(
        self, const int32_t* slots, Py_ssize_t n, uint8_t owner, bint attach=*
    ) except -1
    # Moves pages[0:count] (PENDING or ALLOCATED) to the free side: held while a group is
    # open, else onto `release` (need_sort) or the tail of `pages`.
    cdef void commit(self, const int32_t* pages, int32_t count) noexcept
    # Where the next `count` freed pages are written (compacts `pages` first if needed).
    cdef int32_t* free_dst(self, int32_t count) noexcept
    # Books `count` pages written at free_dst(count) whose state is already set.
    cdef void placed(self, int32_t* dst, int32_t count, bint bits_done) noexcept
    # page_size == 1 fast path of collect + commit: one pass, rolled back on error
    # (InvalidFreeError, every state as before). Returns n.
    cdef int32_t free_slots(self, const int32_t* slots, Py_ssize_t n, uint8_t owner) except -1
    # The pages of slots[0:n], each PAGE_ALLOCATED, become PAGE_CACHED (a prefix cache
    # takes them from their caller); InvalidValueError with every state as it was.
    cdef int adopt(self, const int32_t* slots, Py_ssize_t n) except -1
    # The pages of slots[0:n] set to `st` unchecked: PAGE_ALLOCATED undoes adopt(slots, n)
    # (the allocators' disown_c).
    cdef void set_owner(self, const int32_t* slots, Py_ssize_t n, uint8_t st) noexcept
    # Rebuilds `pages` as every PAGE_FREE page, ascending; empties `release`.
    cdef void merge(self) noexcept
    cdef void end_group(self) noexcept


cdef class TokenToKVPoolAllocator:
    """Slots ``1..size`` of one KV pool (see the .pyx for the public contract)."""
    cdef PageCore core
    cdef readonly int32_t size
    cdef readonly int32_t page_size
    # Frees data[0:n], each in a page in state `owner` (validated: InvalidFreeError, nothing
    # freed). The C entry point of free() (owner PAGE_ALLOCATED), which the compiled radix
    # tree calls directly, with PAGE_CACHED, when it evicts.
    cdef int free_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1
    # The radix tree's insert: the caller's slots data[0:n] become the cache's
    # (PageCore.adopt), and back (disown) when the insert cannot finish.
    cdef int adopt_c(self, const int32_t* data, Py_ssize_t n) except -1
    cdef void disown_c(self, const int32_t* data, Py_ssize_t n) noexcept


cdef class SWATokenToKVPoolAllocator:
    """A full-attention slot and a sliding-window slot per token (see the .pyx)."""
    cdef PageCore full
    cdef PageCore swa
    cdef object _mapping      # int32 numpy array [(full_pages + 1) * page_size]: full -> swa
    cdef int32_t* mapping
    cdef readonly int32_t size
    cdef readonly int32_t swa_size
    cdef readonly int32_t page_size
    cdef int _live(self) except -1
    cdef int32_t _swa_pages_of(self, int32_t count) noexcept
    # Free full slots data[0:n] (pages in state `owner`) and their SWA slots; validated,
    # InvalidFreeError with nothing freed. The radix tree's entry point (PAGE_CACHED).
    cdef int free_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1
    # Free only the SWA side of full slots data[0:n] (pages in state `owner`, kept).
    cdef int free_swa_c(self, const int32_t* data, Py_ssize_t n, uint8_t owner) except -1
    # Attach an SWA page to each caller-owned (PAGE_ALLOCATED) full page of data[0:n] that
    # has none: 1 done, 0 the SWA side is short; InvalidValueError for a page not the
    # caller's or already mapped. Either way short of 1, nothing changed.
    cdef int alloc_swa_c(self, const int32_t* data, Py_ssize_t n) except -1
    # As TokenToKVPoolAllocator's, on the full side.
    cdef int adopt_c(self, const int32_t* data, Py_ssize_t n) except -1
    cdef void disown_c(self, const int32_t* data, Py_ssize_t n) noexcept


# A constructor's size argument: any integer (numpy's too, through operator.index) but a
# bool, in [minimum, 2**31); else InvalidValueError. Shared with the radix tree's options.
cdef object _size_arg(str name, object value, int minimum)

# A sequence numpy would read item by item (a deque, a UserList) as a list, else the object
# itself: the radix tree's key and value reads call it in C.
cpdef object _sequence_as_list(str name, object x, object error=*)
