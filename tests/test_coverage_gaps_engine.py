"""Coverage review (session 24): engine paths the suite did not run."""

from __future__ import annotations

import pytest

from pymllm.engine.config import get_config
from pymllm.engine.memory import EngineMemory
from pymllm.engine.scheduler import _run_all


def test_run_all_runs_every_step_and_raises_the_first_error() -> None:
    """scheduler._run_all (the release path's cleanup): a step that raises, an interrupt
    included, must not skip the later steps (a skipped release leaks its slots)."""
    ran: list[int] = []

    def boom(exc: BaseException) -> None:
        raise exc

    first = KeyboardInterrupt("first")
    with pytest.raises(KeyboardInterrupt) as info:
        _run_all(
            [
                lambda: ran.append(1),
                lambda: boom(first),
                lambda: ran.append(2),
                lambda: boom(RuntimeError("second")),
                lambda: ran.append(3),
            ]
        )
    assert info.value is first
    assert ran == [1, 2, 3]


def test_engine_memory_refuses_swa_size_without_swa_layers() -> None:
    with pytest.raises(ValueError, match="no SWA layers"):
        EngineMemory(get_config("micro", "full"), 64, swa_size=32)


def test_engine_memory_refuses_a_hybrid_model_without_state_slots() -> None:
    with pytest.raises(ValueError, match="state_size >= 1"):
        EngineMemory(get_config("micro", "hybrid"), 64, state_size=0)


def test_get_config_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("no-such-model")


def test_cli_demo_on_a_hybrid_model_uses_the_mamba_cache_and_leaks_nothing(tmp_path, capsys):
    """cli._make_cache's Mamba branch (cli.py ~193-195) was never run in-process."""
    import json

    from pymllm.cli import main

    lines = [
        {"timestamp": 0, "input_length": 60 + 8 * i, "output_length": 4, "hash_ids": [i % 2]}
        for i in range(4)
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(
        [
            "demo",
            "--trace",
            str(trace),
            "--json",
            "--cache",
            "radix",
            "--variant",
            "hybrid",
            "--model",
            "micro",
            "--pool-size",
            "512",
            "--max-running",
            "4",
            "--chunk-tokens",
            "32",
            "--prefill-batch",
            "2",
            "--pad-prefill-batch",
            "--jit-cache",
            "",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    (run,) = json.loads(out.out)["runs"]
    assert run["cache"] == "MambaRadixCache"
    assert run["requests"] == 4 and run["leak_free"]
