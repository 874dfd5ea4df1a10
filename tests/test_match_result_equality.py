"""``MatchResult`` is a dataclass with the generated ``__eq__``, which compares its fields
as a tuple; ``indices`` is a numpy array, so comparing two results asks numpy for the
truth value of an array: ``ValueError`` for every prefix longer than one token (and for
an empty one, a miss). ``==``, ``!=`` and ``in`` on results must answer, not raise."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import ChunkCache, MambaRadixCache, RadixCache, RadixKey


def _radix_results(key: list[int]):
    cache = RadixCache()
    cache.insert(RadixKey([1, 2, 3, 4]), np.arange(1, 5, dtype=np.int32))
    return cache.match_prefix(RadixKey(key)), cache.match_prefix(RadixKey(key))


def _mamba_results():
    cache = MambaRadixCache()
    cache.insert(RadixKey([1, 2, 3]), np.arange(1, 4, dtype=np.int32), mamba_value=7)
    return cache.match_prefix(RadixKey([1, 2, 3])), cache.match_prefix(RadixKey([1, 2, 3]))


def _chunk_results():
    cache = ChunkCache()
    return cache.match_prefix(RadixKey([1, 2])), cache.match_prefix(RadixKey([1, 2]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _radix_results([1, 2, 3, 4]),
        lambda: _radix_results([9]),
        _mamba_results,
        _chunk_results,
    ],
    ids=["radix-hit", "radix-miss", "mamba-hit", "chunk-miss"],
)
def test_comparing_match_results_answers(make) -> None:
    a, b = make()
    eq = a == b
    ne = a != b
    assert isinstance(eq, bool) and isinstance(ne, bool)
    assert eq is not ne
    assert a in [a, b]
