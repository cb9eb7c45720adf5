"""What this machine is good at: the compute dtype, and whether dense float32 GEMMs are fast.

MLX on Metal computes in bfloat16. On a CPU, MLX's half-precision and quantized matmuls are slow loops, and its
float32 GEMM goes through whatever BLAS the process has: the reference BLAS vendored by the mlx[cpu] wheel is
slow, an optimised one (OpenBLAS, preloaded) is ~100x faster. With a fast BLAS, a multi-row product with a
4-bit matrix is ~15x faster as dequantize + float32 GEMM than as MLX's quantized matmul (bench/, cpu-notes).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import mlx.core as mx

from . import settings

# Debian/Ubuntu package libopenblas0-pthread; other distributions put it elsewhere (GEMMA_MLX_BLAS overrides).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_FAST_BLAS_MARKERS = ("libopenblas", "libmkl", "libblis", "libflexiblas")


def default_dtype() -> mx.Dtype:
    """bfloat16 on Metal, float32 elsewhere (MLX's CPU matmuls are slow in half precision)."""
    return mx.bfloat16 if mx.metal.is_available() else mx.float32


@functools.cache
def fast_blas_loaded() -> bool:
    """True when an optimised BLAS is mapped into this process (Linux only; macOS MLX uses Accelerate/Metal)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(marker in maps for marker in _FAST_BLAS_MARKERS)


def dense_prefill_enabled() -> bool:
    """Whether multi-row quantized products should run as dequantize + float32 GEMM."""
    setting = settings.get().dense_prefill
    if setting != "auto":
        return setting == "on"
    return not mx.metal.is_available() and fast_blas_loaded()


def find_openblas() -> str | None:
    """Path of a system OpenBLAS library to preload, if one is installed."""
    explicit = settings.get().blas
    if explicit == "off":
        return None
    if explicit:
        return explicit  # checked to be a file when the settings were read
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).is_file()), None)


def reexec_with_fast_blas() -> None:
    """On Linux, restart this process with a system OpenBLAS preloaded (once), unless disabled or present."""
    if not sys.platform.startswith("linux") or settings.get().blas_reexec == "done":
        return
    if settings.get().blas == "off" or fast_blas_loaded():
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ, GEMMA_MLX_BLAS_REEXEC="done")
    env["LD_PRELOAD"] = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
