"""Hugging Face safetensors -> MLX (optionally quantized), tensor by tensor, into a directory written atomically.

Tensors are memory-mapped and converted one at a time into a shard buffer that is flushed at ``shard_size``
bytes, so peak memory stays near one shard plus one tensor whatever the model size. Everything is written into
a temporary directory beside OUT and renamed at the end: an interrupted conversion leaves OUT untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.config import load_config
from gemma_mlx.errors import ConfigError, ConvertError, WeightsError
from gemma_mlx.weights import (
    canonical_name,
    parse_dtype,
    read_safetensors_header,
    resolve_model_path,
    safetensors_files,
)

from .quantize import DEFAULT_RECIPE, RECIPES, QuantSpec, output_name, quant_spec

DEFAULT_SHARD_SIZE = 5 * 1024**3
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Files copied next to the weights: tokenizer, chat template, generation and processor configs.
SIDECAR_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


@dataclass
class ConvertSummary:
    out: Path
    tensors: int
    bytes_on_disk: int
    parameters: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_on_disk / max(self.parameters, 1)

    def __str__(self) -> str:
        return (f"{self.out}: {self.tensors} tensors, {self.bytes_on_disk / 1e9:.2f} GB on disk, "
                f"{self.bits_per_weight:.2f} bits per weight, {self.seconds:.1f} s")


def _expected_shapes(config) -> dict[str, tuple]:
    from gemma_mlx.model.multimodal import Model

    return {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def convert_hf(source: str | Path, out: str | Path, *, bits: int | None = 4, group_size: int = 64,
               mode: str = "affine", recipe: str = DEFAULT_RECIPE, dtype: str | None = "bfloat16",
               revision: str | None = None, force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
               progress: bool = True) -> ConvertSummary:
    """Convert a Hugging Face checkpoint (directory or hub id) into an MLX directory at out."""
    start = time.perf_counter()
    src = resolve_model_path(source, revision)
    if src.is_file():
        raise ConvertError(f"{src} is a file; pass a checkpoint directory (or a .gguf file)")
    try:
        config = load_config(src)
    except ConfigError as e:
        raise ConvertError(f"{src} is not a Gemma checkpoint gemma-mlx can convert: {e}") from None
    if config.quantization:
        raise ConvertError(f"{src} is already quantized; convert from the bf16/fp32 checkpoint")
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    target = parse_dtype(dtype or "bfloat16")
    files = safetensors_files(src)
    headers = {f: read_safetensors_header(f)[0] for f in files}
    expected = _expected_shapes(config)
    seen: dict[str, tuple] = {}
    for f, infos in headers.items():
        for name, info in infos.items():
            key = canonical_name(name, config.model_type)
            if key in ("lm_head.weight",) and config.text.tie_word_embeddings or key.endswith("rotary_emb.inv_freq"):
                continue
            if info.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{f.name}: tensor {name} has unsupported dtype {info.dtype} (expected one of "
                                   f"{', '.join(FLOAT_DTYPES)})")
            if key not in expected:
                raise ConvertError(f"{f.name}: tensor {name} is not part of a {config.model_type} model with this "
                                   "config (config/weights mismatch)")
            if tuple(info.shape) != expected[key]:
                raise ConvertError(f"{f.name}: tensor {name} has shape {list(info.shape)}, the config implies "
                                   f"{list(expected[key])} (config/weights mismatch)")
            seen[key] = info.shape
    missing = sorted(expected.keys() - seen.keys())
    if missing:
        raise ConvertError(f"{src}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}")

    def fill(tmp: Path) -> dict:
        for pattern in SIDECAR_PATTERNS:
            if (src / pattern).is_file():
                shutil.copy(src / pattern, tmp / pattern)
        total = sum(i.end - i.start for infos in headers.values() for i in infos.values())
        return write_model(tmp, _hf_tensors(headers, config), total, config, config.raw, bits=bits,
                           group_size=group_size, mode=mode, recipe=recipe, target=target,
                           shard_size=shard_size, progress=progress, source_name=src.name)

    return atomic_output(Path(out), force, fill, start)


def atomic_output(out: Path, force: bool, fill, start: float) -> ConvertSummary:
    """Run fill(tmp) in a temporary directory beside out, verify what it wrote, then rename it to out."""
    tmp = _prepare_out(out, force)
    try:
        summary = fill(tmp)
        _verify(tmp, summary["written"])
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return ConvertSummary(out, len(summary["written"]), size, summary["parameters"], time.perf_counter() - start)


@dataclass
class Prequantized:
    """A tensor already in MLX's affine layout (repacked GGUF blocks): written as is."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int


def _hf_tensors(headers, config):
    """(canonical name, lazily loaded array, source bytes) for every tensor of a safetensors checkpoint."""
    for f, infos in headers.items():
        arrays = mx.load(str(f))
        for name in sorted(infos):
            key = canonical_name(name, config.model_type)
            if (key == "lm_head.weight" and config.text.tie_word_embeddings) or key.endswith("inv_freq"):
                continue
            yield key, arrays.pop(name), infos[name].end - infos[name].start


