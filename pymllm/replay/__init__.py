"""Trace replay: run recorded (or generated) traffic through the real prefix cache.

``pymllm-cache replay TRACE`` reads a trace (:mod:`~pymllm.replay.traces`: Mooncake JSONL or
plain token lists), replays it through :class:`~pymllm.mem_cache.RadixCache` and its
allocator at each capacity and eviction policy (:mod:`~pymllm.replay.simulator`), and reports
hit rates and replay speed; ``pymllm-cache gen-trace`` writes a synthetic trace
(:mod:`~pymllm.replay.generate`). Only the host side is involved: no JAX, no device.
"""

from pymllm.replay.generate import TraceSpec as TraceSpec
from pymllm.replay.generate import generate_trace as generate_trace
from pymllm.replay.generate import write_trace as write_trace
from pymllm.replay.simulator import Ideal as Ideal
from pymllm.replay.simulator import Replay as Replay
from pymllm.replay.simulator import ReplayResult as ReplayResult
from pymllm.replay.simulator import check_policy as check_policy
from pymllm.replay.simulator import default_capacities as default_capacities
from pymllm.replay.simulator import ideal as ideal
from pymllm.replay.simulator import ideal_prefix_units as ideal_prefix_units
from pymllm.replay.simulator import parse_capacity as parse_capacity
from pymllm.replay.simulator import replay as replay
from pymllm.replay.simulator import sweep as sweep
from pymllm.replay.traces import Trace as Trace
from pymllm.replay.traces import TraceError as TraceError
from pymllm.replay.traces import read_trace as read_trace

__all__ = [
    "Ideal",
    "Replay",
    "ReplayResult",
    "Trace",
    "TraceError",
    "TraceSpec",
    "check_policy",
    "default_capacities",
    "generate_trace",
    "ideal",
    "ideal_prefix_units",
    "parse_capacity",
    "read_trace",
    "replay",
    "sweep",
    "write_trace",
]
