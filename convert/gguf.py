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
import math
import mmap
import os
import struct
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from gemma_mlx.config import parse_config
from gemma_mlx.errors import ConfigError, ConvertError
from gemma_mlx.weights import parse_dtype

from .hf import expected_shapes
from .quantize import QuantSpec, check_recipe, quant_spec
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


# -- the file --------------------------------------------------------------------------------------------
#
# GGUF is read here, not with gguf's GGUFReader: that reader trusts every count and length (an array header
# claiming 2^31 items in a 761-byte file makes it allocate for them) and fails with whatever numpy raises. Every
# count, length, dimension, offset and type id is checked against the file's size and llama.cpp's own limits
# (gguf.cpp: GGML_MAX_DIMS, GGML_MAX_NAME, no nested arrays) before anything is allocated, so a damaged file
# fails at once with a ConvertError naming the file, the field and the byte where it is.

_GGUF_VERSIONS = (2, 3)
_MAX_TENSORS = 1 << 16       # a 27B Gemma has ~800 tensors
_MAX_KV = 1 << 16            # a real file has ~50 keys
_MAX_KEY_BYTES = 1 << 16
_MAX_STRING_BYTES = 1 << 28  # chat templates are tens of KB
_MAX_ARRAY_ITEMS = 1 << 24   # the largest real arrays are vocabularies and merges (~0.5M)
_MAX_DIMS = 4                # GGML_MAX_DIMS
_MAX_NAME_BYTES = 63         # GGML_MAX_NAME is 64 with the terminating NUL
_MAX_DIM = 1 << 40
_STRING, _ARRAY = 8, 9
# GGUFValueType id -> (struct code, bytes); strings and arrays are variable-sized.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.uint8, 10: np.uint64, 11: np.int64, 12: np.float64}
_VALUE_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
                     7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
# Tensor types whose data is read as numbers (BF16 as its 16-bit patterns); every other type is blocks of bytes.
_ELEMENT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                  "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF: its shape rows first (GGUF lists dimensions innermost first) and its data view."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray  # numbers for F32/F16/..., else (..., bytes per row) uint8 blocks


@dataclass
class GGUFFile:
    """A validated GGUF: metadata values by key (arrays as lists / numpy arrays), their type ids, the tensors."""

    path: Path
    fields: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]
    tensors: list[GGUFTensor]
    mm: mmap.mmap


