"""Checkpoints: find the files (local directory or Hugging Face hub), check them, map names, load lazily.

Reads the layouts people have: Hugging Face safetensors as Google/transformers write them (single file or
sharded with an index), and MLX directories written by gemma-mlx, mlx-vlm or mlx-lm (optionally quantized,
with a ``quantization`` block in config.json). Tensors are memory-mapped by ``mx.load`` and only read when
first used, so a 24 GB checkpoint is never held in RAM twice.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import GEMMA3_TEXT, ModelConfig, load_config
from .errors import InputError, WeightsError
from .jsonfile import open_regular, parse_json, read_json_object, regular_file
from .model.linear import use_prefill_friendly_linears
from .platform import default_dtype

# Files a model needs; everything a download asks the hub for.
MODEL_FILE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer.model", "*.txt",
]

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype:
    """An mx.Dtype from a name like 'bfloat16' (None -> the platform default)."""
    if name is None:
        return default_dtype()
    if isinstance(name, mx.Dtype):
        return name
    table = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
             "float16": mx.float16, "fp16": mx.float16}
    if not isinstance(name, str) or name not in table:
        raise InputError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16")
    return table[name]


# Measured on the tiny model (tests/test_config_hardening.py): once the residual stream peaks past float16's
# largest value, 65504, float16 turns it into inf and every logit into NaN, while bfloat16 and float32 (8 exponent
# bits) stay finite; trained Gemma checkpoints carry residual activations of that size, random tiny ones do not.
FLOAT16_REFUSAL = ("float16 cannot compute Gemma: its residual stream grows past float16's largest value (65504), "
                   "which makes every logit NaN; use bfloat16 (same memory) or float32")


def compute_dtype(name: str | mx.Dtype | None) -> mx.Dtype:
    """The dtype a model computes in: parse_dtype's, with float16 refused (it overflows on Gemma)."""
    dtype = parse_dtype(name)
    if dtype == mx.float16:
        raise InputError(FLOAT16_REFUSAL)
    return dtype


# -- locating a checkpoint ---------------------------------------------------------------------------

