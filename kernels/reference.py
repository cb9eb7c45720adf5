"""Pure-MLX reference path for every op (the CPU path, and what the kernels are checked against).

Statistics are float32 whatever the input dtype. Attention is memory-bounded at long context: short problems
(one decode step over a short cache, a small chunk) take one dense pass; anything with more than ``key_block``
keys or ``dense_limit`` score entries runs over key blocks with an online softmax, so the scratch is
(queries × block) plus one float32 block of K and V, independent of the context length. A 512-token chunk over
256K keys needs a few hundred MB, not the 8 GB of the full score matrix nor a float32 copy of the whole cache.
Visibility always comes from gemma_mlx.model.masks.allowed. Positions and block ids may be per row ((B, L) and
(B, S)) or shared ((L,) and (S,)); a per-row mask (B, L, S) is broadcast over the heads, a shared one (L, S) over
the batch too.

K and V may be stored quantized (gemma_mlx.cache.QuantizedKV, from a quantized cache): the dense pass (short by
construction) dequantizes them whole, the blocked pass one key block at a time inside its loop, so the float
scratch stays one block of K and V whatever the context length.
"""

from __future__ import annotations

import mlx.core as mx

from gemma_mlx.cache import dequantized
from gemma_mlx.model.masks import allowed


def _float32(x) -> mx.array:
    """Keys or values (float, or a QuantizedKV dequantized here) as float32."""
    return dequantized(x).astype(mx.float32)


def attention(q, k, v, *, scale, q_pos, k_pos, window=None, q_block=None, k_block=None,
              block_overrides_window=False, dense_limit: int, key_block: int) -> mx.array:
    """Attention output (B, Hq, L, D) in q's dtype: ops.attention's contract, dense or over key blocks."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf = (q.astype(mx.float32) * scale).reshape(B, Hkv, group, L, D)
    rule = dict(window=window, q_block=q_block, block_overrides_window=block_overrides_window)
    if Hq * L * S <= dense_limit and S <= key_block:
        out = _dense(qf, k, v, q_pos, k_pos, k_block, rule)
    else:
        out = _blocked(qf, k, v, q_pos, k_pos, k_block, rule, key_block)
    return out.reshape(B, Hq, L, -1).astype(q.dtype)


def _scores(qf, kb) -> mx.array:
    """(B, Hkv, G, L, D) queries against (B, Hkv, S, D) keys -> (B, Hkv, G, L, S) scores.

    The G query heads of a KV head are stacked as rows of one product: a broadcast over G would make MLX's CPU
    matmul copy the keys once per head (10x slower at 16 heads on one KV head).
    """
    B, H, G, L, D = qf.shape
    return (qf.reshape(B, H, G * L, D) @ kb.swapaxes(-1, -2)).reshape(B, H, G, L, -1)


def _weighted_values(probs, vb) -> mx.array:
    """(B, Hkv, G, L, S) weights times (B, Hkv, S, D) values -> (B, Hkv, G, L, D), stacked like _scores."""
    B, H, G, L, S = probs.shape
    return (probs.reshape(B, H, G * L, S) @ vb).reshape(B, H, G, L, -1)


def _over_heads(mask: mx.array) -> mx.array:
    """allowed's (L, S) mask as it is, or its per-row (B, L, S) mask as (B, 1, 1, L, S) against (B, Hkv, G, L, S)."""
    return mask if mask.ndim == 2 else mask[:, None, None]


def _dense(qf, k, v, q_pos, k_pos, k_block, rule) -> mx.array:
    mask = _over_heads(allowed(q_pos, k_pos, k_block=k_block, **rule))
    scores = mx.where(mask, _scores(qf, _float32(k)), -mx.inf)
    probs = mx.softmax(scores, axis=-1, precise=True)
    probs = mx.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    return _weighted_values(probs, _float32(v))


def _blocked(qf, k, v, q_pos, k_pos, k_block, rule, key_block) -> mx.array:
    """Online softmax over key blocks: running max m, normaliser l and weighted sum acc, all float32."""
    S = k.shape[2]
    shape = qf.shape[:-1] + (1,)
    m = mx.full(shape, -mx.inf, dtype=mx.float32)
    l = mx.zeros(shape, dtype=mx.float32)
    acc = mx.zeros(qf.shape[:-1] + (v.shape[-1],), dtype=mx.float32)
    for start in range(0, S, key_block):
        end = min(start + key_block, S)
        kb = _float32(k[:, :, start:end])  # a quantized cache is dequantized here, one block at a time
        vb = _float32(v[:, :, start:end])
        mask = _over_heads(allowed(q_pos, k_pos[..., start:end],
                                   k_block=None if k_block is None else k_block[..., start:end], **rule))
        scores = mx.where(mask, _scores(qf, kb), -mx.inf)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # Rows that have seen no visible key yet keep m = -inf; shift by 0 there so exp() stays finite.
        shift = mx.where(mx.isinf(m_new), 0.0, m_new)
        p = mx.exp(scores - shift)
        correction = mx.exp(mx.where(mx.isinf(m), -mx.inf, m - shift))
        l = l * correction + p.sum(axis=-1, keepdims=True)
        acc = acc * correction + _weighted_values(p, vb)
        m = m_new
        mx.eval(m, l, acc)  # bound the graph (and the scratch) to one block at a time
    return mx.where(l > 0, acc / mx.maximum(l, 1e-30), 0.0)


def layer_norm_f32(x: mx.array, w: mx.array, b: mx.array, eps: float) -> mx.array:
    """LayerNorm with float32 statistics (mx.fast.layer_norm on bfloat16 input is less accurate on the CPU)."""
    f32 = mx.float32
    return mx.fast.layer_norm(x.astype(f32), w.astype(f32), b.astype(f32), eps)


def patch_embed(patches, ln1_w, ln1_b, dense_w, dense_b, ln2_w, ln2_b, eps=1e-5) -> mx.array:
    """LayerNorm(6912) -> x @ W.T + b -> LayerNorm(3840), in the dense weight's dtype (the compute dtype).

    Rounding points follow transformers: pixels are cast to the weight dtype first, each LayerNorm output is
    rounded to it, and the product with its bias is one addmm in it.
    """
    dtype = dense_w.dtype
    h = layer_norm_f32(patches.astype(dtype), ln1_w, ln1_b, eps).astype(dtype)
    h = mx.addmm(dense_b.astype(dtype), h, dense_w.T)
    return layer_norm_f32(h, ln2_w, ln2_b, eps).astype(dtype)