class _Cursor:
    """Reads little-endian values from the mapped file, refusing any read past its end."""

    def __init__(self, mm: mmap.mmap, path: Path):
        self.mm, self.path, self.size, self.pos = mm, path, len(mm), 0

    def fail(self, what: str, at: int | None = None) -> ConvertError:
        return ConvertError(f"{self.path}: damaged GGUF: {what} (at byte {self.pos if at is None else at} of "
                            f"{self.size})")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {self.size - self.pos} are left")

    def scalar(self, code: str, n: int, what: str):
        self.need(n, what)
        value = struct.unpack_from("<" + code, self.mm, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str, limit: int) -> str:
        at = self.pos
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes (at most {limit})", at)
        self.need(n, what)
        raw = self.mm[self.pos:self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8", at) from None
        self.pos += n
        return text


def _read_value(c: _Cursor, vtype: int, key: str):
    """One metadata value at the cursor, with its element type for an array (None otherwise)."""
    if vtype in _SCALARS:
        code, n = _SCALARS[vtype]
        return c.scalar(code, n, f"value of {key}"), None
    if vtype == _STRING:
        return c.string(f"string value of {key}", _MAX_STRING_BYTES), None
    if vtype != _ARRAY:
        raise c.fail(f"metadata key {key!r} has unknown value type id {vtype}", c.pos - 4)
    at = c.pos
    etype = c.u32(f"element type of {key}")
    count = c.u64(f"item count of {key}")
    if etype == _ARRAY:
        raise c.fail(f"metadata key {key!r} is an array of arrays, which GGUF (llama.cpp) does not allow", at)
    if etype not in _SCALARS and etype != _STRING:
        raise c.fail(f"metadata key {key!r} is an array of unknown value type id {etype}", at)
    smallest = _SCALARS[etype][1] if etype in _SCALARS else 8  # a string is at least its 8-byte length
    if count > _MAX_ARRAY_ITEMS or count * smallest > c.size - c.pos:
        raise c.fail(f"metadata key {key!r} claims an array of {count} {_VALUE_TYPE_NAMES[etype]} items, more than "
                     f"{'the file can hold' if count <= _MAX_ARRAY_ITEMS else f'the {_MAX_ARRAY_ITEMS} allowed'}",
                     at)
    if etype == _STRING:
        return [c.string(f"item {i} of {key}", _MAX_STRING_BYTES) for i in range(count)], etype
    n = count * smallest
    values = np.frombuffer(c.mm, _NUMPY[etype], count, c.pos).copy()
    c.pos += n
    return (values.astype(bool) if etype == 7 else values), etype


def read_gguf(path: Path) -> GGUFFile:
    """The file's metadata and tensor table, every count, length, type and range checked against the file."""
    import gguf

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ConvertError(f"{path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None
    c = _Cursor(mm, path)
    if mm[:4] != b"GGUF":
        raise ConvertError(f"{path}: not a GGUF file (it starts with {bytes(mm[:4])!r}, not b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version not in _GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in _GGUF_VERSIONS:
            raise ConvertError(f"{path}: a big-endian GGUF (version {swapped}); only little-endian files are read")
        raise ConvertError(f"{path}: GGUF version {version} is not supported (versions "
                           f"{', '.join(map(str, _GGUF_VERSIONS))})")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata key count")
    # Each key takes at least 14 bytes (length, one byte of name, type, a one-byte value), each tensor entry 32.
    for count, most, each, what in ((n_kv, _MAX_KV, 14, "metadata keys"), (n_tensors, _MAX_TENSORS, 32, "tensors")):
        if count > most or count * each > size - c.pos:
            raise c.fail(f"the header claims {count} {what}, more than "
                         f"{'the file can hold' if count <= most else f'the {most} allowed'}", 8)

    fields: dict[str, Any] = {}
    value_types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        at = c.pos
        key = c.string("metadata key", _MAX_KEY_BYTES)
        if not key or key in fields:
            raise c.fail(f"metadata key {key!r} is {'empty' if not key else 'repeated'}", at)
        vtype = c.u32(f"value type of {key}")
        fields[key], etype = _read_value(c, vtype, key)
        value_types[key] = (vtype, etype)

    alignment = fields.get("general.alignment", 32)
    if "general.alignment" in fields and (value_types["general.alignment"][0] != 4 or alignment == 0
                                          or alignment & (alignment - 1)):
        raise ConvertError(f"{path}: GGUF general.alignment must be a UINT32 power of two, got {alignment!r}")
    entries = []
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"name of tensor {i}", _MAX_NAME_BYTES)
        n_dims = c.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)", at)
        dims = [c.u64(f"dimension {d} of {name}") for d in range(n_dims)]
        type_id = c.u32(f"type of {name}")
        offset = c.u64(f"data offset of {name}")
        entries.append((at, name, dims, type_id, offset))
    data_start = c.pos + -c.pos % alignment

    tensors, names = [], set()
    for at, name, dims, type_id, offset in entries:
        if name in names:
            raise c.fail(f"tensor {name} is listed twice", at)
        names.add(name)
        if not all(1 <= d <= _MAX_DIM for d in dims):
            raise c.fail(f"tensor {name} has dimensions {dims} (each must be 1 to 2^40)", at)
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name} has unknown type id {type_id}", at) from None
        if dims[0] % block:
            raise c.fail(f"tensor {name} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its "
                         f"{block}-value blocks", at)
        n_bytes = math.prod(dims) // block * type_size
        start = data_start + offset
        if offset % alignment or n_bytes > size or start > size - n_bytes:
            raise c.fail(f"tensor {name} ({qtype.name}, {n_bytes} bytes at data offset {offset}) does not lie "
                         f"{'on the alignment of ' + str(alignment) if offset % alignment else 'inside the file'}",
                         at)
        shape = tuple(reversed(dims))
        element = _ELEMENT_TYPES.get(qtype.name)
        if element is not None:
            data = np.frombuffer(mm, element, n_bytes // np.dtype(element).itemsize, start).reshape(shape)
        else:
            data = np.frombuffer(mm, np.uint8, n_bytes, start).reshape(
                (*shape[:-1], shape[-1] // block * type_size))
        tensors.append(GGUFTensor(name, qtype, shape, n_bytes, start, data))
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in tensors)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ConvertError(f"{path}: damaged GGUF: the data of tensors {first} and {second} overlap")
    return GGUFFile(path, fields, value_types, tensors, mm)


# -- typed metadata ------------------------------------------------------------------------------------
#
# Each hyper-parameter is read with its GGUF type and a range that any real model lies in, so a damaged or
# hostile value is refused here, naming the key, instead of sizing a loop or a list further on.

_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
_FLOATS = (6, 12)
_BOOL = 7
_MAX_LAYERS = 1024
_MAX_WIDTH = 1 << 20        # hidden / FFN sizes
_MAX_HEADS = 1024
_MAX_HEAD_DIM = 8192
_MAX_POSITIONS = 1 << 24


def _bad_value(g: GGUFFile, key: str, why: str) -> ConvertError:
    return ConvertError(f"{g.path}: GGUF metadata {key} {why}")


def _type_name(g: GGUFFile, key: str) -> str:
    vtype, etype = g.value_types[key]
    return f"ARRAY of {_VALUE_TYPE_NAMES[etype]}" if vtype == _ARRAY and etype is not None else _VALUE_TYPE_NAMES[vtype]


def _present(g: GGUFFile, key: str, default) -> bool:
    if key in g.fields:
        return True
    if default is _REQUIRED:
        raise ConvertError(f"{g.path}: GGUF metadata lacks {key}, which a Gemma model needs")
    return False


def _check_range(g: GGUFFile, key: str, value, lo, hi):
    if not lo <= value <= hi:
        raise _bad_value(g, key, f"is {value}, outside {lo} ... {hi}")
    return value


def _int(g: GGUFFile, key: str, default=_REQUIRED, lo: int = 1, hi: int = _MAX_WIDTH) -> int:
    """The integer at key (or default), within lo ... hi."""
    if not _present(g, key, default):
        return default
    if g.value_types[key][0] not in _INTEGERS:
        raise _bad_value(g, key, f"must be an integer, not {_type_name(g, key)}")
    return _check_range(g, key, int(g.fields[key]), lo, hi)


def _float(g: GGUFFile, key: str, default=_REQUIRED, lo: float = 0.0, hi: float = 1e12) -> float | None:
    """The finite number at key (or default), within lo ... hi."""
    if not _present(g, key, default):
        return default
    if g.value_types[key][0] not in _FLOATS + _INTEGERS:
        raise _bad_value(g, key, f"must be a number, not {_type_name(g, key)}")
    value = float(g.fields[key])
    if not math.isfinite(value):
        raise _bad_value(g, key, f"is {value}")
    return _check_range(g, key, value, lo, hi)


def _str(g: GGUFFile, key: str, default=_REQUIRED) -> str | None:
    """The string at key (or default)."""
    if not _present(g, key, default):
        return default
    if g.value_types[key][0] != _STRING:
        raise _bad_value(g, key, f"must be a string, not {_type_name(g, key)}")
    return g.fields[key]


def _is_array_of(g: GGUFFile, key: str, types: tuple[int, ...]) -> bool:
    vtype, etype = g.value_types[key]
    return vtype == _ARRAY and (etype in types or len(g.fields[key]) == 0)


def _int_list(g: GGUFFile, key: str, default=_REQUIRED, lo: int = 0, hi: int = _MAX_WIDTH) -> list[int] | None:
    """The integer array at key (or default), each value within lo ... hi."""
    if not _present(g, key, default):
        return default
    if not _is_array_of(g, key, _INTEGERS):
        raise _bad_value(g, key, f"must be an array of integers, not {_type_name(g, key)}")
    values = [int(v) for v in g.fields[key]]
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise _bad_value(g, key, f"holds {bad[0]}, outside {lo} ... {hi}")
    return values


def _per_layer(g: GGUFFile, key: str, n: int, lo: int = 1, hi: int = _MAX_WIDTH) -> list[int]:
    """An integer given once for every layer or as a per-layer array (as llama.cpp's get_key_or_arr reads it)."""
    if _present(g, key, _REQUIRED) and g.value_types[key][0] == _ARRAY:
        values = _int_list(g, key, lo=lo, hi=hi)
        if len(values) != n:
            raise _bad_value(g, key, f"has {len(values)} entries for {n} layers")
        return values
    return [_int(g, key, lo=lo, hi=hi)] * n


def _layer_pattern(g: GGUFFile, key: str, n: int) -> list[bool]:
    """The per-layer boolean array at key (true = sliding), one entry per layer."""
    _present(g, key, _REQUIRED)
    if not _is_array_of(g, key, (_BOOL,)):
        raise _bad_value(g, key, f"must list every layer as booleans, not {_type_name(g, key)}")
    if len(g.fields[key]) != n:
        raise _bad_value(g, key, f"has {len(g.fields[key])} entries for {n} layers")
    return [bool(v) for v in g.fields[key]]


# -- hyper-parameters --------------------------------------------------------------------------------

def gemma3_config(g: GGUFFile, tensors: dict) -> dict:
    """The Hugging Face config.json of a Gemma 3 text GGUF."""
    a = "gemma3"
    layers = _int(g, f"{a}.block_count", hi=_MAX_LAYERS)
    hidden = _int(g, f"{a}.embedding_length")
    heads = _int(g, f"{a}.attention.head_count", hi=_MAX_HEADS)
    head_dim = _int(g, f"{a}.attention.key_length", max(hidden // heads, 1), hi=_MAX_HEAD_DIM)
    key = f"{a}.attention.sliding_window_pattern"
    if key in g.fields and g.value_types[key][0] == _ARRAY:
        types = ["sliding_attention" if s else "full_attention" for s in _layer_pattern(g, key, layers)]
    else:
        period = _int(g, key, 6, hi=_MAX_LAYERS)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    scaling_type = _str(g, f"{a}.rope.scaling.type", "none")
    factor = _float(g, f"{a}.rope.scaling.factor", None, lo=1e-6, hi=1e6)
    if scaling_type not in ("none", "linear"):
        raise ConvertError(f"{g.path}: GGUF rope scaling {scaling_type!r} is not supported for gemma3")
    full_rope = {"rope_type": "default", "rope_theta": _float(g, f"{a}.rope.freq_base", 10000.0, lo=1.0)}
    if scaling_type == "linear" and factor:
        full_rope.update(rope_type="linear", factor=factor)
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": _int(g, f"{a}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(g, f"{a}.attention.head_count_kv", heads, hi=_MAX_HEADS), "head_dim": head_dim,
        # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B, which scales by 1/sqrt(hidden / heads).
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "rms_norm_eps": _float(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-6, lo=1e-12, hi=1.0),
        "sliding_window": _int(g, f"{a}.attention.sliding_window", hi=_MAX_POSITIONS),
        "max_position_embeddings": _int(g, f"{a}.context_length", 32768, hi=_MAX_POSITIONS),
        "layer_types": types,
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": _float(g, f"{a}.rope.freq_base_swa", 10000.0, lo=1.0)}},
        "final_logit_softcapping": _float(g, f"{a}.final_logit_softcapping", None, lo=1e-3, hi=1e6),
        "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
        **_common(g, tensors, ("<end_of_turn>",)),
    }


def gemma4_config(g: GGUFFile, tensors: dict) -> dict:
    """The Hugging Face config.json of the text part of a gemma4_unified GGUF."""
    a = "gemma4"
    layers = _int(g, f"{a}.block_count", hi=_MAX_LAYERS)
    if _int(g, f"{a}.embedding_length_per_layer_input", 0, lo=0):
        raise ConvertError(f"{g.path}: this Gemma 4 GGUF has per-layer embeddings (E2B/E4B), which gemma-mlx "
                           "does not run")
    if _int(g, f"{a}.expert_count", 0, lo=0):
        raise ConvertError(f"{g.path}: this Gemma 4 GGUF is a mixture of experts, which gemma-mlx does not run")
    swa = _layer_pattern(g, f"{a}.attention.sliding_window_pattern", layers)
    types = ["sliding_attention" if s else "full_attention" for s in swa]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    kv = _per_layer(g, f"{a}.attention.head_count_kv", layers, hi=_MAX_HEADS)
    heads = _per_layer(g, f"{a}.attention.head_count", layers, hi=_MAX_HEADS)
    ff = _per_layer(g, f"{a}.feed_forward_length", layers)
    shared = _int(g, f"{a}.attention.shared_kv_layers", 0, lo=0, hi=layers)
    double_wide = ff != [ff[0]] * layers
    if len(set(heads)) != 1 or len({kv[i] for i in sliding}) > 1 or len({kv[i] for i in full}) > 1 or (
            double_wide and ff != [ff[0]] * (layers - shared) + [2 * ff[0]] * shared):
        raise ConvertError(f"{g.path}: GGUF per-layer head counts / FFN widths vary in a way gemma4_unified "
                           "cannot express")
    head_dim = _int(g, f"{a}.attention.key_length_swa", hi=_MAX_HEAD_DIM)
    global_dim = _int(g, f"{a}.attention.key_length", hi=_MAX_HEAD_DIM)
    rot_swa = _int(g, f"{a}.rope.dimension_count_swa", head_dim, lo=0, hi=_MAX_HEAD_DIM)
    if rot_swa != head_dim:
        raise ConvertError(f"{g.path}: GGUF rotates {rot_swa} of {head_dim} dims on sliding layers; only full "
                           "rotation is supported there")
    theta = _float(g, f"{a}.rope.freq_base", 10000.0, lo=1.0)
    full_rope = {"rope_type": "proportional", "rope_theta": theta,
                 "partial_rotary_factor": _partial_rotary_factor(g, tensors, global_dim) if full else 1.0}
    k_eq_v = bool(full) and all(f"blk.{i}.attn_v.weight" not in tensors for i in full)
    if any(f"blk.{i}.attn_v.weight" not in tensors for i in sliding):
        raise ConvertError(f"{g.path}: GGUF sliding-attention layer without attn_v: not a Gemma 4 layout")
    text = {
        "model_type": "gemma4_unified_text", "hidden_size": _int(g, f"{a}.embedding_length"),
        "num_hidden_layers": layers, "intermediate_size": ff[0], "use_double_wide_mlp": double_wide,
        "num_attention_heads": heads[0], "head_dim": head_dim, "global_head_dim": global_dim,
        "num_key_value_heads": kv[sliding[0]] if sliding else kv[0],
        "num_global_key_value_heads": kv[full[0]] if full else None, "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": shared, "hidden_size_per_layer_input": 0, "layer_types": types,
        "sliding_window": _int(g, f"{a}.attention.sliding_window", hi=_MAX_POSITIONS),
        "rms_norm_eps": _float(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-6, lo=1e-12, hi=1.0),
        "max_position_embeddings": _int(g, f"{a}.context_length", 131072, hi=_MAX_POSITIONS),
        "final_logit_softcapping": _float(g, f"{a}.final_logit_softcapping", None, lo=1e-3, hi=1e6),
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": _float(g, f"{a}.rope.freq_base_swa", theta, lo=1.0)}},
        "hidden_activation": "gelu_pytorch_tanh", "use_bidirectional_attention": "vision",
        **_common(g, tensors, ("<turn|>", "<|tool_response>")),
    }
    return {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
            "text_config": text, **{k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                         "tie_word_embeddings", "vocab_size")}}


def _partial_rotary_factor(g: GGUFFile, tensors: dict, head_dim: int) -> float:
    t = tensors.get("rope_freqs.weight")
    if t is None:
        raise ConvertError(f"{g.path}: GGUF lacks rope_freqs.weight, which holds Gemma 4's partial rotation")
    factors = np.asarray(t.data, dtype=np.float32).reshape(-1) if t.tensor_type.name == "F32" else None
    rotated = int((factors == 1.0).sum()) if factors is not None else 0
    if factors is None or factors.size != head_dim // 2 or not (factors[:rotated] == 1.0).all() or not (
            factors[rotated:] > 1e20).all():
        raise ConvertError(f"{g.path}: GGUF rope_freqs.weight is not the proportional-RoPE pattern (F32: 1 ... 1, "
                           "1e30 ... 1e30)")
    return 2 * rotated / head_dim


def _common(g: GGUFFile, tensors: dict, turn_ends: tuple[str, ...]) -> dict:
    """Vocabulary size, tying and special ids; the chat turn-end tokens are end-of-sequence ids too."""
    embed = tensors.get("token_embd.weight")
    vocab = int(embed.shape[0]) if embed is not None and len(embed.shape) == 2 else 0
    top = max(vocab - 1, 0)

    def token(kind: str, default: int) -> int:
        return _int(g, f"tokenizer.ggml.{kind}_token_id", default, lo=0, hi=top)

    eos = token("eos", 1)
    extra = [token(k, -1) if f"tokenizer.ggml.{k}_token_id" in g.fields else -1 for k in ("eot", "eom")]
    ends = [i for i in extra if i >= 0] + _token_ids(g, turn_ends)
    return {"vocab_size": vocab, "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": token("bos", 2), "eos_token_id": [eos] + [i for i in dict.fromkeys(ends) if i != eos],
            "pad_token_id": token("padding", 0)}


_NEVER_GENERATED = ("<image|>", "<audio|>")  # Gemma 4's synthetic end-of-media rows


def _vocabulary(g: GGUFFile) -> list[str] | None:
    """tokenizer.ggml.tokens, or None when the file has no vocabulary."""
    key = "tokenizer.ggml.tokens"
    if key not in g.fields:
        return None
    if not _is_array_of(g, key, (_STRING,)):
        raise _bad_value(g, key, f"must be an array of strings, not {_type_name(g, key)}")
    return g.fields[key]


def _token_ids(g: GGUFFile, wanted: tuple[str, ...]) -> list[int]:
    tokens = _vocabulary(g) or []
    found = {}
    for i, text in enumerate(tokens):
        if text in wanted:
            found.setdefault(text, i)
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

def _release(g: GGUFFile, offset: int, length: int) -> None:
    """Drop mapped pages already copied (the whole file is mapped; they would count as ours)."""
    if hasattr(mmap, "MADV_DONTNEED"):
        start = offset - offset % mmap.PAGESIZE
        try:
            g.mm.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):
            pass


