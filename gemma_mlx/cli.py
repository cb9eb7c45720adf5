"""The gemma-mlx command line: demo, generate, chat, convert."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .errors import GemmaMLXError

DEMO_NOTE = "random weights: this tiny model exercises the whole path and speaks gibberish"


def _default_demo_dir() -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-mlx" / "tiny-demo"
    if not (base / "model.safetensors").is_file():
        from .tiny import write_demo_model

        write_demo_model(base)
    return base


def _load(model: str | None, dtype: str | None):
    from .api import load

    if model is None:
        click.secho(f"No MODEL given: using the tiny demo model ({DEMO_NOTE}).", fg="yellow", err=True)
        model = str(_default_demo_dir())
    return load(model, dtype=dtype)


class _Group(click.Group):
    """Prints gemma-mlx's own errors as one line a person can act on, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GemmaMLXError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="gemma-mlx")
def cli():
    """Run Gemma 4 (gemma4_unified) locally with MLX: text, images, audio and video.

    MODEL is a Hugging Face repo id (downloaded once into the HF cache), a local Hugging Face checkpoint or a
    directory made by `gemma-mlx convert`. Without MODEL, a tiny random model is used so that everything runs
    offline (it speaks gibberish).
    """


def sampling_options(f):
    for option in reversed([
        click.option("--temp", "temperature", type=float, help="Sampling temperature (default: the model's)."),
        click.option("--top-k", type=int, help="Keep the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold."),
        click.option("--min-p", type=float, help="Drop tokens below min-p × the top probability."),
        click.option("--repetition-penalty", type=float, help="Multiplicative penalty on recent tokens."),
        click.option("--presence-penalty", type=float, help="Additive penalty on recent tokens."),
        click.option("--seed", type=int, help="Random seed for reproducible sampling."),
        click.option("--greedy", is_flag=True, help="Always take the most likely token."),
        click.option("-n", "--max-tokens", type=int, default=512, show_default=True, help="Tokens to generate."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--think/--no-think", default=False, help="Let the model think before answering."),
        click.option("--max-context", type=int, help="Refuse prompts longer than this many tokens."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Compute dtype (default: bfloat16 on Metal, float32 on CPU)."),
    ]):
        f = option(f)
    return f


def _sampling(kw) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "seed",
            "greedy", "max_tokens", "stop")
    out = {k: kw[k] for k in keys if kw.get(k) not in (None, ())}
    return out


def _print_stream(stream):
    """Print a stream of Pieces (thinking apart, in cyan) and the tool calls of its final Result; return it."""
    from .api import Piece

    state: dict = {}
    result = None
    for item in stream:
        if isinstance(item, Piece):
            _print_piece(item, state)
            continue
        result = item
        click.echo()
        for call in item.tool_calls:
            click.secho(f"[tool call] {call.name}({call.arguments})", fg="magenta")
        for err in item.parsed.errors:
            click.secho(f"[unparsed tool call] {err.reason}: {err.raw}", fg="red")
    return result


def _print_piece(piece, state: dict) -> None:
    if piece.kind != state.get("kind"):
        if piece.kind == "thinking":
            click.secho("[thinking] ", fg="cyan", nl=False, err=False)
        elif state.get("kind") == "thinking":
            click.echo("\n")
        state["kind"] = piece.kind
    click.secho(piece.text, fg="cyan" if piece.kind == "thinking" else None, nl=False)


@cli.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", required=True, help="The user message.")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Attach an image (repeatable).")
@click.option("--audio", "audios", multiple=True, type=click.Path(), help="Attach an audio file (repeatable).")
@click.option("--video", "videos", multiple=True, type=click.Path(), help="Attach a video (repeatable).")
@click.option("--system", help="A system prompt.")
@click.option("--stats/--no-stats", default=True, help="Print speed and memory after the answer.")
@sampling_options
def generate(model, prompt, images, audios, videos, system, stats, **kw):
    """Stream one answer to PROMPT (with optional attachments) to stdout."""
    from .api import user_message

    g = _load(model, kw["dtype"])
    media = g.load_media(images, audios, videos)
    messages = ([{"role": "system", "content": system}] if system else []) + [user_message(prompt, media)]
    text = g.render(messages, enable_thinking=kw["think"])
    result = _print_stream(g.stream_text(text, media, opts=g.options(**_sampling(kw)), max_context=kw["max_context"]))
    if stats:
        click.secho(result.stats.summary(), fg="bright_black", err=True)


CHAT_HELP = """Commands: /reset  /system TEXT  /think (toggle)  /stats  /save FILE  /retry
          /image PATH  /audio PATH  /video PATH (attach to your next message)  /help  /quit (or Ctrl-D)
Ctrl-C stops the current answer and keeps the conversation."""


