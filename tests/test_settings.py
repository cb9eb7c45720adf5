"""GEMMA_MLX_* variables: read once, validated with errors naming the variable, overridable in a block, and listed
in one table that `gemma-mlx --help` and the README both show."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from gemma_mlx import settings
from gemma_mlx.errors import ConfigError
from gemma_mlx.settings import VARIABLES, Settings

EXE = Path(sys.executable).parent / "gemma-mlx"


def test_defaults_and_valid_values():
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env({"GEMMA_MLX_KERNELS": " Reference ", "GEMMA_MLX_ATTENTION_KEY_BLOCK": "1_024",
                           "GEMMA_MLX_ATTENTION_DENSE_LIMIT": "0", "GEMMA_MLX_DENSE_PREFILL": "1",
                           "GEMMA_MLX_BLAS": "OFF", "GEMMA_MLX_MODEL": "  ", "GEMMA_MLX_KERNEL_CACHE": "~/k"})
    assert (s.kernels, s.attention_key_block, s.attention_dense_limit, s.dense_prefill, s.blas, s.model) == \
        ("reference", 1024, 0, "on", "off", None)
    assert s.kernel_cache == Path.home() / "k"
    assert Settings.from_env({"GEMMA_MLX_BLAS": sys.executable}).blas == sys.executable  # any existing file


@pytest.mark.parametrize("name, value, message", [
    ("GEMMA_MLX_KERNELS", "fastest", "must be one of auto, reference, metal, cuda"),
    ("GEMMA_MLX_ATTENTION_KEY_BLOCK", "abc", "must be a whole number, got 'abc'"),
    ("GEMMA_MLX_ATTENTION_KEY_BLOCK", "0", "in 1..16777216"),
    ("GEMMA_MLX_ATTENTION_KEY_BLOCK", "4096.0", "whole number"),
    ("GEMMA_MLX_ATTENTION_DENSE_LIMIT", "-1", "in 0.."),
    ("GEMMA_MLX_ATTENTION_DENSE_LIMIT", "1e9", "whole number"),
    ("GEMMA_MLX_ATTENTION_DENSE_LIMIT", "9" * 5000, "whole number"),
    ("GEMMA_MLX_DENSE_PREFILL", "maybe", "auto, on, off"),
    ("GEMMA_MLX_BLAS", "/no/such/libopenblas.so", "is not a file"),
    ("GEMMA_MLX_BLAS_REEXEC", "yes", "must be one of"),
    ("GEMMA_MLX_KERNEL_CACHE", "", "empty"),
    ("GEMMA_MLX_KERNEL_CACHE", sys.executable, "is not one"),
])
def test_invalid_values_are_config_errors_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=re.escape(name)) as e:
        Settings.from_env({name: value})
    assert message in str(e.value) and len(str(e.value)) < 400


def test_the_object_is_frozen_and_override_validates_and_restores():
    before = settings.get()
    assert settings.get() is before  # read once
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.kernels = "reference"
    with settings.override(attention_key_block=7) as inside:
        assert settings.get() is inside and inside.attention_key_block == 7
        assert inside.kernels == before.kernels
    assert settings.get() is before
    with pytest.raises(ConfigError, match="GEMMA_MLX_ATTENTION_KEY_BLOCK"):
        with settings.override(attention_key_block=0):
            pass
    with pytest.raises(ConfigError, match="GEMMA_MLX_DENSE_PREFILL"):
        with settings.override(dense_prefill=True):
            pass
    assert settings.get() is before


def test_every_field_has_one_variable_and_nothing_else_reads_the_environment():
    assert [v.field for v in VARIABLES] == [f.name for f in dataclasses.fields(Settings)]
    names = {v.name for v in VARIABLES}
    readers = []
    for path in [*ROOT.glob("gemma_mlx/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("convert/**/*.py"),
                 ROOT / "bench" / "bench_kernels.py"]:
        text = path.read_text()
        for match in re.finditer(r"(?:environ(?:\.get)?\(?\[?|getenv\()\s*[\"'](GEMMA_MLX_\w+)", text):
            readers.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
        for name in re.findall(r"GEMMA_MLX_\w+", text):
            assert name in names, f"{path.relative_to(ROOT)} names {name}, which settings.VARIABLES lacks"
    assert readers == [p for p in readers if p.startswith("gemma_mlx/settings.py")]


@pytest.mark.parametrize("env, message", [
    ({"GEMMA_MLX_KERNELS": "metal"}, "GEMMA_MLX_KERNELS=metal, but MLX has no metal backend"),
    ({"GEMMA_MLX_ATTENTION_KEY_BLOCK": "abc"}, "GEMMA_MLX_ATTENTION_KEY_BLOCK must be a whole number"),
    ({"GEMMA_MLX_BLAS": "/no/such.so"}, "GEMMA_MLX_BLAS must be"),
])
def test_bad_variables_are_one_line_in_the_cli_and_an_error_at_import(env, message, tmp_path):
    import mlx.core as mx

    if "metal" in str(env) and mx.metal.is_available():
        pytest.skip("Metal is available here: GEMMA_MLX_KERNELS=metal is valid")
    full = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **env)
    r = subprocess.run([str(EXE), "generate", str(tmp_path / "no-model"), "-p", "x"], capture_output=True,
                       text=True, env=full, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", "import gemma_mlx.kernels.ops"], capture_output=True, text=True,
                       env=full, timeout=120)
    assert r.returncode == 1 and f"ConfigError: {message}" in r.stderr


def test_help_and_readme_list_every_variable():
    r = subprocess.run([str(EXE), "--help"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0
    for var in VARIABLES:
        assert var.name in r.stdout
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, "README's Settings table differs from settings.markdown_table()"