def write_spec(t: GGUFTensor, key: str, layers: int, *, bits: int | None, keep_blocks: bool, group_size: int,
               mode: str, recipe: str) -> tuple[QuantSpec | None, bool]:
    """(spec, repacked): how t is written (None: in float), and whether its blocks are repacked as they are.

    Kept blocks (bits "auto") are repacked where MLX holds them exactly, else re-quantized finer; an explicit
    bits treats every matrix as a float checkpoint's (the recipe decides), repacking only where that gives the
    very spec asked for."""
    kind = t.tensor_type.name
    if bits is None:
        return None, False
    quantized = kind not in FLOAT_TYPES
    if keep_blocks and quantized:
        if kind in REPACKED:
            return QuantSpec(REPACK_BITS[kind], 32), True
        return (requantize_spec(kind) if t.shape[1] % 32 == 0 else None), False
    spec = quant_spec(key, t.shape, layers, bits, group_size, mode, recipe)
    return spec, quantized and kind in REPACKED and spec == QuantSpec(REPACK_BITS[kind], 32)


def tensor_source(g: GGUFFile, t: GGUFTensor, key: str, spec: QuantSpec | None, repacked: bool,
                  norm_shift: float) -> Source:
    """The writer's reader of t's rows: repacked blocks, or float rows (dequantized, norm shift undone)."""
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    shape = t.shape
    rows = shape[0]
    data = t.data
    per_row = t.n_bytes // rows

    def raw_rows(r0: int, r1: int) -> np.ndarray:
        block = np.array(data[r0:r1])
        _release(g, t.data_offset + r0 * per_row, (r1 - r0) * per_row)
        return block

    if repacked:
        return Source(key, shape, t.n_bytes, lambda r0, r1: repack(kind, raw_rows(r0, r1), r1 - r0, shape[1]),
                      packed=spec)

    def read(r0: int, r1: int) -> mx.array:
        block = raw_rows(r0, r1)
        if kind == "BF16":
            value = mx.array(block).view(mx.bfloat16).astype(mx.float32)
        elif kind in ("F32", "F16"):
            value = mx.array(block)
        else:
            value = mx.array(dequantize(block, t.tensor_type).reshape((r1 - r0, *shape[1:])))
        return value - norm_shift if norm_shift else value

    return Source(key, shape, t.n_bytes, read, requantize=spec)


