"""Tiny random checkpoints built and saved by transformers itself (the real on-disk layout).

Norm weights, biases, layer scalars and the position table are randomised so that no convention
(w vs 1 + w, a forgotten bias, a missing layer scalar) can hide behind an initial value of 0 or 1.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Small vocabulary with the multimodal ids placed inside it; chat specials keep Gemma's real ids (< 107).
TOKENS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503,
              boa_token_id=504, eoa_token_index=505, audio_token_id=506)
VOCAB = 512

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
            attention_k_eq_v=True, sliding_window=8, final_logit_softcapping=30.0,
            layer_types=["sliding_attention"] * 5 + ["full_attention"], initializer_range=0.1)
VISION = dict(mm_embed_dim=64, mm_posemb_size=64, output_proj_dims=64)


def gemma4_config(text: dict | None = None, vision: bool = True, audio: bool = True):
    from transformers import Gemma4UnifiedConfig

    t = copy.deepcopy(TEXT)
    t.update(text or {})
    return Gemma4UnifiedConfig(text_config=t, vision_config=dict(VISION) if vision else None,
                               audio_config={} if audio else None, initializer_range=0.1, **TOKENS)


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "pos_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))


def build_gemma4(path: Path, seed: int = 0, **kw):
    """Save a random tiny Gemma4UnifiedForConditionalGeneration to path; return the (eager, fp32) torch model."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(gemma4_config(**kw)).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    model.config._attn_implementation = "eager"
    return model


def build_gemma3(path: Path, seed: int = 0, query_pre_attn_scalar: int = 24):
    """Save a random tiny Gemma3ForCausalLM (gemma3_text) to path; return the torch model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           query_pre_attn_scalar=query_pre_attn_scalar,
                           rope_scaling={"rope_type": "linear", "factor": 4.0},
                           final_logit_softcapping=None, initializer_range=0.1)
    model = Gemma3ForCausalLM(cfg).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    model.config._attn_implementation = "eager"
    return model
