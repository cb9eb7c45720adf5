"""Checkpoint conversion: Hugging Face safetensors -> MLX (4/8-bit), streaming and atomic."""

from __future__ import annotations

from pathlib import Path

from .hf import DEFAULT_SHARD_SIZE, ConvertSummary, convert_hf
from .quantize import RECIPES, check_mode


def convert(source: str | Path, out: str | Path, *, bits: int | None = 4, group_size: int = 64,
            mode: str = "affine", recipe: str = "default", dtype: str | None = "bfloat16",
            revision: str | None = None, force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
            progress: bool = True) -> ConvertSummary:
    """Convert SOURCE (a local checkpoint directory or a hub repo id) into an MLX model directory OUT."""
    if bits:
        check_mode(bits, group_size, mode)
    return convert_hf(source, out, bits=bits, group_size=group_size, mode=mode, recipe=recipe, dtype=dtype,
                      revision=revision, force=force, shard_size=shard_size, progress=progress)


__all__ = ["RECIPES", "ConvertSummary", "convert"]
