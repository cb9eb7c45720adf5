"""Merge an adapter into a model's weights and write a converted model directory (the converter's writer).

Tensors stream from the loaded model to the converter's writer one row block at a time, so nothing the size of
the whole model is copied: an adapted projection is dequantized (if its base is quantized), gets scale · B A
added and is quantized again with its base's spec; every other tensor passes through, quantized blocks as they
are. With bits="auto" a float base follows the converter's default recipe (4 bits), a quantized base keeps its
precision per tensor; bits=None writes every tensor in float; a number re-quantizes every matrix at that width.
The output is written, checked and renamed into place by the converter (atomic, --force rules, final load check).
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ConvertError
from .lora import LoRALinear, load_adapter


def _spec(module):
    from ..convert.quantize import QuantSpec

    return QuantSpec(module.bits, module.group_size, getattr(module, "mode", "affine"))


def _sources(model, keep_blocks: bool) -> list:
    """The converter's Sources for every tensor of model (canonical names), adapters merged."""
    from ..convert.writer import Source

    sources, handled = [], set()
    for name, module in model.named_modules():
        base, delta = module, None
        if isinstance(module, LoRALinear):
            base, delta = module.base, module.delta()
            handled.update(f"{name}.base.{k}" for k, _ in tree_flatten(base.parameters()))
            handled.update(f"{name}.{k}" for k in ("lora_a", "lora_b"))
        elif name.endswith(".base") or not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        quantized = isinstance(base, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        if not quantized and delta is None:
            continue
        handled.update(f"{name}.{k}" for k, _ in tree_flatten(base.parameters()))
        key = f"{name}.weight"
        if quantized:
            spec = _spec(base)
            w, s, b = base["weight"], base["scales"], base.get("biases")
            shape = (w.shape[0], w.shape[1] * 32 // spec.bits)

            def dequantized(r0, r1, w=w, s=s, b=b, spec=spec):
                return mx.dequantize(w[r0:r1], s[r0:r1], None if b is None else b[r0:r1], spec.group_size,
                                     spec.bits, mode=spec.mode)

            if delta is None and keep_blocks:
                sources.append(Source(key, shape, w.nbytes + s.nbytes, lambda r0, r1, w=w, s=s, b=b:
                                      (w[r0:r1], s[r0:r1], b[r0:r1]), packed=spec))
                continue
            read = dequantized
            requantize = spec if keep_blocks else None
        else:
            read, requantize, shape = (lambda r0, r1, w=base.weight: w[r0:r1]), None, tuple(base.weight.shape)
        if delta is not None:
            read = (lambda r0, r1, read=read, delta=delta:
                    (read(r0, r1).astype(mx.float32) + delta[r0:r1]).astype(mx.float32))
        sources.append(Source(key, shape, shape[0] * shape[1] * 4, read, requantize=requantize))
        if "bias" in base:
            bias = base["bias"]
            sources.append(Source(f"{name}.bias", tuple(bias.shape), bias.nbytes, lambda r0, r1, x=bias: x[r0:r1]))
    for key, value in tree_flatten(model.parameters()):
        if key in handled:
            continue
        sources.append(Source(key, tuple(value.shape), value.nbytes,
                              lambda r0, r1, x=value: x[r0:r1] if x.ndim else x))
    return sources


def fuse(model: str | Path, adapter: str | Path, out: str | Path, *, bits="auto", group_size: int = 64,
         mode: str = "affine", recipe: str | None = None, dtype: str | None = None, force: bool = False,
         shard_size: int | None = None, progress: bool = True, on_done=None):
    """Write model with adapter merged into out (a converted MLX directory); the converter's summary."""
    from ..convert import AUTO_BITS, DEFAULT_BITS
    from ..convert.quantize import DEFAULT_RECIPE, check_mode, check_recipe
    from ..convert.sidefiles import present_side_files
    from ..convert.writer import DEFAULT_SHARD_SIZE, atomic_output, write_model
    from ..weights import load_model, parse_dtype

    start = time.perf_counter()
    recipe = recipe or DEFAULT_RECIPE
    check_recipe(recipe)
    keep_blocks = bits == AUTO_BITS
    if keep_blocks:
        bits = DEFAULT_BITS
    if bits:
        check_mode(bits, group_size, mode)
    net, model_dir = load_model(model)
    load_adapter(net, adapter)
    config = net.config
    first_float = next((v.dtype for _, v in tree_flatten(net.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                       mx.float32)
    target = parse_dtype(dtype) if dtype else first_float
    sources = _sources(net, keep_blocks)
    if not sources:
        raise ConvertError(f"{model}: no tensors to write")

    def fill(tmp: Path) -> dict:
        import shutil

        for name in present_side_files(model_dir):
            if name != "config.json":
                shutil.copy(model_dir / name, tmp / name)
        settings = (f"{bits}-bit {mode}, group {group_size}, recipe {recipe}" if bits else "none (float)")
        card = {"name": Path(out).name, "source": f"{model} + adapter {adapter}", "format": "fused LoRA adapter",
                "settings": settings + ("; quantized blocks of the base kept" if keep_blocks else "")}
        return write_model(tmp, sources, config, dict(config.raw), bits=bits, group_size=group_size, mode=mode,
                           recipe=recipe, target=target, shard_size=shard_size or DEFAULT_SHARD_SIZE,
                           progress=progress, card=card)

    return atomic_output(Path(out), force, fill, start, protect=[Path(model_dir), Path(adapter)], on_done=on_done)
