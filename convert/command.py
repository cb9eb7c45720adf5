"""`gemma-mlx convert`: the click command over gemma_mlx.convert.convert."""

from __future__ import annotations

import click

from .hf import DEFAULT_SHARD_SIZE
from .quantize import DEFAULT_RECIPE, MODE_RULES, RECIPES


@click.command("convert")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (must not exist, or --force).")
@click.option("-q", "--bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "none"]), default="4",
              show_default=True, help="Quantization bits ('none' keeps every tensor in --dtype).")
@click.option("--group-size", type=click.Choice(["16", "32", "64", "128"]), default="64", show_default=True)
@click.option("--mode", type=click.Choice(list(MODE_RULES)), default="affine", show_default=True)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="What to quantize: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="dtype of the tensors kept in float (and of the quantization scales).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True, help="Bytes per shard.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new model is complete).")
def convert_command(source, out, bits, group_size, mode, recipe, dtype, revision, shard_size, force):
    """Convert SOURCE (a Hugging Face checkpoint directory or hub repo id) into an MLX model at OUT.

    Tensors are streamed one at a time from memory-mapped files, so converting the 24 GB bf16 12B checkpoint
    needs about one shard of memory. The output loads in gemma-mlx, mlx-vlm and mlx-lm.
    """
    from . import convert

    summary = convert(source, out, bits=None if bits == "none" else int(bits), group_size=int(group_size),
                      mode=mode, recipe=recipe, dtype=dtype, revision=revision, force=force, shard_size=shard_size)
    click.echo(str(summary))
