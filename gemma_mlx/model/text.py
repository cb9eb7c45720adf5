"""The Gemma 4 (and Gemma 3) text decoder in MLX.

Module and parameter names mirror the checkpoint's on-disk names under ``model.language_model``, so a
Hugging Face checkpoint loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import LayerSpec, TextConfig, embed_scale
from ..kernels import ops
from . import masks


class RMSNorm(nn.Module):
    """RMSNorm with an optional learned scale; Gemma 4 multiplies by w, Gemma 3 by (1 + w) (``offset``)."""

    def __init__(self, dims: int, eps: float, with_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.with_scale = with_scale
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        if not self.with_scale:
            return mx.fast.rms_norm(x, None, self.eps)
        weight = self.weight + self.offset if self.offset else self.weight
        return mx.fast.rms_norm(x, weight, self.eps)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """HF "rotate_half" RoPE: dim j pairs with dim j + D/2; cos/sin are (B, L, D) per row for x of (B, L, H, D)."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclass(frozen=True)
class Step:
    """What every layer needs to know about the tokens of one forward call.

    Every row has its own positions (a batch of sequences at different depths). They are built afresh for each
    call from the host-side offsets and never aliased by a cache, so no layer or cache can move another's.
    """

    positions: mx.array  # (B, L) int32 absolute positions, row by row
    offsets: tuple[int, ...]  # (B,) absolute position of each row's first token
    blocks: mx.array | None  # (L,) int32 vision block ids, or None when no token is in a vision block
    vision_mask: str
    rope: dict  # (layer_type, head_dim) -> (cos, sin), each (B, L, D)

    @property
    def offset(self) -> int:
        """The first token's position when every row starts at the same one (vision blocks need it)."""
        if len(set(self.offsets)) != 1:
            raise ValueError("rows start at different positions: no single offset")
        return self.offsets[0]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.n_heads = cfg.num_attention_heads
        self.n_kv = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = cfg.attention_scale
        self.window = cfg.sliding_window
        self.use_v_norm = cfg.use_v_norm
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=cfg.norm_offset)
        if spec.kv_source is None:
            self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=cfg.norm_offset)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)

    def __call__(self, x: mx.array, step: Step, cache, shared: dict, layer_idx: int) -> mx.array:
        B, L, _ = x.shape
        cos, sin = step.rope[(self.spec.layer_type, self.head_dim)]
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        q = rotate(q, cos, sin).transpose(0, 2, 1, 3)

        if self.spec.kv_source is None:
            k = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim)
            # k_eq_v: V is the same pre-norm projection as K (no v_proj), normalised without scale or RoPE.
            v = k if self.spec.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim)
            k = rotate(self.k_norm(k), cos, sin).transpose(0, 2, 1, 3)
            if self.use_v_norm:
                v = mx.fast.rms_norm(v, None, self.k_norm.eps)
            v = v.transpose(0, 2, 1, 3)
            if cache is not None:
                keys, values, k_pos = cache.update(k, v)
            else:  # no cache: the chunk attends over itself
                keys, values = k, v
                k_pos = step.positions[0] if len(set(step.offsets)) == 1 else step.positions
            shared[layer_idx] = (keys, values, k_pos)
        else:
            keys, values, k_pos = shared[self.spec.kv_source]

        window, use_blocks, overrides = masks.layer_attention_options(
            self.spec.layer_type, self.window, step.vision_mask, step.blocks is not None)
        window = window if self.spec.is_sliding else None
        q_block = step.blocks if use_blocks else None
        if k_pos.ndim == 1:
            # One sequence's caches (or none): every row at the same positions over the same key slots.
            q_pos = step.positions[0]
            k_block = masks.key_blocks(k_pos, step.offset, q_block) if use_blocks else None
            out = ops.attention(q, keys, values, scale=self.scale, q_pos=q_pos, k_pos=k_pos, window=window,
                                q_block=q_block, k_block=k_block, block_overrides_window=overrides)
        else:
            out = _attend_rows(q, keys, values, step, k_pos, scale=self.scale, window=window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _attend_rows(q, keys, values, step: Step, k_pos: mx.array, *, scale: float, window: int | None) -> mx.array:
    """Attention (B, Hq, L, D) for rows at their own positions (B, L) over their own keys k_pos (B, S): one call.

    Batched decode carries no media, so no vision blocks. The buffers are read only as far as the longest row's
    last valid key; shorter rows see their padding as empty slots (-1).
    """
    if step.blocks is not None:
        raise ValueError("vision blocks need every row at the same positions (prefill runs one sequence)")
    used = np.flatnonzero(np.asarray(mx.any(k_pos >= 0, axis=0)))
    end = int(used[-1]) + 1 if len(used) else 1
    return ops.attention(q, keys[:, :, :end], values[:, :, :end], scale=scale, q_pos=step.positions,
                         k_pos=k_pos[:, :end], window=window)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(cfg.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset=off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset=off)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=off)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=off)
        self.use_layer_scalar = cfg.use_layer_scalar
        if cfg.use_layer_scalar:
            self.layer_scalar = mx.ones((1,))

    def __call__(self, x, step: Step, cache, shared: dict, layer_idx: int) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), step, cache, shared, layer_idx)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        x = x + self.post_feedforward_layernorm(h)
        if self.use_layer_scalar:
            # Scales the whole residual stream, not just the branch (JAX `skip_scale`).
            x = x * self.layer_scalar
        return x


