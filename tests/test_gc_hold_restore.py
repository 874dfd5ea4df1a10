"""RadixCache's docstring: "a gc.disable() or gc.enable() made while a call runs (in a
callback, ...) is undone when the outermost call returns", in both directions."""

from __future__ import annotations

import gc

import pytest

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey


@pytest.mark.parametrize("make", [RadixCache, MambaRadixCache], ids=["radix", "mamba"])
@pytest.mark.parametrize("on_at_entry", [False, True], ids=["off", "on"])
def test_a_callbacks_gc_switch_is_undone_when_the_call_returns(
    make: type[RadixCache], on_at_entry: bool
) -> None:
    """With the collector off when the call began, a callback's ``gc.enable()`` outlived
    the call (only a callback's ``gc.disable()`` with it on was undone): a server that runs
    with gc off had collections from then on, inside later cache calls too."""

    def on_evict(_node_id: int) -> None:
        if on_at_entry:
            gc.disable()
        else:
            gc.enable()

    cache = make(on_node_evict=on_evict)
    cache.insert(RadixKey([1, 2]), [3, 4])
    was = gc.isenabled()
    if on_at_entry:
        gc.enable()
    else:
        gc.disable()
    try:
        assert cache.evict(2).full_evicted == 2
        assert gc.isenabled() == on_at_entry
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()
