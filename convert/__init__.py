"""Checkpoint conversion: Hugging Face safetensors or Gemma 3/4 GGUF -> MLX (quantized), streaming and atomic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from gemma_mlx.errors import ConvertError

from .quantize import DEFAULT_RECIPE, RECIPES, check_mode, check_recipe
from .writer import DEFAULT_SHARD_SIZE, ConvertSummary, check_output

AUTO_BITS = "auto"  # 4 bits; a GGUF's quantized blocks are kept as they are
DEFAULT_BITS = 4


def convert(source: str | Path, out: str | Path, *, bits: int | str | None = AUTO_BITS, group_size: int = 64,
            mode: str = "affine", recipe: str | None = None, dtype: str | None = None, revision: str | None = None,
            force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
            on_done: Callable[[ConvertSummary], None] | None = None) -> ConvertSummary:
    """Convert SOURCE (a checkpoint directory, a hub repo id, or a Gemma 3/4 .gguf file) into an MLX directory OUT.

    bits=None keeps every tensor in float; "auto" is 4 bits. dtype (bfloat16, float16, float32) is that of float
    tensors and quantization scales; None keeps the source's (float16 for GGUF, whose block scales are fp16).
    recipe=None is the default recipe. For a GGUF under bits="auto", quantized blocks keep their precision
    (repacked exactly where MLX can hold them, re-quantized finer otherwise) and 4 bits/recipe apply to its float
    tensors; an explicit bits re-quantizes every matrix as for a float checkpoint.

    on_done(summary), when given, runs once OUT is complete and in place, with Ctrl-C and SIGTERM still held
    off (an interrupt then is raised after it returns, with OUT complete).
    """
    recipe = recipe or DEFAULT_RECIPE
    check_recipe(recipe)
    keep_gguf_blocks = bits == AUTO_BITS
    if keep_gguf_blocks:
        bits = DEFAULT_BITS
    if bits:
        check_mode(bits, group_size, mode)
    if shard_size < 1:
        raise ConvertError(f"shard size must be positive, got {shard_size}")
    local = Path(source).expanduser()
    check_output(out, force, [local] if os.path.exists(local) else [])  # before any reading or downloading
    if str(source).endswith(".gguf"):
        from .gguf import convert_gguf

        return convert_gguf(Path(source).expanduser(), Path(out), bits=bits, keep_blocks=keep_gguf_blocks,
                            group_size=group_size, mode=mode, recipe=recipe, dtype=dtype, force=force,
                            shard_size=shard_size, progress=progress, on_done=on_done)
    from .hf import convert_hf

    return convert_hf(source, out, bits=bits, group_size=group_size, mode=mode, recipe=recipe, dtype=dtype,
                      revision=revision, force=force, shard_size=shard_size, progress=progress, on_done=on_done)


__all__ = ["AUTO_BITS", "DEFAULT_RECIPE", "RECIPES", "ConvertSummary", "convert"]
