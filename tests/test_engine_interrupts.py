"""Ctrl-C handling the engine's tests did not pin (found by mutation testing).

Lives in tests/ (imports the helpers of test_engine and test_engine_errors).
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
from test_engine import small_shared
from test_engine_errors import make_engine, run_after_error

from pymllm.engine import model as M


def test_a_ctrl_c_stops_the_run_at_the_next_step_not_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pins: a Ctrl-C held during a step is raised at the top of the very next turn of the
    serving loop; no further model step runs. The existing Ctrl-C tests only check that
    KeyboardInterrupt comes out eventually and nothing leaks, which also holds if the held
    signal is delivered only when the run exits. Without it, Ctrl-C on a long benchmark or
    a replayed trace would be ignored until every request had been served (minutes to
    hours), and the user would have to kill the process, losing the report."""
    engine = make_engine("full")
    steps = {"n": 0}
    step = M.extend_step

    def step_then_ctrl_c(*a: Any, **k: Any) -> Any:
        out = step(*a, **k)
        steps["n"] += 1
        if steps["n"] == 1:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(M, "extend_step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        engine.run(small_shared(n_groups=2, per_group=3))
    assert steps["n"] == 1, f"{steps['n']} steps ran after the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    run_after_error(engine)


def test_a_ctrl_c_in_a_follow_up_callback_goes_through_at_once() -> None:
    """Pins: a workload's follow_up is the user's code (it may block: waiting for the next
    chat turn, a network call), so a Ctrl-C inside it is raised there, as in a progress
    callback, and the run releases everything. Held instead, a follow_up blocked on input
    could never be interrupted, and one that goes on runs to its end after the Ctrl-C."""
    engine = make_engine("full")
    wl = small_shared(n_groups=1, per_group=3)
    after: list[str] = []

    def follow_up(spec: Any, output: Any) -> None:
        signal.raise_signal(signal.SIGINT)
        after.append(spec.rid)  # not reached: KeyboardInterrupt comes out of raise_signal

    wl.follow_up = follow_up
    with pytest.raises(KeyboardInterrupt):
        engine.run(wl)
    assert after == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run_after_error(engine)
