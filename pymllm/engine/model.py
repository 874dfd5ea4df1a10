"""A decoder-only transformer in plain JAX whose attention reads a paged KV pool by gather.

One jitted function, :func:`extend_step`, serves both chunked prefill and decode: a batch
of ``B`` requests each brings ``T`` new tokens (decode: ``T == 1``; prefill: a chunk of the
prompt), their KV is scattered into the pool at the request's freshly allocated slots, and
every query attends over the request's whole slot table (cached prefix + new tokens),
gathered from the pool. The cached prefix is therefore never recomputed: it is read from the
slots the prefix cache hands out.

Buffers (all donated, rebound by the caller):

* ``kv``: one ``(k, v)`` pair per attention layer (``cfg.kv_layer_ids``), each
  ``[pool_size + 1, n_kv_heads, head_dim]`` of ``cfg.dtype``; row 0 is the padding slot.
* ``state``: one ``[state_slots + 1, n_heads, head_dim]`` float32 buffer per recurrent
  layer (``cfg.rec_layer_ids``); row 0 is the padding slot.

Padding everywhere uses slot 0: padded tokens write their KV/state to the trash row 0 and
padded slot-table entries read it (masked out of the softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pymllm.engine.config import ModelConfig

Params = dict[str, Any]
KVBuffers = tuple[tuple[jax.Array, jax.Array], ...]
StateBuffers = tuple[jax.Array, ...]

_NEG_INF = -1e30


def init_params(cfg: ModelConfig) -> Params:
    """Weights drawn from ``cfg.seed`` (scaled normal; norms at one)."""
    dtype = jnp.dtype(cfg.dtype)
    d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(cfg.seed), 8 + 8 * cfg.n_layers))

    def dense(shape: Sequence[int], fan_in: int, scale: float = 1.0) -> jax.Array:
        w = jax.random.normal(next(keys), shape, jnp.float32) * (scale / np.sqrt(fan_in))
        return w.astype(dtype)

    layers = []
    for kind in cfg.layer_kinds:
        layer: dict[str, jax.Array] = {
            "norm1": jnp.ones((d,), dtype),
            "norm2": jnp.ones((d,), dtype),
            "w_gate": dense((d, f), d),
            "w_up": dense((d, f), d),
            "w_down": dense((f, d), f),
        }
        if kind == "rec":
            layer["w_u"] = dense((d, h * hd), d)
            layer["w_a"] = dense((d, h * hd), d)
            # Bias the decay gate towards remembering (sigmoid(2) ~ 0.88).
            layer["b_a"] = jnp.full((h * hd,), 2.0, dtype)
            layer["w_g"] = dense((d, h * hd), d)
            layer["w_o"] = dense((h * hd, d), h * hd)
        else:
            layer["wq"] = dense((d, h * hd), d)
            layer["wk"] = dense((d, kvh * hd), d)
            layer["wv"] = dense((d, kvh * hd), d)
            layer["wo"] = dense((h * hd, d), h * hd)
        layers.append(layer)
    return {
        "embed": dense((cfg.vocab_size, d), 1),
        "layers": layers,
        "norm_f": jnp.ones((d,), dtype),
        # A wider LM head spreads the logits, so greedy argmax rarely meets a near-tie.
        "lm_head": dense((d, cfg.vocab_size), d, scale=4.0),
    }


def init_kv_buffers(cfg: ModelConfig, pool_size: int) -> KVBuffers:
    """Zeroed KV buffers for the layout the step expects (without a ``KVPool``)."""
    shape = (pool_size + 1, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in cfg.kv_layer_ids)


def init_state_buffers(cfg: ModelConfig, num_slots: int) -> StateBuffers:
    """Zeroed recurrent-state buffers, ``num_slots + 1`` rows each (row 0 = padding)."""
    shape = (num_slots + 1, cfg.n_heads, cfg.head_dim)
    return tuple(jnp.zeros(shape, jnp.float32) for _ in cfg.rec_layer_ids)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half form. ``x``: [B, T, H, D]; ``positions``: [B, T]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _kv_write(buf: jax.Array, loc: jax.Array, val: jax.Array) -> jax.Array:
    # Padding tokens all target row 0; whatever lands there is never read unmasked.
    return buf.at[loc].set(val, unique_indices=True)


def _attention(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,
    kv: tuple[jax.Array, jax.Array],
    b: dict[str, jax.Array],
    window: int | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    bsz, t, _ = x.shape
    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (x @ p["wq"]).reshape(bsz, t, h, hd)
    k = (x @ p["wk"]).reshape(bsz, t, kvh, hd)
    v = (x @ p["wv"]).reshape(bsz, t, kvh, hd)
    q = _rope(q, b["positions"], cfg.rope_theta)
    k = _rope(k, b["positions"], cfg.rope_theta)

    k_buf, v_buf = kv
    loc = b["new_slots"].reshape(-1)
    k_buf = _kv_write(k_buf, loc, k.reshape(-1, kvh, hd).astype(k_buf.dtype))
    v_buf = _kv_write(v_buf, loc, v.reshape(-1, kvh, hd).astype(v_buf.dtype))

    # Paged attention by gather: the request's slot table names every KV row it may see.
    keys = k_buf[b["kv_slots"]]  # [B, S, kvh, hd]
    vals = v_buf[b["kv_slots"]]
    s = keys.shape[1]
    qg = q.reshape(bsz, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(hd))
    kv_pos = jnp.arange(s, dtype=jnp.int32)[None, None, :]
    q_pos = b["positions"][:, :, None]
    mask = kv_pos <= q_pos  # [B, T, S]; causal, and beyond the request's length
    if window is not None:
        mask = mask & (kv_pos > q_pos - window)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, vals, preferred_element_type=jnp.float32)
    out = out.reshape(bsz, t, h * hd).astype(x.dtype)
    return out @ p["wo"], (k_buf, v_buf)


def _recurrence(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,
    state_buf: jax.Array,
    b: dict[str, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Gated linear recurrence ``s_t = a_t * s_{t-1} + (1 - a_t) * u_t``, output gated.

    The state of each request is read from its slot in ``state_buf`` (zero where
    ``state_fresh``) and written back there; padded tokens (``t >= chunk_lens``) leave it
    unchanged.
    """
    bsz, t, _ = x.shape
    h, hd = cfg.n_heads, cfg.head_dim
    u = (x @ p["w_u"]).astype(jnp.float32).reshape(bsz, t, h, hd)
    a = jax.nn.sigmoid((x @ p["w_a"] + p["b_a"]).astype(jnp.float32)).reshape(bsz, t, h, hd)
    valid = jnp.arange(t)[None, :] < b["chunk_lens"][:, None]  # [B, T]
    s0 = state_buf[b["state_slots"]]  # [B, h, hd]
    s0 = jnp.where(b["state_fresh"][:, None, None], 0.0, s0)

    def step(s: jax.Array, inp: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        u_t, a_t, ok = inp
        s_new = a_t * s + (1.0 - a_t) * u_t
        s = jnp.where(ok[:, None, None], s_new, s)
        return s, s

    s_last, seq = jax.lax.scan(step, s0, (u.swapaxes(0, 1), a.swapaxes(0, 1), valid.swapaxes(0, 1)))
    seq = seq.swapaxes(0, 1).reshape(bsz, t, h * hd)
    gate = jax.nn.silu((x @ p["w_g"]).astype(jnp.float32))
    y = (seq * gate).astype(x.dtype) @ p["w_o"]
    state_buf = state_buf.at[b["state_slots"]].set(s_last, unique_indices=True)
    return y, state_buf


def _extend(
    params: Params,
    kv: KVBuffers,
    state: StateBuffers,
    batch: dict[str, jax.Array],
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array, KVBuffers, StateBuffers]:
    x = params["embed"][batch["tokens"]]
    kv_out = list(kv)
    state_out = list(state)
    kv_i = rec_i = 0
    for kind, p in zip(cfg.layer_kinds, params["layers"], strict=True):
        hn = _rms_norm(x, p["norm1"], cfg.norm_eps)
        if kind == "rec":
            y, state_out[rec_i] = _recurrence(cfg, p, hn, state_out[rec_i], batch)
            rec_i += 1
        else:
            window = cfg.sliding_window if kind == "swa" else None
            y, kv_out[kv_i] = _attention(cfg, p, hn, kv_out[kv_i], batch, window)
            kv_i += 1
        x = x + y
        hn = _rms_norm(x, p["norm2"], cfg.norm_eps)
        x = x + (jax.nn.silu(hn @ p["w_gate"]) * (hn @ p["w_up"])) @ p["w_down"]
    last = jnp.take_along_axis(x, batch["last_idx"][:, None, None], axis=1)[:, 0]
    last = _rms_norm(last, params["norm_f"], cfg.norm_eps)
    logits = (last @ params["lm_head"]).astype(jnp.float32)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return next_tokens, logits, tuple(kv_out), tuple(state_out)


_extend_jit = jax.jit(_extend, static_argnames=("cfg",), donate_argnames=("kv", "state"))


def extend_step(
    params: Params,
    kv: KVBuffers,
    state: StateBuffers,
    batch: dict[str, jax.Array],
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array, KVBuffers, StateBuffers]:
    """One chunked-prefill or decode step for a padded batch; jitted, ``kv``/``state`` donated.

    ``batch`` (int32 arrays; ``B``, ``T``, ``S`` are bucket sizes chosen by the caller):

    * ``tokens``, ``positions``, ``new_slots``: ``[B, T]``; the new tokens, their absolute
      positions and the KV slot each one is written to (padding: token 0, position 0,
      slot 0).
    * ``kv_slots``: ``[B, S]``; the KV slot of every position ``0..S-1`` of the request,
      the new tokens included (padding: slot 0). Position ``j`` is visible to a query at
      position ``p`` iff ``j <= p`` (and, in ``swa`` layers, ``j > p - sliding_window``).
    * ``chunk_lens``, ``last_idx``, ``state_slots``: ``[B]``; new tokens per row, the index
      in ``T`` of the row's last new token (its logits are returned), and the row's slot in
      the recurrent-state buffers (padding rows: 0).
    * ``state_fresh``: ``[B]`` bool; the row starts its recurrence from a zero state
      instead of reading its slot (a request's first chunk).

    Returns ``(next_tokens [B] int32, logits [B, vocab] float32, kv, state)``; the input
    ``kv`` and ``state`` are donated and must not be used again.
    """
    return _extend_jit(params, kv, state, batch, cfg=cfg)


def compile_count() -> int:
    """How many shapes :func:`extend_step` has compiled in this process (all configs)."""
    return int(_extend_jit._cache_size())


__all__ = [
    "KVBuffers",
    "Params",
    "StateBuffers",
    "compile_count",
    "extend_step",
    "init_kv_buffers",
    "init_params",
    "init_state_buffers",
]