def _checkpointed(layer: DecoderLayer, h: mx.array, step: Step, shared: dict, i: int) -> mx.array:
    """layer(h, ...) whose activations are recomputed in the backward pass (mx.checkpoint); the trainable
    parameters go in as inputs so their gradients flow through the recomputation."""
    def forward(params, x):
        layer.update(params)
        return layer(x, step, None, shared, i)

    return mx.checkpoint(forward)(layer.trainable_parameters(), h)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)
        self._inv_freq = {
            (spec.layer_type, spec.head_dim): mx.array(spec.rope.inv_freq(spec.head_dim)) for spec in cfg.layers
        }
        self._embed_scale = embed_scale(cfg.hidden_size)
        # Layers whose K/V later layers read (KV sharing): their forward has a side output, so it is never
        # recomputed by gradient checkpointing.
        self._kv_producers = {spec.kv_source for spec in cfg.layers if spec.kv_source is not None}

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings times √hidden (the scale is cast to the table's dtype first, as in transformers)."""
        h = self.embed_tokens(ids)
        return h * mx.array(self._embed_scale, dtype=h.dtype)

    def rope_tables(self, positions: mx.array, dtype) -> dict:
        """(cos, sin) (B, L, D) per (layer type, head dim) for positions (B, L), in float32 cast to dtype."""
        tables = {}
        pos = positions.astype(mx.float32)[..., None]
        for key, inv_freq in self._inv_freq.items():
            freqs = pos * inv_freq
            emb = mx.concatenate([freqs, freqs], axis=-1)
            tables[key] = (mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype))
        return tables

    def __call__(self, h: mx.array, *, cache=None, offset=0, blocks: mx.array | None = None,
                 vision_mask: str = masks.VISION_BIDIRECTIONAL_SLIDING, checkpoint: bool = False) -> mx.array:
        """Final-norm hidden states (B, L, H) for input embeddings h (B, L, H), row b at positions offset[b]..

        offset is one int for every row or one per row (a batch of sequences at different depths). checkpoint
        (training, no cache): each layer's activations are recomputed in the backward pass instead of kept.
        """
        B, L = h.shape[:2]
        offsets = np.broadcast_to(np.asarray(offset, dtype=np.int64).reshape(-1), (B,))
        positions = mx.array((offsets[:, None] + np.arange(L)).astype(np.int32))
        step = Step(positions=positions, offsets=tuple(int(o) for o in offsets), blocks=blocks,
                    vision_mask=vision_mask, rope=self.rope_tables(positions, h.dtype))
        shared: dict = {}
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if checkpoint and layer_cache is None and i not in self._kv_producers:
                h = _checkpointed(layer, h, step, shared, i)
            else:
                h = layer(h, step, layer_cache, shared, i)
        return self.norm(h)

    def logits(self, h: mx.array, head: nn.Module | None = None) -> mx.array:
        """Soft-capped logits from final hidden states (the tied embedding unless a separate head is given)."""
        out = head(h) if head is not None else self.embed_tokens.as_linear(h)
        cap = self.config.final_logit_softcapping
        if cap:
            out = mx.tanh(out / cap) * cap
        return out
