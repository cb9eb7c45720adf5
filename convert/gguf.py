"""GGUF (llama.cpp) Gemma 3 and Gemma 4 text checkpoints -> MLX.

The layouts below were checked against llama.cpp's own source (conversion/gemma.py: Gemma3Model, Gemma4Model;
conversion/base.py: TextModel.set_gguf_parameters; src/models/gemma4.cpp: load_arch_hparams, load_arch_tensors
and the graph; gguf-py constants/tensor_mapping), not guessed. What llama.cpp's converter changes, undone here:
- Gemma 3 RMSNorm weights are stored as 1 + w (Gemma3Model.norm_shift = 1: llama.cpp's RMSNorm multiplies by the
  weight, Gemma 3's by 1 + w); Gemma 4's are stored as is (Gemma4Model.norm_shift = 0).
- Names (``blk.N.attn_q`` ...) come from gguf's own TensorNameMap, the table llama.cpp converts with
  (``layer_scalar`` -> ``blk.N.layer_output_scale``, shape [1]); GGUF lists dimensions innermost first. Gemma's
  rotary embedding is the NeoX (half-split) kind, so q/k are not permuted (only LlamaModel permutes); the embedding
  scale sqrt(hidden) is applied at run time (gemma4.cpp scales token rows only), not baked in. A tied embedding is
  written once, as token_embd (no output.weight); rows past the tokenizer's vocabulary are cut
  (Gemma3Model.modify_tensors), so the vocabulary size is token_embd's row count.
- Hyper-parameters llama.cpp keeps implicit. Gemma 3: 5 sliding layers to 1 full unless a pattern is stored,
  local RoPE base 10 000, query_pre_attn_scalar = head_dim (hidden / heads for the 62-layer 27B). Gemma 4
  (Gemma4Model.set_gguf_parameters): key_length is the full layers' head dim (global_head_dim) and key_length_swa
  the sliding layers'; head_count is a scalar, head_count_kv a per-layer array when the config has
  num_global_key_value_heads; sliding_window_pattern lists every layer (true = sliding); freq_base is the full
  layers' RoPE base and freq_base_swa the sliding layers' (a missing freq_base_swa means freq_base, as in
  llama.cpp); rope.dimension_count is the whole full head dim because the proportional RoPE is stored as the
  ``rope_freqs`` tensor (global_head_dim / 2 factors: 1 for rotated pairs, 1e30 for the rest; generate_extra_tensors);
  feed_forward_length becomes a per-layer array only with use_double_wide_mlp. attention_k_eq_v leaves no
  ``attn_v`` on full layers (gemma4.cpp: V = K when attn_v is absent); v_norm has no weight, so no tensor.
- The tokenizer comes from the GGUF vocabulary (Gemma4Model.set_vocab: tokenizer.ggml.model "gemma4", the
  tokenizer.json vocabulary with its merges, scores -1000; built with transformers' GGUF tokenizer builder).
  Suppressed ids come from tokenizer.ggml.suppress_tokens when the file has it (llama.cpp masks them in the
  gemma4 graph), else from Gemma 4's synthetic end-of-media rows. The text model only: llama.cpp writes the
  gemma4_unified vision/audio front end to a separate mmproj file (clip.vision.projector_type gemma4uv,
  clip.audio.projector_type gemma4ua), which is refused here with a message saying so.

Quantized blocks: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (32 weights, an fp16 scale and offset) and Q4_K, Q5_K (groups
of 32 inside 256-weight super-blocks, scale and offset = fp16 super-scale x 6-bit sub-scale) are all MLX affine
groups of 32 (w = scale·q + bias), so they are repacked exactly: with float32 scales bit for bit, with the
default float16 scales to within 2^-11 of each K-quant scale (Q4_0 ... Q8_0 stay exact). Q2_K, Q3_K and Q6_K use
groups of 16, which MLX cannot hold, and the IQ/TQ types are non-linear; they are dequantized and re-quantized at
two bits more than they had (group 32, at most 8 bits), which keeps their own error dominant. llama-quantize keeps
1-D tensors (norms, layer_output_scale, rope_freqs) in F32 and gives the tied token_embd (which is also the
output) a higher type than the rest (Q6_K in a Q4_0 file unless --pure); F32/F16/BF16 tensors follow --bits and
the recipe.
"""

