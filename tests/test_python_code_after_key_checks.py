"""Python code an insert runs after its last check of the key and value arrays.

The caches read an aligned int32 key (and value) array in place, and check after each
piece of Python code they run that the key array still holds the key
(``InvalidKeyError``, nothing changed, otherwise). Two such pieces run after the last check:

* an insert into a namespace the tree does not hold yet takes the namespace
  (``_intern_ns``), which runs the extra_key's ``__hash__``/``__eq__`` a second time, and
  the key is then read (walk, new leaf) from wherever kv.tok points;
* the insert reads ``key.extra_key`` once more after the value was read; for a
  ``RadixKey`` subclass that is a property, Python code that can free the key array or
  rewrite the value array the tree then copies its slots from.

Each case runs in a child process, so that a crash fails one case.
"""

from __future__ import annotations

import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

_PRELUDE = r"""
import numpy as np
from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache.errors import CacheError, InvalidKeyError

TOKENS = np.arange(1000, 1000 + N, dtype=np.int32)
junk = []


class Pool:
    def free(self, slots):
        pass

    def free_swa(self, slots):
        pass


def make(cls):
    if cls == "RadixCache":
        return RadixCache(token_to_kv_pool_allocator=Pool())
    if cls == "windowed":
        return RadixCache(sliding_window_size=8, token_to_kv_pool_allocator=Pool())
    return MambaRadixCache(token_to_kv_pool_allocator=Pool(), mamba_pool=Pool())


def mamba_kw(cls):
    return {"mamba_value": 1} if cls == "MambaRadixCache" else {}


def free_array_of(key):
    # the RadixKey lets go of its array; the resize of a temporary passes numpy's
    # reference check (only the call's own reference is left) and frees the data
    def take():
        t = key.token_ids
        key.token_ids = None
        return t

    take().resize(1)
    junk.extend(np.full(min(N, 4096), 7, np.int32) for _ in range(64))  # reuse the block


def report(cache, call):
    before = cache.total_size()
    try:
        call()
    except InvalidKeyError:
        cache._check_invariants()
        print("refused", cache.total_size() == before)
        return
    cache._check_invariants()
    ek = KEY_EK
    got = cache.match_prefix(RadixKey(TOKENS, ek)).prefix_len
    print("stored", got == N)
"""

_SECOND_HASH = r"""
hashes = [0]


class ExtraKey:
    # the first lookup finds no namespace; the second, which takes it, frees the key
    def __hash__(self):
        hashes[0] += 1
        if hashes[0] == 2 and key.token_ids is not None:
            free_array_of(key)
        return 1

    def __eq__(self, other):
        return self is other


KEY_EK = ExtraKey()
key = RadixKey(TOKENS.copy(), KEY_EK)
cache = make(CLS)
report(cache, lambda: cache.insert(key, np.arange(1, N + 1, dtype=np.int32), **mamba_kw(CLS)))
"""

_KEY_CLASS = r"""
from pymllm.mem_cache import RadixKey


class Key(RadixKey):
    # extra_key is a property: its read number at_read (by default the one after the
    # value's) runs victim()
    __slots__ = ("_ek", "reads", "at_read", "victim")

    @property
    def extra_key(self):
        self.reads += 1
        if self.reads == self.at_read and self.victim is not None:
            self.victim()
        return self._ek

    @extra_key.setter
    def extra_key(self, v):
        self._ek = v
        self.reads = 0
        self.at_read = 2
        self.victim = None
"""

_PROPERTY = (
    _KEY_CLASS
    + r"""

KEY_EK = "ns"
cache = make(CLS)
cache.insert(RadixKey([5] * 8, "ns"), np.arange(N + 1, N + 9, dtype=np.int32), **mamba_kw(CLS))
key = Key(TOKENS.copy(), "ns")
key.at_read = 2  # the read after the value's
key.victim = lambda: free_array_of(key)
report(cache, lambda: cache.insert(key, np.arange(1, N + 1, dtype=np.int32), **mamba_kw(CLS)))
"""
)

_CLASSES = ["RadixCache", "windowed", "MambaRadixCache"]
# 4,096 tokens: the freed block is reused (the tree stored another array's data); 2**22
# tokens (16 MiB): the block was mmap'd and is unmapped (the insert read it: SIGSEGV)
_SIZES = [4096, 1 << 22]


def _code(cls: str, n: int, case: str) -> str:
    return f"N = {n}\n" + _PRELUDE + f"CLS = {cls!r}\n" + case


@pytest.mark.parametrize("n", _SIZES)
@pytest.mark.parametrize("cls", _CLASSES)
def test_key_freed_when_the_insert_takes_its_namespace(cls: str, n: int) -> None:
    out = run_child(_code(cls, n, _SECOND_HASH)).split()
    # either refused with nothing changed, or the tree holds the key as it was passed
    assert out in (["refused", "True"], ["stored", "True"]), out


