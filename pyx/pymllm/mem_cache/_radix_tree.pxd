# The contract of the compiled radix tree.
#
# Nodes live in one growable array of structs and refer to each other by slot id (never by
# pointer: the array is realloc'ed). Slot 0 is the root. A slot is reused after its node is
# evicted; the public node id (`uid`) is never reused, so a handle (slot, uid) to an evicted
# node is detected as stale.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

ctypedef uint32_t tok_t     # one token id (tuple tokens are `width` consecutive tok_t)
ctypedef int32_t idx_t      # one KV slot index
ctypedef int32_t nid_t      # a node's slot in the node array

cdef enum:
    NIL = -1                # "no node"
    ROOT = 0                # slot of the root node

cdef enum:
    POLICY_LRU = 0          # least recently used first
    POLICY_LFU = 1          # fewest match hits first, ties by recency
    POLICY_FIFO = 2         # oldest insertion first (a split keeps the insertion time)
    POLICY_PRIORITY = 3     # lowest insert(priority=) first, ties by recency
    POLICY_SLRU = 4         # never-hit (probationary) before hit (protected), LRU within

cdef enum:
    IN_RUN = -2             # heap_pos[HEAP_FULL] of a leaf kept in the run, not the heap

cdef enum:
    HEAP_FULL = 0           # evictable leaves: non-root, no children, lock_ref == 0
    HEAP_AUX = 1            # second eviction class (SWA tombstoning / Mamba states)


ctypedef struct Node:
    int64_t uid             # public id; -1 while the slot is free
    nid_t parent            # slot of the parent (NIL for the root)
    int32_t num_children    # children are found through the ChildMap, counted here
    int32_t ns              # namespace id (extra_key, token width)
    int32_t width           # tok_t per position: 1 for int tokens, k for k-tuples
    int64_t len             # positions (tokens) in this node's key
    int64_t end_pos         # prefix length at the node's end (root: 0); splits keep it
    tok_t* key              # len * width tokens, in the block the node owns (a split may
                            # leave it past the block's start: see _node_lead)
    idx_t* value            # len KV indices, owned (tree-owned slots)
    int64_t prio            # eviction class, compared before last_access (policy-defined:
                            # 0 for LRU, hits for LFU, creation clock for FIFO, priority,
                            # segment for SLRU); it only ever grows while a node lives
    int64_t last_access     # logical clock of the last match/insert that touched it
    int64_t hit_count       # match_prefix calls that matched this node
    int32_t lock_ref        # full-KV lock count (node and all its ancestors are locked)
    int32_t heap_pos[2]     # position in each eviction heap, -1 when absent; for HEAP_FULL
                            # IN_RUN (-2) when the node is in the run instead (see Run)
    int32_t aux_lock_ref    # lock count of the second resource (SWA KV / Mamba state)
    int32_t own_lock        # inc_lock_ref calls on this node itself not yet undone
                            # (lock_ref also counts those through its descendants)
    int32_t aux_value       # Mamba: state slot or -1; SWA: 0 = live SWA KV, -1 = tombstone
    nid_t run_prev          # neighbours in the run of evictable leaves (IN_RUN), NIL at
    nid_t run_next          # its ends
    nid_t next_free         # free-list link while the slot is free


ctypedef struct MapEntry:
    uint64_t h              # hash of (parent, ns, first page)
    nid_t parent
    nid_t child             # MAP_EMPTY, MAP_DELETED or a node slot (> 0: the root is no child)

cdef enum:
    MAP_EMPTY = 0           # zero: a zeroed table is empty without a pass over it
    MAP_DELETED = -2


# Growing the map never rehashes it in one go: a larger, zeroed table is started (from
# 1 MiB on, pages mapped from the kernel, touched only as entries land in them) and the old
# one is drained into it a few buckets per later reservation, while lookups look in both.
# A tree of a million nodes would otherwise stall one insert for a rehash of a million
# entries (380 ms on the development machine).
ctypedef struct ChildMap:
    MapEntry* entries       # the table new entries go into
    uint64_t mask           # capacity - 1 (capacity is a power of two)
    int64_t used            # live entries, in both tables
    int64_t filled          # live + deleted entries of `entries` (grow when > capacity / 2)
    MapEntry* old           # the table being drained into `entries`, NULL when none
    uint64_t old_mask
    uint64_t old_next       # buckets old[0:old_next] were drained (deleted or moved)


# The evictable leaves are kept in two ordered structures, both by (prio, last_access, uid):
# a run, a doubly linked list in ascending order that takes a leaf only at its end (a leaf
# ordered after the run's last: a new leaf, a touched one under LRU), and the heap for every
# other (a parent left childless, a leaf touched while another ordered after it). The next
# victim is the smaller of the run's head and the heap's top. Under LRU nearly every leaf
# lives in the run, so the common evict, insert and touch are O(1) list operations with no
# sift through a large heap (whose every level reads two node structs).
ctypedef struct Run:
    nid_t head              # first (smallest) leaf of the run, NIL when empty
    nid_t tail              # last (largest) leaf
    int64_t size


ctypedef struct Heap:
    nid_t* data             # binary min-heap of node slots ordered by (prio, last_access, uid)
    int64_t size
    int64_t cap
