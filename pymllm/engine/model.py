"""A decoder-only transformer in plain JAX whose attention reads a paged KV pool by gather.

One jitted function, :func:`extend_step`, serves both chunked prefill and decode: a batch
of ``B`` requests each brings ``T`` new tokens (decode: ``T == 1``; prefill: a chunk of the
prompt), their KV is scattered into the pool at the request's freshly allocated slots, and
every query attends over the request's whole slot table (cached prefix + new tokens),
gathered from the pool. The cached prefix is therefore never recomputed: it is read from the
slots the prefix cache hands out.

Buffers are the package's pools' own (:mod:`pymllm.mem_cache.memory_pool`), donated and
returned by the step:

* ``kv``: :class:`~pymllm.mem_cache.memory_pool.KVBuffers` of a ``KVPool`` with one layer
  per attention layer (``cfg.kv_layer_ids``): ``k``/``v`` ``[L_kv, rows, n_kv_heads,
  head_dim]`` of ``cfg.dtype``; row 0 is the padding slot.
* ``swa_kv``: ``None``, or the ``KVBuffers`` of a second pool that holds the ``swa``
  layers' KV (then ``kv`` holds only the full-attention layers), indexed by SWA slots: the
  layout of ``RadixCache(sliding_window_size=...)`` with a ``SWATokenToKVPoolAllocator``,
  which frees the SWA KV of tokens that left every window.
* ``state``: :class:`~pymllm.mem_cache.memory_pool.MambaBuffers` of a ``MambaPool`` with
  one layer per recurrent layer: ``conv`` ``[L_rec, rows, conv_width - 1, n_heads *
  head_dim]`` and ``temporal`` ``[L_rec, rows, n_heads, head_dim]`` (float32); ``None``
  when the model has no recurrent layer.

The layers run as a ``lax.scan`` over groups of the variant's pattern (one group is one
layer for ``full``, a pair for ``swa``/``hybrid``), so compilation cost does not grow with
depth. Padding everywhere uses slot 0 in the batch: padded slot-table entries read row 0
(masked out of the softmax), which stays all zeros. Padded tokens and rows write nothing:
the step routes their writes past the buffers' end, where the scatter drops them (see
:func:`pymllm.mem_cache.memory_pool.scatter_rows`), as the pools' own writes do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pymllm.engine.config import ModelConfig
from pymllm.mem_cache.memory_pool import KVBuffers, MambaBuffers, scatter_rows

Params = dict[str, Any]

_NEG_INF = -1e30


class _Draw:
    """A placeholder for a normal weight of ``shape`` times ``scale``."""

    def __init__(self, shape: tuple[int, ...], scale: float) -> None:
        self.shape, self.scale = shape, scale


def init_params(cfg: ModelConfig) -> Params:
    """Weights drawn from ``cfg.seed`` (scaled normal; norms at one), on the default device.

    ``params["blocks"][j]`` holds the weights of pattern position ``j`` for every group,
    stacked on a leading axis of ``n_layers / len(pattern)``. Drawn with numpy on the host,
    one array at a time: the same weights on every platform, and nothing to compile (each
    ``jax.random`` call compiles its own PRNG kernel, about a second each on a CPU).
    """
    dtype = jnp.dtype(cfg.dtype)
    d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    groups = cfg.n_layers // len(cfg.pattern)

    def dense(shape: Sequence[int], fan_in: int, scale: float = 1.0) -> _Draw:
        return _Draw((groups, *shape), scale / np.sqrt(fan_in))

    def full(shape: Sequence[int], value: float) -> np.ndarray:
        return np.full((groups, *shape), value, np.float32)

    blocks = []
    for kind in cfg.pattern:
        blk: dict[str, Any] = {
            "norm1": full((d,), 1.0),
            "norm2": full((d,), 1.0),
            "w_gate": dense((d, f), d),
            "w_up": dense((d, f), d),
            "w_down": dense((f, d), f),
        }
        if kind == "rec":
            blk["w_u"] = dense((d, h * hd), d)
            blk["conv"] = dense((cfg.conv_width, h * hd), cfg.conv_width)
            blk["w_a"] = dense((d, h * hd), d)
            # Bias the decay gate towards remembering (sigmoid(2) ~ 0.88).
            blk["b_a"] = full((h * hd,), 2.0)
            blk["w_g"] = dense((d, h * hd), d)
            blk["w_o"] = dense((h * hd, d), h * hd)
        else:
            blk["wq"] = dense((d, h * hd), d)
            blk["wk"] = dense((d, kvh * hd), d)
            blk["wv"] = dense((d, kvh * hd), d)
            blk["wo"] = dense((h * hd, d), h * hd)
        blocks.append(blk)
    tree = {
        "embed": _Draw((cfg.vocab_size, d), 1.0),
        "blocks": blocks,
        "norm_f": np.ones((d,), np.float32),
        # A wide LM head spreads the logits, so greedy argmax rarely meets a near-tie.
        "lm_head": _Draw((d, cfg.vocab_size), 4.0 / np.sqrt(d)),
    }

    rng = np.random.default_rng(cfg.seed)

    def draw(x: Any) -> jax.Array:
        if isinstance(x, _Draw):
            x = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(x.scale)
        return jax.device_put(x.astype(dtype))  # a host cast: no kernel to compile

    return jax.tree.map(draw, tree, is_leaf=lambda x: isinstance(x, _Draw))


def state_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(conv_state_shape, temporal_state_shape)`` of one recurrent layer, for ``MambaPool``."""
    return (cfg.conv_width - 1, cfg.n_heads * cfg.head_dim), (cfg.n_heads, cfg.head_dim)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def _rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half form. ``x``: [B, T, H, D]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,
    kv: KVBuffers,
    layer: jax.Array,
    b: dict[str, jax.Array],
    rope: tuple[jax.Array, jax.Array],
    bias: jax.Array,
) -> tuple[jax.Array, KVBuffers]:
    bsz, t, _ = x.shape
    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = _rope((x @ p["wq"]).reshape(bsz, t, h, hd), *rope)
    k = _rope((x @ p["wk"]).reshape(bsz, t, kvh, hd), *rope)
    v = (x @ p["wv"]).reshape(bsz, t, kvh, hd)

    # Write first, then gather: the chunk's own keys come back through the pool, exactly as
    # a later request that hits this prefix will read them. Padding tokens write nothing.
    valid = jnp.arange(t)[None, :] < b["chunk_lens"][:, None]
    loc = scatter_rows(b["new_slots"].reshape(-1), kv.k.shape[1], valid.reshape(-1))
    kv = KVBuffers(
        kv.k.at[layer, loc].set(
            k.reshape(-1, kvh, hd).astype(kv.k.dtype), mode="drop", unique_indices=True
        ),
        kv.v.at[layer, loc].set(
            v.reshape(-1, kvh, hd).astype(kv.v.dtype), mode="drop", unique_indices=True
        ),
    )
    keys = kv.k[layer, b["kv_slots"]]  # [B, S, kvh, hd]: paged attention by gather
    vals = kv.v[layer, b["kv_slots"]]

    # Query heads grouped under their KV head, flattened into one batched matmul per KV head
    # ([B, kvh, g*T, hd] x [B, kvh, S, hd]): several times faster on CPU than a 5-D einsum.
    g = h // kvh
    qg = q.reshape(bsz, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(bsz, kvh, g * t, hd)
    keys = keys.transpose(0, 2, 1, 3)
    vals = vals.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, keys, preferred_element_type=jnp.float32)
    s = keys.shape[2]
    scores = scores.reshape(bsz, kvh, g, t, s) * (1.0 / np.sqrt(hd)) + bias[:, None, None]
    probs = jax.nn.softmax(scores.reshape(bsz, kvh, g * t, s), axis=-1).astype(vals.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vals, preferred_element_type=jnp.float32)
    out = out.reshape(bsz, kvh, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(bsz, t, h * hd)
    out = out.astype(x.dtype)
    return out @ p["wo"], kv


def _recurrence(
    cfg: ModelConfig,
    p: dict[str, jax.Array],
    x: jax.Array,
    state: MambaBuffers,
    layer: jax.Array,
    b: dict[str, jax.Array],
) -> tuple[jax.Array, MambaBuffers]:
    """Causal depthwise conv, then ``s_t = a_t * s_{t-1} + (1 - a_t) * u_t``, output gated.

    Each request's conv window and recurrent state are read from slot ``state_read`` (zero
    where ``state_fresh``) and written to slot ``state_slots``; padded tokens
    (``t >= chunk_lens``) leave both unchanged, so a prompt split into chunks ends in the
    same state as one pass, and padded rows (``chunk_lens == 0``) write nothing.
    """
    bsz, t, _ = x.shape
    h, hd, c = cfg.n_heads, cfg.head_dim, cfg.n_heads * cfg.head_dim
    width = cfg.conv_width
    slots, src, fresh = b["state_slots"], b["state_read"], b["state_fresh"][:, None, None]
    conv0 = jnp.where(fresh, 0.0, state.conv[layer, src].astype(jnp.float32))  # [B, W-1, C]
    s0 = jnp.where(fresh, 0.0, state.temporal[layer, src])  # [B, h, hd]

    u = (x @ p["w_u"]).astype(jnp.float32)  # [B, T, C]
    ext = jnp.concatenate([conv0, u], axis=1)  # [B, W-1+T, C]
    w = p["conv"].astype(jnp.float32)
    u = ext[:, :t] * w[0]
    for j in range(1, width):
        u = u + ext[:, j : j + t] * w[j]
    # The new conv window: the last W-1 inputs up to the row's last valid token.
    idx = b["chunk_lens"][:, None] + jnp.arange(width - 1)[None, :]
    conv_new = jnp.take_along_axis(ext, idx[:, :, None], axis=1)

    u = u.reshape(bsz, t, h, hd)
    a = jax.nn.sigmoid((x @ p["w_a"] + p["b_a"]).astype(jnp.float32)).reshape(bsz, t, h, hd)
    valid = jnp.arange(t)[None, :] < b["chunk_lens"][:, None]  # [B, T]

    def step(s: jax.Array, inp: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        u_t, a_t, ok = inp
        s = jnp.where(ok[:, None, None], a_t * s + (1.0 - a_t) * u_t, s)
        return s, s

    s_last, seq = jax.lax.scan(step, s0, (u.swapaxes(0, 1), a.swapaxes(0, 1), valid.swapaxes(0, 1)))
    seq = seq.swapaxes(0, 1).reshape(bsz, t, c)
    gate = jax.nn.silu((x @ p["w_g"]).astype(jnp.float32))
    y = (seq * gate).astype(x.dtype) @ p["w_o"]
    # Padded rows (no token) write nothing.
    rows = scatter_rows(slots, state.conv.shape[1], b["chunk_lens"] > 0)
    state = MambaBuffers(
        state.conv.at[layer, rows].set(
            conv_new.astype(state.conv.dtype), mode="drop", unique_indices=True
        ),
        state.temporal.at[layer, rows].set(s_last, mode="drop", unique_indices=True),
    )
    return y, state


def _extend(
    params: Params,
    kv: KVBuffers,
    swa_kv: KVBuffers | None,
    state: MambaBuffers | None,
    batch: dict[str, jax.Array],
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array, KVBuffers, KVBuffers | None, MambaBuffers | None]:
    pattern = cfg.pattern
    split = swa_kv is not None  # sliding-window layers keep their KV in a pool of their own
    n_swa = sum(k == "swa" for k in pattern) if split else 0
    n_kv = sum(k != "rec" for k in pattern) - n_swa
    n_rec = sum(k == "rec" for k in pattern)
    swa_batch = (
        dict(batch, new_slots=batch["swa_new_slots"], kv_slots=batch["swa_kv_slots"])
        if split
        else batch
    )
    rope = _rope_tables(batch["positions"], cfg.head_dim, cfg.rope_theta)
    # Additive masks [B, T, S], built once per step and shared by every layer of a kind.
    kv_pos = jnp.arange(batch["kv_slots"].shape[1], dtype=jnp.int32)[None, None, :]
    q_pos = batch["positions"][:, :, None]
    visible = kv_pos <= q_pos  # causal; slots past the request's length are masked too
    full_bias = jnp.where(visible, 0.0, _NEG_INF).astype(jnp.float32)
    swa_bias = jnp.where(visible & (kv_pos > q_pos - cfg.sliding_window), 0.0, _NEG_INF)
    x = params["embed"][batch["tokens"]]

    def group(carry: tuple[Any, ...], xs: tuple[Any, ...]) -> tuple[tuple[Any, ...], None]:
        x, kv, swa_kv, state = carry
        g, blocks = xs
        kv_i = swa_i = rec_i = 0
        for kind, p in zip(pattern, blocks, strict=True):
            hn = _rms_norm(x, p["norm1"], cfg.norm_eps)
            if kind == "rec":
                y, state = _recurrence(cfg, p, hn, state, g * n_rec + rec_i, batch)
                rec_i += 1
            elif kind == "swa" and split:
                layer = g * n_swa + swa_i
                y, swa_kv = _attention(cfg, p, hn, swa_kv, layer, swa_batch, rope, swa_bias)
                swa_i += 1
            else:
                bias = swa_bias if kind == "swa" else full_bias
                y, kv = _attention(cfg, p, hn, kv, g * n_kv + kv_i, batch, rope, bias)
                kv_i += 1
            x = x + y
            hn = _rms_norm(x, p["norm2"], cfg.norm_eps)
            x = x + (jax.nn.silu(hn @ p["w_gate"]) * (hn @ p["w_up"])) @ p["w_down"]
        return (x, kv, swa_kv, state), None

    groups = cfg.n_layers // len(pattern)
    (x, kv, swa_kv, state), _ = jax.lax.scan(
        group, (x, kv, swa_kv, state), (jnp.arange(groups, dtype=jnp.int32), params["blocks"])
    )
    last = jnp.take_along_axis(x, batch["last_idx"][:, None, None], axis=1)[:, 0]
    last = _rms_norm(last, params["norm_f"], cfg.norm_eps)
    logits = (last @ params["lm_head"]).astype(jnp.float32)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return next_tokens, logits, kv, swa_kv, state


_extend_jit = jax.jit(_extend, static_argnames=("cfg",), donate_argnames=("kv", "swa_kv", "state"))


def extend_step(
    params: Params,
    kv: KVBuffers,
    swa_kv: KVBuffers | None,
    state: MambaBuffers | None,
    batch: dict[str, jax.Array],
    cfg: ModelConfig,
) -> tuple[jax.Array, jax.Array, KVBuffers, KVBuffers | None, MambaBuffers | None]:
    """One chunked-prefill or decode step for a padded batch; jitted, buffers donated.

    ``batch`` (int32 unless noted; ``B``, ``T``, ``S`` are bucket sizes chosen by the caller,
    each distinct ``(B, T, S)`` compiles once):

    * ``tokens``, ``positions``, ``new_slots``: ``[B, T]``; the new tokens, their absolute
      positions and the KV slot each one is written to (padding: token 0, position 0,
      slot 0; a padded token, past its row's ``chunk_lens``, writes nothing). The real
      slots must be distinct: the scatter promises XLA unique indices.
    * ``kv_slots``: ``[B, S]``; the KV slot of every position ``0..S-1`` of the request,
      the new tokens included (padding: slot 0). Position ``j`` is visible to a query at
      position ``p`` iff ``j <= p`` (and, in ``swa`` layers, ``j > p - sliding_window``).
    * ``chunk_lens``, ``last_idx``, ``state_slots``: ``[B]``; new tokens per row, the index
      in ``T`` of the row's last new token (its logits are returned), and the row's slot in
      the state pool (padding rows: 0).
    * ``state_read``: ``[B]``; the state-pool slot the row's recurrence starts from (its own
      slot, or on a request's first step a cached prefix's saved state).
    * ``state_fresh``: ``[B]`` bool; the row starts from a zero state instead (a request's
      first chunk without a cached prefix).

    * ``swa_new_slots`` ``[B, T]``, ``swa_kv_slots`` ``[B, S]`` (only with ``swa_kv``): the
      same positions' slots in the sliding-window pool (0 where a token's SWA KV is gone).

    Returns ``(next_tokens [B] int32, logits [B, vocab] float32, kv, swa_kv, state)`` on
    the buffers' device; the inputs ``kv``, ``swa_kv`` and ``state`` are donated and must
    not be used again.
    """
    return _extend_jit(params, kv, swa_kv, state, batch, cfg=cfg)


def compile_count() -> int:
    """How many shapes :func:`extend_step` has compiled in this process (all configs)."""
    # A private method of jit's wrapper (missing from its type stubs); the tests pin it.
    return int(_extend_jit._cache_size())  # type: ignore[attr-defined]


__all__ = ["Params", "compile_count", "extend_step", "init_params", "state_shapes"]
