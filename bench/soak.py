"""Soak run: a long serving mix over the compiled caches, then slot and memory accounting.

    python bench/soak.py --ops 1000000                     # RadixCache
    python bench/soak.py --ops 1000000 --kinds radix,swa,mamba

Each operation is one step of a scheduler's life, drawn from a seeded RNG: admit a request
(match, lock, allocate its uncached tokens, evicting when short; no memory: unlock and give
back), chunked prefill (insert what is computed, free duplicates, re-match, move the lock),
decode (allocate new tokens' slots), finish (insert, free duplicates, unlock), abort
(unlock, free) or a plain evict. Prompts share a few hundred system prefixes and the pool
is small, so eviction runs all the time.

Every ``--check-every`` operations the caches and allocators run ``_check_invariants()``
and the slot ledger is checked (free + in the tree + held by live requests == pool). At the
end every request is aborted and the cache reset: every slot must be free again. Resident
memory (``/proc/self/statm``) is read at the start, after the first tenth of the run
(warm: the tree's arrays have grown to their working size) and at the end; the run fails
when RSS grows by more than ``--rss-tolerance-mib`` between the warm point and the end.

Exit status: 0 clean, 1 on a leaked slot, a broken ledger or RSS growth past the tolerance.
No dependency beyond the package (the Mamba state pool is a host slot allocator here, the
one ``MambaPool`` uses, so that JAX is not loaded).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import StaleNodeError

KINDS = ("radix", "swa", "mamba")
# op -> weight: the serving mix
MIX = {"admit": 30, "prefill": 10, "decode": 30, "finish": 20, "abort": 4, "evict": 6}


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(eq=False)
class Request:
    extra_key: Any
    tokens: np.ndarray  # int32; slots[i] holds tokens[i]
    slots: np.ndarray  # int32; slots[:cached] are the tree's (locked), the rest ours
    cached: int
    node: Any
    token: Any
    state: int = 0


class Stack:
    """One cache with its allocators, driven the way pymllm.engine.scheduler drives it."""

    def __init__(self, kind: str, pool: int, states: int, window: int) -> None:
        self.kind = kind
        self.pool = pool
        self.evicted_nodes = 0
        if kind == "swa":
            self.kv: Any = SWATokenToKVPoolAllocator(pool, pool // 2)
            self.cache: Any = RadixCache(
                sliding_window_size=window,
                token_to_kv_pool_allocator=self.kv,
                on_node_evict=self._on_evict,
            )
        else:
            self.kv = TokenToKVPoolAllocator(pool)
        self.states: TokenToKVPoolAllocator | None = None
        if kind == "radix":
            self.cache = RadixCache(
                token_to_kv_pool_allocator=self.kv, on_node_evict=self._on_evict
            )
        elif kind == "mamba":
            self.states = TokenToKVPoolAllocator(states)
            self.cache = MambaRadixCache(
                token_to_kv_pool_allocator=self.kv,
                mamba_pool=self.states,
                on_node_evict=self._on_evict,
            )
        self.reqs: list[Request] = []

    def _on_evict(self, node_id: int) -> None:
        self.evicted_nodes += 1

    # -- slots ----------------------------------------------------------------------------

    def alloc_kv(self, n: int, prefix: np.ndarray | None = None) -> np.ndarray | None:
        """``n`` new slots, after ``prefix``'s (copied) when given, evicting when short."""
        if n == 0 and prefix is None:
            return np.zeros(0, dtype=np.int32)
        if self.kind == "swa":
            full_short = n - self.kv.full_available_size()
            swa_short = n - self.kv.swa_available_size()
            if full_short > 0 or swa_short > 0:
                self.cache.evict(max(full_short, 0), max(swa_short, 0))
        elif n > self.kv.available_size():
            self.cache.evict(n - self.kv.available_size())
        return self.kv.alloc(n, prefix=prefix)

    def alloc_state(self) -> int:
        assert self.states is not None
        if self.states.available_size() < 1:
            self.cache.evict(0, mamba_num=1)
        got = self.states.alloc(1)
        return 0 if got is None else int(got[0])

    def free_kv(self, slots: np.ndarray) -> None:
        if len(slots):
            self.kv.free(slots)

    def free_state(self, slot: int) -> None:
        assert self.states is not None
        self.states.free(np.array([slot], dtype=np.int32))

    def unlock(self, node: Any, token: Any) -> None:
        self.cache.dec_lock_ref(node, swa_boundary_id=token)

    # -- request life ---------------------------------------------------------------------

    def client(self) -> Stack:
        """A second scheduler on the same cache and allocators, with its own requests (the
        thread test gives each thread one)."""
        other = copy.copy(self)
        other.reqs = []
        return other

    def match_and_lock(self, key: RadixKey) -> tuple[Any, Any]:
        """match_prefix, then lock its last node. Each call is atomic, the pair is not: on a
        shared cache another scheduler may evict the node in between (StaleNodeError), and
        the match is simply made again."""
        while True:
            m = self.cache.match_prefix(key)
            try:
                return m, self.cache.inc_lock_ref(m.last_node)
            except StaleNodeError:
                continue

    def admit(self, extra_key: Any, tokens: np.ndarray) -> bool:
        m, token = self.match_and_lock(RadixKey(tokens, extra_key))
        cached = len(m.indices)
        slots = self.alloc_kv(len(tokens) - cached, m.indices)  # the tree's, then ours
        state = 0
        if slots is not None and self.states is not None:
            state = self.alloc_state()
            if not state:
                self.free_kv(slots[cached:])
                slots = None
        if slots is None:
            self.unlock(m.last_node, token)
            return False
        self.reqs.append(Request(extra_key, tokens, slots, cached, m.last_node, token, state))
        return True

    def insert(self, r: Request, n: int, state: int = 0) -> tuple[np.ndarray, int, bool]:
        """(duplicates ours to free, leading slots the tree settled, mamba_exist)."""
        kwargs: dict[str, Any] = {}
        if state:
            kwargs["mamba_value"] = state
        if self.kind == "swa":
            kwargs["prev_prefix_len"] = r.cached
        res = self.cache.insert(RadixKey(r.tokens[:n], r.extra_key), r.slots[:n], **kwargs)
        if res.prefix_len < r.cached:
            raise AssertionError(f"insert: prefix_len {res.prefix_len} < locked {r.cached}")
        # The tree takes value[prefix_len:n] (page size 1); a windowed tree settles all of
        # value[prev_prefix_len:n] itself. The ledger check catches any other outcome.
        if self.kind == "swa":
            return r.slots[:0], n, False
        return r.slots[r.cached : res.prefix_len].copy(), n, bool(res.mamba_exist)

    def prefill(self, r: Request, upto: int) -> None:
        snap = 0
        if self.states is not None:
            snap = self.alloc_state()
            if not snap:
                return
        dups, covered, exist = self.insert(r, upto, snap)
        if snap and exist:
            self.free_state(snap)
        m, token = self.match_and_lock(RadixKey(r.tokens[:upto], r.extra_key))
        self.unlock(r.node, r.token)
        ours = r.slots[max(covered, len(m.indices)) :]
        # The re-match stops short (SWA: at a tombstone; on a shared cache: another
        # scheduler evicted what we inserted): those positions are computed anew.
        refill = covered - len(m.indices)
        r.node, r.token, r.cached = m.last_node, token, len(m.indices)
        self.free_kv(dups)
        head = self.alloc_kv(max(refill, 0), m.indices)  # the tree's slots, then ours
        if head is None:
            self.unlock(r.node, r.token)
            self.end(r, ours)
            return
        r.slots = np.concatenate([head, ours])

    def decode(self, r: Request, new_tokens: np.ndarray) -> bool:
        new = self.alloc_kv(len(new_tokens))
        if new is None:
            return False
        r.tokens = np.concatenate([r.tokens, new_tokens])
        r.slots = np.concatenate([r.slots, new])
        return True

    def finish(self, r: Request) -> None:
        dups, covered, exist = self.insert(r, len(r.tokens), r.state)
        if r.state and not exist:
            r.state = 0
        self.unlock(r.node, r.token)
        self.end(r, np.concatenate([dups, r.slots[covered:]]))

    def abort(self, r: Request) -> None:
        self.unlock(r.node, r.token)
        self.end(r, r.slots[r.cached :])

    def end(self, r: Request, kv: np.ndarray) -> None:
        self.reqs.remove(r)
        self.free_kv(kv)
        if r.state:
            self.free_state(r.state)

    # -- accounting -----------------------------------------------------------------------

    def held(self) -> int:
        return sum(len(r.slots) - r.cached for r in self.reqs)

    def full_available(self) -> int:
        return self.kv.full_available_size() if self.kind == "swa" else self.kv.available_size()

    def check(self, held: int | None = None) -> None:
        """Invariants of the tree and the allocators, and the slot ledger (*held*: slots
        held by live requests, default this scheduler's)."""
        self.cache._check_invariants()
        self.kv._check_invariants()
        if self.states is not None:
            self.states._check_invariants()
        free, tree = self.full_available(), self.cache.total_size()
        held = self.held() if held is None else held
        if free + tree + held != self.pool:
            raise AssertionError(f"ledger: {free} free + {tree} tree + {held} held != {self.pool}")

    def drain(self) -> dict[str, int]:
        """Abort every request, reset the cache; what is not free then has leaked."""
        for r in list(self.reqs):
            self.abort(r)
        self.check()
        self.cache.reset()
        self.check()
        out = {"kv_free": self.full_available(), "kv_leaked": self.pool - self.full_available()}
        if self.kind == "swa":
            out["swa_free"] = self.kv.swa_available_size()
            out["swa_leaked"] = self.kv.swa_size - self.kv.swa_available_size()
        if self.states is not None:
            out["states_free"] = self.states.available_size()
            out["states_leaked"] = self.states.size - self.states.available_size()
        return out


