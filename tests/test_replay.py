"""Trace replay (pymllm.replay): readers, the replay against independent computations, the
generator.

The oracles here share no code with the replay: the ideal hit of a request is recomputed by
comparing it with every earlier request, and finite capacities are replayed a second time
through the pure-Python reference tree with a free-list allocator written below.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from reference_model import RefRadixCache

from pymllm.mem_cache import EVICTION_POLICIES, RadixKey
from pymllm.replay import (
    TraceError,
    TraceSpec,
    default_capacities,
    generate_trace,
    ideal,
    ideal_prefix_units,
    parse_capacity,
    read_trace,
    replay,
    sweep,
    write_trace,
)
from pymllm.replay.traces import trace_from_records

POLICIES = EVICTION_POLICIES


def write_lines(tmp_path, lines, name="trace.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def mc(ids, n_in=None, ts=0, n_out=4, **extra):
    rec = {"timestamp": ts, "output_length": n_out, "hash_ids": ids, **extra}
    rec["input_length"] = n_in if n_in is not None else 512 * len(ids)
    return rec


def random_trace(seed, n=40, page_size_hint=1, namespaces=False):
    """Small random token requests that share prefixes often: each starts with a cut of
    one of three roots or of an earlier request, then random tokens from a tiny vocab."""
    rng = np.random.default_rng(seed)
    roots = [rng.integers(0, 4, size=12).tolist() for _ in range(3)]
    recs: list = []
    for _ in range(n):
        if recs and rng.random() < 0.5:
            base = recs[int(rng.integers(len(recs)))]["tokens"]
        else:
            base = roots[int(rng.integers(3))]
        head = base[: int(rng.integers(0, len(base) + 1))]
        toks = head + rng.integers(0, 4, size=int(rng.integers(1, 6))).tolist()
        rec = {"tokens": toks}
        if namespaces:
            rec["extra_key"] = ["a", "b", None][int(rng.integers(3))]
        recs.append(rec)
    return trace_from_records(recs, f"random{seed}")


# -- readers ------------------------------------------------------------------------------


def test_mooncake_lines_become_int32_keys(tmp_path):
    path = write_lines(
        tmp_path,
        [mc([1, 2], n_in=600), "", mc([1, 2, 3], n_in=1100), {"hash_ids": [9], "priority": 3}],
    )
    t = read_trace(path)
    assert (t.format, t.unit, t.unit_tokens, len(t)) == ("mooncake", "block", 512, 3)
    assert [k.tolist() for k in t.keys] == [[1, 2], [1, 2, 3], [9]]
    assert all(k.dtype == np.int32 and k.flags.c_contiguous for k in t.keys)
    # input_length when given, else whole blocks
    assert t.tokens.tolist() == [600, 1100, 512]
    assert t.lines == [1, 3, 4]
    assert t.priorities == [0, 0, 3]
    assert t.extra_keys is None
    assert (t.total_units, t.distinct_units()) == (6, 4)
    assert read_trace(path, max_requests=2).tokens.tolist() == [600, 1100]


def test_plain_lines_lists_and_objects(tmp_path):
    path = write_lines(
        tmp_path,
        [[5, 6, 7], {"tokens": [5, 6], "extra_key": "lora-1"}, {"tokens": [5], "extra_key": 3}],
    )
    t = read_trace(path)
    assert (t.format, t.unit, t.unit_tokens) == ("tokens", "token", 1)
    assert [k.tolist() for k in t.keys] == [[5, 6, 7], [5, 6], [5]]
    assert t.tokens.tolist() == [3, 2, 1]
    assert t.extra_keys == [None, "lora-1", 3]
    assert t.priorities is None
    # the namespaces keep equal tokens apart: 3 + 2 + 1 distinct units
    assert t.distinct_units() == 6


def test_format_can_be_forced(tmp_path):
    path = write_lines(tmp_path, [{"tokens": [1], "hash_ids": [2]}])
    assert read_trace(path).keys[0].tolist() == [1]  # auto: 'tokens' wins
    assert read_trace(path, format="mooncake").keys[0].tolist() == [2]
    with pytest.raises(TraceError, match=r"trace.jsonl:1: expected a JSON object, got list"):
        read_trace(write_lines(tmp_path, [[1, 2]]), format="mooncake")
    with pytest.raises(TraceError, match=r"trace.jsonl:1: missing field 'hash_ids'"):
        read_trace(write_lines(tmp_path, [{"tokens": [1]}]), format="mooncake")
    with pytest.raises(ValueError, match="format: expected one of"):
        read_trace(path, format="csv")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", r":3: not valid JSON"),
        (json.dumps(mc([1, "x"])), r":3: field 'hash_ids' must be a list of integers"),
        (json.dumps({"hash_ids": []}), r":3: field 'hash_ids' is empty"),
        (json.dumps(mc([1, -4])), r":3: field 'hash_ids': id -4 is outside \[0, 2\*\*31\)"),
        (json.dumps(mc([2**31])), r":3: field 'hash_ids': id 2147483648 is outside"),
        (json.dumps(mc([2**70])), r":3: field 'hash_ids': id 1180591620717411303424 is outside"),
        (json.dumps(mc([1, 2], n_in=100)), r":3: field 'hash_ids' has 2 ids but input_length"),
        (json.dumps(mc([1], n_in=0)), r":3: field 'input_length' must be an integer in \[1, "),
        (json.dumps(mc([1] * 2, n_in=2**31)), r":3: field 'input_length' must be an integer in"),
        (json.dumps(mc([1], ts=-1)), r":3: field 'timestamp' must be >= 0"),
        # an int past float's range: math.isfinite raised OverflowError, not a TraceError
        (json.dumps(mc([1], ts=10**400)), r":3: field 'timestamp' must be a finite number"),
        (json.dumps(mc([1], priority=1.5)), r":3: field 'priority' must be a 64-bit integer"),
        (json.dumps(mc([1], priority=2**63)), r":3: field 'priority' must be a 64-bit integer"),
        ("[1, 2]", r":3: expected a JSON object, got list"),
        ("[" + "1" * 5000 + "]", r":3: not a line this reader takes \(Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, r":3: not a line this reader takes"),
    ],
)
def test_bad_mooncake_lines_name_the_line(tmp_path, line, message):
    path = write_lines(tmp_path, [mc([1]), "", line, mc([2])])
    with pytest.raises(TraceError, match=message):
        read_trace(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2.5]", r":2: field 'tokens' must be a list of integers"),
        ("[]", r":2: field 'tokens' is empty"),
        ('{"extra_key": 1}', r":2: missing field 'tokens'"),
        ('{"tokens": [1], "extra_key": [1]}', r":2: field 'extra_key' must be a string, an int"),
        ('{"tokens": [1], "extra_key": true}', r":2: field 'extra_key' must be a string"),
        ('"abc"', r":2: expected a list of token ids or an object with 'tokens', got str"),
    ],
)
def test_bad_plain_lines_name_the_line(tmp_path, line, message):
    path = write_lines(tmp_path, [[1, 2, 3], line])
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_lines_end_at_newlines_only_and_a_bom_is_skipped(tmp_path):
    # U+2028, form feed and the like are line breaks to str.splitlines(), not to JSON Lines
    rec = {"tokens": [1, 2], "extra_key": "a\u2028b\x0cc\x1cd"}
    path = tmp_path / "sep.jsonl"
    path.write_text("\ufeff" + json.dumps(rec, ensure_ascii=False) + "\r\n[3]\n", "utf-8")
    t = read_trace(path)
    assert t.extra_keys == ["a\u2028b\x0cc\x1cd", None]
    assert [k.tolist() for k in t.keys] == [[1, 2], [3]]
    assert t.lines == [1, 2]


def test_unreadable_empty_or_unknown_trace(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace file"):
        read_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="holds no requests"):
        read_trace(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(TraceError, match=r"trace.jsonl:1: cannot tell the trace format"):
        read_trace(write_lines(tmp_path, [{"ids": [1]}]))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe[1]\n")
    with pytest.raises(TraceError, match="cannot read trace file"):
        read_trace(binary)


def test_the_demo_loader_shares_the_checks_and_the_error_type(tmp_path):
    from pymllm.engine.workloads import TraceError as EngineTraceError
    from pymllm.engine.workloads import load_mooncake_trace

    assert EngineTraceError is TraceError
    path = write_lines(tmp_path, [mc([1]), json.dumps(mc([1, 2], n_in=100))])
    for load in (read_trace, lambda p: load_mooncake_trace(p, vocab_size=50)):
        with pytest.raises(TraceError, match=r"trace.jsonl:2: field 'hash_ids' has 2 ids"):
            load(path)
    # ids past int32 and a bad priority: the demo took both lines, the replay refused them
    for bad, match in (
        (mc([-5, 7]), r"trace.jsonl:2: field 'hash_ids': id -5 is outside \[0, 2\*\*31\)"),
        (mc([2**31]), r"trace.jsonl:2: field 'hash_ids': id 2147483648 is outside"),
        (mc([3], priority="high"), r"trace.jsonl:2: field 'priority'"),
    ):
        path = write_lines(tmp_path, [mc([1]), bad])
        for load in (read_trace, lambda p: load_mooncake_trace(p, vocab_size=50)):
            with pytest.raises(TraceError, match=match):
                load(path)


# -- replay against independent computations ----------------------------------------------


def brute_force_ideal(keys, extra, page_size):
    """For each request: the longest prefix, in whole pages, equal to a prefix of the cached
    (page-aligned) part of some earlier request in the same namespace."""
    out = []
    for i, key in enumerate(keys):
        best = 0
        for j in range(i):
            if extra[j] != extra[i]:
                continue
            other = keys[j][: len(keys[j]) // page_size * page_size]
            n = 0
            while n < min(len(key), len(other)) and key[n] == other[n]:
                n += 1
            best = max(best, n // page_size * page_size)
        out.append(best)
    return out


class FreeList:
    """The simplest allocator: a Python list of free slots."""

    def __init__(self, size):
        self.free_slots = list(range(size, 0, -1))

    def available_size(self):
        return len(self.free_slots)

    def alloc(self, n):
        if n > len(self.free_slots):
            return None
        out, self.free_slots[len(self.free_slots) - n :] = self.free_slots[-n:] if n else [], []
        return np.asarray(out, dtype=np.int32)

    def free(self, idx):
        self.free_slots.extend(np.asarray(idx).tolist())


class TokenCountingFreeList(FreeList):
    """A FreeList that knows each slot's tokens (set when allocated) and sums the tokens of
    the slots freed while `counting` is on."""

    def __init__(self, size):
        super().__init__(size)
        self.tokens = {}
        self.counting = False
        self.counted = 0

    def free(self, idx):
        if self.counting:
            self.counted += sum(self.tokens[s] for s in np.asarray(idx).tolist())
        super().free(idx)


def reference_replay(trace, capacity, page_size, policy):
    """The replay's request sequence on RefRadixCache + a free list; per-request hits, the
    units evicted and their tokens (each slot's tokens recorded when it is allocated)."""
    alloc = TokenCountingFreeList(capacity)
    kwargs = {"eviction_policy": policy} if len(POLICIES) > 1 else {}
    cache = RefRadixCache(page_size=page_size, token_to_kv_pool_allocator=alloc, **kwargs)
    hits, evicted = [], 0
    extra = trace.extra_keys or [None] * len(trace)
    for i, (toks, ns) in enumerate(zip(trace.keys, extra, strict=True)):
        key = RadixKey(toks.tolist(), ns)
        m = cache.match_prefix(key)
        cache.inc_lock_ref(m.last_node)
        short = len(toks) - m.prefix_len - alloc.available_size()
        if short > 0:
            alloc.counting = True
            evicted += cache.evict(short).full_evicted
            alloc.counting = False
        new = alloc.alloc(len(toks) - m.prefix_len)
        for j, slot in enumerate(new.tolist(), m.prefix_len):  # unit j of the request
            alloc.tokens[slot] = min(
                trace.unit_tokens, int(trace.tokens[i]) - j * trace.unit_tokens
            )
        value = np.concatenate([m.indices, new])
        prio = (
            {"priority": trace.priorities[i]} if policy == "priority" and trace.priorities else {}
        )
        r = cache.insert(key, value, **prio)
        aligned = len(toks) // page_size * page_size
        alloc.free(value[m.prefix_len : r.prefix_len])
        alloc.free(value[aligned:])
        cache.dec_lock_ref(m.last_node)
        hits.append(m.prefix_len)
    assert alloc.available_size() + cache.total_size() == capacity
    return hits, evicted, alloc.counted


@pytest.mark.parametrize("page_size", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_unbounded_replay_is_the_brute_force_ideal(seed, page_size):
    t = random_trace(seed, namespaces=seed % 2 == 1)
    want = brute_force_ideal(
        [k.tolist() for k in t.keys], t.extra_keys or [None] * len(t), page_size
    )
    assert sum(want) > 0  # the trace does share prefixes
    res = replay(t, None, page_size=page_size)
    assert res.prefix_units.tolist() == want
    assert ideal_prefix_units(t, page_size).tolist() == want
    assert res.evicted_units == 0 and res.leak_free
    assert res.hit_blocks == sum(w // page_size for w in want)
    assert res.blocks == sum(-(-len(k) // page_size) for k in t.keys)
    assert res.requests_with_hit == sum(w > 0 for w in want)
    assert res.hit_tokens == sum(want)
    best = ideal(t, page_size)
    assert best.block_hit_rate == res.block_hit_rate
    assert best.token_hit_rate == res.token_hit_rate


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("seed", "page_size"), [(10, 1), (11, 1), (12, 2), (13, 3)])
def test_finite_replay_matches_the_reference_tree(seed, page_size, policy):
    t = random_trace(seed, n=80, namespaces=seed == 11)
    longest = max(k.size for k in t.keys)
    for capacity in (longest, longest + 7, 3 * longest):
        want, evicted, evicted_tokens = reference_replay(t, capacity, page_size, policy)
        res = replay(t, capacity, policy=policy, page_size=page_size)
        assert res.prefix_units.tolist() == want, capacity
        assert (res.evicted_units, res.evicted_tokens) == (evicted, evicted_tokens)
        assert res.leak_free and res.pool_slots == capacity
    assert evicted > 0  # the small capacities did evict


def random_mooncake_trace(seed, block_tokens=4):
    """random_trace's keys as hash ids of `block_tokens`-token blocks, most requests' last
    block partial (input_length 1-3 tokens short of whole blocks, or whole)."""
    rng = np.random.default_rng(seed + 100)
    recs = [
        mc(k.tolist(), n_in=k.size * block_tokens - int(rng.integers(0, block_tokens)))
        for k in random_trace(seed, n=80).keys
    ]
    return trace_from_records(recs, block_tokens=block_tokens)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("seed", "page_size"), [(20, 1), (21, 1), (22, 2)])
def test_evicted_tokens_count_partial_blocks(seed, page_size, policy):
    """Each evicted block counts its own tokens: the reference frees slot by slot, knowing
    every slot's tokens from when it was allocated."""
    t = random_mooncake_trace(seed)
    assert (t.tokens < np.array([k.size for k in t.keys]) * 4).any()
    longest = max(k.size for k in t.keys)
    for capacity in (longest, longest + 5, 2 * longest):
        _, evicted, evicted_tokens = reference_replay(t, capacity, page_size, policy)
        res = replay(t, capacity, policy=policy, page_size=page_size)
        assert (res.evicted_units, res.evicted_tokens) == (evicted, evicted_tokens), capacity
        assert evicted_tokens < 4 * evicted  # partial blocks were among the evicted
    assert replay(t, None).evicted_tokens == 0


def test_evicted_tokens_hand_cases():
    # capacity 1 block: [1] (10 tokens) is evicted by [2] (512), which [3] evicts; the slot
    # that held the partial block holds [2], a whole block, when it goes
    t = trace_from_records([mc([1], n_in=10), mc([2]), mc([3])])
    res = replay(t, 1)
    assert (res.evicted_units, res.evicted_tokens) == (2, 10 + 512)
    # a partial block cached by the warmup and evicted by the timed replay
    res = replay(trace_from_records([mc([2])]), 1, warmup=trace_from_records([mc([1], n_in=7)]))
    assert (res.evicted_units, res.evicted_tokens) == (1, 7)


def test_hand_computed_lru_case():
    # capacity 4: [1,2] [3,4] fill it; [1,2,5,6] hits 2 and must evict [3,4] (its own prefix
    # is locked); [3,4] misses and evicts the leaf [5,6]; [1,2] hits again.
    t = trace_from_records([[1, 2], [3, 4], [1, 2, 5, 6], [3, 4], [1, 2]])
    res = replay(t, 4, policy="lru")
    assert res.prefix_units.tolist() == [0, 0, 2, 0, 2]
    assert (res.hit_blocks, res.blocks, res.requests_with_hit) == (4, 12, 2)
    assert (res.evicted_units, res.evicted_tokens) == (4, 4)
    assert res.block_hit_rate == pytest.approx(4 / 12)
    assert res.request_hit_fraction == pytest.approx(2 / 5)
    assert replay(t, None).prefix_units.tolist() == [0, 0, 2, 2, 2]


def test_token_hit_rate_counts_partial_blocks():
    # 4-token blocks; the second request hits both blocks but holds only 6 tokens
    t = trace_from_records([mc([1, 2], n_in=7), mc([1, 2], n_in=6)], block_tokens=4)
    res = replay(t, None)
    assert (res.hit_blocks, res.blocks) == (2, 4)
    assert (res.hit_tokens, res.tokens) == (6, 13)
    assert res.token_hit_rate == pytest.approx(6 / 13)
    assert res.block_hit_rate == pytest.approx(0.5)


def test_page_size_caches_whole_pages_and_frees_the_tail():
    t = trace_from_records([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 9]])
    res = replay(t, None, page_size=2)
    # 4 of 5 tokens are cached (2 pages); the third request shares 3 tokens, 1 whole page
    assert res.prefix_units.tolist() == [0, 4, 2]
    assert (res.hit_blocks, res.blocks) == (3, 3 + 3 + 2)
    assert res.leak_free
    assert replay(t, 5, page_size=2).leak_free


@pytest.mark.skipif("priority" not in POLICIES, reason="this build has no priority policy")
def test_priorities_reach_insert_under_the_priority_policy():
    # capacity 4: [1,2] (priority 5) and [3,4] (priority 0); [7,8] must evict one: the
    # low-priority [3,4] goes although [1,2] is older. LRU would evict [1,2].
    recs = [
        {"tokens": [1, 2], "priority": 5},
        {"tokens": [3, 4]},
        {"tokens": [7, 8]},
        {"tokens": [1, 2]},
    ]
    t = trace_from_records(recs)
    assert replay(t, 4, policy="priority").prefix_units.tolist() == [0, 0, 0, 2]
    assert replay(t, 4, policy="lru").prefix_units.tolist() == [0, 0, 0, 0]


def test_bad_arguments_name_the_argument():
    t = trace_from_records([[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match=r"capacity: 2 tokens cannot hold .* \(3 tokens\)"):
        replay(t, 2)
    with pytest.raises(ValueError, match="capacity: expected a positive integer or None, got 0"):
        replay(t, 0)
    with pytest.raises(ValueError, match=r"policy: expected one of \(.*'lru'.*\), got 'mru'"):
        replay(t, 10, policy="mru")
    with pytest.raises(ValueError, match="page_size: expected a positive integer, got 0"):
        replay(t, 10, page_size=0)
    # a sweep checks everything before its first replay
    calls = []
    with pytest.raises(ValueError, match="capacity: 1 tokens"):
        sweep(t, [None, 1], ["lru"], progress=lambda *a: calls.append(a))
    assert calls == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("1000", 1000), ("1e6", 1_000_000), ("64k", 64_000), ("2M", 2_000_000), (7, 7)],
        *[("inf", None), ("INF", None), ("Infinity", None), (None, None), (math.inf, None)],
    ],
)
def test_parse_capacity(text, value):
    assert parse_capacity(text) == value


@pytest.mark.parametrize(
    "text",
    ["0", "-5", "1.5", "lots", "nan", "", True, -math.inf, "1e400", "infk", "-inf", 10**400],
)
def test_parse_capacity_rejects(text):
    with pytest.raises(ValueError, match=r"capacity: expected a positive whole number"):
        parse_capacity(text)


def test_sweep_reports_progress_over_all_runs():
    t = random_trace(1, n=30)
    seen = []
    res = sweep(t, [50, None], ["lru"], progress=lambda d, n, s: seen.append((d, n)))
    assert [r.capacity for r in res] == [50, None]
    assert seen[-1] == (60, 60) and (30, 60) in seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_default_capacities_span_the_trace():
    t = random_trace(2, n=60)
    caps = default_capacities(t)
    assert caps[-1] is None and caps[-2] == t.distinct_units()
    assert caps[0] >= max(k.size for k in t.keys)
    assert caps[:-1] == sorted(set(caps[:-1]))


def test_summary_is_json_ready():
    res = replay(random_trace(3), None)
    s = res.summary()
    json.dumps(s)
    assert s["capacity"] == "inf" and "prefix_units" not in s
    assert s["block_hit_rate"] == round(res.block_hit_rate, 6)
    assert s["requests_per_s"] > 0


# -- the generator ------------------------------------------------------------------------


def test_generator_is_deterministic_and_well_formed(tmp_path):
    spec = TraceSpec(requests=1500, seed=7)
    a, b = generate_trace(spec), generate_trace(spec)
    assert a == b
    assert generate_trace(TraceSpec(requests=1500, seed=8)) != a
    assert len(a) == 1500
    ts = [r["timestamp"] for r in a]
    assert ts == sorted(ts)
    assert all(r["input_length"] == 512 * len(r["hash_ids"]) for r in a)
    path = tmp_path / "gen.jsonl"
    write_trace(path, a)
    write_trace(tmp_path / "again.jsonl", b)
    assert path.read_bytes() == (tmp_path / "again.jsonl").read_bytes()
    t = read_trace(path)  # the same checks as any Mooncake file
    assert len(t) == 1500 and t.format == "mooncake"
    # ids are consistent: distinct ids = trie nodes (an id always has the same history)
    assert t.distinct_units() == len({h for r in a for h in r["hash_ids"]})


def test_generator_has_chains_and_shared_prefix_groups():
    recs = generate_trace(TraceSpec(requests=1500, seed=1))
    ids = [tuple(r["hash_ids"]) for r in recs]
    seen: set[tuple[int, ...]] = set()
    later_turns = 0
    for x in ids:
        # a later turn starts with some earlier request's whole hash_ids
        later_turns += any(x[:k] in seen for k in range(1, len(x)))
        seen.add(x)
    # (a short trace catches few chains: turns follow after ~30 s of think time)
    assert later_turns > 0.25 * len(ids)
    # system prompts: many conversations open with the same first block
    firsts = [x[0] for x in ids]
    assert max(firsts.count(f) for f in set(firsts)) > 0.05 * len(ids)


def test_generator_knobs_change_the_sharing():
    def hit(**kw):
        recs = generate_trace(TraceSpec(requests=800, seed=3, **kw))
        return ideal(trace_from_records(recs)).block_hit_rate

    solo = {"mean_turns": 1, "no_prefix": 1.0, "regenerate": 0.0}
    lone = generate_trace(TraceSpec(requests=800, seed=3, **solo))
    assert hit(**solo) == 0.0  # one-turn chats, no system prompt, no resent turns
    assert len({h for r in lone for h in r["hash_ids"]}) == sum(len(r["hash_ids"]) for r in lone)
    # every turn resent: each key twice (once, for a turn whose resend fell past the cut)
    again = generate_trace(TraceSpec(requests=800, seed=3, **{**solo, "regenerate": 1.0}))
    counts = Counter(tuple(r["hash_ids"]) for r in again)
    assert (
        set(counts.values()) <= {1, 2} and sum(c == 2 for c in counts.values()) > len(counts) // 2
    )
    assert hit(**{**solo, "regenerate": 0.5}) > 0
    assert 0 < hit(mean_turns=1, no_prefix=0.0) < hit()  # system prompts, then chains too
    with pytest.raises(ValueError, match="requests: expected a positive integer, got 0"):
        TraceSpec(requests=0)
    with pytest.raises(ValueError, match=r"no_prefix: expected a fraction in \[0, 1\], got 2"):
        TraceSpec(no_prefix=2)
    with pytest.raises(ValueError, match=r"regenerate: expected a fraction in \[0, 1\]"):
        TraceSpec(regenerate=-0.1)


def test_generator_bounds_keep_it_finite():
    for bad in (math.inf, math.nan, 101, 1e9):
        with pytest.raises(ValueError, match=r"mean_turns: expected a number in \[1, 100\]"):
            TraceSpec(mean_turns=bad)
    for name in ("rate", "think_s", "zipf"):
        for bad in (math.inf, 10**400):  # an int past float's range: not OverflowError
            with pytest.raises(ValueError, match=f"{name}: expected a positive finite number"):
                TraceSpec(**{name: bad})
    with pytest.raises(ValueError, match="groups: expected an integer below 1,000,000"):
        TraceSpec(groups=10**6)
    with pytest.raises(ValueError, match="block_tokens: expected an integer below"):
        TraceSpec(block_tokens=2**31)
    recs = generate_trace(TraceSpec(requests=50, mean_turns=100))  # the bound itself runs
    assert len(recs) == 50


def test_a_capacity_beyond_the_trace_allocates_only_the_trace():
    t = trace_from_records([[1, 2, 3], [1, 2, 4], [5]])
    for cap in (7, 10**12):
        res = replay(t, cap)
        assert res.pool_slots == 7 and res.capacity == cap
        assert res.prefix_units.tolist() == replay(t, None).prefix_units.tolist()
    assert replay(t, 5).pool_slots == 5
    warm = trace_from_records([[9, 9]])
    assert replay(t, 10**12, warmup=warm).pool_slots == 9
    with pytest.raises(ValueError, match="capacity: 1 tokens cannot hold the warmup's longest"):
        replay(trace_from_records([[1]]), 1, warmup=warm)


def test_warmup_fills_the_cache_untimed_and_uncounted():
    t = trace_from_records([[1, 2, 3], [4, 5]])
    warm = trace_from_records([[1, 2, 9], [7, 7, 7]])
    res = replay(t, None, warmup=warm)
    assert res.prefix_units.tolist() == [2, 0]
    assert (res.requests, res.warm_units, res.pool_slots) == (2, 6, 5 + 6)
    assert res.leak_free
    # at capacity 3 the warm [7,7,7] leaf is newest, so [1,2,9] went when it came
    assert replay(t, 3, warmup=warm).prefix_units.tolist() == [0, 0]
    with pytest.raises(ValueError, match="warmup: expected a trace of tokens, got blocks"):
        replay(t, None, warmup=trace_from_records([mc([1])]))
