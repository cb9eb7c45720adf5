"""Attention entry point shared by every backend. (Interim dense version; replaced by the kernels work.)"""

from __future__ import annotations

import mlx.core as mx

from gemma_mlx.model.masks import allowed


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
    """Attention output (B, Hq, L, D) for q (B, Hq, L, D) over k, v (B, Hkv, S, D), masked by masks.allowed."""
    mask = allowed(q_pos, k_pos, window=window, q_block=q_block, k_block=k_block,
                   block_overrides_window=block_overrides_window)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    qf = q.astype(mx.float32).reshape(B, Hkv, group, L, D)
    kf = k.astype(mx.float32)[:, :, None]
    vf = v.astype(mx.float32)[:, :, None]
    scores = (qf * scale) @ kf.swapaxes(-1, -2)
    scores = mx.where(mask, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1, precise=True)
    # A query that sees no key (never happens for valid inputs) would give NaN; make it zero instead.
    probs = mx.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = probs @ vf
    return out.reshape(B, Hq, L, D).astype(q.dtype)
