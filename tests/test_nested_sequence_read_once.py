"""The slot checks read a list holding a sequence that is no list (numpy reads it item
by item) once more, as nested lists, and refuse nesting that forms no array there. A
nested sequence left as it is (ragged on that read) would be read again by the
conversion, where it may give a bool that numpy reads as slot 1."""

from __future__ import annotations

from typing import Any

import pytest

from pymllm.mem_cache import SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidValueError


class Morphing:
    """Two items until its *at*-th ``len()``, then one bool: ragged next to a 1-item
    list on the early reads, a bool on the later ones."""

    def __init__(self, at: int) -> None:
        self.at, self.lens = at, 0

    def _items(self) -> list[Any]:
        return [True] if self.lens >= self.at else [3, 4]

    def __len__(self) -> int:
        self.lens += 1
        return len(self._items())

    def __getitem__(self, i: int) -> Any:
        items = self._items()
        if i >= len(items):
            raise IndexError(i)
        return items[i]


@pytest.mark.parametrize("at", range(1, 9))
def test_ragged_then_bool_is_refused_on_every_read(at: int) -> None:
    a = SWATokenToKVPoolAllocator(16, 16)
    a.alloc(5)
    with pytest.raises(InvalidValueError):
        # ragged, or a bool: never read as slot 1 (translate takes any shape)
        a.translate_loc_from_full_to_swa([Morphing(at), [5]])