def card_settings(decided: list[tuple[GGUFTensor, QuantSpec | None, bool]], *, bits: int | None,
                  keep_blocks: bool, group_size: int, mode: str, recipe: str, dtype: str) -> str:
    """The model card's quantization line: the rule applied, then what became of each GGUF tensor type."""
    if bits is None:
        head = f"none: every tensor dequantized to {dtype}"
    elif keep_blocks:
        head = (f"auto: the GGUF's quantized blocks kept (repacked exactly where MLX holds them, else re-quantized "
                f"finer), its float matrices at {bits}-bit {mode}, group {group_size}, recipe {recipe}")
    else:
        head = (f"{bits}-bit {mode}, group {group_size}, recipe {recipe}: every matrix re-quantized from the GGUF "
                "(blocks already at exactly that precision repacked)")
    outcomes: dict[str, int] = {}
    for t, spec, repacked in decided:
        done = (f"{dtype}" if spec is None else f"{spec.bits}-bit {spec.mode} g{spec.group_size}"
                + (" (repacked exactly)" if repacked else ""))
        label = f"{t.tensor_type.name} -> {done}"
        outcomes[label] = outcomes.get(label, 0) + 1
    return head + "; tensors by GGUF type: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))


def _check_tensors(g: GGUFFile, arch: str, config) -> list[tuple[GGUFTensor, str]]:
    """(tensor, canonical name) of every model tensor, each of the shape the metadata implies and readable."""
    from gguf.quants import dequantize

    expected = expected_shapes(config)
    names = gguf_names(arch, expected)
    chosen, seen, tried = [], set(), set()
    for t in g.tensors:
        if t.name == "rope_freqs.weight":
            continue
        key = names.get(t.name)
        if key is None:
            raise ConvertError(f"{g.path}: GGUF tensor {t.name} has no counterpart in a {arch} text model "
                               "with this metadata (config/weights mismatch)")
        if t.shape != expected[key]:
            raise ConvertError(f"{g.path}: GGUF tensor {t.name} has shape {list(t.shape)}, the metadata implies "
                               f"{list(expected[key])} (config/weights mismatch)")
        kind = t.tensor_type.name
        if kind not in FLOAT_TYPES and len(t.shape) != 2:
            # llama.cpp keeps every 1-D tensor in F32; blocks are read a row at a time, so only for matrices.
            raise ConvertError(f"{g.path}: GGUF tensor {t.name} is a {len(t.shape)}-D {kind} tensor; only "
                               "matrices can be block-quantized (1-D tensors are F32, F16 or BF16)")
        if kind not in FLOAT_TYPES + REPACKED and kind not in tried:
            tried.add(kind)
            try:
                dequantize(np.array(t.data[:1]), t.tensor_type)
            except (NotImplementedError, KeyError):
                raise ConvertError(f"{g.path}: GGUF tensor {t.name} uses {kind}, which cannot be "
                                   "dequantized here") from None
        seen.add(key)
        chosen.append((t, key))
    missing = sorted(expected.keys() - seen)
    if missing:
        raise ConvertError(f"{g.path}: tensor(s) missing from the GGUF: {', '.join(missing[:5])}")
    return chosen