class Workload:
    """Seeded prompts: a system prefix (one of many, shared) plus fresh tokens."""

    def __init__(self, rng: np.random.Generator, n_prefixes: int) -> None:
        self.prefixes = [
            rng.integers(0, 50_000, int(rng.integers(16, 192)), dtype=np.int32)
            for _ in range(n_prefixes)
        ]

    def prompt(self, rng: np.random.Generator) -> tuple[Any, np.ndarray]:
        i = int(rng.integers(len(self.prefixes)))
        base = self.prefixes[i]
        cut = len(base) if rng.random() < 0.7 else int(rng.integers(1, len(base) + 1))
        fresh = rng.integers(0, 50_000, int(rng.integers(1, 48)), dtype=np.int32)
        return (None if i % 4 else "lora-1"), np.concatenate([base[:cut], fresh])


def draw_ops(rng: np.random.Generator, n: int) -> list[str]:
    """n operation names drawn from the serving mix."""
    names = list(MIX)
    p = np.array([MIX[k] for k in names], dtype=np.float64)
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def step(stack: Stack, work: Workload, rng: np.random.Generator, op: str, args: Any) -> int:
    """Run one operation of the mix; returns 1 for an admitted request, -1 for one turned
    away for lack of memory, else 0."""
    reqs = stack.reqs
    if op == "admit" or not reqs:
        if len(reqs) >= args.max_reqs:
            return 0
        return 1 if stack.admit(*work.prompt(rng)) else -1
    if op == "evict":
        n = int(rng.integers(1, 256))
        if stack.kind == "swa":
            stack.cache.evict(n, int(rng.integers(0, 64)))
        elif stack.kind == "mamba":
            stack.cache.evict(n, mamba_num=int(rng.integers(0, 3)))
        else:
            stack.cache.evict(n)
        return 0
    r = reqs[int(rng.integers(len(reqs)))]
    if op == "prefill":
        if r.cached < len(r.tokens):
            stack.prefill(r, int(rng.integers(r.cached + 1, len(r.tokens) + 1)))
    elif op == "decode" and len(r.tokens) < args.max_len:
        stack.decode(r, rng.integers(0, 50_000, int(rng.integers(1, 5)), np.int32))
    elif op in ("decode", "finish"):
        stack.finish(r)
    else:
        stack.abort(r)
    return 0


