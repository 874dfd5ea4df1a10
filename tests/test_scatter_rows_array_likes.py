"""scatter_rows on integer slot arrays that are not numpy arrays, lists or jax arrays."""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import scatter_rows


class _ArrayFunc:
    """An array-like known to numpy and JAX through ``__array__`` only (a host tensor of
    another library)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._a if dtype is None else self._a.astype(dtype)


class _ArrayInterface:
    def __init__(self, a: np.ndarray) -> None:
        self._a = a  # keeps the memory alive
        self.__array_interface__ = a.__array_interface__


@pytest.mark.parametrize(
    "wrap",
    [memoryview, _ArrayFunc, _ArrayInterface],
    ids=["memoryview", "__array__", "__array_interface__"],
)
def test_a_wide_slot_of_an_array_like_goes_past_the_end_not_onto_another_row(wrap) -> None:
    """With x64 off, a 64-bit slot must not be narrowed to its low 32 bits (2**32 + 5 onto
    row 5): like a numpy int64 array, it is routed past the buffer's end and dropped."""
    assert not cast(Any, jax.config).jax_enable_x64
    host = np.array([10, 2**32 + 5, 0, 3], dtype=np.int64)
    expected = scatter_rows(host, 11).tolist()
    assert expected == [10, 12, 13, 3]
    assert scatter_rows(wrap(host), 11).tolist() == expected


@pytest.mark.parametrize("dtype", [">i4", ">u4", ">i2"])
def test_a_big_endian_integer_slot_array_is_read_by_value(dtype: str) -> None:
    """The pools and allocators read a big-endian slot array by value; scatter_rows raised
    JAX's bare TypeError ("Error interpreting argument to stage") for it."""
    loc = np.array([3, 0, 5], dtype=dtype)
    assert scatter_rows(loc, 8).tolist() == scatter_rows(loc.astype(np.int32), 8).tolist()


@pytest.mark.parametrize(
    "loc",
    [object(), None, {1: 2}, "abc", np.array([1, 2], dtype=object), np.array(["a"])],
    ids=["object", "None", "dict", "str", "object-array", "str-array"],
)
def test_what_holds_no_integer_slots_is_an_invalid_value_error(loc: Any) -> None:
    """These reached JAX, which raised a bare TypeError (or ValueError for None); the
    docstring promises InvalidValueError for a non-integer loc."""
    with pytest.raises(InvalidValueError, match="expected integer slot ids"):
        scatter_rows(loc, 8)


class Wrapped:
    """A JAX-side container (a model-state variable of a neural-network library): JAX reads
    it as an array, numpy does not."""

    def __init__(self, a: jax.Array) -> None:
        self.a = a

    def __jax_array__(self) -> jax.Array:
        return self.a


def test_a_jax_array_protocol_object_is_read_as_the_array_it_wraps() -> None:
    slots = jnp.array([0, 3, 5], jnp.int32)
    assert scatter_rows(Wrapped(slots), 8).tolist() == [8, 3, 5]


def test_a_wrapped_tracer_is_read_inside_jit() -> None:
    slots = jnp.array([0, 3, 5], jnp.int32)
    out = jax.jit(lambda a: scatter_rows(Wrapped(a), 8))(slots)
    assert out.tolist() == [8, 3, 5]


def test_a_python_int_past_int32_is_refused_as_in_a_list() -> None:
    """With x64 off JAX cannot hold it; a list of it is refused, and so is the int alone
    (it is not routed as a numpy int64 would be)."""
    for loc in (2**40, [2**40]):
        with pytest.raises(InvalidValueError, match="does not fit"):
            scatter_rows(loc, 8)
