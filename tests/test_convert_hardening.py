"""Conversion under hostile conditions: what --force may delete, full disks and odd output paths, signals,
corrupt side files, a newcomer's first run, and a seeded fuzz campaign of the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemma_mlx.convert import convert
from gemma_mlx.convert.writer import MARKER
from gemma_mlx.errors import ConvertError

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under path (hidden ones too) with its bytes (None for a directory)."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


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
