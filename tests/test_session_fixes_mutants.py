"""Tests that kill mutants of session 24's changes which the other tests let through."""

from __future__ import annotations

import json
import sys

import jax
import pytest
from conftest import FlakyExtraKey  # tests/ is on sys.path (rootdir conftest)

from pymllm.cli import main
from pymllm.mem_cache import ReqToTokenPool
from pymllm.mem_cache.errors import InvalidValueError


def test_to_device_wraps_a_type_error_from_jax_too():
    """A sharding JAX refuses with TypeError (an unhashable slice), not ValueError, is
    refused as InvalidValueError as well (mutant: ``except (ValueError,)``)."""
    req = ReqToTokenPool(4, 8)
    req.write((1, slice(0, 2)), [4, 5])
    with pytest.raises(InvalidValueError, match="sharding"):
        req.to_device([1], sharding=slice(1))
    out = req.to_device([1], sharding=jax.devices()[0])
    assert out.shape[0] >= 1


@pytest.fixture
def tiny_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("[1, 2, 3]\n[1, 2, 3, 4]\n")
    return path


class _NoFd:
    """A replaced stdout with no fileno at all (AttributeError) whose writes fail."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass


class _ClosedFd(_NoFd):
    """A replaced stdout whose fileno raises a plain ValueError (a closed file does)."""

    def fileno(self) -> int:
        raise ValueError("I/O operation on closed file")


@pytest.mark.parametrize("stdout", [_NoFd, _ClosedFd], ids=["no-fileno", "closed"])
def test_a_broken_pipe_into_any_replaced_stdout_returns_141(tiny_trace, monkeypatch, stdout):
    """The devnull redirect gives up quietly for every stdout without a usable descriptor
    (mutant: ``except (OSError,)`` lets AttributeError / ValueError out of main)."""
    monkeypatch.setattr(sys, "stdout", stdout())
    assert main(["replay", str(tiny_trace), "--json", "--quiet"]) == 141


def _demo_with_a_bare_memory_error(tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    from pymllm.engine import scheduler

    def boom(self, *a, **k):
        raise MemoryError()

    monkeypatch.setattr(scheduler.Engine, "run", boom)
    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "input_length": 20, "output_length": 3, "hash_ids": [i]} for i in range(2)
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(
        ["demo", "--trace", str(trace), "--model", "micro", "--pool-size", "128", "--cache",
         "radix", "--quiet", "--jit-cache", "", "--max-running", "3", "--prefill-batch", "2"]
    )  # fmt: skip
    return rc, capsys.readouterr().err


def test_demo_out_of_host_memory_is_a_runtime_error(tmp_path, monkeypatch, capsys):
    """A MemoryError while serving exits 1 (a runtime error, as EngineError; 2 is the
    usage errors' status) in one line naming both batch options (mutant: ``return 2``)."""
    rc, err = _demo_with_a_bare_memory_error(tmp_path, monkeypatch, capsys)
    assert rc == 1, err
    assert "out of host memory while serving (" in err
    assert "--max-running 3 and --prefill-batch 2" in err
    assert err.strip().count("\n") == 0


def test_demo_bare_memory_error_says_no_detail(tmp_path, monkeypatch, capsys):
    """An exception is always truthy: ``{exc or 'no detail'}`` printed "()" for a bare
    MemoryError (fixed in session 24)."""
    _, err = _demo_with_a_bare_memory_error(tmp_path, monkeypatch, capsys)
    assert "(no detail)" in err


@pytest.mark.parametrize("field", ["max_running", "chunk_tokens", "max_prefill_batch"])
def test_scheduler_config_refuses_a_bool(field):
    """True is an int (== 1) but not a size: refused by name (mutant: no bool check, which
    accepted max_running=True)."""
    from pymllm.engine.scheduler import SchedulerConfig

    with pytest.raises(TypeError, match=field):
        SchedulerConfig(**{field: True})


def test_trace_spec_refuses_a_bool_seed():
    """seed=True is an int but not a seed (mutant: no bool check)."""
    from pymllm.replay.generate import TraceSpec

    with pytest.raises(ValueError, match="seed"):
        TraceSpec(seed=True)
    TraceSpec(seed=0)


@pytest.mark.parametrize("name", ["system_blocks", "user_blocks", "output_tokens"])
@pytest.mark.parametrize("pair", [(True, 2), (1, True)], ids=["low", "high"])
def test_trace_spec_refuses_bool_block_counts(name, pair):
    """(True, 2) passed ``1 <= low <= high`` (mutant: no bool check in the pairs)."""
    from pymllm.replay.generate import TraceSpec

    with pytest.raises(ValueError, match=f"{name}: expected two integers"):
        TraceSpec(**{name: pair})


@pytest.mark.skipif(sys.platform != "linux", reason="mallinfo2 is glibc's")
def test_a_leaf_made_from_a_whole_key_block_gives_the_rest_back():
    """_link_leaf shrinks a block made for the whole key to the leaf's positions (mutant:
    the shrink skipped, each 16-token leaf keeping a 64K-token key's 512 KB block)."""
    import numpy as np
    from conftest import heap_bytes_in_use

    from pymllm.mem_cache import RadixCache, RadixKey

    prefix, suffix, leaves = 1 << 16, 16, 20
    cache = RadixCache()
    base = np.arange(1, prefix + 1, dtype=np.int32)
    cache.insert(RadixKey(base, FlakyExtraKey("k")), base.copy())
    rng = np.random.default_rng(0)
    keys = [
        np.concatenate([base, rng.integers(prefix + 1, 1 << 30, suffix, dtype=np.int32)])
        for _ in range(leaves + 1)
    ]
    values = [k.copy() for k in keys]
    cache.insert(RadixKey(keys[0], FlakyExtraKey("k", wrong=1)), values[0])  # scratch growth
    before = heap_bytes_in_use()
    for k, v in zip(keys[1:], values[1:], strict=True):
        assert cache.insert(RadixKey(k, FlakyExtraKey("k", wrong=1)), v).prefix_len == prefix
    per_leaf = (heap_bytes_in_use() - before) / leaves
    cache._check_invariants()
    assert cache.total_size() == prefix + (leaves + 1) * suffix
    assert per_leaf < 16 * 1024, f"{per_leaf:.0f} bytes a leaf"
