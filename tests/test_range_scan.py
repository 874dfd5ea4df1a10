"""The vectorised range scan every int32 key, value and allocation prefix goes through
(``first_outside`` in ``pyx/pymllm/mem_cache/_copy.pxd``): an unrolled vector loop, its
vector remainder and a scalar tail. One bad entry at every position of arrays of every
length around those boundaries must be found, and named, and a clean array passed."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError

# every length up to four unrolled AVX2 iterations and a few past, then larger ones
LENGTHS = [*range(1, 70), 127, 128, 129, 1023, 1024, 1025]


def _positions(n: int) -> list[int]:
    return list(range(n)) if n <= 70 else sorted({0, 1, 7, 8, 31, 32, n // 2, n - 2, n - 1})


@pytest.mark.parametrize("n", LENGTHS)
def test_a_negative_token_anywhere_in_a_key_is_found(n: int) -> None:
    cache = RadixCache()
    tokens = np.arange(1, n + 1, dtype=np.int32)
    assert cache.match_prefix(RadixKey(tokens)).prefix_len == 0
    for bad in (-1, -(2**31)):
        for j in _positions(n):
            key = tokens.copy()
            key[j] = bad
            with pytest.raises(InvalidKeyError, match=f"token {bad} is outside"):
                cache.match_prefix(RadixKey(key))
    assert cache.total_size() == 0


@pytest.mark.parametrize("n", LENGTHS)
def test_a_negative_slot_anywhere_in_a_value_is_found(n: int) -> None:
    cache = RadixCache()
    key = RadixKey(np.arange(1, n + 1, dtype=np.int32))
    value = np.arange(1, n + 1, dtype=np.int32)
    for j in _positions(n):
        bad = value.copy()
        bad[j] = -5
        with pytest.raises(InvalidValueError, match="KV index -5 is outside"):
            cache.insert(key, bad)
        assert cache.total_size() == 0
    assert cache.insert(key, value).prefix_len == 0
    assert cache.total_size() == n


@pytest.mark.parametrize("n", LENGTHS)
def test_a_prefix_slot_outside_the_pool_anywhere_is_found(n: int) -> None:
    size = 2048
    alloc = TokenToKVPoolAllocator(size)
    prefix = np.arange(1, n + 1, dtype=np.int32)
    for bad in (0, size + 1, -1, 2**31 - 1):
        for j in _positions(n):
            p = prefix.copy()
            p[j] = bad
            with pytest.raises(InvalidValueError, match=f"slot {bad} is outside"):
                alloc.alloc(1, prefix=p)
    assert alloc.available_size() == size
    p = prefix.copy()
    p[-1] = size  # the last slot is inside
    out = alloc.alloc(1, prefix=p)
    assert out is not None and out[:n].tolist() == p.tolist()
