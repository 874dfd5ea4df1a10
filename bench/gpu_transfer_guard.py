"""Which public calls run under ``jax.transfer_guard(LEVEL)``, on the default device.

Each call is made once outside the guard (to compile) and once inside it, with its slots
given as a numpy array and as a ``jax.Array`` on the device; the table says ``ok`` or the
start of the error. On the CPU backend device-to-host reads of a ``jax.Array`` are no
transfer; on a GPU they are, so the jax-slot column is the one a GPU run is for.

    python bench/gpu_transfer_guard.py [LEVEL ...]     (default: disallow log)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.mem_cache.memory_pool import KVPool, MambaPool, ReqToTokenPool, scatter_rows


def calls(as_slots: Callable[[Any], Any]) -> dict[str, Callable[[], Any]]:
    """The calls, each on objects and slot arrays made here, outside any guard (so that a
    refused call leaves no trace, and the guard sees the calls' transfers alone)."""
    k = np.ones((3, 2, 4), np.float32)
    conv = np.ones((2, 3, 4), np.float32)
    temporal = np.ones((2, 3, 1), np.float32)
    kv = KVPool(64, 2, 2, 4, dtype=jnp.float32)
    mamba = MambaPool(8, 2, (4,), (1,), conv_dtype=jnp.float32, temporal_dtype=jnp.float32)
    table = ReqToTokenPool(4, 16)
    alloc = TokenToKVPoolAllocator(64)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    key, value = as_slots([5, 6, 7]), as_slots(alloc.alloc(3))
    freed = as_slots(alloc.alloc(3))
    s123, s12, s45, s789, s035 = (
        as_slots(x) for x in ([1, 2, 3], [1, 2], [4, 5], [7, 8, 9], [0, 3, 5])
    )
    return {
        "KVPool.set_kv_buffer": lambda: kv.set_kv_buffer(0, s123, k, k),
        "KVPool.get_kv": lambda: kv.get_kv(0, s123),
        "KVPool.copy": lambda: kv.copy(s12, s45),
        "MambaPool.set_states": lambda: mamba.set_states(s123, conv, temporal),
        "MambaPool.get_states": lambda: mamba.get_states(s12),
        "ReqToTokenPool.write": lambda: table.write((1, slice(0, 3)), s789),
        "scatter_rows": lambda: scatter_rows(s035, 16),
        "RadixCache.insert (key and value)": lambda: cache.insert(RadixKey(key), value),
        "TokenToKVPoolAllocator.free": lambda: alloc.free(freed),
    }


def run(level: str) -> None:
    forms = {
        "numpy slots": lambda x: np.asarray(x, np.int32),
        "jax slots": lambda x: jax.device_put(np.asarray(x, np.int32)),
    }
    print(f"\n### jax.transfer_guard({level!r}) on {jax.devices()[0].device_kind}\n")
    print("| call | " + " | ".join(forms) + " |")
    print("|---|" + "---|" * len(forms))
    rows: dict[str, list[str]] = {}
    for as_slots in forms.values():
        for call in calls(as_slots).values():
            jax.block_until_ready(call())  # compiled outside the guard
        for name, call in calls(as_slots).items():
            try:
                with jax.transfer_guard(level):
                    jax.block_until_ready(call())
                rows.setdefault(name, []).append("ok")
            except Exception as exc:  # what the guard says, shortened
                text = str(exc).split("\n")[0][:60]
                rows.setdefault(name, []).append(f"{type(exc).__name__}: {text}")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.devices()}")
    for level in sys.argv[1:] or ["disallow", "log"]:
        run(level)
