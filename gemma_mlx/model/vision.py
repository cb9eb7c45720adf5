"""The encoder-free front ends: raw 48×48 patches and raw 640-sample audio frames projected into the LM.

Module names mirror the checkpoint: ``model.vision_embedder.*``, ``model.embed_vision.embedding_projection``
and ``model.embed_audio.embedding_projection``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import AudioConfig, VisionConfig
from ..kernels import ops

# torch.nn.LayerNorm's default; the vision LayerNorms do not use the config's RMSNorm eps.
LAYER_NORM_EPS = 1e-5


def linear_dtype(layer: nn.Module):
    """The floating dtype a (possibly quantized, possibly adapted) Linear computes in."""
    layer = getattr(layer, "base", layer)  # a LoRA adapter computes in its base layer's dtype
    return layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype


class VisionEmbedder(nn.Module):
    """Patch pixels (N, 6912) and (x, y) positions (N, 2) -> embeddings (N, mm_embed_dim) before projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(cfg.patch_dim, dim, bias=True)
        self.patch_ln2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((cfg.mm_posemb_size, 2, dim))
        self.pos_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        dense = self.patch_dense
        if type(dense) is not nn.Linear:
            # Only the "all" recipe quantizes the front end (its product is MLX's quantized matmul); a LoRA
            # adapter on it (fine-tuning with --train-media) is a module call too.
            h = self.patch_ln2(dense(self.patch_ln1(patches.astype(linear_dtype(dense)))))
        else:
            h = ops.patch_embed(patches, self.patch_ln1.weight, self.patch_ln1.bias, dense.weight, dense.bias,
                                self.patch_ln2.weight, self.patch_ln2.bias, eps=LAYER_NORM_EPS)
        # Factorized position embedding: column x looks up table[:, 0], row y table[:, 1]; -1 means none.
        valid = (positions >= 0).astype(h.dtype)[..., None]
        clamped = mx.maximum(positions, 0)
        pos = (self.pos_embedding[clamped[:, 0], 0] * valid[:, 0]
               + self.pos_embedding[clamped[:, 1], 1] * valid[:, 1])
        return self.pos_norm(h + pos)


class MultimodalProjector(nn.Module):
    """Scale-free RMSNorm then a bias-free Linear into the text hidden size."""

    def __init__(self, in_dims: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dims, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(linear_dtype(self.embedding_projection))
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


def make_vision_projector(cfg: VisionConfig, hidden_size: int) -> MultimodalProjector:
    return MultimodalProjector(cfg.output_proj_dims, hidden_size, cfg.rms_norm_eps)


def make_audio_projector(cfg: AudioConfig, hidden_size: int) -> MultimodalProjector:
    return MultimodalProjector(cfg.audio_embed_dim, hidden_size, cfg.rms_norm_eps)
