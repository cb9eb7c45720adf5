"""The CLI as a person runs it: the entry point, errors without tracebacks, and chat in a real terminal."""

from __future__ import annotations

import json
import os
import pty
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


def run(*args, **kw):
    env = dict(os.environ, GEMMA_MLX_BLAS="off")
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=120, env=env, **kw)


def test_generate_streams_to_stdout(demo_model):
    r = run("generate", str(demo_model), "-p", "Hello", "--greedy", "-n", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "generated" in r.stderr and "tok/s" in r.stderr
    again = run("generate", str(demo_model), "-p", "Hello", "--greedy", "-n", "12", "--no-stats")
    assert again.stdout == r.stdout and "tok/s" not in again.stderr  # greedy is deterministic


def test_generate_with_attachments(demo_model, fixtures_dir):
    media = fixtures_dir / "media"
    r = run("generate", str(demo_model), "-p", "What is this?", "--image", str(media / "chelsea.png"),
            "--audio", str(media / "speech_16k.flac"), "--greedy", "-n", "4")
    assert r.returncode == 0, r.stderr
    assert "prompt" in r.stderr


def test_errors_are_one_line_without_traceback(demo_model, tmp_path):
    r = run("generate", str(tmp_path / "missing-model"), "-p", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    (tmp_path / "bad.png").write_bytes(b"junk")
    r = run("generate", str(demo_model), "-p", "x", "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", str(demo_model), "-p", "x" * 100, "--max-context", "50")
    assert r.returncode == 2 and "context allowed is 50 tokens" in r.stderr


def test_demo_runs_every_modality():
    r = run("demo", "--tokens", "4")
    assert r.returncode == 0, r.stderr
    for marker in ("[text]", "[image]", "[audio]", "random weights", "greedy tokens"):
        assert marker in r.stdout


class Terminal:
    """A program in a pseudo-terminal, driven like a person at a keyboard."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
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

    def send(self, text: str):
        os.write(self.fd, text.encode())

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


def test_chat_in_a_terminal(demo_model, tmp_path):
    env = dict(os.environ, GEMMA_MLX_BLAS="off", TERM="dumb")
    term = Terminal([str(EXE), "chat", str(demo_model), "--greedy", "-n", "24", "--system", "be brief"], env)
    term.read_until(b">>> ")
    term.send("hello there\n")
    term.read_until(b"tok/s")
    term.read_until(b">>> ")
    term.send("/think\n")
    assert b"thinking on" in term.read_until(b">>> ")
    term.send("and now?\n")
    term.read_until(b"tok/s")
    term.read_until(b">>> ")
    term.send("/think\n")
    assert b"thinking off" in term.read_until(b">>> ")
    term.send("/stats\n")
    assert b"generated" in term.read_until(b">>> ")
    saved = tmp_path / "conversation.json"
    term.send(f"/save {saved}\n")
    term.read_until(b">>> ")
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["system"] == "be brief"
    term.send("/reset\n")
    assert b"cleared" in term.read_until(b">>> ")
    term.send("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session(demo_model, tmp_path):
    endless = tmp_path / "endless"
    shutil.copytree(demo_model, endless)
    for name in ("config.json", "generation_config.json"):  # an EOS that is suppressed: answers never end
        cfg = json.loads((endless / name).read_text())
        cfg["eos_token_id"] = [511]
        cfg["suppress_tokens"] = [511]
        (endless / name).write_text(json.dumps(cfg))
    env = dict(os.environ, GEMMA_MLX_BLAS="off", TERM="dumb")
    term = Terminal([str(EXE), "chat", str(endless), "--greedy", "-n", "200000", "--max-context", "300000"], env)
    term.read_until(b">>> ")
    term.send("tell me a very long story\n")
    time.sleep(1.5)
    term.send("\x03")  # Ctrl-C in the middle of the answer
    term.read_until(b"[stopped", timeout=30)
    term.read_until(b">>> ")
    term.send("/save /dev/stdout\n")  # the session is alive and the interrupted turn left no half entry
    assert b'"messages": []' in term.read_until(b">>> ")
    term.send("still there?\n")
    time.sleep(0.5)
    term.send("\x03")
    term.read_until(b">>> ", timeout=30)
    term.send("/quit\n")
    assert term.wait() == 0
