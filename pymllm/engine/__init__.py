"""A compact reference serving engine that embeds the prefix cache in a JAX loop.

A decoder-only transformer in plain JAX (:mod:`~pymllm.engine.model`) whose attention reads
the KV of cached prefixes straight from the pool through the slot indices the cache hands
out; a continuous-batching scheduler (:mod:`~pymllm.engine.scheduler`) that works with any
:class:`~pymllm.mem_cache.BasePrefixCache`; and built-in workloads plus a Mooncake trace
reader (:mod:`~pymllm.engine.workloads`). ``pymllm-cache demo`` runs it.
"""

from importlib import import_module
from typing import Any

# Where each public name lives. Imported on first use: the model and the scheduler load JAX
# (about a second), which the config and workload helpers (and every CLI --help) do without.
_HOMES = {
    "PRESETS": "config",
    "ModelConfig": "config",
    "get_config": "config",
    "EngineMemory": "memory",
    "extend_step": "model",
    "init_params": "model",
    "Engine": "scheduler",
    "EngineError": "scheduler",
    "RunStats": "scheduler",
    "SchedulerConfig": "scheduler",
    "RequestSpec": "workloads",
    "TraceError": "workloads",
    "Workload": "workloads",
    "load_mooncake_trace": "workloads",
    "make_workload": "workloads",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)


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
