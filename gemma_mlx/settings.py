"""Every GEMMA_MLX_* environment variable, read once into one frozen, validated Settings object.

``get()`` returns the process's settings (read from the environment on first use); ``override(**fields)`` swaps
in changed settings for the length of a ``with`` block (tests, benchmarks). An invalid value is a ConfigError
naming the variable. VARIABLES is the one table of them: it feeds ``gemma-mlx --help`` and the README's
"Settings" table (tests/test_settings.py keeps the README in step).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import ConfigError


def _shown(value: Any) -> str:
    """The value's repr for an error message, cut short (a variable can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _choice(aliases: Mapping[str, str]) -> Callable[[Any], str]:
    """A check that maps each accepted spelling (case-insensitive) to its canonical value."""

    def check(value: Any) -> str:
        key = value.strip().lower() if isinstance(value, str) else None
        if key not in aliases:
            raise ValueError(f"must be one of {', '.join(dict.fromkeys(aliases.values()))}, got {_shown(value)}")
        return aliases[key]

    return check


def _whole(low: int, high: int) -> Callable[[Any], int]:
    """A check for a whole number in low..high, given as an int or its decimal text."""

    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number, got {_shown(value)}")
        if isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""), 10)
            except ValueError:
                raise ValueError(f"must be a whole number, got {_shown(value)}") from None
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number in {low}..{high}, got {_shown(value)}")
        return value

    return check


def _optional_text(value: Any) -> str | None:
    """Empty means unset."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {_shown(value)}")
    return value.strip() or None


def _directory(value: Any) -> Path:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must be a directory path, got an empty value")
        value = Path(value.strip())
    if not isinstance(value, Path):
        raise ValueError(f"must be a directory path, got {_shown(value)}")
    value = value.expanduser()
    if value.exists() and not value.is_dir():
        raise ValueError(f"must be a directory, but {value} is not one")
    return value


def _blas(value: Any) -> str | None:
    """None: look for a system OpenBLAS; "off": never preload one; else the library file to preload."""
    value = _optional_text(value)
    if value is None:
        return None
    if value.lower() in ("0", "off", "none", "false", "no"):
        return "off"
    if not Path(value).expanduser().is_file():
        raise ValueError(f"must be 'off' or the path of a BLAS library file, but {_shown(value)} is not a file")
    return str(Path(value).expanduser())


_ON_OFF_AUTO = {"auto": "auto", "1": "on", "on": "on", "true": "on", "yes": "on",
                "0": "off", "off": "off", "false": "off", "no": "off"}


@dataclass(frozen=True)
class Variable:
    """One environment variable: the Settings field it fills, its default as shown, what it does, its check."""

    name: str
    field: str
    shown_default: str
    help: str
    check: Callable[[Any], Any]


VARIABLES: tuple[Variable, ...] = (
    Variable("GEMMA_MLX_MODEL", "model", "(unset)",
             "The model used when a command is given no MODEL (a hub id or a directory).", _optional_text),
    Variable("GEMMA_MLX_KERNELS", "kernels", "auto",
             "Attention kernels: auto (Metal or CUDA where available, else the pure-MLX reference), reference, "
             "metal or cuda (refused where that backend is missing).",
             _choice({"auto": "auto", "reference": "reference", "metal": "metal", "cuda": "cuda"})),
    Variable("GEMMA_MLX_ATTENTION_DENSE_LIMIT", "attention_dense_limit", str(1 << 24),
             "Reference attention: above this many scores (heads x queries x keys) it runs blockwise.",
             _whole(0, 1 << 40)),
    Variable("GEMMA_MLX_ATTENTION_KEY_BLOCK", "attention_key_block", "4096",
             "Reference attention: keys per block when it runs blockwise.", _whole(1, 1 << 24)),
    Variable("GEMMA_MLX_DENSE_PREFILL", "dense_prefill", "auto",
             "CPU prefill as dequantize + float32 GEMM: auto (on a CPU with a fast BLAS), on or off.",
             _choice(_ON_OFF_AUTO)),
    Variable("GEMMA_MLX_BLAS", "blas", "(search)",
             "Linux: the BLAS library to preload (an OpenBLAS .so), or off; unset looks in the usual places.",
             _blas),
    Variable("GEMMA_MLX_BLAS_REEXEC", "blas_reexec", "(unset)",
             "Internal: set to done by gemma-mlx itself when it has restarted with the BLAS preloaded.",
             _choice({"": "", "done": "done"})),
    Variable("GEMMA_MLX_KERNEL_CACHE", "kernel_cache", "~/.cache/gemma-mlx/kernels",
             "Where the kernel verification tools (tests, bench) keep what they download and compile.", _directory),
)


@dataclass(frozen=True)
class Settings:
    """The validated values of every GEMMA_MLX_* variable (see VARIABLES)."""

    model: str | None = None
    kernels: str = "auto"
    attention_dense_limit: int = 1 << 24
    attention_key_block: int = 4096
    dense_prefill: str = "auto"
    blas: str | None = None
    blas_reexec: str = ""
    kernel_cache: Path = Path.home() / ".cache" / "gemma-mlx" / "kernels"

    def __post_init__(self):
        for var in VARIABLES:  # the same checks for values from the environment and from override()
            try:
                object.__setattr__(self, var.field, var.check(getattr(self, var.field)))
            except ValueError as e:
                raise ConfigError(f"{var.name} {e}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Settings from environ (default os.environ); ConfigError naming the first invalid variable."""
        environ = os.environ if environ is None else environ
        given = {}
        for var in VARIABLES:
            if var.name in environ:
                try:
                    given[var.field] = var.check(environ[var.name])
                except ValueError as e:
                    raise ConfigError(f"{var.name} {e}") from None
        return cls(**given)


_current: Settings | None = None


def get() -> Settings:
    """The process's Settings, read from the environment on the first call."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


@contextmanager
def override(**fields) -> Iterator[Settings]:
    """Within the block, get() returns the current settings with these fields changed (validated)."""
    global _current
    previous = get()
    _current = dataclasses.replace(previous, **fields)
    try:
        yield _current
    finally:
        _current = previous


def help_table() -> str:
    """The variables as plain text for ``--help``: one name with its default, then what it does."""
    lines = ["Environment variables (invalid values are refused with the variable's name):"]
    for var in VARIABLES:
        lines.append(f"  {var.name} [default: {var.shown_default}]")
        lines += textwrap.wrap(var.help, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def markdown_table() -> str:
    """The variables as the README's Markdown table."""
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    rows += [f"| `{v.name}` | `{v.shown_default}` | {v.help} |" for v in VARIABLES]
    return "\n".join(rows)
