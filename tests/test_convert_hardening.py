"""Conversion under hostile conditions: what --force may delete, full disks and odd output paths, signals,
corrupt side files, a newcomer's first run, and a seeded fuzz campaign of the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gemma_mlx.convert import convert
from gemma_mlx.convert.writer import MARKER
from gemma_mlx.errors import ConvertError

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under path (hidden ones too) with its bytes (None for a directory)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(path.rglob("*"))}  # a FIFO is listed, never opened (that would block)


# -- 1. --force replaces only what convert wrote --------------------------------------------------------------

def test_every_output_carries_a_marker_listing_its_files(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    convert(src, out, bits=8, progress=False)
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"} <= set(marker["files"])


def test_force_replaces_a_conversion_but_never_a_project_or_a_checkpoint(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    project = tmp_path / "project"  # what a mistyped -o could point at
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "config.json").write_text("{}")  # even one that happens to hold a config.json
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(src, checkpoint)
    for victim in (project, checkpoint):
        before = tree(victim)
        for force in (False, True):
            with pytest.raises(ConvertError, match=f"{victim} exists and is not a model gemma-mlx convert wrote"):
                convert(src, victim, force=force, progress=False)
            assert tree(victim) == before

    out = tmp_path / "out"
    convert(src, out, bits=8, progress=False)
    (out / "notes.txt").write_text("my notes on this model")  # a conversion someone added to
    (out / "extra").mkdir()
    before = tree(out)
    with pytest.raises(ConvertError, match=r"holds files gemma-mlx convert did not write \(extra/, notes.txt\)"):
        convert(src, out, force=True, progress=False)
    assert tree(out) == before
    (out / "notes.txt").unlink()
    (out / "extra").rmdir()
    (out / "config.json").unlink()
    (out / "config.json").mkdir()  # a listed name that is no longer a plain file
    with pytest.raises(ConvertError, match=r"did not write \(config.json/\)"):
        convert(src, out, force=True, progress=False)
    (out / "config.json").rmdir()
    (out / MARKER).write_text("{not json")
    with pytest.raises(ConvertError, match="not a model gemma-mlx convert wrote"):
        convert(src, out, force=True, progress=False)


def test_force_replaces_a_complete_conversion(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    out = tmp_path / "out"
    convert(src, out, bits=8, progress=False)
    convert(src, out, bits=4, force=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 2. full disks and odd output paths: one line, nothing left behind -------------------------------------------

def cli_convert(*args: str):
    """(exit code, output) of `gemma-mlx convert ARGS` run through click in this process."""
    from click.testing import CliRunner

    from gemma_mlx.cli import cli

    r = CliRunner().invoke(cli, ["convert", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.exit_code, r.output


def refused(src: Path, out: Path, match: str, *extra: str) -> None:
    """Convert src to out through the CLI: one `error:` line naming the problem, exit 2, out's parent unchanged."""
    parent = next(p for p in out.parents if os.path.isdir(p))
    before = tree(parent)
    code, output = cli_convert(str(src), "-o", str(out), "--quiet", *extra)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("error: ") and match in output, output
    assert tree(parent) == before


