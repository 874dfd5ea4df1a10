"""A node handle read from an ``extra_key``'s ``__del__`` that an ``evict`` runs.

Removing a namespace's last node drops the cache's reference to its ``extra_key`` while
the node's slot is still live; the ``extra_key``'s ``__del__`` runs there, inside the
evict. Handle reads are allowed inside the cache's own calls ("see the call's state as
it stands"), so ``node.key`` and ``repr(node)`` there must answer (or raise
``StaleNodeError`` for a node already gone), not fail with a bare ``TypeError`` from
unpacking the namespace's emptied registry entry."""

from __future__ import annotations

from typing import Any

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.errors import StaleNodeError


def test_handle_reads_in_an_extra_key_finalizer_run_by_evict() -> None:
    errors: list[BaseException] = []
    reads: list[Any] = []
    node: Any = None

    class ExtraKey:
        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            return self is other

        def __del__(self) -> None:
            for read in (lambda: node.key, lambda: repr(node)):
                try:
                    reads.append(read())
                except StaleNodeError:
                    reads.append("stale")
                except Exception as exc:
                    errors.append(exc)

    cache = RadixCache()
    node = cache.insert(RadixKey([1, 2, 3], ExtraKey()), [4, 5, 6]).last_node
    assert cache.evict(3).full_evicted == 3
    assert len(reads) + len(errors) == 2, "the extra_key was not dropped by the evict"
    assert not errors, errors
    cache._check_invariants()
