"""Model configurations for the reference engine: one frozen dataclass, a few presets.

A config is static data to ``jax.jit`` (hashable, never traced): two steps built from equal
configs share one compilation.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

#: Layer kinds. ``attn``: full causal attention over the paged KV. ``swa``: the same, limited
#: to the last ``sliding_window`` positions. ``rec``: a gated linear recurrence whose
#: per-request state lives in a state pool instead of the KV pool.
LAYER_KINDS = ("attn", "swa", "rec")

#: Model variants and the layer pattern each one repeats.
VARIANTS = {
    "full": ("attn",),
    "swa": ("swa", "attn"),
    "hybrid": ("rec", "attn"),
}


#: Weight, activation and KV dtypes the model runs in (names JAX understands without x64).
DTYPES = ("float32", "bfloat16", "float16")

#: Integer fields and the least value each takes.
_INT_FIELDS = {
    "vocab_size": 1,
    "d_model": 1,
    "n_layers": 1,
    "n_heads": 1,
    "n_kv_heads": 1,
    "head_dim": 1,
    "ffn_dim": 1,
    "sliding_window": 1,
    "conv_width": 2,
    "seed": 0,
}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU).

    ``variant`` picks the layer pattern (see :data:`VARIANTS`): ``full`` (every layer full
    attention), ``swa`` (sliding-window and full attention alternating) or ``hybrid``
    (gated linear recurrence and full attention alternating; the recurrence runs a causal
    depthwise convolution of ``conv_width`` taps first, Mamba style). ``dtype`` is the dtype of the
    weights, the activations and the KV pool; float32 keeps the exactness checks tight.
    """

    name: str = "tiny"
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 768
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    variant: str = "full"
    sliding_window: int = 128
    conv_width: int = 4
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in _INT_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and float(value) > 0):  # NaN fails too
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        pattern = VARIANTS[self.variant]
        if self.n_layers % len(pattern):
            raise ValueError(
                f"n_layers ({self.n_layers}) must be a multiple of the {self.variant!r} "
                f"pattern length ({len(pattern)})"
            )

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of every layer, the variant's pattern repeated."""
        pattern = VARIANTS[self.variant]
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    @property
    def pattern(self) -> tuple[str, ...]:
        """The layer kinds of one group; the model is ``n_layers / len(pattern)`` groups."""
        return VARIANTS[self.variant]

    @property
    def kv_layer_ids(self) -> tuple[int, ...]:
        """Layers that keep KV in the KV pool (``attn`` and ``swa``)."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k != "rec")

    @property
    def rec_layer_ids(self) -> tuple[int, ...]:
        """Layers that keep a recurrent state in the state pool."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "rec")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embedding and LM head included)."""
        d, h, kvh, hd, f = (
            self.d_model,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.ffn_dim,
        )
        attn = d * h * hd * 2 + d * kvh * hd * 2
        rec = d * h * hd * 3 + h * hd * (1 + self.conv_width) + h * hd * d
        mlp = 3 * d * f
        per_kind = {"attn": attn, "swa": attn, "rec": rec}
        layers = sum(per_kind[k] + mlp + 2 * d for k in self.layer_kinds)
        return layers + 2 * self.vocab_size * d + d


#: Presets. ``micro`` is for smoke tests; ``tiny`` (the demo's default) runs on two CPU
#: cores in seconds; the others are GPU sizes (random weights: the figures measure the
#: serving loop, not a language model).
PRESETS: dict[str, ModelConfig] = {
    "micro": ModelConfig(
        name="micro",
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        sliding_window=32,
    ),
    "tiny": ModelConfig(),
    "small": ModelConfig(
        name="small",
        vocab_size=8192,
        d_model=1024,
        n_layers=8,
        n_heads=16,
        n_kv_heads=4,
        head_dim=64,
        ffn_dim=2816,
        sliding_window=512,
        dtype="bfloat16",
    ),
    "1b": ModelConfig(
        name="1b",
        vocab_size=32000,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        sliding_window=1024,
        dtype="bfloat16",
    ),
    "8b": ModelConfig(
        name="8b",
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        rope_theta=500000.0,
        sliding_window=4096,
        dtype="bfloat16",
    ),
}


def get_config(name: str, variant: str = "full", **overrides: object) -> ModelConfig:
    """A preset by name with ``variant`` and any field overridden."""
    try:
        base = PRESETS[name]
    except KeyError:
        known = sorted(PRESETS)
        raise ValueError(f"unknown model preset {name!r}; choose one of {known}") from None
    return base.replace(variant=variant, **overrides)


__all__ = ["DTYPES", "LAYER_KINDS", "PRESETS", "VARIANTS", "ModelConfig", "get_config"]
