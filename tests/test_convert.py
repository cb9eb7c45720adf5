"""Conversion: exact round trips, derived quantization bounds, interop, streaming, atomicity, every error path."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.convert import convert
from gemma_mlx.convert import writer
from gemma_mlx.errors import ConvertError
from gemma_mlx.weights import load_model

IDS = np.random.RandomState(0).randint(5, 400, (1, 40)).astype(np.int32)
ROOT = Path(__file__).resolve().parents[1]


def logits(path, **kw):
    model, _ = load_model(path, **kw)
    return np.array(model(mx.array(IDS)))


def hf_logits(hf):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(IDS.astype(np.int64))).logits.float().numpy()


def kl(ref, got):
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def all_weights(path):
    weights = {}
    for f in Path(path).glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    return weights


def test_float32_output_gives_the_reference_logits(tiny_gemma4, tmp_path):
    hf, src = tiny_gemma4
    summary = convert(src, tmp_path / "f32", bits=None, progress=False)  # the source's own dtype: float32
    assert np.abs(logits(tmp_path / "f32") - hf_logits(hf)).max() < 1e-4
    assert summary.tensors == 96 and summary.bits_per_weight == pytest.approx(32, rel=0.01)
    out = tmp_path / "f32"
    assert {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert "quantization" not in json.loads((out / "config.json").read_text())


def test_bfloat16_output_gives_the_reference_logits_of_bf16_rounded_weights(tiny_gemma4, tmp_path):
    hf, src = tiny_gemma4
    convert(src, tmp_path / "bf16", bits=None, dtype="bfloat16", progress=False)
    rounded = copy.deepcopy(hf)
    with torch.no_grad():  # round what the checkpoint stores (parameters, layer scalars), not the RoPE tables
        for t in list(rounded.parameters()) + [b for n, b in rounded.named_buffers() if n.endswith("layer_scalar")]:
            t.copy_(t.to(torch.bfloat16).to(torch.float32))
    assert np.abs(logits(tmp_path / "bf16") - hf_logits(rounded)).max() < 1e-4


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 64), (4, 32)])
def test_quantized_weights_stay_within_one_step_of_the_source(tiny_gemma4, tmp_path, bits, group_size):
    """Affine quantization rounds each weight to the nearest of 2^bits levels spanning its group's range:
    half a step, step = (max - min) / (2^bits - 1). MLX's scheme then pins the group's larger-magnitude edge
    exactly by rescaling the step, which can move the far end by up to another half step: |w_q - w| <= one step
    per group. Scale, bias and the dequantized value are bf16 (8 significant bits): rounding each adds at most
    2^-9 of |q·scale| <= span, of |bias| <= max|w| and of |w_q| <= max|w| + span, and the bf16 product and sum
    in dequantize round twice more; 2^-7·(span + max|w|) covers all five. Checked on every element of every
    quantized matrix."""
    _, src = tiny_gemma4
    out = tmp_path / f"q{bits}"
    convert(src, out, bits=bits, group_size=group_size, recipe="uniform", dtype="bfloat16", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == {"group_size": group_size, "bits": bits,
                                                                  "mode": "affine"}
    source = mx.load(str(src / "model.safetensors"))
    weights = all_weights(out)
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
    for name in ("vision_embedder.patch_dense.weight", "embed_vision.embedding_projection.weight",
                 "embed_audio.embedding_projection.weight", "language_model.model.layers.0.layer_scalar",
                 "vision_embedder.pos_embedding", "language_model.model.norm.weight"):
        assert weights[name].dtype == mx.bfloat16  # kept in float, per the policy


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_stay_within_the_bound_of_ideal_rounding(tiny_gemma4, tmp_path, bits):
    """End to end, the bound comes from the model's own sensitivity: round-to-nearest on a grid of step s
    leaves an error uniform on [-s/2, s/2], so the KL of quantized logits to the float ones should match the KL
    caused by adding such noise (s = each group's span / (2^bits - 1)) to the same matrices. This tiny random
    model is chaotic (its logit error does not shrink in proportion to the step), so no fixed ratio between
    bit widths would be justified; this comparison holds at every width (measured ratios 0.97 to 1.21 for
    3 to 8 bits). Allowed: within a factor 2 either way (MLX pins each group's larger edge, which can push the
    far end by up to a whole step; the noise reference averages 4 draws, which scatter by about +-25%)."""
    from mlx.utils import tree_flatten

    from gemma_mlx.convert.quantize import quant_spec

    hf, src = tiny_gemma4
    ref = hf_logits(hf)
    convert(src, tmp_path / "q", bits=bits, recipe="uniform", progress=False)
    quantized = kl(ref, logits(tmp_path / "q"))
    convert(src, tmp_path / "f", bits=None, progress=False)
    noisy = []
    for seed in range(4):
        model, _ = load_model(tmp_path / "f")
        rng = np.random.default_rng(seed)
        perturbed = []
        for name, w in tree_flatten(model.parameters()):
            if quant_spec(name, w.shape, 6, bits, 64, "affine", "uniform") is None:
                continue
            groups = np.array(w).reshape(-1, 64)
            step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2**bits - 1)
            noise = step * rng.uniform(-0.5, 0.5, groups.shape)
            perturbed.append((name, mx.array((groups + noise).reshape(w.shape).astype(np.float32))))
        assert len(perturbed) == 42
        model.load_weights(perturbed, strict=False)
        noisy.append(kl(ref, np.array(model(mx.array(IDS)))))
    assert 0.5 < quantized / np.mean(noisy) < 2, (quantized, noisy)


def test_mlx_vlm_loads_our_4bit_output_with_the_same_logits(tiny_gemma4, tmp_path):
    vlm = pytest.importorskip("mlx_vlm.utils")
    _, src = tiny_gemma4
    out = tmp_path / "q4"
    convert(src, out, bits=4, progress=False)  # the default recipe: per-module overrides in the block
    model = vlm.load_model(out)
    model.set_dtype(mx.float32)
    theirs = model.language_model(mx.array(IDS))
    theirs = np.array((theirs.logits if hasattr(theirs, "logits") else theirs).astype(mx.float32))
    assert np.abs(theirs - logits(out)).max() < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_gemma4"])
def test_mlx_lm_loads_our_4bit_output_with_the_same_logits(fixture, tmp_path, request):
    """mlx-lm reads Gemma 3's RoPE from the published keys and fills Gemma 4 fields with E2B defaults: without
    the config spelling of published_config it builds other layers or silently uses other RoPE bases."""
    lm = pytest.importorskip("mlx_lm.utils")
    _, src = request.getfixturevalue(fixture)
    out = tmp_path / "q4"
    convert(src, out, bits=4, progress=False)
    model = lm.load_model(out)[0]
    model.set_dtype(mx.float32)
    assert np.abs(np.array(model(mx.array(IDS))) - logits(out)).max() < 1e-4


def test_we_load_mlx_vlm_mixed_conversions_with_their_logits(tmp_path):
    """The community layout: mlx_vlm.convert's mixed_4_8 writes per-module overrides without a mode."""
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.convert import convert as vlm_convert
    from mlx_vlm.utils import load_model as vlm_load

    from gemma_mlx.tiny import write_demo_model

    src = write_demo_model(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(writer.published_config(cfg)))  # mlx-vlm's spelling
    vlm_convert(hf_path=str(src), mlx_path=str(tmp_path / "vlm"), quantize=True, q_bits=4, q_group_size=64,
                quant_predicate="mixed_4_8", dtype="float32")
    block = json.loads((tmp_path / "vlm" / "config.json").read_text())["quantization"]
    assert block["language_model.model.embed_tokens"] == {"group_size": 64, "bits": 8}
    theirs = vlm_load(tmp_path / "vlm")
    theirs.set_dtype(mx.float32)
    out = theirs.language_model(mx.array(IDS))
    out = np.array(out.logits if hasattr(out, "logits") else out)
    assert np.abs(out - logits(tmp_path / "vlm")).max() < 1e-4


def test_recipes_and_modes(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4

    def block(name, **kw):
        convert(src, tmp_path / name, progress=False, **kw)
        logits(tmp_path / name)  # every variant loads
        return json.loads((tmp_path / name / "config.json").read_text())["quantization"]

    q = block("e8", bits=4, recipe="embed8")
    assert q["language_model.model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert len(q) == 4
    q = block("vd", bits=4, recipe="vdown6")
    assert q["language_model.model.layers.0.mlp.down_proj"]["bits"] == 6
    assert "language_model.model.embed_tokens" not in q
    q = block("mixed", bits=4)  # the default recipe
    assert q["language_model.model.embed_tokens"]["bits"] == 6
    assert q["language_model.model.layers.0.mlp.down_proj"]["bits"] == 6
    assert q["language_model.model.layers.0.self_attn.v_proj"]["bits"] == 6
    assert "language_model.model.layers.0.mlp.up_proj" not in q  # stays at --bits
    assert "language_model.model.layers.1.mlp.down_proj" not in q  # not one of Q4_K_M's layers
    q = block("all", bits=4, recipe="all")
    assert "embed_audio.embedding_projection.scales" in all_weights(tmp_path / "all")
    q = block("mx", bits=4, group_size=32, mode="mxfp4")
    assert q == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert block("e8mx", bits=8, group_size=32, mode="mxfp8") == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    with pytest.raises(ConvertError, match="mxfp4 needs bits=4 and group size 32"):
        convert(src, tmp_path / "bad", bits=4, group_size=64, mode="mxfp4", progress=False)
    with pytest.raises(ConvertError, match="group size 32, 64 or 128"):
        convert(src, tmp_path / "bad", bits=4, group_size=16, progress=False)
    with pytest.raises(ConvertError, match="unknown recipe 'q4km'"):
        convert(src, tmp_path / "bad", recipe="q4km", progress=False)
    assert not (tmp_path / "bad").exists()


def test_shards_and_row_blocks_give_the_same_model(tiny_gemma4, tmp_path, monkeypatch):
    """Shards of ~20 kB (a dozen files) and 1 KB row blocks (every matrix streamed in many pieces) must give
    byte-identical tensors to one shard written in whole-tensor blocks."""
    _, src = tiny_gemma4
    convert(src, tmp_path / "one", bits=4, progress=False)
    monkeypatch.setattr(writer, "CHUNK_BYTES", 1024)
    convert(src, tmp_path / "many", bits=4, shard_size=20_000, progress=False)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 10 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    one, many = all_weights(tmp_path / "one"), all_weights(tmp_path / "many")
    assert one.keys() == many.keys()
    assert all(np.array_equal(np.array(one[k].view(mx.uint8)), np.array(many[k].view(mx.uint8))) for k in one)
    for k, f in index["weight_map"].items():
        assert k in mx.load(str(tmp_path / "many" / f))


def test_published_config_spelling(tiny_gemma4, tiny_gemma3, tmp_path):
    convert(tiny_gemma4[1], tmp_path / "g4", bits=4, progress=False)
    cfg = json.loads((tmp_path / "g4" / "config.json").read_text())
    text = cfg["text_config"]
    assert "per_layer_config" not in text and text["global_head_dim"] == 32
    assert text["num_global_key_value_heads"] == 1 and text["hidden_size_per_layer_input"] == 0
    assert cfg["vocab_size"] == text["vocab_size"] == 512 and cfg["torch_dtype"] == text["dtype"] == "float32"
    convert(tiny_gemma3[1], tmp_path / "g3", bits=4, progress=False)
    cfg = json.loads((tmp_path / "g3" / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and cfg["sliding_window_pattern"] == 6


def test_existing_out_is_refused_unless_forced(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    convert(src, out, bits=8, progress=False)
    before = (out / "config.json").read_text()
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(src, out, progress=False)
    assert (out / "config.json").read_text() == before
    convert(src, out, force=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_force_never_replaces_what_is_not_a_model(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("mine")
    with pytest.raises(ConvertError, match="is not a model gemma-mlx convert wrote"):
        convert(src, docs, force=True, progress=False)
    assert (docs / "thesis.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="not a directory"):
        convert(src, tmp_path / "file", force=True, progress=False)
    copy_dir = tmp_path / "copy"
    shutil.copytree(src, copy_dir)
    with pytest.raises(ConvertError, match="holds the source"):
        convert(copy_dir, copy_dir, force=True, progress=False)
    assert (copy_dir / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", force=True, progress=False)  # an empty directory may be filled


def test_ctrl_c_mid_write_leaves_no_out(tiny_gemma4, tmp_path, monkeypatch):
    _, src = tiny_gemma4
    calls = {"n": 0}
    real = writer._write_shard

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing shards
        return real(*a, **kw)

    monkeypatch.setattr(writer, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", shard_size=20_000, progress=False)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


CHILD = """
import os, signal, sys
from gemma_mlx.convert import convert, writer
mode, src, out = sys.argv[1:4]
if mode == "kill-mid-write":
    real, n = writer._write_shard, [0]
    def dying(*a, **kw):
        n[0] += 1
        if n[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    writer._write_shard = dying
elif mode == "sigint-mid-write":
    real, n = writer._write_shard, [0]
    def interrupted(*a, **kw):
        n[0] += 1
        if n[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)
    writer._write_shard = interrupted
elif mode == "kill-between-renames":
    real = os.rename
    def dying(a, b):
        real(a, b)
        if ".old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
    writer.os.rename = dying
convert(src, out, shard_size=20_000, force=True, progress=False)
"""


def _child(mode, src, out):
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_killed_conversion_leaves_no_out_and_the_next_run_cleans_up(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    r = _child("kill-mid-write", src, out)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1  # a SIGKILL cannot clean up after itself...
    convert(src, out, bits=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # ...the next conversion to OUT does

    r = _child("sigint-mid-write", src, out)  # Ctrl-C as a real signal, with --force over a model
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8  # untouched


def test_a_kill_between_the_final_renames_gives_the_old_model_back(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    convert(src, out, bits=8, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _child("kill-between-renames", src, out)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()  # killed with the old model moved aside and the new one not yet in place
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, out, progress=False)  # recovery puts the old model back before anything else
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


MEASURE = """
import sys
from gemma_mlx.convert import convert
from gemma_mlx.convert.hf import expected_shapes
from gemma_mlx.config import load_config
def peak():  # VmHWM belongs to this address space; ru_maxrss would carry over the forking parent's peak
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
expected_shapes(load_config(sys.argv[1]))  # imports and model building, outside the measurement
base = peak()
convert(sys.argv[1], sys.argv[2], bits=4, recipe="uniform", progress=False)
print("GROWTH_KB", peak() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_peak_memory_does_not_grow_with_tensor_or_checkpoint_size(tmp_path):
    """A 0.4 GB bf16 checkpoint whose embedding alone is 0.27 GB: a converter holding a whole tensor (or a
    shard) grows by at least that; streaming row blocks needs one block (64 MiB of float32 work, plus the bf16
    input block and the quantized output: ~0.13 GB measured). Peak RSS includes mapped checkpoint pages, which
    the reader hands back after each block."""
    from gemma_mlx.tiny import gemma4_config, write_random_checkpoint

    cfg = gemma4_config(vocab_size=65536, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, global_head_dim=512,
                        layer_types=["sliding_attention", "full_attention"], vision=False, audio=False)
    src = write_random_checkpoint(tmp_path / "src", cfg, dtype=mx.bfloat16)
    size = (src / "model.safetensors").stat().st_size
    assert size > 0.4e9
    r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split("GROWTH_KB")[1]) * 1024
    assert 0.03e9 < growth < 0.2e9, f"peak RSS grew by {growth / 1e9:.2f} GB converting {size / 1e9:.2f} GB"


def test_bad_inputs_name_the_problem(tiny_gemma4, tmp_path, monkeypatch):
    _, src = tiny_gemma4
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())

    def fails(match, **kw):
        with pytest.raises(ConvertError, match=match):
            convert(bad, tmp_path / "o", progress=False, **kw)

    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    fails("not a Gemma checkpoint.*unsupported model_type 'llama'")
    (bad / "config.json").unlink()
    fails("not a Gemma checkpoint.*no config.json")
    cfg["text_config"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    fails(r"layers.0.mlp.down_proj.weight has shape \[64, 128\], the config implies \[64, 96\] \(config/weights mis")
    (bad / "config.json").write_text(json.dumps(dict(json.loads((src / "config.json").read_text()),
                                                     quantization={"bits": 4, "group_size": 64})))
    fails("already quantized")
    shutil.copy(src / "config.json", bad / "config.json")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    fails("file is truncated")
    (bad / "model.safetensors").write_bytes(data)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    fails("missing: model-2.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    fails("places tensor x in model.safetensors, which does not hold it")
    (bad / "model.safetensors.index.json").unlink()
    weights = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(bad / "model.safetensors"), dict(weights, **{
        "model.language_model.norm.weight": mx.zeros((64,), dtype=mx.int8)}))
    fails("norm.weight has unsupported dtype I8")
    mx.save_safetensors(str(bad / "model.safetensors"), dict(weights, extra=mx.zeros((2,))))
    fails("tensor extra is not part of a gemma4_unified model")
    del weights["model.language_model.layers.3.mlp.up_proj.weight"]
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    fails("missing from the checkpoint: model.language_model.layers.3.mlp.up_proj.weight")
    weights = mx.load(str(src / "model.safetensors"))
    names = sorted(weights)
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    mx.save_safetensors(str(bad / "model-2.safetensors"), {names[0]: weights[names[0]]})
    fails(f"tensor {names[0]} appears in both")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConvertError, match="not in the local Hugging Face cache"):
        convert("nobody/no-such-model", tmp_path / "o", progress=False)
    with pytest.raises(ConvertError, match="no such file or directory"):
        convert(tmp_path / "nowhere", tmp_path / "o", progress=False)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_a_failed_verification_leaves_no_out(tiny_gemma4, tmp_path, monkeypatch):
    _, src = tiny_gemma4
    real = writer._write_shard

    def lossy(path, shard, *a):
        real(path, shard, *a)
        with open(path, "r+b") as f:  # a disk that lost the end of the file
            f.truncate(path.stat().st_size - 8)

    monkeypatch.setattr(writer, "_write_shard", lossy)
    with pytest.raises(ConvertError, match="verification failed: .*truncated"):
        convert(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_tensors_and_bytes():
    import io

    stream = io.StringIO()  # not a terminal: a line per tenth of the bytes
    p = writer.Progress(tensors=20, total=4_000_000_000, enabled=True, stream=stream)
    for i in range(20):
        p.advance(200_000_000, True, f"t{i}")
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("converting: 100% (20/20 tensors, 4.00/4.00 GB")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()  # a terminal: one line redrawn, ending at 100% with the last tensor's name
    p = writer.Progress(tensors=2, total=100, enabled=True, stream=stream)
    p.advance(50, True, "language_model.model.embed_tokens.weight")
    p.advance(50, True, "language_model.model.norm.weight")
    p.close()
    last = stream.getvalue().split("\r")[-1]
    assert "100%  2/2 tensors" in last and "norm.weight" in last and last.endswith("\n")


def test_cli(tiny_gemma4, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    _, src = tiny_gemma4
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o"), "-q", "8", "--shard-size", "20KB",
                                 "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output and "converting: 100%" in r.output
    assert len(list((tmp_path / "o").glob("model-*-of-*.safetensors"))) > 3
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "p"), "--shard-size", "lots"])
    assert r.exit_code == 2 and "not a size" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "p"), "-q", "none", "--quiet"])
    assert r.exit_code == 0 and "converting" not in r.output
