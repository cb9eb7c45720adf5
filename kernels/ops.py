"""Attention entry point: one signature for every caller, memory-bounded at long context.

This is the pure-MLX reference path (statistics in float32). Short problems (decode, small prefill chunks)
take one dense pass; larger ones are processed in key blocks with an online softmax, so the scratch is
(queries × block) instead of (queries × context): a 512-token chunk over 256K keys needs a few hundred MB, not
the 8 GB of the full score matrix. Visibility always comes from gemma_mlx.model.masks.allowed.
"""

from __future__ import annotations

import os

import mlx.core as mx

from gemma_mlx.model.masks import allowed

# Above this many score entries (query heads × queries × keys) attention runs blockwise.
DENSE_LIMIT = int(os.environ.get("GEMMA_MLX_ATTENTION_DENSE_LIMIT", 1 << 24))
KEY_BLOCK = int(os.environ.get("GEMMA_MLX_ATTENTION_KEY_BLOCK", 4096))


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int | None = None,
    q_block: mx.array | None = None,
    k_block: mx.array | None = None,
    block_overrides_window: bool = False,
) -> mx.array:
    """Attention output (B, Hq, L, D) for q (B, Hq, L, D) over k, v (B, Hkv, S, D), masked by masks.allowed.

    Query head i uses KV head i // (Hq / Hkv). Keys with k_pos < 0 are empty slots. A query that sees no key
    gets zeros rather than NaN.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf = (q.astype(mx.float32) * scale).reshape(B, Hkv, group, L, D)
    rule = dict(window=window, q_block=q_block, block_overrides_window=block_overrides_window)
    if Hq * L * S <= DENSE_LIMIT:
        return _dense(qf, k, v, q_pos, k_pos, k_block, rule).reshape(B, Hq, L, -1).astype(q.dtype)
    return _blocked(qf, k, v, q_pos, k_pos, k_block, rule).reshape(B, Hq, L, -1).astype(q.dtype)


def _visible(q_pos, k_pos, k_block, rule) -> mx.array:
    return allowed(q_pos, k_pos, k_block=k_block, **rule)


def _dense(qf, k, v, q_pos, k_pos, k_block, rule) -> mx.array:
    mask = _visible(q_pos, k_pos, k_block, rule)
    scores = qf @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    scores = mx.where(mask, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1, precise=True)
    probs = mx.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    return probs @ v.astype(mx.float32)[:, :, None]


def _blocked(qf, k, v, q_pos, k_pos, k_block, rule) -> mx.array:
    """Online softmax over key blocks: running max m, normaliser l and weighted sum acc, all float32."""
    S = k.shape[2]
    shape = qf.shape[:-1] + (1,)
    m = mx.full(shape, -mx.inf, dtype=mx.float32)
    l = mx.zeros(shape, dtype=mx.float32)
    acc = mx.zeros(qf.shape[:-1] + (v.shape[-1],), dtype=mx.float32)
    for start in range(0, S, KEY_BLOCK):
        end = min(start + KEY_BLOCK, S)
        kb = k[:, :, start:end].astype(mx.float32)[:, :, None]
        vb = v[:, :, start:end].astype(mx.float32)[:, :, None]
        mask = _visible(q_pos, k_pos[start:end], None if k_block is None else k_block[start:end], rule)
        scores = mx.where(mask, qf @ kb.swapaxes(-1, -2), -mx.inf)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # Rows that have seen no visible key yet keep m = -inf; shift by 0 there so exp() stays finite.
        shift = mx.where(mx.isinf(m_new), 0.0, m_new)
        p = mx.exp(scores - shift)
        correction = mx.exp(mx.where(mx.isinf(m), -mx.inf, m - shift))
        l = l * correction + p.sum(axis=-1, keepdims=True)
        acc = acc * correction + p @ vb
        m = m_new
        mx.eval(m, l, acc)  # bound the graph (and the scratch) to one block at a time
    return mx.where(l > 0, acc / mx.maximum(l, 1e-30), 0.0)
