"""Memory-pool benchmarks (issue 5), on the host CPU.

* Slot allocator alloc+free throughput: the compiled ``TokenToKVPoolAllocator`` (always-on
  double-free checks) against a numpy free list in the style of the seed's family
  (``free_slots[:n]`` / ``np.concatenate`` on free / ``np.sort`` on merge, no checks), on
  the same seeded workload: a 262,144-slot pool, batches of a fixed size, 16 batches
  outstanding, freed in random order (so merges run); and the exhausted pool (64 batches
  of 4096 outstanding fill it: every alloc merges what the last free released).
* ``KVPool`` write/read bandwidth on CPU, all layers in one jitted call, beside the
  no-donation write that copies the whole cache every call. float32 here: XLA:CPU has no
  native bf16 scatter and converts the *whole* bf16 buffer to f32 and back around every
  scatter (O(cache) per write, seconds for a 268 MB pool), an artifact of the CPU backend
  that GPUs do not share. The H200 figures (bf16) come from ``bench/gpu_kv_bandwidth.py``
  (see ``bench/RESULTS.md``).

Run: ``pytest bench/bench_memory_pool.py --benchmark-only`` (ratios printed at the end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import note, record

from pymllm.mem_cache.memory_pool import KVPool, TokenToKVPoolAllocator, pad_slots

POOL = 262_144
# (batch, outstanding, shuffled): shuffled frees give each batch back in random slot order,
# which takes the slot-by-slot path instead of the whole-run one.
BATCHES = [
    (1, 16, False),
    (16, 16, False),
    (256, 16, False),
    (1024, 16, False),
    (1024, 16, True),
    (4096, 16, False),
    (4096, 64, False),
]


class NumpyFreeList:
    """The baseline: a numpy free list, sorted merge on demand, no ownership checks."""

    def __init__(self, size: int) -> None:
        self.free_slots = np.arange(1, size + 1, dtype=np.int32)
        self.release_slots = np.zeros(0, dtype=np.int32)

    def available_size(self) -> int:
        return len(self.free_slots) + len(self.release_slots)

    def alloc(self, n: int) -> np.ndarray | None:
        if n > len(self.free_slots) + len(self.release_slots):
            return None
        if n > len(self.free_slots):
            self.free_slots = np.sort(np.concatenate([self.free_slots, self.release_slots]))
            self.release_slots = np.zeros(0, dtype=np.int32)
        out = self.free_slots[:n]
        self.free_slots = self.free_slots[n:]
        return out

    def free(self, indices: np.ndarray) -> None:
        self.release_slots = np.concatenate([self.release_slots, indices])


ALLOCATORS = {"compiled": TokenToKVPoolAllocator, "numpy-free-list": NumpyFreeList}


def churn(alloc, batch: int, outstanding: int, cycles: int, order: np.ndarray, perm) -> int:
    """Alloc `cycles` batches keeping `outstanding` live; free each (its slots permuted by
    `perm` if given) in a seeded random order. Returns the slots through alloc and free."""
    live: list[np.ndarray] = []
    for i in range(cycles):
        x = alloc.alloc(batch)
        live.append(x if perm is None else x[perm])
        if len(live) == outstanding:
            alloc.free(live.pop(order[i]))
    for x in live:
        alloc.free(x)
    return cycles * batch


@pytest.mark.parametrize(
    ("batch", "outstanding", "shuffled"),
    BATCHES,
    ids=[f"{b}x{o}" + ("-shuffled" if s else "") for b, o, s in BATCHES],
)
@pytest.mark.parametrize("impl", sorted(ALLOCATORS))
def test_alloc_free_throughput(
    benchmark, impl: str, batch: int, outstanding: int, shuffled: bool
) -> None:
    cycles = max(256, min(20_000, 4 * POOL // batch))
    rng = np.random.default_rng(batch)
    order = rng.integers(0, outstanding, size=cycles)
    perm = rng.permutation(batch) if shuffled else None
    slots = []

    def setup():
        return (ALLOCATORS[impl](POOL), batch, outstanding, cycles, order, perm), {}

    benchmark.group = f"alloc+free batch={batch} outstanding={outstanding} shuffled={shuffled}"
    benchmark.pedantic(lambda *a: slots.append(churn(*a)), setup=setup, rounds=5)
    full = ", pool full" if batch * outstanding >= POOL else ""
    group = f"allocator alloc+free, batch {batch}{full}{', shuffled' if shuffled else ''}"
    record(benchmark, group, impl, baseline=impl != "compiled", per=cycles * batch)
    if benchmark.stats is not None:
        rate = cycles * batch / benchmark.stats.stats.median
        note(group, f"{impl}: {rate / 1e6:,.1f} M slots/s alloc+free")


# -- KVPool on CPU ----------------------------------------------------------------------

LAYERS, HEADS, DIM, SLOTS = 4, 8, 128, 32_768
KV_BATCHES = [16, 256, 4096]


@pytest.fixture(scope="module")
def kv_pool() -> KVPool:
    return KVPool(SLOTS, LAYERS, HEADS, DIM, dtype=jnp.float32)


def _rows(n: int) -> tuple[np.ndarray, jax.Array]:
    rng = np.random.default_rng(n)
    loc = pad_slots(rng.choice(np.arange(1, SLOTS + 1, dtype=np.int32), n, replace=False))
    k = jax.device_put(rng.standard_normal((LAYERS, n, HEADS, DIM)).astype(np.float32))
    return loc, k


def _gbps(benchmark, n: int) -> str:
    if benchmark.stats is None:
        return ""
    row_bytes = 2 * n * LAYERS * HEADS * DIM * 4  # K and V rows, float32
    return f"{row_bytes / benchmark.stats.stats.median / 1e9:8.2f} GB/s of rows"


@pytest.mark.parametrize("n", KV_BATCHES)
def test_kv_write_all_layers(benchmark, kv_pool: KVPool, n: int) -> None:
    loc, k = _rows(n)

    def run() -> None:
        kv_pool._buffers = kv_pool._write_all(kv_pool._buffers, loc, k, k)
        kv_pool._buffers.k.block_until_ready()

    run()
    benchmark.group = "kv write (CPU)"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    group = f"KVPool write, {n} tokens x {LAYERS} layers (CPU)"
    record(benchmark, group, "donated scatter")
    note(group, f"donated scatter: {_gbps(benchmark, n)}")


@pytest.mark.parametrize("n", KV_BATCHES)
@pytest.mark.parametrize("path", ["jitted call", "set_kv_all"])
def test_kv_write_public_method_overhead(benchmark, kv_pool: KVPool, n: int, path: str) -> None:
    """The public write (slot checks, the duplicate check, the host copy of the slot list,
    device_put) against its jitted call alone, with device-resident K/V at a bucket size:
    what the checks cost a caller who uses the method instead of the module function."""
    loc, k = _rows(n)
    loc = loc[:n]  # the caller's own slots, unpadded (n is a bucket size: no padding)

    def run() -> None:
        if path == "set_kv_all":
            kv_pool.set_kv_all(loc, k, k)
        else:
            kv_pool._buffers = kv_pool._write_all(kv_pool._buffers, pad_slots(loc), k, k)
        kv_pool._buffers.k.block_until_ready()

    run()
    benchmark.group = f"kv write public method, {n} tokens (CPU)"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    record(
        benchmark,
        f"KVPool write, {n} tokens x {LAYERS} layers (CPU): the method's own cost",
        path,
        baseline=path == "set_kv_all",
    )


@pytest.mark.parametrize("n", KV_BATCHES)
def test_kv_read_all_layers(benchmark, kv_pool: KVPool, n: int) -> None:
    loc, _ = _rows(n)

    def run() -> None:
        jax.block_until_ready(kv_pool._read_all(kv_pool._buffers, loc))

    run()
    benchmark.group = "kv read (CPU)"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    group = f"KVPool read, {n} tokens x {LAYERS} layers (CPU)"
    record(benchmark, group, "gather")
    note(group, f"gather: {_gbps(benchmark, n)}")


@pytest.mark.parametrize("donate", [True, False], ids=["donated", "no-donation"])
def test_kv_write_donation_vs_whole_copy(benchmark, kv_pool: KVPool, donate: bool) -> None:
    """One 16-token write: in place (donated) vs copying the whole cache (not donated)."""
    from pymllm.mem_cache.memory_pool import _write_kv_all

    loc, k = _rows(16)
    fn = jax.jit(_write_kv_all, donate_argnums=0) if donate else jax.jit(_write_kv_all)

    def run() -> None:
        kv_pool._buffers = fn(kv_pool._buffers, loc, k, k)
        kv_pool._buffers.k.block_until_ready()

    run()
    benchmark.group = "kv donation (CPU)"
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    group = f"KVPool 16-token write, {kv_pool.mem_bytes() / 2**20:.0f} MiB cache (CPU)"
    record(benchmark, group, "donated" if donate else "no-donation", baseline=not donate)
