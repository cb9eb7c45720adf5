"""Random-weight gemma4_unified checkpoints in the real Hugging Face layout, written without torch.

Used by the offline demo/chat (a tiny model that exercises every modality but speaks gibberish) and by the
benchmarks (the real 12B layer shapes with few layers). The tensor list comes from our own model definition
(whose names are the on-disk names), and the config is written the way transformers 5.23 saves it, so the
result also loads in transformers (tests check that).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import parse_config

# Multimodal special ids of the tiny vocabulary (the real model's live above 255999). Chat specials keep
# Gemma's real ids, which are all below 107.
TINY_TOKEN_IDS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503,
                      boa_token_id=504, eoa_token_index=505, audio_token_id=506)


def gemma4_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                  num_hidden_layers: int = 6, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                  head_dim: int = 16, global_head_dim: int = 32, num_global_key_value_heads: int = 1,
                  sliding_window: int = 16, layer_types: list[str] | None = None, mm_embed_dim: int | None = None,
                  mm_posemb_size: int = 64, token_ids: dict | None = None, vision: bool = True,
                  audio: bool = True, dtype: str = "float32") -> dict:
    """A config.json dict for gemma4_unified with the given sizes (per_layer_config form, as 5.23 saves)."""
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                       for i in range(num_hidden_layers)]
        layer_types[-1] = "full_attention"
    per_layer = {str(i): {"head_dim": global_head_dim, "num_key_value_heads": num_global_key_value_heads}
                 for i, t in enumerate(layer_types) if t == "full_attention"}
    text = {
        "model_type": "gemma4_unified_text", "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim, "per_layer_config": per_layer, "attention_k_eq_v": True,
        "sliding_window": sliding_window, "layer_types": layer_types, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "tie_word_embeddings": True, "use_bidirectional_attention": "vision", "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    }
    cfg = {
        "architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
        "text_config": text, "tie_word_embeddings": True, "dtype": dtype, "eos_token_id": [1, 106],
        **(token_ids if token_ids is not None else TINY_TOKEN_IDS),
    }
    dim = mm_embed_dim or hidden_size
    if vision:
        cfg["vision_config"] = {"model_type": "gemma4_unified_vision", "patch_size": 16, "pooling_kernel_size": 3,
                                "mm_embed_dim": dim, "mm_posemb_size": mm_posemb_size, "output_proj_dims": dim,
                                "rms_norm_eps": 1e-6}
    if audio:
        cfg["audio_config"] = {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640, "rms_norm_eps": 1e-6}
    return cfg


def random_weights(config: dict, seed: int = 0, dtype=mx.float32, std: float = 0.1) -> dict[str, mx.array]:
    """Random tensors for every parameter the config implies, under the on-disk names.

    Norm scales sit around 1 (± 0.3), layer scalars in 0.6-1.4, biases around 0: every convention is exercised.
    """
    from .model.multimodal import Model

    shapes = {name: p.shape for name, p in tree_flatten(Model(parse_config(config)).parameters())}
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        if "norm" in name or "_ln" in name:
            value = 1.0 + 0.3 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("layer_scalar"):
            value = rng.uniform(0.6, 1.4, size=shape).astype(np.float32)
        elif name.endswith("bias"):
            value = 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            value = std * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = mx.array(value).astype(dtype)
    return weights


def write_random_checkpoint(out_dir: str | Path, config: dict, *, seed: int = 0, dtype=mx.float32) -> Path:
    """Write config.json, generation_config.json and model.safetensors of a random model; return the dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = random_weights(config, seed=seed, dtype=dtype)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50], "do_sample": True,
                  "temperature": 1.0, "top_k": 64, "top_p": 0.95}
    ids = {k: config[k] for k in ("eoi_token_id", "eoa_token_index") if k in config}
    if ids:
        generation["suppress_tokens"] = sorted(ids.values())
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


# Token strings of the multimodal specials, by config key.
MEDIA_TOKEN_STRINGS = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                       "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
                       "audio_token_id": "<|audio|>"}


def write_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A complete tiny random model directory: weights, config, byte tokenizer and the real chat template."""
    from importlib.resources import files

    from .tokenizer import write_byte_tokenizer

    config = gemma4_config()
    out = write_random_checkpoint(out_dir, config, seed=seed)
    media = {MEDIA_TOKEN_STRINGS[k]: v for k, v in config.items() if k in MEDIA_TOKEN_STRINGS}
    write_byte_tokenizer(out, media, config["text_config"]["vocab_size"])
    template = files("gemma_mlx").joinpath("assets/chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(template)
    (out / "README.md").write_text("# Random tiny gemma4_unified model\n\nRandom weights: it exercises every "
                                   "code path (text, image, audio, video) and speaks gibberish.\n")
    return out