def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the model: the path itself, or a hub repo id downloaded into the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise WeightsError(f"{name}: no such file or directory (and not a Hugging Face repo id like 'google/x')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=MODEL_FILE_PATTERNS))
    except RepositoryNotFoundError:
        raise WeightsError(f"{name}: no such model on the Hugging Face hub (or it is gated: run "
                           "`huggingface-cli login` after accepting its licence)") from None
    except LocalEntryNotFoundError:
        raise WeightsError(f"{name}: not in the local Hugging Face cache and the hub cannot be reached; "
                           "connect once to download it, or pass a local directory") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{name}: download failed: {e}") from None


def _shard_name_problem(name) -> str | None:
    """Why an index's shard name does not name a file in the checkpoint directory itself, or None if it does."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name or "/" in name or "\\" in name or name in (".", ".."):
        return "is not a plain file name in the checkpoint directory"
    return None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names (all must exist), else every *.safetensors.

    Every shard is a regular file directly in model_dir (a symbolic link to one, as the hub cache's snapshots
    hold, is fine); an index naming anything else is refused without looking at what it names.
    """
    index = model_dir / "model.safetensors.index.json"
    data = read_json_object(index, error=WeightsError, missing=None)
    if data is not None:
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} is not a valid safetensors index: weight_map must be a non-empty object "
                               "of tensor name -> shard file")
        for tensor, name in weight_map.items():
            problem = _shard_name_problem(name)
            if problem:
                shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
                raise WeightsError(f"{index}: tensor {tensor[:80]!r} names shard {shown}, which {problem}")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if regular_file(model_dir / f, WeightsError, "shard") is None]
        if missing:
            raise WeightsError(f"{model_dir}: the index lists shard(s) that are missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        regular_file(f, WeightsError, "shard")
    return files


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


MAX_HEADER_BYTES = 100_000_000
MAX_TENSOR_RANK = 8


def _no_duplicate_names(pairs: list) -> dict:
    """A JSON object's pairs as a dict; a name given twice (which readers resolve differently) is refused."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key[:80]!r} is declared twice")
        out[key] = value
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors a safetensors file declares and its metadata, after checking the file is complete.

    Checked: the header is a JSON object of well-formed entries, every tensor's bytes match its shape and dtype,
    lie inside the file and overlap no other tensor's.
    """
    f = open_regular(path, WeightsError, "safetensors file")
    if f is None:
        raise WeightsError(f"{path}: no such safetensors file")
    with f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file)")
        header_bytes = f.read(n)
    try:
        header = parse_json(header_bytes, WeightsError, f"{path}: safetensors header", _no_duplicate_names)
    except WeightsError as e:
        raise WeightsError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    tensors = {}
    for name, info in header.items():
        entry = info if isinstance(info, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_RANK and all(map(_is_count, shape))
                and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1] and isinstance(dtype, str)):
            raise WeightsError(f"{path}: corrupt safetensors entry for {name[:80]!r}")
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {dtype[:20]!r}")
        start, end = offsets
        count = 1
        for d in shape:
            count *= d
        if end - start != count * SAFETENSORS_DTYPES[dtype]:
            raise WeightsError(f"{path}: tensor {name} declares {end - start} bytes for shape {list(shape)} {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)
    data_size = size - 8 - n
    previous = None
    for info_name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_size:
            raise WeightsError(f"{path}: file is truncated ({size} bytes, tensor {info_name} needs "
                               f"{8 + n + info.end})")
        if previous is not None and info.start < previous[1].end and info.start < info.end:
            raise WeightsError(f"{path}: tensors {previous[0]} and {info_name} overlap in the file")
        if info.start < info.end:
            previous = (info_name, info)
    return tensors, meta


def load_raw_weights(model_dir: Path) -> dict[str, mx.array]:
    """All tensors of the checkpoint, lazily memory-mapped, under their on-disk names."""
    weights: dict[str, mx.array] = {}
    for path in safetensors_files(model_dir):
        infos, _ = read_safetensors_header(path)
        if any(i.dtype.startswith("F8") for i in infos.values()):
            raise WeightsError(f"{path}: FP8 tensors are not supported; convert from the bf16 checkpoint")
        try:
            loaded = mx.load(str(path))
        except Exception as e:  # MLX raises plain RuntimeError/ValueError for unreadable files
            raise WeightsError(f"{path}: cannot be read as safetensors: {e}") from None
        dup = weights.keys() & loaded.keys()
        if dup:
            raise WeightsError(f"{path}: tensor {sorted(dup)[0]} appears in more than one shard")
        weights.update(loaded)
    return weights


# -- names --------------------------------------------------------------------------------------------

# Prefixes of other layouts -> ours (which are the Hugging Face on-disk names).
_PREFIX_MAP = [
    ("language_model.model.", "model.language_model."),  # mlx-vlm / mlx-lm gemma4
    ("model.embed_vision.multimodal_embedder.", "model.embed_vision."),  # transformers in-memory names
    ("vision_embedder.", "model.vision_embedder."),
    ("embed_vision.", "model.embed_vision."),
    ("embed_audio.", "model.embed_audio."),
]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def canonical_name(name: str, model_type: str) -> str:
    """The name a tensor (or a module path) has in our model, whatever layout it comes from."""
    if model_type == GEMMA3_TEXT:
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model."):]
        if name.startswith("model.") and not name.startswith("model.language_model."):
            return "model.language_model." + name[len("model."):]
        return name
    if name.startswith("model.embed_vision.") and any(
            name.startswith(f"model.embed_vision.{p}") for p in ("patch_", "pos_")):
        return "model.vision_embedder." + name[len("model.embed_vision."):]  # transformers in-memory names
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def canonical_weights(weights: dict[str, mx.array], config: ModelConfig) -> dict[str, mx.array]:
    """Weights renamed to our module names, minus the tied LM head and non-persistent buffers."""
    out = {}
    for name, value in weights.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        key = canonical_name(name, config.model_type)
        if config.text.tie_word_embeddings and key in ("lm_head.weight", "language_model.lm_head.weight",
                                                       "lm_head.scales", "lm_head.biases"):
            continue  # tied: the head is the embedding table
        if key in out:
            raise WeightsError(f"tensor {name} duplicates {key} under another name")
        out[key] = value
    return out


# -- building the model ------------------------------------------------------------------------------

def apply_quantization(model: nn.Module, weights: dict[str, mx.array], config: ModelConfig) -> None:
    """Swap Linear/Embedding modules for quantized ones wherever the checkpoint holds quantized tensors."""
    quant = config.quantization
    if not quant:
        if any(k.endswith(".scales") for k in weights):
            raise WeightsError("checkpoint holds quantized tensors (*.scales) but config.json has no "
                               "'quantization' block")
        return
    overrides = {canonical_name(k, config.model_type): v for k, v in quant.items() if isinstance(v, (dict, bool))}
    default = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        spec = overrides.get(path, default)
        if spec is False:
            return False
        return spec if isinstance(spec, dict) else default

    try:
        nn.quantize(model, group_size=default.get("group_size", 64), bits=default.get("bits", 4),
                    mode=default.get("mode", "affine"), class_predicate=predicate)
    except ValueError as e:  # MLX refuses a group size / bits / mode combination or a layer width
        raise WeightsError(f"config.json's quantization block does not fit this model: {e}") from None
    use_prefill_friendly_linears(model)


def load_weights_into(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype) -> None:
    """Check names and shapes against the model, cast floating tensors to dtype, and load them."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(f"checkpoint has tensor(s) the config does not describe: "
                           f"{', '.join(unexpected[:5])}{more}")
    cast = []
    for name, value in weights.items():
        want = expected[name].shape
        if tuple(value.shape) != tuple(want):
            raise WeightsError(f"tensor {name} has shape {list(value.shape)}, the config implies {list(want)}")
        floating = mx.issubdtype(value.dtype, mx.floating)
        if floating != mx.issubdtype(expected[name].dtype, mx.floating):
            need = "floating-point" if not floating else f"{expected[name].dtype} (quantized)"
            raise WeightsError(f"tensor {name} has dtype {value.dtype}, the model needs {need} values")
        if floating and value.dtype != dtype:
            value = value.astype(dtype)
        cast.append((name, value))
    model.load_weights(cast, strict=True)


def load_model(model: str | os.PathLike, *, dtype: str | mx.Dtype | None = None, revision: str | None = None,
               vision_mask: str | None = None, lazy: bool = False):
    """(Model, model directory) for a local checkpoint directory or a hub repo id."""
    from .model.masks import VISION_BIDIRECTIONAL_SLIDING, VISION_MASK_MODES
    from .model.multimodal import Model

    compute = compute_dtype(dtype)  # before any download or read
    if vision_mask is not None and vision_mask not in VISION_MASK_MODES:
        raise InputError(f"vision_mask must be one of {', '.join(VISION_MASK_MODES)}, got {vision_mask!r}")
    model_dir = resolve_model_path(model, revision)
    if model_dir.is_file():
        raise WeightsError(f"{model_dir} is a file; pass the model directory (convert .gguf files first with "
                           "`gemma-mlx convert`)")
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir} is not a model directory")
    config = load_config(model_dir)
    weights = canonical_weights(load_raw_weights(model_dir), config)
    net = Model(config, vision_mask=vision_mask or VISION_BIDIRECTIONAL_SLIDING)
    apply_quantization(net, weights, config)
    load_weights_into(net, weights, compute)
    if not lazy:
        mx.eval(net.parameters())
    net.eval()
    return net, model_dir