@pytest.mark.parametrize("n", _SIZES)
@pytest.mark.parametrize("cls", _CLASSES)
def test_key_freed_by_an_extra_key_property(cls: str, n: int) -> None:
    out = run_child(_code(cls, n, _PROPERTY)).split()
    assert out in (["refused", "True"], ["stored", "True"]), out


_VALUE_REWRITTEN = (
    r"""
import numpy as np
from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache.errors import CacheError


class Pool:
    def __init__(self):
        self.freed = []

    def free(self, slots):
        self.freed.extend(np.asarray(slots).tolist())

    def free_swa(self, slots):
        pass


"""
    + _KEY_CLASS
    + r"""


pool = Pool()
if CLS == "RadixCache":
    cache = RadixCache(token_to_kv_pool_allocator=pool)
    kw = {}
elif CLS == "windowed":
    cache = RadixCache(sliding_window_size=8, token_to_kv_pool_allocator=pool)
    kw = {}
else:
    cache = MambaRadixCache(token_to_kv_pool_allocator=pool, mamba_pool=Pool())
    kw = {"mamba_value": 1}
cache.insert(RadixKey([5, 6, 7, 8], "ns"), np.array([1, 2, 3, 4], np.int32), **kw)
value = np.array([10, 11, 12, 13], np.int32)
key = Key([1, 2, 3, 4], "ns")


def rewrite():
    value[:] = -5


key.victim = rewrite
try:
    cache.insert(key, value, **kw)
except CacheError:
    pass
cache._check_invariants()
held = cache.match_prefix(RadixKey([1, 2, 3, 4], "ns")).indices.tolist()
print(all(0 <= s < 2**31 for s in held), held)
cache.reset()
print(all(s >= 0 for s in pool.freed))
"""
)


@pytest.mark.parametrize("cls", _CLASSES)
def test_value_rewritten_by_an_extra_key_property(cls: str) -> None:
    # the tree must never take a slot id that failed (or never went through) the checks
    out = run_child(f"CLS = {cls!r}\n" + _VALUE_REWRITTEN).split("\n")
    assert out[0].startswith("True"), out
    assert out[1] == "True", out


_VALUE_REWRITTEN_BOOKED_WINDOW = (
    r"""
import numpy as np
from pymllm.mem_cache import RadixCache, RadixKey, SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import CacheError


"""
    + _KEY_CLASS
    + r"""


alloc = SWATokenToKVPoolAllocator(64, 64)
cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
cache.insert(RadixKey([5, 6, 7, 8], "ns"), alloc.alloc(4))
value = alloc.alloc(8)
key = Key([1, 2, 3, 4, 5, 6, 7, 8], "ns")


def rewrite():
    value[:] = np.iinfo(np.int32).min


key.victim = rewrite
try:
    cache.insert(key, value, swa_evicted_seqlen=6)
except CacheError:
    pass
cache._check_invariants()
alloc._check_invariants()
print("done")
"""
)


def test_value_rewritten_by_an_extra_key_property_over_a_booked_window() -> None:
    # the windowed insert looked the rewritten slots up in the allocator's SWA mapping
    # (int32 min: 8 GiB before it) and crashed
    assert run_child(_VALUE_REWRITTEN_BOOKED_WINDOW).split() == ["done"]


@pytest.mark.parametrize("pool", [False, True], ids=["no-allocator", "python-allocator"])
def test_the_windowed_insert_keeps_the_value_it_checked(pool: bool) -> None:
    """A windowed insert into a new namespace takes the namespace (running the extra_key's
    ``__hash__`` again) after it checked the value and before it fills the new nodes: it
    fills them from its own copy, so a value rewritten there is not what the tree keeps
    (nor a slot id no check saw)."""
    import numpy as np

    from pymllm.mem_cache import RadixCache, RadixKey

    class Pool:
        def free(self, slots: object) -> None:
            pass

        def free_swa(self, slots: object) -> None:
            pass

    value = np.arange(1, 9, dtype=np.int32)
    hashes = [0]

    class Rewriting:
        def __hash__(self) -> int:
            hashes[0] += 1
            if hashes[0] == 2:  # the namespace taken, after the value's checks
                value[:] = 40
            return 3

        def __eq__(self, other: object) -> bool:
            return self is other

    ek = Rewriting()
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=Pool() if pool else None)
    cache.insert(RadixKey(list(range(1, 9)), ek), value, swa_evicted_seqlen=2)
    assert value.tolist() == [40] * 8  # the hook ran
    cache._check_invariants()
    got = cache.match_prefix(RadixKey(list(range(1, 9)), ek))
    assert got.prefix_len == 8
    assert cache.total_size() == 8
    node = got.last_node
    values = []
    while node is not None and node.parent is not None:
        values = node.value.tolist() + values
        node = node.parent
    assert values == list(range(1, 9))