from __future__ import annotations

import json
import mmap
import time
from importlib.resources import files
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.config import parse_config
from gemma_mlx.errors import ConfigError, ConvertError
from gemma_mlx.weights import parse_dtype

from .hf import expected_shapes
from .quantize import QuantSpec, check_recipe
from .writer import ConvertSummary, Source, atomic_output, write_model

ARCHITECTURES = ("gemma3", "gemma4")
REPACKED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")
REPACK_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# Bits per weight the other block types carry; re-quantized at two more.
NOMINAL_BITS = {"Q2_K": 2, "Q3_K": 3, "Q6_K": 6, "Q8_1": 8, "Q8_K": 8, "IQ1_S": 1, "IQ1_M": 1, "IQ2_XXS": 2,
                "IQ2_XS": 2, "IQ2_S": 2, "IQ3_XXS": 3, "IQ3_S": 3, "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 2,
                "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4}
FLOAT_TYPES = ("F32", "F16", "BF16")
_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise ConvertError(f"GGUF metadata lacks {key}, which a Gemma model needs")
        return default
    return f.contents()


def _per_layer(value, n: int, what: str) -> list[int]:
    values = [int(v) for v in value] if isinstance(value, list) else [int(value)] * n
    if len(values) != n:
        raise ConvertError(f"GGUF {what} has {len(values)} entries for {n} layers")
    return values


# -- hyper-parameters --------------------------------------------------------------------------------

def gemma3_config(reader, tensors: dict) -> dict:
    a = "gemma3"
    layers = int(_field(reader, f"{a}.block_count"))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // heads))
    pattern = _field(reader, f"{a}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]
    scaling_type = _field(reader, f"{a}.rope.scaling.type", "none")
    factor = _field(reader, f"{a}.rope.scaling.factor", None)
    if scaling_type not in ("none", "linear"):
        raise ConvertError(f"GGUF rope scaling {scaling_type!r} is not supported for gemma3")
    full_rope = {"rope_type": "default", "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0))}
    if scaling_type == "linear" and factor:
        full_rope.update(rope_type="linear", factor=float(factor))
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", heads)), "head_dim": head_dim,
        # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B, which scales by 1/sqrt(hidden / heads).
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window")),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 32768)),
        "layer_types": types,
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(_field(reader, f"{a}.rope.freq_base_swa", 10000.0))}},
        "final_logit_softcapping": _field(reader, f"{a}.final_logit_softcapping", None),
        "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
        **_common(reader, tensors, ("<end_of_turn>",)),
    }


