"""`gemma-mlx convert`: the click command over gemma_mlx.convert.convert."""

from __future__ import annotations

import re
import signal
import sys

import click

from .quantize import DEFAULT_RECIPE, MODE_RULES, RECIPES
from .writer import DEFAULT_SHARD_SIZE

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def _size(_ctx, _param, value):
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(value).upper())
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 5GB, 512MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@click.command("convert")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (must not exist, or --force).")
@click.option("-q", "--bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "none", "auto"]), default="auto",
              show_default=True, help="Quantization bits ('none' keeps every tensor in --dtype; 'auto' is 4, and "
                                      "keeps a GGUF's quantized blocks as they are, where a number re-quantizes "
                                      "them).")
@click.option("--group-size", type=click.Choice(["16", "32", "64", "128"]), default="64", show_default=True,
              help="Weights per quantization group (16 is nvfp4's).")
@click.option("--mode", type=click.Choice(list(MODE_RULES)), default="affine", show_default=True)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="What to quantize at which precision: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="dtype of the tensors kept in float and of quantization scales [default: the source's; "
                   "float16 for GGUF].")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("--shard-size", default=str(DEFAULT_SHARD_SIZE), callback=_size, show_default="5GB",
              help="Largest output shard (bytes, or with a unit: 512MB, 5GB).")
@click.option("--force", is_flag=True, help="Replace an existing OUT model (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress line.")
def convert_command(source, out, bits, group_size, mode, recipe, dtype, revision, shard_size, force, quiet):
    """Convert SOURCE into an MLX model at OUT.

    SOURCE is a Hugging Face checkpoint directory, a hub repo id (only the files a model needs are downloaded
    into the Hugging Face cache) or a Gemma 3 / Gemma 4 .gguf file. Tensors are streamed from memory-mapped
    files a block at a time, so converting the 24 GB bf16 12B needs well under 1 GB of working memory. The
    output loads in gemma-mlx, mlx-vlm and mlx-lm.
    """
    if not quiet:  # at once: reading headers and building the model's plan is silent for seconds on the 12B
        click.echo(f"converting {source} -> {out}: checking the checkpoint...", err=True)
    from gemma_mlx.interrupts import Terminated, ignore_interrupts, terminate_raises

    from . import convert

    def finished(summary) -> None:  # OUT is in place (interrupts held off): a late one must not report failure
        ignore_interrupts()
        click.echo(str(summary))

    bits = None if bits == "none" else bits if bits == "auto" else int(bits)
    with terminate_raises():  # SIGTERM cleans up as Ctrl-C does, instead of killing the process mid-write
        try:
            convert(source, out, bits=bits, group_size=int(group_size), mode=mode, recipe=recipe, dtype=dtype,
                    revision=revision, force=force, shard_size=shard_size, progress=not quiet, on_done=finished)
        except (KeyboardInterrupt, Terminated) as e:
            what, code = (("terminated", Terminated.exit_code) if isinstance(e, Terminated) else
                          ("interrupted", 128 + int(signal.SIGINT)))
            click.echo(f"{what}: {out} is left as it was", err=True)
            sys.exit(code)
