"""The child map's hash is SipHash-1-3 keyed with random bits for each tree.

With an unkeyed hash anyone can compute which bucket a prompt's first token (or first
page) lands in, and crafted prompts that land together make every lookup, insert and
removal near them walk the whole cluster. These tests check the hash against the SipHash
reference vectors, build such a cluster against a key they set, and show that the same
prompts spread out in a tree keyed at random. The probe distances come from the map itself
(``_map_probe_stats``): what a lookup walks, not a timing.
"""

from __future__ import annotations

import collections
import functools
import itertools
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache._radix_tree import (
    _map_probe_stats,
    _namespace_hash,
    _namespace_ids,
    _page_hash_for_test,
    _set_hash_key,
    _siphash_for_test,
)

# SipHash-2-4 of the bytes 00 01 ... (n-1) under the key 00 01 ... 0f, from the reference
# implementation's table (vectors_sip64), for the lengths a page's message can have
# (8 bytes of parent and namespace, then 4 bytes a token): eight bytes, least significant
# first.
REFERENCE_2_4 = {
    8: "6224939a79f5f593",
    12: "fbe50e86bc8f1e75",
    16: "db9bc2577fcc2a3f",
    20: "98eea21af25cd6be",
    24: "94af49f6c650adb8",
    28: "a5c91da7acaa4dde",
    32: "ce7cf2722f512771",
    36: "b4a31508beff4d31",
    40: "d0a704536ba93e0e",
    44: "f21df2e41d4535f9",
    48: "51a9cb9ecba312e6",
    52: "b274cb8ebf87870a",
    56: "bd838d3aafbf8db7",
    60: "e1915f5cb1eca46c",
}
K0 = int.from_bytes(bytes(range(8)), "little")
K1 = int.from_bytes(bytes(range(8, 16)), "little")


@pytest.mark.parametrize("n", sorted(REFERENCE_2_4))
def test_siphash_matches_the_reference_vectors(n: int) -> None:
    msg = bytes(range(n))
    first = int.from_bytes(msg[:8], "little")
    tokens = np.frombuffer(msg[8:], dtype="<u4")
    want = int.from_bytes(bytes.fromhex(REFERENCE_2_4[n]), "little")
    assert _siphash_for_test(K0, K1, first, tokens, 2, 4) == want
    # the rows of a 2-D call are hashed one by one, as the 1-D call does
    rows = np.stack([tokens, tokens])
    assert _siphash_for_test(K0, K1, first, rows, 2, 4).tolist() == [want, want]


def test_one_bit_of_key_or_message_changes_the_hash() -> None:
    tokens = np.array([5, 6, 7], dtype=np.uint32)
    h = _siphash_for_test(K0, K1, 0, tokens)
    assert _siphash_for_test(K0 ^ 1, K1, 0, tokens) != h
    assert _siphash_for_test(K0, K1 ^ (1 << 63), 0, tokens) != h
    assert _siphash_for_test(K0, K1, 1 << 32, tokens) != h  # the namespace half
    assert _siphash_for_test(K0, K1, 0, tokens[:2]) != h  # the length is hashed
    tokens[2] ^= 1 << 31
    assert _siphash_for_test(K0, K1, 0, tokens) != h


def _crafted_first_tokens(k0: int, k1: int, count: int, low_bits: int = 16) -> np.ndarray:
    """`count` distinct token ids whose hash as a root child of the default namespace
    (parent 0, namespace 0) under the key (k0, k1) has its low `low_bits` bits below 4:
    one small run of buckets in every table of up to 2**low_bits buckets."""
    found: list[np.ndarray] = []
    start = 0
    while sum(len(f) for f in found) < count:
        cand = np.arange(start, start + (1 << 21), dtype=np.uint32)
        h = _siphash_for_test(k0, k1, 0, cand.reshape(-1, 1))
        found.append(cand[(h & np.uint64((1 << low_bits) - 1)) < 4])
        start += 1 << 21
    return np.concatenate(found)[:count]