def gemma4_config(reader, tensors: dict) -> dict:
    a = "gemma4"
    layers = int(_field(reader, f"{a}.block_count"))
    if int(_field(reader, f"{a}.embedding_length_per_layer_input", 0)):
        raise ConvertError("this Gemma 4 GGUF has per-layer embeddings (E2B/E4B), which gemma-mlx does not run")
    if _field(reader, f"{a}.expert_count", None):
        raise ConvertError("this Gemma 4 GGUF is a mixture of experts, which gemma-mlx does not run")
    swa = _field(reader, f"{a}.attention.sliding_window_pattern")
    if not isinstance(swa, list):
        raise ConvertError(f"GGUF {a}.attention.sliding_window_pattern must list every layer")
    types = ["sliding_attention" if s else "full_attention" for s in swa]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    kv = _per_layer(_field(reader, f"{a}.attention.head_count_kv"), layers, "head_count_kv")
    heads = _per_layer(_field(reader, f"{a}.attention.head_count"), layers, "head_count")
    ff = _per_layer(_field(reader, f"{a}.feed_forward_length"), layers, "feed_forward_length")
    shared = int(_field(reader, f"{a}.attention.shared_kv_layers", 0))
    double_wide = ff != [ff[0]] * layers
    if len(set(heads)) != 1 or len({kv[i] for i in sliding}) > 1 or len({kv[i] for i in full}) > 1 or (
            double_wide and ff != [ff[0]] * (layers - shared) + [2 * ff[0]] * shared):
        raise ConvertError("GGUF per-layer head counts / FFN widths vary in a way gemma4_unified cannot express")
    head_dim, global_dim = (int(_field(reader, f"{a}.attention.key_length_swa")),
                            int(_field(reader, f"{a}.attention.key_length")))
    rot_swa = int(_field(reader, f"{a}.rope.dimension_count_swa", head_dim))
    if rot_swa != head_dim:
        raise ConvertError(f"GGUF rotates {rot_swa} of {head_dim} dims on sliding layers; only full rotation is "
                           "supported there")
    theta = float(_field(reader, f"{a}.rope.freq_base", 10000.0))
    full_rope = {"rope_type": "proportional", "rope_theta": theta,
                 "partial_rotary_factor": _partial_rotary_factor(tensors, global_dim) if full else 1.0}
    k_eq_v = bool(full) and all(f"blk.{i}.attn_v.weight" not in tensors for i in full)
    if any(f"blk.{i}.attn_v.weight" not in tensors for i in sliding):
        raise ConvertError("GGUF sliding-attention layer without attn_v: not a Gemma 4 layout")
    text = {
        "model_type": "gemma4_unified_text", "hidden_size": int(_field(reader, f"{a}.embedding_length")),
        "num_hidden_layers": layers, "intermediate_size": ff[0], "use_double_wide_mlp": double_wide,
        "num_attention_heads": heads[0], "head_dim": head_dim, "global_head_dim": global_dim,
        "num_key_value_heads": kv[sliding[0]] if sliding else kv[0],
        "num_global_key_value_heads": kv[full[0]] if full else None, "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": shared, "hidden_size_per_layer_input": 0, "layer_types": types,
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window")),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 131072)),
        "final_logit_softcapping": _field(reader, f"{a}.final_logit_softcapping", None),
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(_field(reader, f"{a}.rope.freq_base_swa", theta))}},
        "hidden_activation": "gelu_pytorch_tanh", "use_bidirectional_attention": "vision",
        **_common(reader, tensors, ("<turn|>", "<|tool_response>")),
    }
    return {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
            "text_config": text, **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                         "tie_word_embeddings", "vocab_size")}}


def _partial_rotary_factor(tensors: dict, head_dim: int) -> float:
    t = tensors.get("rope_freqs.weight")
    if t is None:
        raise ConvertError("GGUF lacks rope_freqs.weight, which holds Gemma 4's partial rotation")
    factors = np.asarray(t.data, dtype=np.float32).reshape(-1)
    rotated = int((factors == 1.0).sum())
    if factors.size != head_dim // 2 or not (factors[:rotated] == 1.0).all() or not (factors[rotated:] > 1e20).all():
        raise ConvertError("GGUF rope_freqs.weight is not the proportional-RoPE pattern (1 ... 1, 1e30 ... 1e30)")
    return 2 * rotated / head_dim


