"""GGUF (llama.cpp) Gemma 3 text checkpoints -> MLX.

llama.cpp's conventions undone here: RMSNorm weights are stored as 1 + w (Gemma 3 multiplies by 1 + w, and
llama.cpp by w, so its converter adds 1: we subtract it); tensor names and the reversed dimension order of
GGUF; hyper-parameters llama.cpp keeps implicit for gemma3 (5 sliding layers to 1 full, local RoPE base 10 000,
query_pre_attn_scalar = head_dim). Q4_0 and Q8_0 blocks (32 weights, one fp16 scale) are exactly MLX affine
groups of 32 (scale d, bias -8d or -128d), so they are repacked without loss; other block types are
dequantized and, per the recipe, re-quantized. The tokenizer comes from the GGUF vocabulary (via transformers'
GGUF tokenizer conversion).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.config import parse_config
from gemma_mlx.errors import ConfigError, ConvertError

from .hf import Prequantized, atomic_output, write_model
from .quantize import DEFAULT_RECIPE

SUPPORTED_ARCHITECTURES = ("gemma3",)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight", "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight", "attn_norm": "input_layernorm.weight",
    "post_attention_norm": "post_attention_layernorm.weight", "ffn_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight", "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def hf_name(gguf_name: str) -> str:
    """The canonical (Hugging Face) name of a Gemma 3 GGUF tensor."""
    if gguf_name == "token_embd.weight":
        return "model.language_model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.language_model.norm.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.language_model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ConvertError(f"GGUF tensor {gguf_name} has no counterpart in a Gemma 3 text model")


def gemma3_config(reader) -> dict:
    """A gemma3_text config.json dict from GGUF metadata."""
    a = "gemma3"
    head_dim = int(_field(reader, f"{a}.attention.key_length"))
    layers = int(_field(reader, f"{a}.block_count"))
    scaling = _field(reader, f"{a}.rope.scaling.factor")
    cfg = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": int(_field(reader, f"{a}.embedding_length")), "num_hidden_layers": layers,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_attention_heads": int(_field(reader, f"{a}.attention.head_count")),
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv")), "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window", 512)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 32768)),
        "query_pre_attn_scalar": head_dim, "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear" if scaling else "default",
                               "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 1e6)),
                               **({"factor": float(scaling)} if scaling else {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    }
    return cfg


def repack_q4_0(raw: np.ndarray, rows: int, cols: int) -> Prequantized:
    """Q4_0 blocks (fp16 d, 16 bytes of nibbles: low = weights 0-15, high = 16-31; w = d·(q - 8)) as MLX affine."""
    blocks = raw.reshape(rows, cols // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nib = blocks[..., 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.uint32)  # (rows, groups, 32)
    packed = np.zeros((rows, cols // 8), np.uint32)
    q = q.reshape(rows, cols // 8, 8)
    for i in range(8):  # MLX packs 8 four-bit values per uint32, value i at bits 4i
        packed |= q[..., i] << (4 * i)
    return Prequantized(mx.array(packed), mx.array(d), mx.array(-8.0 * d), 4, 32)


def repack_q8_0(raw: np.ndarray, rows: int, cols: int) -> Prequantized:
    """Q8_0 blocks (fp16 d, 32 int8; w = d·q) as MLX 8-bit affine (q + 128, bias -128·d)."""
    blocks = raw.reshape(rows, cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint32).reshape(rows, cols // 4, 4)
    packed = np.zeros((rows, cols // 4), np.uint32)
    for i in range(4):
        packed |= q[..., i] << (8 * i)
    return Prequantized(mx.array(packed), mx.array(d), mx.array(-128.0 * d), 8, 32)


def _tensors(reader, repack: bool):
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    for t in reader.tensors:
        key = hf_name(t.name)
        shape = [int(x) for x in reversed(t.shape)]
        if repack and len(shape) == 2 and t.tensor_type in (T.Q4_0, T.Q8_0) and not key.endswith("norm.weight"):
            fn = repack_q4_0 if t.tensor_type == T.Q4_0 else repack_q8_0
            yield key, fn(np.asarray(t.data), shape[0], shape[1]), int(t.n_bytes)
            continue
        try:
            value = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        except NotImplementedError:
            raise ConvertError(f"GGUF tensor {t.name} uses {t.tensor_type.name}, which cannot be dequantized "
                               "here") from None
        if key.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stores Gemma's (1 + w)
        yield key, mx.array(value), int(t.n_bytes)


def write_tokenizer(gguf_path: Path, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json built from the GGUF's vocabulary."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers comes with mlx-lm
        raise ConvertError("building a tokenizer from GGUF needs transformers") from None
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def convert_gguf(source: Path, out: Path, *, bits: int | None = 4, group_size: int = 64, mode: str = "affine",
                 recipe: str = DEFAULT_RECIPE, dtype: str | None = "float16", force: bool = False,
                 shard_size: int, progress: bool = True) -> object:
    """Convert a Gemma 3 GGUF file into an MLX model directory at out."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConvertError("reading GGUF files needs the gguf package: pip install 'gemma-mlx[gguf]'") from None

    from gemma_mlx.weights import parse_dtype

    start = time.perf_counter()
    try:
        reader = GGUFReader(str(source))
    except Exception as e:  # gguf raises ValueError/struct errors for damaged files
        raise ConvertError(f"{source}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{source}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    raw = gemma3_config(reader)
    try:
        config = parse_config(raw)
    except ConfigError as e:
        raise ConvertError(f"{source}: GGUF metadata does not describe a usable model: {e}") from None
    # Repacked blocks keep their fp16 scales exactly; a float dtype narrower than that would round them.
    target = parse_dtype(dtype or "float16")
    total = sum(int(t.n_bytes) for t in reader.tensors)

    def fill(tmp: Path) -> dict:
        write_tokenizer(Path(source), tmp)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": raw["bos_token_id"], "eos_token_id": [raw["eos_token_id"], 106],
             "pad_token_id": raw["pad_token_id"]}, indent=2))
        return write_model(tmp, _tensors(reader, repack=bits is not None), total, config, raw, bits=bits,
                           group_size=group_size, mode=mode, recipe=recipe, target=target, shard_size=shard_size,
                           progress=progress, source_name=Path(source).name)

    return atomic_output(Path(out), force, fill, start)