@cli.command()
@click.argument("model", required=False)
@click.option("--system", help="A system prompt.")
@click.option("--load", "load_path", type=click.Path(exists=True), help="Continue a conversation saved with /save.")
@sampling_options
def chat(model, system, load_path, **kw):
    """A multi-turn chat in the model's own template, streaming, with thinking shown apart."""
    from .chat import Chat

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    g = _load(model, kw["dtype"])
    sampling = _sampling(kw)
    session = (Chat.load(g, load_path, max_context=kw["max_context"], **sampling) if load_path
               else Chat(g, system=system, enable_thinking=kw["think"], max_context=kw["max_context"], **sampling))
    pending = {"images": [], "audios": [], "videos": []}
    click.secho(f"gemma-mlx chat · {g.model_dir.name} · thinking {'on' if session.enable_thinking else 'off'}",
                bold=True)
    click.echo(CHAT_HELP)

    def run(stream):
        try:
            _print_stream(stream)
        except KeyboardInterrupt:
            click.secho("\n[stopped: this turn was discarded; the conversation before it is kept]", fg="yellow")

    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            break
        except KeyboardInterrupt:
            click.echo()
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    break
                elif cmd == "/help":
                    click.echo(CHAT_HELP)
                elif cmd == "/reset":
                    session.reset()
                    click.echo("[conversation cleared]")
                elif cmd == "/system":
                    session.system = arg or None
                    click.echo(f"[system prompt {'set' if arg else 'cleared'}]")
                elif cmd == "/think":
                    session.enable_thinking = not session.enable_thinking
                    click.echo(f"[thinking {'on' if session.enable_thinking else 'off'}]")
                elif cmd == "/stats":
                    click.echo(session.last.stats.summary() if session.last else "[no answer yet]")
                elif cmd == "/save":
                    session.save(arg or "conversation.json")
                    click.echo(f"[saved to {arg or 'conversation.json'}]")
                elif cmd == "/retry":
                    run(session.retry())
                elif cmd in ("/image", "/audio", "/video"):
                    if not arg or not Path(arg).expanduser().is_file():
                        click.secho(f"[no such file: {arg}]", fg="red")
                    else:
                        pending[cmd[1:] + "s"].append(arg)
                        click.echo(f"[{cmd[1:]} attached to your next message]")
                else:
                    click.secho(f"[unknown command {cmd}; /help lists them]", fg="red")
                continue
            media, pending = pending, {"images": [], "audios": [], "videos": []}
            start = time.perf_counter()
            run(session.send(line, **media))
            if session.last is not None and time.perf_counter() - start > 0:
                click.secho(session.last.stats.summary(), fg="bright_black")
        except GemmaMLXError as e:
            click.secho(f"error: {e}", fg="red")


def _register_convert() -> None:
    from .convert.command import convert_command

    cli.add_command(convert_command)


_register_convert()


@cli.command()
@click.option("--tokens", default=16, show_default=True, help="Tokens to generate per modality.")
@click.option("--seed", default=0, show_default=True)
def demo(tokens, seed):
    """Build a tiny random Gemma 4 model and run text, image and audio through the real pipeline."""
    import tempfile

    import numpy as np

    from .api import load
    from .tiny import write_demo_model

    click.secho(f"gemma-mlx demo: {DEMO_NOTE}.", fg="yellow")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_demo_model(Path(tmp) / "tiny-gemma4", seed=seed)
        g = load(path)
        click.echo(f"built and loaded {path.name} ({g.config.text.num_hidden_layers} layers, hidden "
                   f"{g.config.text.hidden_size}, vocab {g.config.text.vocab_size}) in {time.perf_counter() - t0:.2f}s")
        rng = np.random.default_rng(seed)
        image = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
        t = np.arange(16000 * 2) / 16000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        runs = [("text", {}, "Hello! What can you do?"),
                ("image", {"images": [image]}, "What is in this picture?"),
                ("audio", {"audios": [(tone, 16000)]}, "What do you hear?")]
        for name, media, prompt in runs:
            r = g.generate(prompt, greedy=True, max_tokens=tokens, **media)
            click.secho(f"\n[{name}] {prompt}", bold=True)
            click.echo(f"  greedy tokens: {r.tokens}")
            click.echo(f"  text: {r.text!r}")
            click.echo(f"  {r.stats.summary()}")
    click.secho("\nThe weights are random, so the text is gibberish; see README for real models.", fg="yellow")


def main() -> None:
    """The console entry point: on Linux, first re-execute with a fast BLAS preloaded when one is installed."""
    from .platform import reexec_with_fast_blas

    reexec_with_fast_blas()
    cli()


if __name__ == "__main__":
    main()