def write_model(tmp: Path, tensors, total_bytes: int, config, raw_config: dict, *, bits, group_size, mode, recipe,
                target, shard_size, progress, source_name: str) -> dict:
    """Quantize and shard tensors into tmp, then write the index, config.json and a model card."""
    shard: dict[str, mx.array] = {}
    shard_bytes, shard_files, weight_map, written = 0, [], {}, {}
    overrides: dict[str, dict] = {}
    parameters = 0

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
        shard_files.append(name)
        for k in shard:
            weight_map[k] = name
        shard, shard_bytes = {}, 0

    sink = None if progress else open(os.devnull, "w")
    bar = click.progressbar(length=total_bytes, label="converting", file=sink, show_pos=False,
                            item_show_func=lambda n: n or "")
    with bar:
        for key, value, nbytes in tensors:
            out_key = output_name(key, config.model_type)
            module = out_key.rsplit(".", 1)[0]
            if isinstance(value, Prequantized):
                parameters += value.weight.size * 32 // value.bits
                parts = {f"{module}.weight": value.weight, f"{module}.scales": value.scales.astype(target),
                         f"{module}.biases": value.biases.astype(target)}
                spec = QuantSpec(value.bits, value.group_size, "affine")
            else:
                parameters += value.size
                spec = quant_spec(key, value.shape, config, bits, group_size, mode, recipe)
                if mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(target)
                if spec is not None:
                    q = mx.quantize(value, spec.group_size, spec.bits, mode=spec.mode)
                    parts = {f"{module}.weight": q[0], f"{module}.scales": q[1]}
                    if len(q) > 2 and q[2] is not None:
                        parts[f"{module}.biases"] = q[2]
                else:
                    parts = {out_key: value}
            if spec is not None and (spec.bits, spec.group_size, spec.mode) != (bits, group_size, mode):
                overrides[module] = {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}
            mx.eval(parts)
            for k, v in parts.items():
                shard[k] = v
                shard_bytes += v.nbytes
                written[k] = tuple(v.shape)
            del value
            mx.clear_cache()  # return the source tensor's buffer now, or MLX's cache keeps every one of them
            bar.update(nbytes, key)
            if shard_bytes >= shard_size:
                flush()
        flush()
    if sink is not None:
        sink.close()

    index = {"metadata": {"total_size": sum((tmp / s).stat().st_size for s in shard_files),
                          "total_parameters": parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    raw = published_config(raw_config)
    quantized = bits or overrides
    if quantized:
        quant = {"group_size": group_size, "bits": bits or 8, "mode": mode, **overrides}
        raw["quantization"] = quant
        raw["quantization_config"] = quant
    raw.pop("dtype", None)
    raw["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}[target]
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    (tmp / "README.md").write_text(
        f"# {source_name} ({'%d-bit %s, group %d' % (bits, mode, group_size) if bits else 'unquantized'})\n\n"
        f"Converted to MLX by gemma-mlx (recipe `{recipe}`) from `{source_name}`. Load it with "
        "`gemma_mlx.load(path)`, `gemma-mlx chat PATH`, or mlx-vlm.\n")
    return {"written": written, "parameters": parameters}


def published_config(raw: dict) -> dict:
    """config.json in the form Google published (global_head_dim / num_global_key_value_heads), which every
    reader understands; transformers >= 5.2x writes per_layer_config, which mlx-vlm and mlx-lm ignore."""
    raw = json.loads(json.dumps(raw))
    text = raw.get("text_config")
    per_layer = text.get("per_layer_config") if isinstance(text, dict) else None
    if per_layer:
        types = text.get("layer_types", [])
        full = {str(i) for i, t in enumerate(types) if t == "full_attention"}
        overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
        if set(per_layer) == full and len(overrides) == 1:
            o = next(iter(per_layer.values()))
            text["global_head_dim"] = o.get("head_dim", text.get("head_dim"))
            if "num_key_value_heads" in o:
                text["num_global_key_value_heads"] = o["num_key_value_heads"]
            del text["per_layer_config"]
    return raw


def _verify(tmp: Path, written: dict[str, tuple]) -> None:
    """Re-open the output and check every tensor is present with the shape that was written."""
    found: dict[str, tuple] = {}
    for f in safetensors_files(tmp):
        try:
            infos, _ = read_safetensors_header(f)
        except WeightsError as e:
            raise ConvertError(f"verification failed: {e}") from None
        found.update({k: tuple(i.shape) for k, i in infos.items()})
    missing = [k for k in written if k not in found]
    wrong = [k for k in written if k in found and found[k] != written[k]]
    if missing or wrong:
        raise ConvertError(f"verification failed: missing {missing[:3]}, misshapen {wrong[:3]}")
