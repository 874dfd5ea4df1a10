"""``InsertResult.mamba_exist`` says whether a state was already stored at the key's end."""

from pymllm.mem_cache import MambaRadixCache, RadixKey


def test_mamba_exist_reports_a_stored_state_without_an_incoming_one() -> None:
    cache = MambaRadixCache()
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4], mamba_value=[9])

    # a chunk cached again without a state of its own: a state is stored at that point
    r = cache.insert(RadixKey([1, 2, 3, 4]), [5, 6, 7, 8])

    assert r.prefix_len == 4
    assert r.last_node.mamba_value is not None
    assert r.mamba_exist is True


def test_mamba_exist_is_false_where_no_state_is_stored() -> None:
    cache = MambaRadixCache()
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4], mamba_value=[9])

    r = cache.insert(RadixKey([1, 2]), [1, 2])

    assert r.last_node.mamba_value is None
    assert r.mamba_exist is False


def test_mamba_exist_is_false_when_the_key_ends_inside_a_page() -> None:
    """A state is only ever stored at a page boundary: a key of 5 tokens with 2-token pages
    ends where no state can be, so no state is stored at the key's end, even though the
    page-aligned node (4 tokens) holds one. Reporting True tells a caller that the state
    after token 5 is saved, which it is not (the one stored is the state after token 4)."""
    cache = MambaRadixCache(page_size=2)
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4], mamba_value=9)
    r = cache.insert(RadixKey([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5])
    assert r.prefix_len == 4
    assert r.mamba_exist is False


def test_mamba_exist_stays_true_for_a_page_aligned_key() -> None:
    cache = MambaRadixCache(page_size=2)
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4], mamba_value=9)
    r = cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4])
    assert r.mamba_exist is True


def test_mamba_exist_reports_a_stored_state_in_slot_zero() -> None:
    """Slot 0 is a state like any other for a cache without a booking pool."""
    cache = MambaRadixCache()
    cache.insert(RadixKey([1, 2]), [1, 2], mamba_value=0)
    r = cache.insert(RadixKey([1, 2]), [3, 4])
    assert r.last_node.mamba_value is not None
    assert int(r.last_node.mamba_value[0]) == 0
    assert r.mamba_exist is True