def test_a_full_disk_fails_in_one_line_and_leaves_nothing(tiny_gemma4, tmp_path, monkeypatch):
    import errno

    from gemma_mlx.convert import writer

    _, src = tiny_gemma4
    real = writer.os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    out = tmp_path / "new" / "deeper" / "out"  # parents the conversion creates, and must remove again
    refused(src, out, "No space left on device (model.safetensors)")
    assert calls["n"] > 5 and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer.os, "pwrite", real)
    code, _ = cli_convert(str(src), "-o", str(out), "--quiet")
    assert code == 0 and (tmp_path / "new" / "deeper").stat().st_mode & 0o777 == 0o777 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mount_tmpfs(path: Path, options: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_on_a_tiny_tmpfs(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=256k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        refused(src, disk / "out", "No space left on device")
        assert list(disk.iterdir()) == []
        statvfs = os.statvfs(disk)
        assert statvfs.f_bfree == statvfs.f_blocks  # every block handed back: nothing left half-written
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_odd_output_paths_are_refused_before_any_work(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    (tmp_path / "file").write_text("x")
    refused(src, tmp_path / "file" / "out", "cannot create")
    refused(src, tmp_path / "file" / "a" / "out", f"{tmp_path / 'file'} is not a directory")
    refused(src, tmp_path / ("x" * 256), "is 256 bytes, more than the 255 the file system allows")
    refused(src, tmp_path / "ok" / ("y" * 300) / "out", "is 300 bytes")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for force in ((), ("--force",)):
        refused(src, fifo, "exists and is not a directory", *force)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "ok")
    refused(src, link, "exists and is not a directory", "--force")
    code, output = cli_convert(str(src), "-o", "/", "--quiet")
    assert code == 2 and "cannot be an output directory" in output
    code, output = cli_convert(str(src), "-o", str(tmp_path / "file"), "--quiet")
    assert code == 2 and "exists and is not a directory" in output


def test_a_name_near_the_limit_still_converts(tiny_gemma4, tmp_path):
    """OUT's own name fits, but `.OUT.partial-PID-XXXXXXXX` would not: temporary siblings use a short hash."""
    _, src = tiny_gemma4
    out = tmp_path / ("m" * 250)
    for force in ((), ("--force",)):
        code, output = cli_convert(str(src), "-o", str(out), "--quiet", "-q", "8", *force)
        assert code == 0, output
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and (out / MARKER).is_file()


def test_an_unwritable_parent_is_refused(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    parent = tmp_path / "ro"
    if not _mount_tmpfs(parent, "ro,size=64k"):  # root writes through permission bits: use a read-only mount
        parent.mkdir(exist_ok=True)
        parent.chmod(0o555)
    try:
        refused(src, parent / "out", f"{parent} is not writable")
        refused(src, parent / "a" / "b" / "out", f"{parent} is not writable")
    finally:
        if os.path.ismount(parent):
            subprocess.run(["umount", str(parent)], check=True)
        parent.chmod(0o755)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_out_follows_the_umask(tiny_gemma4, tmp_path, umask):
    _, src = tiny_gemma4
    old = os.umask(umask)
    try:
        convert(src, tmp_path / "out", bits=8, progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# -- 5. a newcomer sees a status line at once ----------------------------------------------------------------------

def test_a_status_line_comes_first_and_quiet_silences_it(tiny_gemma4, tmp_path):
    _, src = tiny_gemma4
    code, output = cli_convert(str(src), "-o", str(tmp_path / "out"), "-q", "8")
    assert code == 0 and output.splitlines()[0] == f"converting {src} -> {tmp_path / 'out'}: checking the checkpoint..."
    code, output = cli_convert(str(src), "-o", str(tmp_path / "quiet"), "-q", "8", "--quiet")
    assert code == 0 and "converting" not in output


# -- 3. signals: SIGTERM cleans up as Ctrl-C does; after the final rename nothing reports failure -------------------

SIGNAL_CHILD = r"""
import os, signal, sys, threading, time
from gemma_mlx import settings
from gemma_mlx.interrupts import route_to_main_thread
settings.get()
route_to_main_thread()  # as gemma_mlx.__main__.main does, before any other thread exists
from gemma_mlx.convert import writer
when, args = sys.argv[1], sys.argv[2:]
real_stream, real_commit = writer._stream_shard, writer._commit
bystander = threading.Thread(target=time.sleep, args=(600,), daemon=True)  # a thread that blocks no SIGTERM
bystander.start()

def paused(*a, **kw):  # mid-write, with the temporary directory holding a partial shard
    print("writing", flush=True)
    time.sleep(60)
    return real_stream(*a, **kw)

def commit_then(signame):
    def commit(tmp, out):
        if signame == "SIGTERM-to-a-thread":  # lands on a thread the rename's mask does not cover
            signal.pthread_kill(bystander.ident, signal.SIGTERM)
            time.sleep(0.3)
        real_commit(tmp, out)
        if signame != "SIGTERM-to-a-thread":
            os.kill(os.getpid(), getattr(signal, signame))
            time.sleep(0.3)  # a routed press reaches the main thread within 50 ms
    return commit

if when == "mid-write":
    writer._stream_shard = paused
else:
    writer._commit = commit_then(when)
from gemma_mlx.cli import cli
cli(["convert", *args])
"""


def signal_child(when: str, src: Path, out: Path, *extra: str) -> subprocess.Popen:
    import sys

    return subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, when, str(src), "-o", str(out), "-q", "8", "--quiet",
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signame, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
@pytest.mark.parametrize("force", [False, True])
def test_a_signal_mid_write_removes_the_temporary_directory_and_leaves_out(tiny_gemma4, tmp_path, signame, code,
                                                                           word, force):
    import signal

    _, src = tiny_gemma4
    out = tmp_path / "out"
    if force:
        convert(src, out, bits=4, progress=False)
    before = tree(tmp_path)
    child = signal_child("mid-write", src, out, *(("--force",) if force else ()))
    try:
        assert child.stdout.readline() == "writing\n"
        assert any(".partial-" in p.name for p in tmp_path.iterdir())  # the signal comes while it is there
        child.send_signal(getattr(signal, signame))
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"{word}: {out} is left as it was"] and stdout == ""
    assert tree(tmp_path) == before


@pytest.mark.parametrize("when", ["SIGINT", "SIGTERM", "SIGTERM-to-a-thread"])
def test_a_signal_at_or_after_the_final_rename_does_not_report_failure(tiny_gemma4, tmp_path, when):
    """Once OUT is in place, an interrupt can no longer stop anything: exit 0, the summary line, OUT complete.
    A SIGTERM that lands on another thread during the rename is held off too (the mask covers the main thread
    only; the rename's block also stands in for the handlers)."""
    from gemma_mlx.weights import load_model

    _, src = tiny_gemma4
    out = tmp_path / "out"
    child = signal_child(when, src, out)
    try:
        stdout, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, stderr
    assert stderr == "" and stdout.startswith(f"{out}: ") and len(stdout.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / MARKER).is_file()
    load_model(out)  # complete: the weights load


def test_the_command_run_in_process_gives_the_signal_handlers_back(tiny_gemma4, tmp_path):
    """The command ignores interrupts once OUT is in place, and SIGTERM raises while it runs: a process that runs
    the CLI in-process (as these tests do) has its own handlers back afterwards, and its children Ctrl-C."""
    import signal

    _, src = tiny_gemma4
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, _ = cli_convert(str(src), "-o", str(tmp_path / "out"), "-q", "8", "--quiet")
    assert code == 0 and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- 4. side files: a source whose side files do not load is refused; the output is loaded before the rename -------

@pytest.fixture()
def complete_source(tmp_path):
    """A complete tiny checkpoint (weights, config, byte tokenizer, the real template, generation config)."""
    from gemma_mlx.tiny import write_demo_model

    return write_demo_model(tmp_path / "src")


def _deep(n: int) -> str:
    return "[" * n + "]" * n


SIDE_FILE_DAMAGE = [
    ("tokenizer.json", b'{"version": "1.0", "model":', "tokenizer.json cannot be read as a tokenizer"),
    ("tokenizer.json", b"\xff\xfe not json", "tokenizer.json cannot be read as a tokenizer"),
    ("tokenizer.json", "directory", "tokenizer.json is a directory"),
    ("tokenizer.json", "fifo", "tokenizer.json is not a regular file"),
    ("tokenizer.json", "dangling", "tokenizer.json is a dangling symbolic link"),
    ("generation_config.json", b'{"suppress_tokens": [10000000]}', "suppress_tokens[0]=10000000 is outside"),
    ("generation_config.json", b'{"eos_token_id": "one"}', "generation_config.json"),
    ("generation_config.json", b"\xc3\x28", "generation_config.json is not UTF-8 text"),
    ("generation_config.json", b"[1, 2]", "generation_config.json must hold a JSON object"),
    ("chat_template.jinja", b"{% if %}", "chat_template.jinja: the chat template does not parse"),
    ("chat_template.jinja", b"\xff{{ x }}", "chat_template.jinja is not UTF-8 text"),
    ("tokenizer_config.json", _deep(500).encode(), "tokenizer_config.json: JSON nested too deeply"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "tokenizer_config.json"),
    ("tokenizer_config.json", b'{"chat_template": [{"template": "x"}]}', "must list objects with a name"),
    ("chat_template.json", b'{"chat_template": "{{ x"}', "chat_template.json: the chat template does not parse"),
    ("processor_config.json", b'{"image_seq_length":', "processor_config.json is not valid JSON"),
    ("preprocessor_config.json", b"null", "preprocessor_config.json must hold a JSON object"),
    ("special_tokens_map.json", b"\x00\x01", "special_tokens_map.json"),
]


def damage(src: Path, name: str, content) -> None:
    path = src / name
    if path.exists():
        path.unlink()
    if content == "directory":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "dangling":
        path.symlink_to(src / "gone")
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("name, content, match", SIDE_FILE_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SIDE_FILE_DAMAGE)])
def test_a_source_whose_side_files_do_not_load_is_refused(complete_source, tmp_path, name, content, match):
    if name == "chat_template.json" or name == "tokenizer_config.json" and b"chat_template" in content:
        (complete_source / "chat_template.jinja").unlink()  # else the .jinja is the template read
    damage(complete_source, name, content)
    refused(complete_source, tmp_path / "new" / "out", match)


def test_a_tokenizer_without_the_media_tokens_is_refused(complete_source, tmp_path):
    """config.json's media ids lie inside the model's vocabulary, but the tokenizer has fewer tokens."""
    tokenizer = json.loads((complete_source / "tokenizer.json").read_text())
    image = json.loads((complete_source / "config.json").read_text())["image_token_id"]
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] != image]
    tokenizer["model"]["vocab"] = {k: v for k, v in tokenizer["model"]["vocab"].items() if v != image}
    (complete_source / "tokenizer.json").write_text(json.dumps(tokenizer))
    refused(complete_source, tmp_path / "out", f"the tokenizer has no token with id {image}")


