"""RadixKey indexing of a key whose tokens are a jax array."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from pymllm.mem_cache import RadixCache, RadixKey


def test_slicing_a_jax_array_key_slices_the_array_not_a_list_of_device_scalars() -> None:
    """_sliceable turned a jax array into ``list(tokens)``: one device scalar per token of
    the whole key (seconds for a 20,000-token prompt) for any slice, and a sliced key that
    the cache then reads one device scalar at a time. A numpy key is sliced as an array."""
    key = RadixKey(jnp.arange(8, dtype=jnp.int32), "a")
    part = key[2:5]
    assert not isinstance(part.token_ids, list)
    assert np.asarray(part.token_ids).tolist() == [2, 3, 4]
    assert part.extra_key == "a"
    one = key[-1]
    assert not isinstance(one.token_ids, list)
    assert np.asarray(one.token_ids).tolist() == [7]
    cache = RadixCache()
    cache.insert(key)
    assert cache.match_prefix(key[:6]).prefix_len == 6


class HostTensor:
    """A host tensor of another library: iterating it gives 0-d tensors, ``__array__`` the
    whole array at once."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (HostTensor(np.asarray(x)) for x in self._a)

    def __index__(self) -> int:
        return int(self._a)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._a if dtype is None else self._a.astype(dtype)


def test_slicing_an_array_like_key_reads_it_as_numpy() -> None:
    key = RadixKey(HostTensor(np.arange(8, dtype=np.int32)), "a")
    part = key[2:5]
    assert isinstance(part.token_ids, np.ndarray)
    assert part.token_ids.tolist() == [2, 3, 4]
    one = key[-1]
    assert isinstance(one.token_ids, np.ndarray)
    assert one.token_ids.tolist() == [7]
    cache = RadixCache()
    cache.insert(RadixKey(np.arange(8, dtype=np.int32), "a"))
    assert cache.match_prefix(part).prefix_len == 0
    assert cache.match_prefix(key[:6]).prefix_len == 6