# -- sidecars ----------------------------------------------------------------------------------------

def _suppressed(g: GGUFFile, arch: str, vocab: int) -> list[int]:
    """Ids never to generate: tokenizer.ggml.suppress_tokens, else Gemma 4's end-of-media rows."""
    key = "tokenizer.ggml.suppress_tokens"
    if key in g.fields:
        if g.value_types[key][0] == _ARRAY:
            return _int_list(g, key, lo=0, hi=vocab - 1)
        return [_int(g, key, lo=0, hi=vocab - 1)]
    return _token_ids(g, _NEVER_GENERATED) if arch == "gemma4" else []


def write_tokenizer(g: GGUFFile, out: Path, arch: str, raw: dict) -> str | None:
    """tokenizer.json / tokenizer_config.json from the GGUF vocabulary, the chat template, generation config."""
    note = None
    if _vocabulary(g) is not None:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:  # pragma: no cover - transformers comes with mlx-lm
            raise ConvertError("building a tokenizer from GGUF needs transformers") from None
        # The same backend AutoTokenizer builds for a GGUF (GemmaTokenizer's), without AutoTokenizer's second
        # full read of the file for a model config.
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
        except Exception as e:  # transformers' GGUF tokenizer builder raises whatever a bad vocabulary makes
            raise ConvertError(f"{g.path}: the GGUF vocabulary does not make a tokenizer "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
        tok.save_pretrained(str(out))
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "GemmaTokenizer"
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    else:
        note = "The GGUF carried no vocabulary: add the tokenizer files of the original model."
    template = _str(g, "tokenizer.chat_template", None)
    if template:
        (out / "chat_template.jinja").write_text(template)
    elif arch == "gemma4":
        (out / "chat_template.jinja").write_text(files("gemma_mlx").joinpath("assets/chat_template.jinja").read_text())
        note = "The GGUF carried no chat template; the Gemma 4 template bundled with gemma-mlx was added."
    gen = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"],
           "pad_token_id": raw["pad_token_id"]}
    suppress = _suppressed(g, arch, raw["vocab_size"])
    if suppress:
        gen["suppress_tokens"] = suppress
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return note


