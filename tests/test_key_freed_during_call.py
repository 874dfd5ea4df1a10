"""A key array freed by Python code that a cache call runs after reading it in place.

The caches read an aligned C-contiguous int32 key array in place (no copy), then run
Python code before they are done with it: the extra_key's ``__hash__``/``__eq__`` (the
namespace lookup), a value item's ``__index__``. That code can free the array's data with
no unsafe flag: once the RadixKey lets go of the array, only the call's references are
left, so ``ndarray.resize`` passes its reference check and reallocates. An AddressSanitizer
run (session 23) caught ``insert`` then copying the key out of the freed block
(heap-use-after-free); without ASan the tree stored whatever reused that memory. Each call
now checks the array still holds the key after such code, and raises ``InvalidKeyError``
with nothing changed. Each case runs in a child process, so that a crash fails one case.
"""

from __future__ import annotations

import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

_PRELUDE = r"""
import numpy as np
from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache.errors import InvalidKeyError

N = 4096
key = RadixKey(np.arange(1000, 1000 + N, dtype=np.int32), None)
junk = []
armed = [False]

def take_tokens():
    t = key.token_ids
    key.token_ids = None  # the RadixKey lets go: only the call's references are left
    return t

def free_the_key():
    if armed[0] and key.token_ids is not None:
        take_tokens().resize(1)  # a temporary: refcheck passes; the key's data is freed
        junk.extend(np.full(N, 7, np.int32) for _ in range(64))  # reuse the block

class ExtraKey:
    def __hash__(self):
        free_the_key()
        return 1

    def __eq__(self, other):
        return self is other

class Index:
    def __init__(self, v):
        self.v = v

    def __index__(self):
        free_the_key()
        return self.v

class Pool:
    def free(self, slots):
        pass

def make(cls):
    if cls == "RadixCache":
        return RadixCache()
    return MambaRadixCache(token_to_kv_pool_allocator=Pool(), mamba_pool=Pool())

def report(call):
    before = cache.total_size()
    try:
        call()
    except InvalidKeyError as exc:
        cache._check_invariants()
        print("refused", cache.total_size() == before, "resized" in str(exc))
    else:
        print("returned")
"""

_CASES = {
    # the namespace lookup of an insert (value None: the key's tokens are the values)
    "insert, extra_key hash": """
key.extra_key = ExtraKey(); armed[0] = True
mamba = {} if CLS == "RadixCache" else {"mamba_value": 1}
value = None if CLS == "RadixCache" else np.arange(N, dtype=np.int32)
report(lambda: cache.insert(key, value, **mamba))
""",
    # a value item's __index__, after the namespace was found
    "insert, value __index__": """
key.extra_key = ExtraKey()
mamba = {} if CLS == "RadixCache" else {"mamba_value": 1}
value = [Index(i) for i in range(N)]
armed[0] = True
report(lambda: cache.insert(key, value, **mamba))
""",
    # a match whose namespace exists (a miss returns before the key is read)
    "match, extra_key hash": """
ek = ExtraKey(); key.extra_key = ek
mamba = {} if CLS == "RadixCache" else {"mamba_value": 1}
cache.insert(RadixKey(list(range(1000, 1000 + N)), ek), np.arange(N, dtype=np.int32), **mamba)
armed[0] = True
report(lambda: cache.match_prefix(key))
""",
}


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("cls", ["RadixCache", "MambaRadixCache"])
def test_a_key_array_freed_during_the_call_is_refused(cls: str, case: str) -> None:
    code = _PRELUDE + f"CLS = {cls!r}\ncache = make(CLS)\n" + _CASES[case]
    assert run_child(code).split() == ["refused", "True", "True"]