def test_a_complete_source_converts_to_a_model_that_loads(complete_source, tmp_path):
    import gemma_mlx

    code, output = cli_convert(str(complete_source), "-o", str(tmp_path / "out"), "-q", "8", "--quiet")
    assert code == 0, output
    g = gemma_mlx.load(tmp_path / "out")
    assert g.template is not None and g.media_tokens is not None
    assert g.generate("Hi", max_tokens=2, greedy=True).tokens  # and runs


def test_the_output_is_loaded_as_the_runtime_does_before_the_rename(complete_source, tmp_path, monkeypatch):
    """A side file that comes out unloadable (here: the copy is corrupted on its way) fails the final check,
    naming OUT's file, and nothing is left."""
    from gemma_mlx.convert import hf

    real = hf.shutil.copy

    def corrupting(a, b):
        real(a, b)
        if Path(b).name == "generation_config.json":
            Path(b).write_text('{"top_k": -3}')

    monkeypatch.setattr(hf.shutil, "copy", corrupting)
    out = tmp_path / "out"
    refused(complete_source, out, f"verification failed: the converted model would not load: "
                                  f"{out}/generation_config.json")


def test_a_gguf_whose_synthesized_side_files_do_not_load_is_refused(tiny_gemma4, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from test_convert_gguf import write_gemma4_gguf

    hf, _ = tiny_gemma4
    real = gguf.GGUFWriter.add_chat_template
    monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, t: real(self, "{% for %}"))
    path = write_gemma4_gguf(tmp_path / "bad-template.gguf", hf)
    before = tree(tmp_path)
    with pytest.raises(ConvertError, match=r"verification failed: the converted model would not load: .*"
                                           r"out/chat_template.jinja: the chat template does not parse"):
        convert(path, tmp_path / "out", progress=False)
    assert tree(tmp_path) == before
