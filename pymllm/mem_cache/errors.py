"""The exceptions raised by :mod:`pymllm.mem_cache`.

Every error below subclasses :class:`CacheError` and one built-in exception
(``ValueError`` or ``RuntimeError``), so callers can catch either our family or the
built-in one. A scalar argument of the wrong type passed to a method (a float count or
priority, a key that is not a ``RadixKey``, a node that is not a handle) raises a plain
``TypeError``, outside the family. Slot ids and tokens that are not integers (a float, a
bool, a string, even one alone) raise ``InvalidValueError`` and ``InvalidKeyError``: they
are data, checked as data (but ``mamba_value=True``, a ``TypeError``). A constructor's size
or count that is not an int in its range (``page_size=1.5`` as much as ``page_size=0``)
raises ``InvalidValueError``.

An error raised by a public call leaves the cache, its allocator and every KV slot exactly
as they were, except where the call's docstring says otherwise: an ``evict`` whose
``on_node_evict`` callback raises, and an ``evict`` or ``reset`` whose allocator's ``free``
(a Python subclass or stand-in) raises, still finish their work (every slot taken out is
freed, or handed to that ``free``) and then raise the first such error (``reset`` calls
no ``on_node_evict``).
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by pymllm.mem_cache."""


class InvalidKeyError(CacheError, ValueError):
    """A key holds tokens outside [0, 2**32), mixed tuple arities or a bad shape."""


class InvalidValueError(CacheError, ValueError):
    """A value out of its domain: KV indices of the wrong length, dtype or range, slots an
    insert would take that no caller holds, a constructor's size or policy, an insert's
    ``prev_prefix_len``."""


class StaleNodeError(CacheError, ValueError):
    """A node handle refers to a node that was evicted (or to another cache)."""


class LockStateError(CacheError, ValueError):
    """Unlocking a node that holds no lock, or an unlock that does not match its lock."""


class InvalidFreeError(CacheError, ValueError):
    """Freeing a slot that is not the caller's: not allocated (a double free), a cache's,
    the padding slot 0, out of range, or (page size 1) listed twice in one call."""


class AllocatorStateError(CacheError, RuntimeError):
    """An allocator call out of order, such as ``free_group_end()`` with no open group."""


class BuffersDeletedError(CacheError, RuntimeError):
    """A pool's device buffers are deleted: a step donated ``pool.buffers`` and its result
    was not handed back with ``pool.buffers = new``, or an update was interrupted between
    its dispatch and its return (then its result is lost and the pool must be rebuilt)."""


class NotInitializedError(CacheError, RuntimeError):
    """A cache or allocator used before its ``__init__`` ran to completion (made with
    ``__new__``, a subclass that skipped ``super().__init__()``, or an ``__init__`` that
    raised)."""


class AlreadyInitializedError(CacheError, RuntimeError):
    """``__init__`` called again on a live cache, allocator or pool: it would drop the slots,
    nodes or buffers that their owners still point into (``reset()``/``clear()`` empty one,
    or make a new one)."""


class ReentrantCallError(CacheError, RuntimeError):
    """A cache method was called from code that cache runs inside one of its own calls
    (``on_node_evict``, the allocator's ``free``, an ``extra_key``'s ``__hash__`` or
    ``__eq__``) while the outer call is still running, including a finalizer such code
    triggers (a callback that drops the last reference to a request whose ``__del__``
    unlocks). The garbage collector does not run inside a cache call, so the finalizers of
    cyclic garbage run after it returns. Also raised instead of a wait that would never
    end: such code of one cache calling another whose running call, in another thread,
    waits (itself or through others) for the first cache."""


__all__ = [
    "AllocatorStateError",
    "AlreadyInitializedError",
    "BuffersDeletedError",
    "CacheError",
    "InvalidFreeError",
    "InvalidKeyError",
    "InvalidValueError",
    "LockStateError",
    "NotInitializedError",
    "ReentrantCallError",
    "StaleNodeError",
]