def test_prompts_crafted_against_a_known_key_cluster_and_spread_under_a_random_one() -> None:
    n = 300
    tokens = _crafted_first_tokens(K0, K1, n)

    def fill(cache: RadixCache) -> tuple[int, int, int]:
        for i, t in enumerate(tokens.tolist()):
            cache.insert(RadixKey([t, 7, 8]), np.array([3 * i + 1, 3 * i + 2, 3 * i + 3]))
        # every prompt is still found, whatever the map's layout
        for t in tokens.tolist():
            assert cache.match_prefix(RadixKey([t, 7, 8])).prefix_len == 3
        return _map_probe_stats(cache)

    known = RadixCache()
    _set_hash_key(known, K0, K1)
    entries, total, longest = fill(known)
    assert entries == n
    # the attack, had the key been known: each entry walks past the ones before it
    assert longest >= n - 8
    assert total >= n * (n - 8) // 2

    keyed = RadixCache()  # the key every tree draws for itself
    entries, total, longest = fill(keyed)
    assert entries == n
    # a table at most half full with a good hash: short runs (expected total ~ n / 2)
    assert longest < 40
    assert total < 4 * n


def test_every_tree_draws_its_own_key() -> None:
    page = np.array([7, 8, 9], dtype=np.uint32)
    hashes = {_page_hash_for_test(RadixCache(), page) for _ in range(3)}
    assert len(hashes) == 3  # equal by chance with probability 2**-64
    # the tree's hash is SipHash-1-3 of (parent, namespace, tokens) under its key
    keyed = RadixCache()
    _set_hash_key(keyed, K0, K1)
    assert _page_hash_for_test(keyed, page) == _siphash_for_test(K0, K1, 0, page)
    first = 5 | (3 << 32)  # parent 5, namespace 3
    assert _page_hash_for_test(keyed, page, 5, 3) == _siphash_for_test(K0, K1, first, page)
    # and the prompts crafted against one key do not cluster in a fresh tree
    tokens = _crafted_first_tokens(K0, K1, 64)
    cache = RadixCache()
    for i, t in enumerate(tokens.tolist()):
        cache.insert(RadixKey([t]), np.array([i + 1]))
    assert _map_probe_stats(cache)[2] < 32


