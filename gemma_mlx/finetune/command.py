"""`gemma-mlx lora` (train an adapter) and `gemma-mlx fuse` (merge one into the weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import InputError
from .lora import CONFIG_FILE, TEXT_MODULES


def _layers(spec: str | None, num_layers: int) -> tuple[int, ...] | None:
    """--layers: "all", "last:N" or a comma list of indices."""
    if spec is None or spec == "all":
        return None
    try:
        if spec.startswith("last:"):
            n = int(spec[5:])
            if not 1 <= n <= num_layers:
                raise ValueError
            return tuple(range(num_layers - n, num_layers))
        return tuple(sorted({int(x) for x in spec.split(",")}))
    except ValueError:
        raise InputError(f"--layers must be 'all', 'last:N' (1 ≤ N ≤ {num_layers}) or indices like 0,5,7; "
                         f"not {spec!r}") from None


@click.command("lora", help="Train a LoRA adapter (QLoRA on a quantized model) on DIR's train.jsonl "
                            "(and valid.jsonl): chat records with images, audio and video, plain text, or "
                            "prompt/completion. The loss reads the model's turns only.")
@click.argument("model")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Directory with train.jsonl (and valid.jsonl); media paths are relative to it.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=True, file_okay=False),
              help="Adapter directory to write (adapter_config.json + adapter_model.safetensors, PEFT's format).")
@click.option("--iters", type=click.IntRange(min=1), default=600, show_default=True, help="Optimizer steps.")
@click.option("--rank", type=click.IntRange(1, 4096), default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha (the update is scaled by alpha / rank).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Dropout on the adapters' input.")
@click.option("--modules", default=",".join(TEXT_MODULES), show_default=True,
              help="Which projections of the text layers get adapters (comma list).")
@click.option("--layers", "layers_spec", default="all", show_default=True,
              help="Which text layers: all, last:N, or indices like 0,5,7.")
@click.option("--train-media", is_flag=True, help="Also put adapters on the vision and audio projections.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=1e-4,
              show_default=True, help="Peak learning rate (AdamW, cosine decay to a tenth).")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Warm-up steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer step.")
@click.option("--max-seq-length", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Longer records are cut (never inside a media item).")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute layer activations in the backward pass "
                                                       "(less memory, ~30% more time).")
@click.option("--steps-per-eval", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--val-batches", type=click.IntRange(min=0), default=25, show_default=True,
              help="Validation batches per evaluation; 0 is the whole valid set.")
@click.option("--save-every", "steps_per_save", type=click.IntRange(min=1), default=100, show_default=True,
              help="Write an adapter checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT.")
@click.option("--force", is_flag=True, help="Replace an adapter already in OUT (without --resume).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]),
              help="Compute dtype. [default: bfloat16 on Metal, float32 on CPU]")
def lora_command(model, data_dir, out, layers_spec, modules, resume, force, dtype, **kw):
    from ..api import load
    from .data import DatasetReader
    from .lora import LoRASettings, apply_lora, load_adapter
    from .train import Trainer, TrainSettings

    out_dir = Path(out)
    if (out_dir / CONFIG_FILE).exists() and not (resume or force):
        raise InputError(f"{out} already holds an adapter: --resume to continue it, --force to replace it")
    g = load(model, dtype=dtype)
    n = g.config.text.num_hidden_layers
    settings = LoRASettings(rank=kw.pop("rank"), alpha=kw.pop("alpha"), dropout=kw.pop("dropout"),
                            modules=tuple(m.strip() for m in modules.split(",") if m.strip()),
                            layers=_layers(layers_spec, n), train_media=kw.pop("train_media"))
    reader = DatasetReader(g, data_dir, max_seq_length=kw.pop("max_seq_length"))
    train, valid = reader.split("train"), reader.split("valid", required=False)
    train_settings = TrainSettings(**kw).check()
    if resume:
        adapter = load_adapter(g.model, out_dir)
    else:
        adapter = apply_lora(g.model, settings, seed=train_settings.seed)
    trainer = Trainer(g.model, adapter, train, train_settings, valid=valid, out_dir=out_dir, base_model=model)
    if resume:
        trainer.resume()
    from mlx.utils import tree_flatten

    params = sum(v.size for _, v in tree_flatten(g.model.trainable_parameters()))
    click.echo(f"{len(adapter.modules)} adapters, {params / 1e6:.2f} M trainable parameters; "
               f"{len(train)} training and {len(valid)} validation records; step {trainer.step_count} of "
               f"{train_settings.iters}", err=True)
    tty = sys.stderr.isatty()

    def report(r):
        val = f"  val {r.val_loss:.3f}" if r.val_loss is not None else ""
        line = (f"step {r.step}/{r.iters}  loss {r.loss:.3f}{val}  {r.tokens_per_second:.0f} tok/s  "
                f"peak {r.peak_memory_gb:.2f} GB  ETA {_duration(r.seconds_left)}")
        if tty:
            click.echo("\r" + line.ljust(100), nl=r.val_loss is not None or r.step == r.iters, err=True)
        elif r.val_loss is not None or r.step == r.iters or r.step % 10 == 0:
            click.echo(line, err=True)

    try:
        trainer.run(report)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted at step {trainer.step_count}: the adapter is saved in {out} "
                   f"(continue with --resume)", err=True)
        sys.exit(130)
    click.echo(f"adapter saved in {out}", err=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@click.command("fuse", help="Merge a LoRA adapter into MODEL's weights and write a converted model to OUT "
                            "(quantized like the base, or as -q says); OUT loads wherever a converted model does.")
@click.argument("model")
@click.option("--adapter", required=True, type=click.Path(file_okay=False, exists=True),
              help="The adapter directory (ours or PEFT's).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (must not exist, or --force).")
@click.option("-q", "--bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "none", "auto"]), default="auto",
              show_default=True, help="'auto' keeps a quantized base's precision per tensor (a float base gets the "
                                      "converter's 4-bit recipe); 'none' writes float; a number re-quantizes all.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help="dtype of float tensors. [default: the base's]")
@click.option("--force", is_flag=True, help="Replace an existing OUT model (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress line.")
def fuse_command(model, adapter, out, bits, group_size, dtype, force, quiet):
    from .fuse import fuse

    bits = None if bits == "none" else bits if bits == "auto" else int(bits)
    summary = fuse(model, adapter, out, bits=bits, group_size=int(group_size), dtype=dtype, force=force,
                   progress=not quiet)
    click.echo(str(summary))
