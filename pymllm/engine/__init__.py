"""A compact reference serving engine that embeds the prefix cache in a JAX loop.

A decoder-only transformer in plain JAX (:mod:`~pymllm.engine.model`) whose attention reads
the KV of cached prefixes straight from the pool through the slot indices the cache hands
out; a continuous-batching scheduler (:mod:`~pymllm.engine.scheduler`) that works with any
:class:`~pymllm.mem_cache.BasePrefixCache`; and built-in workloads plus a Mooncake trace
reader (:mod:`~pymllm.engine.workloads`). ``pymllm-cache demo`` runs it.
"""

from pymllm.engine.config import PRESETS as PRESETS
from pymllm.engine.config import ModelConfig as ModelConfig
from pymllm.engine.config import get_config as get_config
from pymllm.engine.memory import EngineMemory as EngineMemory
from pymllm.engine.model import extend_step as extend_step
from pymllm.engine.model import init_params as init_params
from pymllm.engine.scheduler import Engine as Engine
from pymllm.engine.scheduler import EngineError as EngineError
from pymllm.engine.scheduler import RunStats as RunStats
from pymllm.engine.scheduler import SchedulerConfig as SchedulerConfig
from pymllm.engine.workloads import RequestSpec as RequestSpec
from pymllm.engine.workloads import TraceError as TraceError
from pymllm.engine.workloads import Workload as Workload
from pymllm.engine.workloads import load_mooncake_trace as load_mooncake_trace
from pymllm.engine.workloads import make_workload as make_workload

__all__ = [
    "PRESETS",
    "Engine",
    "EngineError",
    "EngineMemory",
    "ModelConfig",
    "RequestSpec",
    "RunStats",
    "SchedulerConfig",
    "TraceError",
    "Workload",
    "extend_step",
    "get_config",
    "init_params",
    "load_mooncake_trace",
    "make_workload",
]
