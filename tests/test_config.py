"""config.json parsing: both published spellings, Gemma 3, and errors that name the field."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from gemma_mlx.config import RopeSpec, load_config, parse_config
from gemma_mlx.errors import ConfigError
from gemma_mlx.tiny import gemma4_config

# The real 12B text config as Google published it (global_* keys, written by transformers 5.10.0.dev0).
PUBLISHED_12B = {
    "model_type": "gemma4_unified",
    "text_config": {
        "model_type": "gemma4_unified_text", "hidden_size": 3840, "num_hidden_layers": 48, "intermediate_size": 15360,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 8, "vocab_size": 262144,
        "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 262144, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
        "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    },
    "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840, "mm_posemb_size": 1120,
                      "output_proj_dims": 3840, "rms_norm_eps": 1e-6, "num_soft_tokens": 280},
    "audio_config": {"audio_embed_dim": 640, "rms_norm_eps": 1e-6},
    "image_token_id": 258880, "audio_token_id": 258881, "video_token_id": 258884, "boi_token_id": 255999,
    "eoi_token_id": 258882, "boa_token_id": 256000, "eoa_token_index": 258883, "eos_token_id": [1, 106],
}


def test_published_12b_config():
    cfg = parse_config(PUBLISHED_12B)
    layers = cfg.text.layers
    assert len(layers) == 48
    full = [i for i, s in enumerate(layers) if not s.is_sliding]
    assert full == [5, 11, 17, 23, 29, 35, 41, 47]
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in layers if s.is_sliding} == {(256, 8, False)}
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in layers if not s.is_sliding} == {(512, 1, True)}
    assert all(s.kv_source is None and s.intermediate_size == 15360 for s in layers)
    assert cfg.text.attention_scale == 1.0 and cfg.text.norm_offset == 0.0 and cfg.text.final_logit_softcapping == 30
    assert cfg.token_ids == dict(image=258880, audio=258881, video=258884, boi=255999, eoi=258882, boa=256000,
                                 eoa=258883)
    assert cfg.vision.patch_dim == 6912 and cfg.audio.samples_per_token == 640
    assert cfg.bidirectional_vision and cfg.eos_token_ids == (1, 106)


def test_per_layer_config_spelling_gives_the_same_layers():
    saved = copy.deepcopy(PUBLISHED_12B)
    t = saved["text_config"]
    del t["global_head_dim"], t["num_global_key_value_heads"]
    t["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 1}
                             for i, lt in enumerate(t["layer_types"]) if lt == "full_attention"}
    assert parse_config(saved).text.layers == parse_config(PUBLISHED_12B).text.layers


def test_proportional_rope_rotates_dims_0_63_and_256_319_only():
    inv = RopeSpec("proportional", 1e6, partial_rotary_factor=0.25).inv_freq(512)
    assert inv.shape == (256,)
    assert np.count_nonzero(inv) == 64 and np.all(inv[64:] == 0)
    assert inv[1] == pytest.approx(0.94746, rel=1e-4) and inv[63] == pytest.approx(0.033376, rel=1e-4)
    full = np.concatenate([inv, inv])  # cos/sin tables are [f, f]: dim j pairs with j + 256
    assert set(np.flatnonzero(full)) == set(range(64)) | set(range(256, 320))


def test_missing_fields_are_not_filled_from_other_gemma_sizes():
    cfg = copy.deepcopy(PUBLISHED_12B)
    del cfg["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="text_config.hidden_size"):
        parse_config(cfg)
    cfg = copy.deepcopy(PUBLISHED_12B)
    del cfg["text_config"]["layer_types"]
    with pytest.raises(ConfigError, match="layer_types"):
        parse_config(cfg)
    cfg = copy.deepcopy(PUBLISHED_12B)
    del cfg["image_token_id"]
    with pytest.raises(ConfigError, match="image_token_id"):
        parse_config(cfg)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(model_type="llama"), "unsupported model_type 'llama'"),
    (lambda c: c["text_config"].update(num_attention_heads=12), "not a multiple"),
    (lambda c: c["text_config"].update(layer_types=["sliding_attention"] * 3), "3 entries"),
    (lambda c: c["text_config"].update(hidden_size_per_layer_input=256), "per-layer embeddings"),
    (lambda c: c["text_config"].update(num_kv_shared_layers=48), "num_kv_shared_layers"),
    (lambda c: c.update(image_token_id=300000), "outside the vocabulary"),
    (lambda c: c["text_config"].update(hidden_size=-1), r"text_config.hidden_size=-1 is outside \[1, "),
    (lambda c: c["text_config"]["rope_parameters"]["full_attention"].update(rope_type="yarn"), "rope_type"),
])
def test_inconsistent_configs_name_the_problem(mutate, match):
    cfg = copy.deepcopy(PUBLISHED_12B)
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        cfg_obj = parse_config(cfg)
        for layer in cfg_obj.text.layers:  # RoPE tables are built per layer
            layer.rope.inv_freq(layer.head_dim)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_gemma3_published_style_config():
    cfg = parse_config({
        "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "intermediate_size": 2048,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
        "sliding_window_pattern": 6, "vocab_size": 262144, "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "rope_scaling": None, "max_position_embeddings": 32768,
    })
    assert [s.layer_type for s in cfg.text.layers][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg.text.norm_offset == 1.0 and cfg.text.attention_scale == pytest.approx(1 / 16)
    assert cfg.text.layers[5].rope.theta == 1e6 and cfg.text.layers[0].rope.theta == 1e4
    assert cfg.vision is None and cfg.audio is None


def test_tiny_config_is_what_transformers_writes(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Gemma4UnifiedConfig

    ours = gemma4_config()
    theirs = Gemma4UnifiedConfig(**json.loads(json.dumps(ours)))
    assert parse_config(theirs.to_dict()).text.layers == parse_config(ours).text.layers
