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
