"""The kernel entry points: one function per op, one signature on every backend.

The backend is chosen once, at import (launch.select_backend): the Metal kernels where Metal is available, their
CUDA twins (the same shared bodies) where MLX has CUDA, and the pure-MLX reference path (reference.py) everywhere
else or when ``GEMMA_MLX_KERNELS=reference``. Before their first use the live kernels must pass launch.self_check
(small decode and prefill cases at both head dims against the reference); if they fail to compile, launch or
agree, a RuntimeWarning names the case and the process continues on the reference path. Shapes the kernels do
not cover (head dims that are not a multiple of 32, other dtypes) take the reference path on any backend.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from gemma_mlx import settings
from gemma_mlx.cache import QuantizedKV
from . import reference
from .launch import Launcher, attention_kernel, kernel_supports, select_backend, self_check

BACKEND = select_backend()
_LAUNCH = Launcher(BACKEND) if BACKEND != "reference" else None
_CHECKED = False  # the live kernels pass launch.self_check before their first use, or BACKEND falls back

# Reference path: above settings' attention_dense_limit score entries (query heads × queries × keys), or more
# than attention_key_block keys, attention runs blockwise. Read at call time, so settings.override can shrink them.


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    q_pos: mx.array,
    k_pos: mx.array,
    window: int | None = None,
    q_block: mx.array | None = None,
    k_block: mx.array | None = None,
    block_overrides_window: bool = False,
) -> mx.array:
    """Attention output (B, Hq, L, D) for q (B, Hq, L, D) over k, v (B, Hkv, S, D), masked by masks.allowed.

    Query head i uses KV head i // (Hq / Hkv). q_pos (L,) and k_pos (S,) are absolute positions; k_pos < 0 marks
    an empty slot, so a ring buffer can be passed whole, in ring order. Softmax statistics are float32; the
    output has q's dtype. A query that sees no key gets zeros rather than NaN.

    Per row: q_pos and q_block may be (B, L), k_pos and k_block (B, S), so one call runs B sequences at their own
    positions (each row its own ring order, wrap point, empty slots, window edge and vision blocks); a 1-D array
    is shared by every row, exactly as before. Row b's output depends only on row b of q, k, v and its positions.
    Padding: a row with fewer keys marks the extra slots -1; a row with fewer queries may give its extra queries
    any position (their outputs are simply not used).

    In-place cache reading: k and v may be strided views (``buf[..., :n, :]`` of a preallocated buffer) or a
    whole ring buffer; the kernels read them through their strides, without a copy. Decode (a few queries) is
    split over the keys; longer chunks run flash-style and never build the chunk × context score matrix; tiles
    no query can see (outside the window, after the last query) are skipped.

    Quantized K/V: k and v may be gemma_mlx.cache.QuantizedKV (a quantized cache's buffers, or views of them);
    they are read in place and dequantized one key block at a time, never whole.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    _check_row_shapes(q, k, q_pos=q_pos, k_pos=k_pos, q_block=q_block, k_block=k_block)
    quantized = isinstance(k, QuantizedKV) or isinstance(v, QuantizedKV)
    if _LAUNCH is not None and not quantized and kernel_supports(q, k, v) and _kernels_pass_self_check():
        return attention_kernel(
            q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block, k_block=k_block,
            block_overrides_window=block_overrides_window, launch=_LAUNCH,
        )
    limits = settings.get()
    return reference.attention(
        q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block, k_block=k_block,
        block_overrides_window=block_overrides_window, dense_limit=limits.attention_dense_limit,
        key_block=limits.attention_key_block,
    )


def _check_row_shapes(q: mx.array, k: mx.array, **arrays: mx.array | None) -> None:
    """Raises ValueError naming the argument unless each position/block array is shared (1-D) or per row (B, n)."""
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    for name, arr in arrays.items():
        if arr is None:
            continue
        n = L if name.startswith("q_") else S
        if tuple(arr.shape) not in ((n,), (B, n)):
            raise ValueError(f"{name} must have shape ({n},) or ({B}, {n}) for q {tuple(q.shape)} and k "
                             f"{tuple(k.shape)}, got {tuple(arr.shape)}")


def _kernels_pass_self_check() -> bool:
    """Runs launch.self_check once; a failure falls back to the reference path for the rest of the process."""
    global BACKEND, _LAUNCH, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        problem = self_check(_LAUNCH)
        if problem is not None:
            warnings.warn(f"gemma-mlx: the {BACKEND} attention kernels failed their self-check ({problem}); "
                          f"using the reference path (set GEMMA_MLX_KERNELS=reference to skip the check)",
                          RuntimeWarning, stacklevel=3)
            BACKEND, _LAUNCH = "reference", None
    return _LAUNCH is not None


def patch_embed(
    patches: mx.array,
    ln1_w: mx.array,
    ln1_b: mx.array,
    dense_w: mx.array,
    dense_b: mx.array,
    ln2_w: mx.array,
    ln2_b: mx.array,
    eps: float = 1e-5,
) -> mx.array:
    """Gemma 4's patch projection: LayerNorm(6912) -> x @ dense_w.T + dense_b -> LayerNorm(3840).

    patches (..., 6912); dense_w (3840, 6912) as stored in the checkpoint. Returns (..., 3840) in dense_w's
    dtype, LayerNorm statistics in float32. The same MLX ops on every backend: the GEMM is ~99% of the work and
    no custom kernel measurably beats MLX's addmm plus its fused LayerNorm (bench/bench_kernels.py, README).
    """
    return reference.patch_embed(patches, ln1_w, ln1_b, dense_w, dense_b, ln2_w, ln2_b, eps)