def test_the_key_can_be_set_only_on_a_tree_without_nodes() -> None:
    cache = RadixCache()
    cache.insert(RadixKey([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="no node"):
        _set_hash_key(cache, 1, 2)
    cache.reset()
    _set_hash_key(cache, 1, 2)  # empty again
    cache.insert(RadixKey([1, 2]), np.array([1, 2]))
    assert cache.match_prefix(RadixKey([1, 2])).prefix_len == 2


@pytest.mark.parametrize("page_size", [2, 16])
def test_paged_and_namespaced_trees_find_every_page_under_a_random_key(page_size: int) -> None:
    rng = np.random.default_rng(0)
    cache = RadixCache(page_size=page_size)
    keys = []
    for i in range(200):
        k = rng.integers(0, 2**32, size=page_size * 3, dtype=np.uint64).astype(np.uint32)
        extra = None if i % 3 == 0 else f"ns{i % 7}"
        cache.insert(RadixKey(k, extra), np.arange(1, k.size + 1, dtype=np.int32) + i * k.size)
        keys.append((k, extra))
    for k, extra in keys:
        assert cache.match_prefix(RadixKey(k, extra)).prefix_len == k.size
    entries, _, longest = _map_probe_stats(cache)
    assert entries == 200 and longest < 40


_P61 = 2**61 - 1  # Python hashes an int modulo this: k + i * _P61 all hash alike

Adapter = collections.namedtuple("Adapter", "tenant lora")


@pytest.mark.parametrize(
    "make",
    [
        lambda i: 7 + i * _P61,
        lambda i: -(7 + i * _P61),
        lambda i: (7 + i * _P61, "lora"),  # a tuple's hash mixes its items' hashes
        lambda i: Adapter(7 + i * _P61, "lora"),
        lambda i: ((7 + i * _P61,), 3),
        lambda i: Fraction(1 + 2 * i * _P61, 2),  # not integral: hashed by its ratio
        lambda i: Decimal(f"{5 + 10 * i * _P61}e-1"),
        lambda i: frozenset({7 + i * _P61, "lora"}),  # hashed by its items, as a tuple
        lambda i: (frozenset({-(7 + i * _P61)}), 2),
    ],
    ids=[
        "int",
        "negative",
        "tuple",
        "namedtuple",
        "nested",
        "fraction",
        "decimal",
        "frozenset",
        "frozenset-in-tuple",
    ],
)
def test_extra_keys_whose_python_hashes_collide_spread_in_the_registry(make: Any) -> None:
    """The namespace registry (a dict) filed extra_keys under their Python hash: 400
    tenants whose hashes are all one made a match or an insert compare with each of them.
    It files them under a hash keyed with the tree's random key, of an int's value and of
    a tuple's items: all 400 differ, and each is found (one comparison, with its equal)."""
    n = 400
    cache = RadixCache()
    assert len({hash(make(i)) for i in range(n)}) == 1
    assert len({_namespace_hash(cache, make(i)) for i in range(n)}) == n
    for i in range(n):
        cache.insert(RadixKey([1, 2, 3], make(i)))
    for i in range(n):
        assert cache.match_prefix(RadixKey([1, 2, 3], make(i))).prefix_len == 3
        cache.insert(RadixKey([1, 2, 3, 4], make(i)))
    cache._check_invariants()
    assert cache.total_size() == 4 * n
    other = RadixCache()  # another tree, another key
    assert _namespace_hash(other, make(0)) != _namespace_hash(cache, make(0))


def _shares(kind: str, a: object, b: object) -> bool:
    """Whether a key under extra_key *b* finds what was inserted under *a*."""
    if kind == "mamba":
        cache: Any = MambaRadixCache()
        cache.insert(RadixKey([5, 6], a), np.arange(1, 3, dtype=np.int32), mamba_value=1)
    else:
        cache = RadixCache(sliding_window_size=4 if kind == "swa" else None)
        cache.insert(RadixKey([5, 6], a), np.arange(1, 3, dtype=np.int32))
    got = cache.match_prefix(RadixKey([5, 6], b)).prefix_len == 2
    cache._check_invariants()
    return got


class _Mod10(int):
    """An int subclass with an equality of its own (consistent with its hash)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and int(self) % 10 == int(other) % 10

    def __hash__(self) -> int:
        return int(self) % 10


_EQUAL = [
    (1, True),
    (1, 1.0),
    (1, np.int64(1)),
    (1, Fraction(1)),
    (1, Decimal(1)),
    (1, 1 + 0j),
    (-1, -1.0),
    (-1, np.int64(-1)),
    (0, -0.0),
    (2**70, float(2**70)),
    (2**70, Decimal(2**70)),
    (_P61, np.int64(_P61)),
    (-_P61, np.int64(-_P61)),
    (2**62, np.int64(2**62)),
    (-(2**63), np.int64(-(2**63))),
    (2**63, np.uint64(2**63)),
    (2**61, np.float64(2.0**61)),
    (0.5, Fraction(1, 2)),
    (0.5, Decimal("0.5")),
    (0.5, np.float32(0.5)),
    (2**70, np.longdouble(2**70)),
    (1, np.complex64(1)),
    (Decimal("-0"), 0),
    ((1, "a", (2, 3.0)), (True, "a", (2.0, 3))),
    ((1, "lora"), Adapter(1, "lora")),
    ((0, (1, "lora")), (0, Adapter(1, "lora"))),
    (_Mod10(3), _Mod10(13)),
    (frozenset({1, "a", (2, 3.0)}), frozenset({(2.0, 3), "a", True})),
    (frozenset(), frozenset()),
    (np.timedelta64(1, "ns"), np.timedelta64(1000, "ps")),
    (np.timedelta64(1, "s"), np.timedelta64(1000, "ms")),
    (np.timedelta64(1, "W"), np.timedelta64(7, "D")),
]


@pytest.mark.parametrize("kind", ["full", "swa", "mamba"])
@pytest.mark.parametrize(("a", "b"), _EQUAL, ids=[f"{a!r}={b!r}"[:40] for a, b in _EQUAL])
def test_extra_keys_python_finds_equal_share_a_namespace(kind: str, a: Any, b: Any) -> None:
    """Hashing by value keeps Python's equality: numbers equal to an int are hashed as
    that int (numpy's, floats, Fraction, Decimal, complex; past 2**61 too), a namedtuple
    as the equal tuple, an int subclass with an equality of its own by its own hash."""
    assert a == b and hash(a) == hash(b)
    assert _shares(kind, a, b) and _shares(kind, b, a)


@pytest.mark.parametrize(
    "b", [2, -2, 2**70 + 1, 1.5, (1,), (1, "a"), "1", None, _Mod10(4), Fraction(3, 2)]
)
def test_extra_keys_that_differ_never_share_a_namespace(b: Any) -> None:
    for a in (1, -1, 2**70, (1, "b"), _Mod10(3)):
        assert a != b
        assert not _shares("full", a, b)


class _Unhashable(int):
    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("ek", [_Unhashable(3), (_Unhashable(3), "x"), [1], (1, [1])])
def test_an_unhashable_extra_key_is_refused(ek: Any) -> None:
    """An int subclass made unhashable was hashed by its value, and accepted."""
    cache = RadixCache()
    for call in (
        lambda: cache.insert(RadixKey([1, 2], ek)),
        lambda: cache.match_prefix(RadixKey([1, 2], ek)),
    ):
        with pytest.raises(TypeError, match="extra_key: must be hashable"):
            call()
    cache._check_invariants()
    assert cache.total_size() == 0


def test_a_number_with_a_huge_exponent_is_hashed_without_expanding_it() -> None:
    """An earlier registry expanded a number equal to an int into that int: a 16-character
    Decimal('1e999999999') would have taken hours. Past 10**1233 a Decimal (and a numpy
    long double past float's range) is hashed by its own hash."""
    out = run_child(
        """
        from decimal import Decimal
        import numpy as np
        from pymllm.mem_cache import RadixCache, RadixKey
        cache = RadixCache()
        keys = [Decimal("1e999999999"), Decimal("-1e-999999999"), np.longdouble("1e4000")]
        for ek in keys:
            cache.insert(RadixKey([1, 2], ek))
        print(all(cache.match_prefix(RadixKey([1, 2], ek)).prefix_len == 2 for ek in keys))
        """,
        timeout=120,
    )
    assert out.split() == ["True"]


def test_numbers_past_the_exact_ratio_spans_are_kept_apart_as_documented() -> None:
    """The exception RadixCache's docstring lists (a review of session 31 found it
    undocumented): a Decimal of 10**1233 shares the equal int's namespace, one of 10**1234
    (or 10**-1234) is hashed by its own hash and kept apart from the equal int or Fraction,
    a miss that never turns into a wrong hit."""
    cases = [
        (10**1233, Decimal("1e1233"), 2),
        (Fraction(1, 10**1233), Decimal("1e-1233"), 2),
        (10**1234, Decimal("1e1234"), 0),
        (Fraction(1, 10**1234), Decimal("1e-1234"), 0),
    ]
    for stored, asked, shared in cases:
        assert stored == asked
        cache = RadixCache()
        cache.insert(RadixKey([1, 2], stored))
        assert cache.match_prefix(RadixKey([1, 2], asked)).prefix_len == shared
        cache.insert(RadixKey([1, 2, 3], asked))  # its own namespace when kept apart
        assert cache.total_size() == (3 if shared else 5)
        assert cache.match_prefix(RadixKey([1, 2, 3], stored)).prefix_len == (3 if shared else 2)
        cache._check_invariants()


def test_a_type_error_of_a_hashable_extra_keys_equality_is_its_own() -> None:
    """Every TypeError of the registry's look-up was reported as "must be hashable", also
    one raised by a hashable extra_key's ``__eq__``: that one now propagates as it is."""

    class Touchy:
        def __hash__(self) -> int:
            return 5

        def __eq__(self, other: object) -> bool:
            raise TypeError("Touchy cannot compare")

    cache = RadixCache()
    cache.insert(RadixKey([1, 2], Touchy()))
    with pytest.raises(TypeError, match="Touchy cannot compare"):
        cache.match_prefix(RadixKey([1, 2], Touchy()))
    cache._check_invariants()
    assert cache.total_size() == 2


@pytest.mark.parametrize("make", [RadixCache, lambda: RadixCache(sliding_window_size=4)])
def test_a_new_namespace_hashes_its_extra_key_once_a_look_up(make: Any) -> None:
    """Registering a namespace hashed its extra_key twice in a row (a look-up, then the
    entry's own key made afresh): an insert under a new extra_key ran its ``__hash__``
    three times. Now twice: the look-up made before the value is read (the value's Python
    code may change what the extra_key hashes to), and the one the registration files
    under. A match or an insert into a known namespace runs it once."""
    calls = 0

    class Counted:
        def __hash__(self) -> int:
            nonlocal calls
            calls += 1
            return 7

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Counted)

    cache = make()
    cache.insert(RadixKey([1, 2], Counted()))
    assert calls == 2
    for call in (
        lambda: cache.match_prefix(RadixKey([1, 2], Counted())),
        lambda: cache.insert(RadixKey([1, 2, 3], Counted())),
    ):
        calls = 0
        call()
        assert calls == 1
    cache._check_invariants()


def _keyed_hash(cache: RadixCache, x: object, arity: int = 0, key: Any = None) -> int:
    """The registry's keyed hash of the extra_key *x* in *cache* (under *key* if given)."""
    return int(_namespace_hash(cache, x, arity, key=key))


def test_unequal_extra_keys_of_different_kinds_are_not_hashed_alike() -> None:
    """The registry's hash of a tuple began as the hash of the int of its length, an int's
    was Python's (-1 hashed as -2), and a ratio's and a tuple's items were mixed alike: ()
    was hashed as 0, (d,) as 1/d, -1 as -2, so each item of a tuple could be picked from
    such a pair and 2**n unequal tuples had one keyed hash (1,024 tenants, each match
    compared with all of them). A tuple's hash is tagged as a tuple's and -1 is hashed
    as itself now."""
    cache = RadixCache()
    h = functools.partial(_keyed_hash, cache)

    assert h(()) != h(0)
    assert h(-1) != h(-2)
    for d in (2, 4, 8):  # 1/d exact as a float
        assert h((d,)) != h(Fraction(1, d)) == h(1 / d)
    assert h(0.5) == h(Fraction(1, 2))
    for pair in ((-1, -2), (0, ())):
        family = list(itertools.product(pair, repeat=10))
        assert len({h(t) for t in family}) == len(family)
    # a tuple's hash follows its items' order, and a ratio's its two sides
    pairs = [(a, b) for a in range(25) for b in range(25)]
    assert len({h(t) for t in pairs}) == len(pairs)
    ratios = {Fraction(a, b) for a in range(1, 25) for b in range(2, 25)}
    assert len({h(f) for f in ratios}) == len(ratios)
    # and they are found again, each in its own namespace
    family = list(itertools.product((-1, -2), repeat=4))
    for i, t in enumerate(family):
        cache.insert(RadixKey([1, 2], t), np.array([2 * i + 1, 2 * i + 2], np.int32))
    for i, t in enumerate(family):
        assert cache.match_prefix(RadixKey([1, 2], t)).indices.tolist() == [2 * i + 1, 2 * i + 2]
    cache._check_invariants()


class _MinusOne:
    """A class of the caller's equal to -1 (Python makes its hash -2, as the int's)."""

    def __eq__(self, other: object) -> bool:
        return other == -1

    def __hash__(self) -> int:
        return -2


def test_a_class_equal_to_minus_one_is_kept_apart_as_documented() -> None:
    """RadixCache's docstring lists it: a class of the caller's equal to -1, whose hash is
    Python's -2 (the registry hashes -1 as itself, not as -2). A miss, never a wrong hit."""
    assert _MinusOne() == -1
    assert not _shares("full", -1, _MinusOne()) and not _shares("full", _MinusOne(), -1)


@pytest.mark.parametrize("unit", ["W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "Y", "M"])
def test_a_timedelta64_extra_key_is_accepted_in_every_unit(unit: str) -> None:
    """numpy's timedelta64 is a signed integer type, and the registry read it through
    int(): that gives a datetime.timedelta for seconds to weeks (TypeError, every call
    refused) and the count in the value's own unit otherwise (1 ns and 1000 ps apart). It
    is hashed by its own hash now, as a dict files it."""
    key = np.timedelta64(3, unit)
    assert _shares("full", key, np.timedelta64(3, unit))
    assert not _shares("full", key, np.timedelta64(4, unit))


def test_a_store_whose_equality_changes_its_answer_leaves_the_registry_whole() -> None:
    """A namespace was registered by a look-up, then a store; an extra_key whose __eq__
    said "different" to the look-ups and "equal" to the store overwrote the other
    namespace's entry: that namespace's id could never be found or freed again, and the
    invariant check did not see it. The store now keeps the entry it finds and the key
    takes that namespace (what its __eq__ said last); the check compares the registry
    with the id list."""
    calls = [0]

    class Shifty:
        def __init__(self, n: int, lie_at: int | None = None) -> None:
            self.n, self.lie_at = n, lie_at

        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            calls[0] += 1
            if self.lie_at == calls[0] or getattr(other, "lie_at", None) == calls[0]:
                return True
            return isinstance(other, Shifty) and other.n == self.n

    cache = RadixCache()
    cache.insert(RadixKey([1, 2], Shifty(1)), np.array([10, 11], np.int32))
    calls[0] = 0
    liar = Shifty(2, lie_at=3)  # the insert's two look-ups say no, the store says yes
    r = cache.insert(RadixKey([3, 4], liar), np.array([12, 13], np.int32))
    assert calls[0] == 3 and r.prefix_len == 0
    cache._check_invariants()
    assert _namespace_ids(cache) == (2, 0, 2)  # the root's and Shifty(1)'s: none lost
    liar.lie_at = None
    # the tokens went where the store's answer put them: Shifty(1)'s namespace
    assert cache.match_prefix(RadixKey([3, 4], Shifty(1))).prefix_len == 2
    assert cache.match_prefix(RadixKey([1, 2], Shifty(1))).prefix_len == 2
    cache.evict(1 << 30)
    cache._check_invariants()
    assert _namespace_ids(cache) == (2, 1, 1) and cache.total_size() == 0


def test_the_registry_hash_is_built_as_documented() -> None:
    """Known answers, from the SipHash-1-3 the child map uses (checked against the
    reference vectors above): an int is hashed by its value, a tuple starts from its
    length tagged as a tuple's (one 4-byte word, 0x656c7074) and mixes in each item's
    hash as two 4-byte words, a ratio mixes its denominator's hash into its
    numerator's, and the registry key is the hash of that hash xor the arity, shifted
    right by one (never Python's -1)."""
    cache = RadixCache()

    def sip(first: int, *words: int) -> int:
        return int(_siphash_for_test(K0, K1, first % 2**64, np.array(words, np.uint32)))

    def mix(h: int, v: int) -> int:
        return sip(h, v & 0xFFFFFFFF, v >> 32)

    def key_of(h: int, arity: int = 0) -> int:
        return sip(h ^ arity) >> 1

    def got(x: object, arity: int = 0) -> int:
        return _keyed_hash(cache, x, arity, key=(K0, K1))

    assert got(5) == key_of(sip(5))
    assert got(5, 2) == key_of(sip(5), 2)
    assert got(-1) == key_of(sip(-1)) != got(-2) == key_of(sip(-2))
    assert got(True) == got(1.0) == got(np.int64(1)) == key_of(sip(1))
    tagged = sip(2, 0x656C7074)
    assert got((5, 7)) == key_of(mix(mix(tagged, sip(5)), sip(7)))
    assert got(()) == key_of(sip(0, 0x656C7074))
    assert got(Fraction(3, 4)) == got(0.75) == key_of(mix(sip(3), sip(4)))
    assert got(Fraction(-3, 4)) == key_of(mix(sip(-3), sip(4)))
    # and the tree's own key is another
    assert _keyed_hash(cache, 5) != got(5)


def test_frozensets_are_hashed_by_their_items_in_any_order() -> None:
    """A frozenset extra_key was hashed by Python's own hash: a public function of its
    items' hashes, so sets of ints whose hashes collide collided too. It is hashed by
    its items' keyed hashes now, added up (a set's order is its own) and tagged, so it
    is not hashed as a tuple or an int of the same items."""
    cache = RadixCache()
    h = functools.partial(_keyed_hash, cache)

    items = [5, -1, -2, "x", (1, 2), 0.5]
    forward = frozenset(items)
    backward = frozenset(reversed(items))
    assert h(forward) == h(backward)
    assert h(frozenset({-1})) != h(frozenset({-2}))
    assert len({h(frozenset()), h(()), h(0), h(frozenset({0})), h((0,))}) == 5
    subsets = [frozenset(c) for r in range(4) for c in itertools.combinations(items, r)]
    assert len({h(f) for f in subsets}) == len(subsets)
