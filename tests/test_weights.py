"""Loading checkpoints: layouts, lazy loading, and errors that name the tensor or file."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.errors import WeightsError
from gemma_mlx.tiny import gemma4_config, write_random_checkpoint
from gemma_mlx.weights import load_model, read_safetensors_header


@pytest.fixture()
def ckpt(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def ids():
    return mx.array([[5, 17, 300, 42, 9, 11, 200, 7, 8, 99, 100, 3]])


def test_sharded_checkpoint_with_index_and_stray_lm_head(ckpt):
    base, _ = load_model(ckpt)
    ref = np.array(base(ids()))
    weights = mx.load(str(ckpt / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    (ckpt / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        part = {k: weights[k] for k in keys}
        if fname.startswith("model-00002"):
            part["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]  # tied: must be ignored
        mx.save_safetensors(str(ckpt / fname), part, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_model(ckpt)
    assert np.array_equal(np.array(model(ids())), ref)


def test_mlx_vlm_layout_names_load(ckpt):
    base, _ = load_model(ckpt)
    weights = mx.load(str(ckpt / "model.safetensors"))
    renamed = {}
    for k, v in weights.items():
        k = k[len("model."):]
        if k.startswith("language_model."):
            k = "language_model.model." + k[len("language_model."):]
        renamed[k] = v
    mx.save_safetensors(str(ckpt / "model.safetensors"), renamed)
    model, _ = load_model(ckpt)
    assert np.array_equal(np.array(model(ids())), np.array(base(ids())))


def test_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match="missing: model-00002-of-00002.safetensors"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_model(ckpt)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(WeightsError, match="truncated or not a safetensors"):
        read_safetensors_header(path)
    path.write_bytes((12).to_bytes(8, "little") + b"not json!!!!" + b"\0" * 16)
    with pytest.raises(WeightsError, match="not JSON"):
        load_model(ckpt)


def test_missing_and_misshapen_tensors_are_named(ckpt):
    weights = mx.load(str(ckpt / "model.safetensors"))
    name = "model.language_model.layers.3.self_attn.k_norm.weight"
    broken = dict(weights)
    del broken[name]
    mx.save_safetensors(str(ckpt / "model.safetensors"), broken)
    with pytest.raises(WeightsError, match=f"missing tensor.*{name}"):
        load_model(ckpt)
    broken = dict(weights)
    broken[name] = mx.zeros((7,))
    mx.save_safetensors(str(ckpt / "model.safetensors"), broken)
    with pytest.raises(WeightsError, match=rf"{name} has shape \[7\]"):
        load_model(ckpt)
    broken = dict(weights)
    broken["model.language_model.layers.5.self_attn.v_proj.weight"] = mx.zeros((32, 64))  # k_eq_v layer
    mx.save_safetensors(str(ckpt / "model.safetensors"), broken)
    with pytest.raises(WeightsError, match="does not describe: model.language_model.layers.5.self_attn.v_proj"):
        load_model(ckpt)


def test_config_weights_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"mlp\.\w+_proj\.weight has shape \[(128, 64|64, 128)\], the config implies"):
        load_model(ckpt)


def test_not_a_model(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "config.json").write_text(json.dumps(gemma4_config()))
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        load_model("google/gemma-4-12B-it")


def test_numpy_built_tiny_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import Gemma4UnifiedForConditionalGeneration

    path = write_random_checkpoint(tmp_path / "tiny", gemma4_config(sliding_window=4), seed=3)
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    tokens = [[2, 105, 9, 400, 33, 41, 17, 8, 300, 55, 12, 6]]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens)).logits[0].numpy()
    model, _ = load_model(path)
    assert np.abs(np.array(model(mx.array(tokens))[0]) - ref).max() < 1e-4


def test_weights_are_cast_to_the_compute_dtype(ckpt):
    model, _ = load_model(ckpt, dtype="bfloat16")
    assert model.model.vision_embedder.patch_dense.weight.dtype == mx.bfloat16
    model, _ = load_model(ckpt)
    assert model.model.language_model.layers[0].layer_scalar.dtype == mx.float32