def convert_gguf(source: Path, out: Path, *, bits: int | None, keep_blocks: bool, group_size: int, mode: str,
                 recipe: str, dtype: str | None, force: bool, shard_size: int, progress: bool,
                 on_done=None) -> ConvertSummary:
    """Convert a Gemma 3 / Gemma 4 GGUF file into an MLX model directory at out (on_done: see atomic_output)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConvertError("reading GGUF files needs the gguf package: pip install 'gemma-mlx[gguf]'") from None

    start = time.perf_counter()
    check_recipe(recipe)
    if not source.is_file():
        raise ConvertError(f"{source}: no such GGUF file" if not source.exists() else
                           f"{source}: not a regular file")
    g = read_gguf(source)
    arch = _str(g, "general.architecture", None)
    if arch == "clip":
        kinds = [_str(g, k, None) for k in ("clip.vision.projector_type", "clip.audio.projector_type",
                                             "clip.projector_type")]
        kinds = ", ".join(k for k in kinds if k) or "unknown"
        raise ConvertError(f"{source}: this is a llama.cpp mmproj file (projector {kinds}), not a text model; "
                           "convert the text GGUF (for the vision/audio front end, convert the safetensors release)")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{source}: GGUF architecture {arch!r} is not supported (supported: "
                           f"{', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in g.tensors}
    raw = gemma3_config(g, tensors) if arch == "gemma3" else gemma4_config(g, tensors)
    try:
        config = parse_config(raw)
    except ConfigError as e:
        raise ConvertError(f"{source}: GGUF metadata does not describe a usable model: {e}") from None
    chosen = _check_tensors(g, arch, config)
    tokens = _vocabulary(g)
    if tokens is not None and len(tokens) != raw["vocab_size"]:
        raise ConvertError(f"{source}: the GGUF vocabulary has {len(tokens)} tokens but token_embd "
                           f"has {raw['vocab_size']} rows (llama.cpp needs them equal)")
    # GGUF scales are fp16: float16 keeps Q4_0 ... Q8_0 exact (bfloat16 would round them).
    target = parse_dtype(dtype or "float16")
    shift = 1.0 if arch == "gemma3" else 0.0
    options = {"bits": bits, "keep_blocks": keep_blocks, "group_size": group_size, "mode": mode, "recipe": recipe}
    decided = [(t, key, *write_spec(t, key, config.text.num_hidden_layers, **options)) for t, key in chosen]
    sources = [tensor_source(g, t, key, spec, repacked, shift if key.endswith("norm.weight") else 0.0)
               for t, key, spec, repacked in decided]
    settings = card_settings([(t, spec, repacked) for t, _, spec, repacked in decided], **options,
                             dtype=dtype or "float16")

    def fill(tmp: Path) -> dict:
        note = write_tokenizer(g, tmp, arch, raw)
        card = {"name": source.stem, "source": source.name, "format": f"GGUF, {arch}", "settings": settings,
                "note": note}
        return write_model(tmp, sources, config, raw, bits=bits, group_size=group_size, mode=mode, recipe=recipe,
                           target=target, shard_size=shard_size, progress=progress, card=card)

    return atomic_output(Path(out), force, fill, start, protect=[source], on_done=on_done)