def _common(reader, tensors: dict, turn_ends: tuple[str, ...]) -> dict:
    """Vocabulary size, tying and special ids; the chat turn-end tokens are end-of-sequence ids too."""
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 1))
    extra = [int(_field(reader, f"tokenizer.ggml.{k}_token_id", -1)) for k in ("eot", "eom")]
    ends = [i for i in extra if i >= 0] + _token_ids(reader, turn_ends)
    return {"vocab_size": int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else 0,
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
            "eos_token_id": [eos] + [i for i in dict.fromkeys(ends) if i != eos],
            "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0))}


_NEVER_GENERATED = ("<image|>", "<audio|>")  # Gemma 4's synthetic end-of-media rows


def _token_ids(reader, wanted: tuple[str, ...]) -> list[int]:
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return []
    found = {}
    for i, idx in enumerate(f.data):
        text = bytes(f.parts[idx]).decode("utf-8", "replace")
        if text in wanted:
            found[text] = i
            if len(found) == len(wanted):
                break
    return [found[w] for w in wanted if w in found]


# -- names ----------------------------------------------------------------------------------------------

def gguf_names(arch: str, expected: dict[str, tuple]) -> dict[str, str]:
    """GGUF tensor name -> canonical name, from gguf's TensorNameMap (the table llama.cpp converts with)."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    layers = 1 + max((int(k.split(".")[3]) for k in expected if ".layers." in k), default=0)
    table = gguf.TensorNameMap(arch_enum, layers)
    names = {}
    for key in expected:
        short = key.replace("model.language_model.", "model.", 1)
        base = short[: -len(".weight")] if short.endswith(".weight") else short
        mapped = table.get_name(base)
        if mapped is None:
            raise ConvertError(f"the installed gguf package has no GGUF name for {key}; update it")
        names[mapped + ".weight"] = key
    return names


# -- quantized blocks ----------------------------------------------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 four-bit values, low nibbles first (ggml's order within a 32-weight block)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes -> 32 bits, little-endian (bit j belongs to weight j)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def unpack_blocks(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, bias) of GGUF blocks, one scale and bias per 32 weights, with w = scale·q + bias exactly."""
    if kind == "Q8_0":
        d = _f16(blocks[:, 0:2])
        return (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d[:, None], -128 * d[:, None]
    if kind == "Q4_0":
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 2:18]), d[:, None], -8 * d[:, None]
    if kind == "Q4_1":
        return _nibbles(blocks[:, 4:20]), _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
    if kind == "Q5_0":
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4), d[:, None], -16 * d[:, None]
    if kind == "Q5_1":
        q = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)
        return q, _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
    if kind in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        n = blocks.shape[0]
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:144] if kind == "Q4_K" else blocks[:, 48:176]
        # 4 runs of 32 bytes; the low nibbles are sub-block 2j, the high nibbles sub-block 2j + 1.
        q = np.stack([qs.reshape(n, 4, 32) & 0x0F, qs.reshape(n, 4, 32) >> 4], axis=2).reshape(n, 8, 32)
        if kind == "Q5_K":
            qh = blocks[:, 16:48]  # bit g of byte l is the fifth bit of weight l of sub-block g
            q = q | (((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
        return q.reshape(n, 256), d[:, None] * sc.astype(np.float32), -(dmin[:, None] * m.astype(np.float32))
    raise ValueError(kind)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: values as a little-endian bit stream, read as uint32 words."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q.astype(np.uint8)).view(np.uint32)
    if bits == 4:
        q = q.astype(np.uint8).reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(q[..., 0] | (q[..., 1] << 4)).view(np.uint32)
    stream = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little").view(np.uint32)


def repack(kind: str, raw: np.ndarray, rows: int, cols: int) -> tuple[mx.array, mx.array, mx.array]:
    """GGUF blocks of a (rows, cols) matrix as MLX affine (weight, scales, biases), group 32."""
    block = 256 if kind.endswith("_K") else 32
    q, scale, bias = unpack_blocks(kind, np.ascontiguousarray(raw).reshape(rows * cols // block, -1))
    w = pack_bits(q.reshape(rows, cols), REPACK_BITS[kind])
    return mx.array(w), mx.array(scale.reshape(rows, cols // 32)), mx.array(bias.reshape(rows, cols // 32))


def requantize_spec(kind: str) -> QuantSpec:
    bits = min(NOMINAL_BITS[kind] + 2, 8)
    return QuantSpec(next(b for b in (2, 3, 4, 5, 6, 8) if b >= bits), 32)


# -- tensors ---------------------------------------------------------------------------------------

def _release(reader, offset: int, length: int) -> None:
    """Drop mapped pages already copied (gguf's reader maps the whole file; they would count as ours)."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        start = offset - offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):
            pass


def tensor_source(reader, t, key: str, shape: tuple, *, quantized_ok: bool, norm_shift: float) -> Source:
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    rows = shape[0]
    data = t.data
    per_row = int(t.n_bytes) // rows

    def raw_rows(r0: int, r1: int) -> np.ndarray:
        block = np.array(data[r0:r1])
        _release(reader, int(t.data_offset) + r0 * per_row, (r1 - r0) * per_row)
        return block

    if quantized_ok and kind in REPACKED and len(shape) == 2:
        return Source(key, shape, int(t.n_bytes), lambda r0, r1: repack(kind, raw_rows(r0, r1), r1 - r0, shape[1]),
                      packed=QuantSpec(REPACK_BITS[kind], 32))

    def read(r0: int, r1: int) -> mx.array:
        block = raw_rows(r0, r1)
        if kind == "BF16":
            value = mx.array(block.view(np.uint16)).view(mx.bfloat16).astype(mx.float32)
        elif kind in ("F32", "F16"):
            value = mx.array(block)
        else:
            value = mx.array(dequantize(block, t.tensor_type).reshape((r1 - r0, *shape[1:])))
        return value - norm_shift if norm_shift else value

    requant = None
    if quantized_ok and kind not in FLOAT_TYPES and len(shape) == 2 and shape[1] % 32 == 0:
        requant = requantize_spec(kind)
    return Source(key, shape, int(t.n_bytes), read, requantize=requant)


def _check_tensors(reader, arch: str, config, source: Path) -> list[tuple]:
    from gguf.quants import dequantize

    expected = expected_shapes(config)
    names = gguf_names(arch, expected)
    chosen, seen, tried = [], set(), set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        key = names.get(t.name)
        if key is None:
            raise ConvertError(f"{source.name}: GGUF tensor {t.name} has no counterpart in a {arch} text model "
                               "with this metadata (config/weights mismatch)")
        shape = tuple(int(x) for x in reversed(t.shape))
        if shape != expected[key]:
            raise ConvertError(f"{source.name}: GGUF tensor {t.name} has shape {list(shape)}, the metadata implies "
                               f"{list(expected[key])} (config/weights mismatch)")
        kind = t.tensor_type.name
        if kind not in FLOAT_TYPES + REPACKED and kind not in tried:
            tried.add(kind)
            try:
                dequantize(np.array(t.data[:1]), t.tensor_type)
            except (NotImplementedError, KeyError):
                raise ConvertError(f"{source.name}: GGUF tensor {t.name} uses {kind}, which cannot be "
                                   "dequantized here") from None
        seen.add(key)
        chosen.append((t, key, shape))
    missing = sorted(expected.keys() - seen)
    if missing:
        raise ConvertError(f"{source.name}: tensor(s) missing from the GGUF: {', '.join(missing[:5])}")
    return chosen


# -- sidecars ----------------------------------------------------------------------------------------

def write_tokenizer(reader, source: Path, out: Path, arch: str, raw: dict) -> str | None:
    """tokenizer.json / tokenizer_config.json from the GGUF vocabulary, the chat template, generation config."""
    note = None
    if "tokenizer.ggml.tokens" in reader.fields:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:  # pragma: no cover - transformers comes with mlx-lm
            raise ConvertError("building a tokenizer from GGUF needs transformers") from None
        # The same backend AutoTokenizer builds for a GGUF (GemmaTokenizer's), without AutoTokenizer's second
        # full read of the file for a model config.
        tok = PreTrainedTokenizerFast.from_pretrained(str(source.parent), gguf_file=source.name)
        tok.save_pretrained(str(out))
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "GemmaTokenizer"
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    else:
        note = "The GGUF carried no vocabulary: add the tokenizer files of the original model."
    template = _field(reader, "tokenizer.chat_template", None)
    if template:
        (out / "chat_template.jinja").write_text(template)
    elif arch == "gemma4":
        (out / "chat_template.jinja").write_text(files("gemma_mlx").joinpath("assets/chat_template.jinja").read_text())
        note = "The GGUF carried no chat template; the Gemma 4 template bundled with gemma-mlx was added."
    gen = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"],
           "pad_token_id": raw["pad_token_id"]}
    stored = _field(reader, "tokenizer.ggml.suppress_tokens", None)
    if stored is not None:
        suppress = [int(i) for i in (stored if isinstance(stored, list) else [stored])]
    else:
        suppress = _token_ids(reader, _NEVER_GENERATED) if arch == "gemma4" else []
    if suppress:
        gen["suppress_tokens"] = suppress
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return note


def convert_gguf(source: Path, out: Path, *, bits: int | None, group_size: int, mode: str, recipe: str,
                 dtype: str | None, force: bool, shard_size: int, progress: bool) -> ConvertSummary:
    """Convert a Gemma 3 / Gemma 4 GGUF file into an MLX model directory at out."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConvertError("reading GGUF files needs the gguf package: pip install 'gemma-mlx[gguf]'") from None

    start = time.perf_counter()
    check_recipe(recipe)
    if not source.is_file():
        raise ConvertError(f"{source}: no such GGUF file")
    try:
        reader = GGUFReader(str(source))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError for damaged or truncated files
        raise ConvertError(f"{source}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture", None)
    if arch == "clip":
        kinds = [_field(reader, k, None) for k in ("clip.vision.projector_type", "clip.audio.projector_type",
                                                    "clip.projector_type")]
        kinds = ", ".join(k for k in kinds if k) or "unknown"
        raise ConvertError(f"{source}: this is a llama.cpp mmproj file (projector {kinds}), not a text model; "
                           "convert the text GGUF (for the vision/audio front end, convert the safetensors release)")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{source}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    raw = gemma3_config(reader, tensors) if arch == "gemma3" else gemma4_config(reader, tensors)
    try:
        config = parse_config(raw)
    except ConfigError as e:
        raise ConvertError(f"{source}: GGUF metadata does not describe a usable model: {e}") from None
    chosen = _check_tensors(reader, arch, config, source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != raw["vocab_size"]:
        raise ConvertError(f"{source.name}: the GGUF vocabulary has {len(tokens.data)} tokens but token_embd "
                           f"has {raw['vocab_size']} rows (llama.cpp needs them equal)")
    # GGUF scales are fp16: float16 keeps Q4_0 ... Q8_0 exact (bfloat16 would round them).
    target = parse_dtype(dtype or "float16")
    quantized_ok = bits is not None
    shift = 1.0 if arch == "gemma3" else 0.0
    sources = [tensor_source(reader, t, key, shape, quantized_ok=quantized_ok,
                             norm_shift=shift if key.endswith("norm.weight") else 0.0)
               for t, key, shape in chosen]
    types = sorted({t.tensor_type.name for t, _, _ in chosen})

    def fill(tmp: Path) -> dict:
        note = write_tokenizer(reader, source, tmp, arch, raw)
        settings = (f"GGUF blocks ({', '.join(types)}) repacked where MLX holds them exactly, others "
                    f"re-quantized finer; float tensors: {bits}-bit {mode}, group {group_size}, recipe {recipe}"
                    if bits else "none: every tensor dequantized to float")
        card = {"name": source.stem, "source": source.name, "format": f"GGUF, {arch}", "settings": settings,
                "note": note}
        return write_model(tmp, sources, config, raw, bits=bits, group_size=group_size, mode=mode, recipe=recipe,
                           target=target, shard_size=shard_size, progress=progress, card=card)

    return atomic_output(Path(out), force, fill, start, protect=[source])
