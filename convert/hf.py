"""Hugging Face safetensors checkpoints (a directory or a hub repo id) as a stream of memory-mapped tensors.

Every header is read and checked against the model the config describes before anything is written, so a
bad checkpoint fails fast with an error naming the file and tensor. Tensors are then read a block of rows at a
time straight from the mapped files; the pages read are handed back to the OS as soon as they are copied, so
neither the checkpoint nor a tensor is ever resident as a whole.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx.config import load_config
from gemma_mlx.errors import ConfigError, ConvertError, WeightsError
from gemma_mlx.weights import canonical_name, parse_dtype, read_safetensors_header, resolve_model_path, safetensors_files

from .quantize import check_recipe
from .sidefiles import check_source_side_files, present_side_files
from .writer import ConvertSummary, Source, atomic_output, write_model

NUMPY_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
TENSOR_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def expected_shapes(config) -> dict[str, tuple]:
    """Every parameter the config implies, with its shape (the model is built lazily: nothing is allocated)."""
    from gemma_mlx.model.multimodal import Model

    return {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}


class MappedSafetensors:
    """A safetensors file mapped read-only; rows of a tensor come out as MLX arrays."""

    def __init__(self, path: Path):
        self.path = path
        self.infos, _ = read_safetensors_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data_start = 8 + n

    def reader(self, name: str):
        info = self.infos[name]
        np_dtype = NUMPY_DTYPES[info.dtype]
        rows = info.shape[0] if info.shape else 1
        per_row = (info.end - info.start) // rows
        tail = tuple(info.shape[1:])

        def read(r0: int, r1: int) -> mx.array:
            offset = self.data_start + info.start + r0 * per_row
            view = np.frombuffer(self.map, np_dtype, (r1 - r0) * per_row // np.dtype(np_dtype).itemsize, offset)
            array = mx.array(view.reshape((r1 - r0, *tail) if info.shape else ()))
            del view
            self.release(offset, (r1 - r0) * per_row)
            return array.view(mx.bfloat16) if info.dtype == "BF16" else array

        return read

    def release(self, offset: int, length: int) -> None:
        """Drop the mapped pages just copied from this process (they stay in the OS file cache)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            start = offset - offset % mmap.PAGESIZE
            self.map.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a traceback still holds a view; the mapping goes with it
            pass


def _source_dtype(raw: dict, headers: dict[Path, dict]) -> str:
    """The checkpoint's own float dtype: as its config states it, else that of most of its bytes."""
    for d in (raw.get("torch_dtype"), raw.get("dtype"), (raw.get("text_config") or {}).get("dtype")):
        if d in ("bfloat16", "float16", "float32"):
            return d
    size: dict[str, int] = {}
    for infos in headers.values():
        for i in infos.values():
            size[i.dtype] = size.get(i.dtype, 0) + i.end - i.start
    return TENSOR_DTYPES.get(max(size, key=size.get), "bfloat16") if size else "bfloat16"


def _checked_headers(src: Path, config) -> dict[Path, dict]:
    """Every shard's header, after checking the checkpoint holds exactly the tensors the config implies."""
    files = safetensors_files(src)
    headers = {f: read_safetensors_header(f)[0] for f in files}
    index = src / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in headers[src / shard]:
                raise ConvertError(f"{index.name} places tensor {name} in {shard}, which does not hold it")
    expected = expected_shapes(config)
    seen: dict[str, Path] = {}
    for f, infos in headers.items():
        for name, info in infos.items():
            key = canonical_name(name, config.model_type)
            if _skipped(key, config):
                continue
            if info.dtype not in NUMPY_DTYPES:
                raise ConvertError(f"{f.name}: tensor {name} has unsupported dtype {info.dtype} (expected one of "
                                   f"{', '.join(NUMPY_DTYPES)})")
            if key not in expected:
                raise ConvertError(f"{f.name}: tensor {name} is not part of a {config.model_type} model with this "
                                   "config (config/weights mismatch)")
            if tuple(info.shape) != expected[key]:
                raise ConvertError(f"{f.name}: tensor {name} has shape {list(info.shape)}, the config implies "
                                   f"{list(expected[key])} (config/weights mismatch)")
            if key in seen:
                raise ConvertError(f"tensor {name} appears in both {seen[key].name} and {f.name}")
            seen[key] = f
    missing = sorted(expected.keys() - seen.keys())
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConvertError(f"{src}: tensor(s) missing from the checkpoint: {', '.join(missing[:5])}{more}")
    return headers


def _skipped(key: str, config) -> bool:
    return (key == "lm_head.weight" and config.text.tie_word_embeddings) or key.endswith("rotary_emb.inv_freq")


def convert_hf(source: str | Path, out: str | Path, *, bits: int | None, group_size: int, mode: str, recipe: str,
               dtype: str | None, revision: str | None, force: bool, shard_size: int,
               progress: bool, on_done=None) -> ConvertSummary:
    """Convert a Hugging Face checkpoint (directory or hub id) into an MLX directory at out (on_done: see
    atomic_output)."""
    start = time.perf_counter()
    check_recipe(recipe)
    try:
        src = resolve_model_path(source, revision)
        if src.is_file():
            raise ConvertError(f"{src} is a file; pass a checkpoint directory (or a .gguf file)")
        try:
            config = load_config(src)
        except ConfigError as e:
            raise ConvertError(f"{src} is not a Gemma checkpoint gemma-mlx can convert: {e}") from None
        if config.quantization:
            raise ConvertError(f"{src} is already quantized; convert from the bf16/fp32 checkpoint")
        headers = _checked_headers(src, config)
        check_source_side_files(src, config)  # before anything is written: the output would carry them
    except WeightsError as e:
        raise ConvertError(str(e)) from None
    target = parse_dtype(dtype or _source_dtype(config.raw, headers))

    def fill(tmp: Path) -> dict:
        for name in present_side_files(src):
            shutil.copy(src / name, tmp / name)
        mapped = [MappedSafetensors(f) for f in headers]
        try:
            sources = []
            for m in mapped:
                for name, info in sorted(m.infos.items(), key=lambda kv: kv[1].start):
                    key = canonical_name(name, config.model_type)
                    if not _skipped(key, config):
                        sources.append(Source(key, tuple(info.shape), info.end - info.start, m.reader(name)))
            settings = (f"{bits}-bit {mode}, group {group_size}, recipe {recipe}" if bits else "none (float)")
            card = {"name": src.name, "source": str(source), "format": "Hugging Face safetensors",
                    "settings": settings}
            return write_model(tmp, sources, config, config.raw, bits=bits, group_size=group_size, mode=mode,
                               recipe=recipe, target=target, shard_size=shard_size, progress=progress, card=card)
        finally:
            for m in mapped:
                m.close()

    return atomic_output(Path(out), force, fill, start, protect=[src], on_done=on_done)
