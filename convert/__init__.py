"""Checkpoint conversion: Hugging Face safetensors or Gemma 3 GGUF -> MLX (4/8-bit), streaming and atomic."""

from __future__ import annotations

from pathlib import Path

from .hf import DEFAULT_SHARD_SIZE, ConvertSummary, convert_hf
from .quantize import DEFAULT_RECIPE, RECIPES, check_mode


def convert(source: str | Path, out: str | Path, *, bits: int | None = 4, group_size: int = 64,
            mode: str = "affine", recipe: str = DEFAULT_RECIPE, dtype: str | None = "bfloat16",
            revision: str | None = None, force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
            progress: bool = True) -> ConvertSummary:
    """Convert SOURCE (a checkpoint directory, a hub repo id or a Gemma 3 .gguf file) into an MLX directory OUT."""
    if bits:
        check_mode(bits, group_size, mode)
    if str(source).endswith(".gguf"):
        from .gguf import convert_gguf

        if not Path(source).is_file():
            from gemma_mlx.errors import ConvertError

            raise ConvertError(f"{source}: no such GGUF file")
        return convert_gguf(Path(source), Path(out), bits=bits, group_size=group_size, mode=mode, recipe=recipe,
                            dtype=None if dtype == "bfloat16" else dtype, force=force, shard_size=shard_size,
                            progress=progress)
    return convert_hf(source, out, bits=bits, group_size=group_size, mode=mode, recipe=recipe, dtype=dtype,
                      revision=revision, force=force, shard_size=shard_size, progress=progress)


__all__ = ["RECIPES", "ConvertSummary", "convert"]