def soak(kind: str, ops: int, seed: int, check_every: int, args: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    stack = Stack(kind, args.pool, args.states, args.window)
    work = Workload(rng, args.prefixes)
    names = draw_ops(rng, ops)
    counts = dict.fromkeys(MIX, 0)
    admitted = rejected = 0
    rss_start = rss_bytes()
    rss_warm = rss_start
    warm_at = max(1, ops // 10)
    t0 = time.perf_counter()
    for i, op in enumerate(names):
        counts[op] += 1
        got = step(stack, work, rng, op, args)
        admitted += got == 1
        rejected += got == -1
        if (i + 1) % check_every == 0:
            stack.check()
        if i + 1 == warm_at:
            rss_warm = rss_bytes()
    wall = time.perf_counter() - t0
    live_at_end = len(stack.reqs)
    tree_at_end = stack.cache.total_size()
    drained = stack.drain()
    rss_end = rss_bytes()
    return {
        "kind": kind,
        "ops": ops,
        "mix": counts,
        "admitted": admitted,
        "rejected_no_memory": rejected,
        "evicted_nodes": stack.evicted_nodes,
        "wall_s": wall,
        "rss_start": rss_start,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "live_requests_at_end": live_at_end,
        "tree_tokens_at_end": tree_at_end,
        **drained,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=1_000_000, help="operations per cache kind")
    ap.add_argument("--kinds", default="radix", help=f"comma-separated, of {','.join(KINDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=8_192, help="KV slots (SWA side: half)")
    ap.add_argument("--states", type=int, default=48, help="Mamba state slots")
    ap.add_argument("--window", type=int, default=64, help="SWA window (tokens)")
    ap.add_argument("--prefixes", type=int, default=300, help="shared system prefixes")
    ap.add_argument("--max-reqs", type=int, default=32, help="live requests at most")
    ap.add_argument("--max-len", type=int, default=512, help="tokens per request at most")
    ap.add_argument("--check-every", type=int, default=50_000, help="ops between checks")
    ap.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=8.0,
        help="allowed RSS growth from the warm point (after 10%% of the ops) to the end",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        ap.error(f"--kinds: unknown kind(s) {bad}; choose from {list(KINDS)}")
    failed = False
    mib = 2**20
    for n, kind in enumerate(kinds):
        r = soak(kind, args.ops, args.seed + n, args.check_every, args)
        growth = (r["rss_end"] - r["rss_warm"]) / mib
        leaked = {k: v for k, v in r.items() if k.endswith("_leaked") and v}
        rate = r["ops"] / r["wall_s"]
        print(f"[{kind}] ops {r['ops']:,} in {r['wall_s']:.1f} s ({rate:,.0f} ops/s)")
        print(f"  mix {r['mix']}")
        print(f"  admitted {r['admitted']:,}, no memory {r['rejected_no_memory']:,}")
        print(f"  evicted nodes {r['evicted_nodes']:,}")
        print(
            f"  RSS start {r['rss_start'] / mib:.1f} MiB, warm {r['rss_warm'] / mib:.1f} MiB, "
            f"end {r['rss_end'] / mib:.1f} MiB (growth after warm-up {growth:+.1f} MiB, "
            f"tolerance {args.rss_tolerance_mib:.1f} MiB)"
        )
        print(
            f"  at the end: {r['live_requests_at_end']} live requests, "
            f"{r['tree_tokens_at_end']:,} tokens in the tree; after abort + reset: "
            + ", ".join(f"{k} {v:,}" for k, v in r.items() if k.endswith(("_free", "_leaked")))
        )
        if leaked:
            print(f"  FAIL: leaked slots {leaked}")
            failed = True
        if growth > args.rss_tolerance_mib:
            print(f"  FAIL: RSS grew {growth:.1f} MiB after warm-up")
            failed = True
    print("soak: FAIL" if failed else "soak: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
