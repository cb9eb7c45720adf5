"""Conversion: exact round trips, derived quantization bounds, interop, atomicity and every error path."""

from __future__ import annotations

import copy
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.convert import convert
from gemma_mlx.errors import ConvertError
from gemma_mlx.weights import load_model

IDS = np.random.RandomState(0).randint(5, 400, (1, 40)).astype(np.int32)


def logits(path, **kw):
    model, _ = load_model(path, **kw)
    return np.array(model(mx.array(IDS)))


def hf_logits(hf):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(IDS.astype(np.int64))).logits.float().numpy()


def test_float32_output_gives_the_reference_logits(tiny_gemma4, tmp_path):
    hf, src = tiny_gemma4
    summary = convert(src, tmp_path / "f32", bits=None, dtype="float32", progress=False)
    assert np.abs(logits(tmp_path / "f32") - hf_logits(hf)).max() < 1e-4
    assert summary.tensors == 96 and summary.bits_per_weight == pytest.approx(32, rel=0.01)


def test_bfloat16_output_gives_the_reference_logits_of_bf16_rounded_weights(tiny_gemma4, tmp_path):
    hf, src = tiny_gemma4
    convert(src, tmp_path / "bf16", bits=None, dtype="bfloat16", progress=False)
    rounded = copy.deepcopy(hf)
    with torch.no_grad():  # round what the checkpoint stores (parameters, layer scalars), not the RoPE tables
        for t in list(rounded.parameters()) + [b for n, b in rounded.named_buffers() if n.endswith("layer_scalar")]:
            t.copy_(t.to(torch.bfloat16).to(torch.float32))
    assert np.abs(logits(tmp_path / "bf16") - hf_logits(rounded)).max() < 1e-4


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 64), (4, 32)])
def test_quantized_weights_stay_within_half_a_step_of_the_source(tiny_gemma4, tmp_path, bits, group_size):
    """Affine quantization rounds each weight to the nearest of 2^bits levels spanning its group's range:
    half a step, step = (max - min) / (2^bits - 1). MLX's scheme then pins the group's larger-magnitude edge
    exactly by rescaling the step, which can move the far end by up to another half step: |w_q - w| <= one step
    per group. Scale, bias and the dequantized value are bf16
    (8 significant bits): rounding each adds at most 2^-9 of |q·scale| <= span, of |bias| <= max|w| and of
    |w_q| <= max|w| + span, and the bf16 product and sum in dequantize round twice more; 2^-7·(span + max|w|)
    covers all five. That bound is checked on every element of every quantized matrix."""
    _, src = tiny_gemma4
    out = tmp_path / f"q{bits}"
    convert(src, out, bits=bits, group_size=group_size, recipe="uniform", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    source = mx.load(str(src / "model.safetensors"))
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    checked = 0
    for name, w in source.items():
        qname = name.replace("model.language_model.", "language_model.model.")[: -len(".weight")]
        if f"{qname}.scales" not in weights:
            continue
        deq = mx.dequantize(weights[f"{qname}.weight"], weights[f"{qname}.scales"], weights[f"{qname}.biases"],
                            group_size, bits)
        w32 = np.array(w.astype(mx.bfloat16).astype(mx.float32)).reshape(-1, group_size)
        span = w32.max(-1, keepdims=True) - w32.min(-1, keepdims=True)
        bound = span / (2**bits - 1) + 2**-7 * (span + np.abs(w32).max(-1, keepdims=True))
        err = np.abs(np.array(deq.astype(mx.float32)).reshape(-1, group_size) - w32)
        assert (err <= bound + 1e-6).all(), name
        checked += 1
    assert checked == 6 * 7 - 1 + 1  # every decoder Linear (no v_proj on the full layer) + the embedding
    assert "vision_embedder.patch_dense.weight" in weights  # the multimodal front end stays in float


def test_quantized_models_track_the_reference(tiny_gemma4, tmp_path):
    """End to end on this (chaotic, random) tiny model: KL to the float32 logits grows with coarser bits."""
    hf, src = tiny_gemma4
    ref = hf_logits(hf)

    def kl(q):
        lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
        return float((np.exp(lp) * (lp - lq)).sum(-1).mean())

    kls = {}
    for bits in (8, 4):
        convert(src, tmp_path / str(bits), bits=bits, recipe="uniform", progress=False)
        kls[bits] = kl(logits(tmp_path / str(bits)))
    assert kls[8] < 0.05 and kls[4] < 0.6 and kls[8] < kls[4] / 4


def test_mlx_vlm_loads_our_4bit_output_with_the_same_logits(tiny_gemma4, tmp_path):
    vlm = pytest.importorskip("mlx_vlm.utils")
    _, src = tiny_gemma4
    out = tmp_path / "q4"
    convert(src, out, bits=4, progress=False)
    model = vlm.load_model(out)
    model.set_dtype(mx.float32)
    theirs = model.language_model(mx.array(IDS))
    theirs = np.array((theirs.logits if hasattr(theirs, "logits") else theirs).astype(mx.float32))
    assert np.abs(theirs - logits(out)).max() < 1e-4


def test_recipes_and_modes(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    convert(src, tmp_path / "e8", bits=4, recipe="embed8", progress=False)
    q = json.loads((tmp_path / "e8" / "config.json").read_text())["quantization"]
    assert q["language_model.model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    logits(tmp_path / "e8")  # per-module overrides load
    convert(src, tmp_path / "mx", bits=4, group_size=32, mode="mxfp4", progress=False)
    logits(tmp_path / "mx")
    convert(src, tmp_path / "mixed", bits=4, progress=False)  # the default recipe
    q = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization"]
    assert q["language_model.model.embed_tokens"]["bits"] == 6
    assert q["language_model.model.layers.0.mlp.down_proj"]["bits"] == 6
    assert "language_model.model.layers.0.mlp.up_proj" not in q  # stays at --bits
    logits(tmp_path / "mixed")
    with pytest.raises(ConvertError, match="mxfp4 needs bits=4 and group size 32"):
        convert(src, tmp_path / "bad", bits=4, group_size=64, mode="mxfp4", progress=False)


def test_existing_out_is_refused_unless_forced(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(src, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_a_killed_conversion_leaves_no_out(tiny_gemma4, tmp_path, monkeypatch):
    _, src = tiny_gemma4
    calls = {"n": 0}
    real = mx.save_safetensors

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing shards
        return real(*a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", shard_size=20_000, progress=False)
    assert calls["n"] == 2
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_name_the_problem(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ConvertError, match="not a Gemma checkpoint"):
        convert(bad, tmp_path / "o1", progress=False)
    cfg["text_config"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="config/weights mismatch"):
        convert(bad, tmp_path / "o2", progress=False)
    shutil.copy(src / "config.json", bad / "config.json")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(Exception, match="truncated"):
        convert(bad, tmp_path / "o3", progress=False)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(Exception, match="missing: model-2.safetensors"):
        convert(bad, tmp_path / "o4", progress=False)
    (bad / "model.safetensors.index.json").unlink()
    weights = mx.load(str(src / "model.safetensors"))
    weights["model.language_model.norm.weight"] = mx.zeros((64,), dtype=mx.int8)
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(ConvertError, match="norm.weight has unsupported dtype I8"):
        convert(bad, tmp_path / "o5", progress=False)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_cli(tiny_gemma4, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    _, src = tiny_gemma4
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "-q", "8"])
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "already exists" in r.output
