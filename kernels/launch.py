"""Host side of the custom kernels: backend choice, launch plans, and one launch path for every backend.

``attention_kernel`` turns an attention call into two launches (attn_tile, then attn_combine). It takes a
``launch`` callable with the signature of MLX's custom-kernel objects, so the very same plan (grid, templates,
parameters, output shapes) runs on Metal (``mx.fast.metal_kernel``), CUDA (``mx.fast.cuda_kernel``), the CPU
emulation and the source captures in verify.py. Nothing here depends on which backend is live.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx import settings
from gemma_mlx.errors import ConfigError
from .sources import ATTN_COMBINE, ATTN_TILE, KernelSpec

TG = 256  # threads per attn_tile group: 8 warps/simdgroups
NW = TG // 32
TG_COMBINE = 128
TILE_BYTES = 16384  # K + V tile in threadgroup memory; half of Apple's 32 KB, the rest is small
TARGET_GROUPS = 256  # enough groups in flight to spread one decode step over a whole GPU
MIN_SPLIT = 256  # keys per split-K slice at least, so partials stay small next to the K/V they summarise
LANE_FLOATS = 32  # per lane, q and the accumulator each: RW * D / (32 * WR) <= this
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def select_backend() -> str:
    """'metal', 'cuda' or 'reference', decided once at import from GEMMA_MLX_KERNELS (settings.kernels)."""
    choice = settings.get().kernels
    if choice == "reference":
        return "reference"
    available = {"metal": mx.metal.is_available(), "cuda": mx.cuda.is_available()}
    if choice in available:
        if not available[choice]:
            raise ConfigError(f"GEMMA_MLX_KERNELS={choice}, but MLX has no {choice} backend on this machine "
                              "(use auto or reference)")
        return choice
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "reference"


class Launcher:
    """Builds each MLX custom-kernel object once (every distinct source is a JIT compile) and calls it."""

    def __init__(self, backend: str, verbose: bool = False):
        if backend not in ("metal", "cuda"):
            raise ValueError(f"no kernel launcher for backend {backend!r}")
        self.backend = backend
        self.verbose = verbose
        self._kernels: dict[str, object] = {}

    def _kernel(self, spec: KernelSpec):
        kernel = self._kernels.get(spec.name)
        if kernel is None:
            common = dict(
                name=spec.name,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                source=spec.source(self.backend),
                header=spec.header(self.backend),
                # False: K/V views of a preallocated cache are read through their strides, never copied.
                ensure_row_contiguous=False,
            )
            if self.backend == "metal":
                kernel = mx.fast.metal_kernel(**common)
            else:
                kernel = mx.fast.cuda_kernel(**common)
            self._kernels[spec.name] = kernel
        return kernel

    def __call__(self, spec: KernelSpec, **launch) -> list[mx.array]:
        return self._kernel(spec)(**launch, verbose=self.verbose)


@dataclass(frozen=True)
class AttentionPlan:
    G: int  # query heads per KV head
    BQ: int  # queries per group (rows R = G * BQ; rows past L are dead)
    QT: int  # query tiles
    BK: int  # keys per staged tile
    NS: int  # key slices (split-K)
    SPLIT: int  # keys per slice, a multiple of BK
    groups: int  # attn_tile groups = B * HKV * QT * NS

    @property
    def R(self) -> int:
        return self.G * self.BQ


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows_fit(R: int, D: int) -> bool:
    """R rows map onto NW warps: whole rows per warp, or a power-of-two share of the head dim per warp."""
    if R >= NW:
        return R % NW == 0
    return NW % R == 0 and D % (32 * (NW // R)) == 0


def plan_attention(B: int, Hq: int, Hkv: int, L: int, S: int, D: int, kv_itemsize: int) -> AttentionPlan:
    G = Hq // Hkv
    BK = max(1, min(16, TILE_BYTES // (2 * D * kv_itemsize)))
    max_rows = max(NW, NW * LANE_FLOATS * 32 // D)
    BQ = max(1, min(L, max_rows // G))
    while not _rows_fit(G * BQ, D):  # terminates: G * BQ reaches a multiple of NW
        BQ += 1
    QT = _cdiv(L, BQ)
    base = B * Hkv * QT
    NS = max(1, min(_cdiv(TARGET_GROUPS, base), _cdiv(S, MIN_SPLIT)))
    SPLIT = max(BK, _cdiv(_cdiv(S, NS), BK) * BK)
    NS = max(1, _cdiv(S, SPLIT))
    return AttentionPlan(G=G, BQ=BQ, QT=QT, BK=BK, NS=NS, SPLIT=SPLIT, groups=base * NS)


def kernel_supports(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Shapes and dtypes the shared attention body handles; anything else takes the reference path."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        return False
    B, Hq, L, D = q.shape
    return (
        k.shape[0] == B and k.shape[3] == D and Hq % k.shape[1] == 0 and D % 32 == 0 and D <= 1024
        and L > 0 and q.dtype in KERNEL_DTYPES and k.dtype in KERNEL_DTYPES and v.dtype == k.dtype
    )


def _row_stride(positions: mx.array) -> int:
    """Elements between two rows of a position or block array: 0 when shared (1-D), its length when (B, n)."""
    return positions.shape[-1] if positions.ndim == 2 else 0


def attention_kernel(q, k, v, *, scale, q_pos, k_pos, window, q_block, k_block, block_overrides_window, launch):
    """Attention through attn_tile + attn_combine; same contract as reference.attention."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    plan = plan_attention(B, Hq, Hkv, L, S, D, k.dtype.size)
    blocks = q_block is not None and k_block is not None
    none = mx.zeros((1,), dtype=mx.int32)
    # Row strides of the position and block arrays: 0 for one (L,)/(S,) array shared by the batch, L or S for
    # per-row (B, L)/(B, S) arrays (the body reads row b at b * stride).
    strides = [_row_stride(q_pos), _row_stride(k_pos),
               _row_stride(q_block) if blocks else 0, _row_stride(k_block) if blocks else 0]
    ip = mx.array([L, S, Hkv, plan.NS, plan.SPLIT, plan.QT, window or 0, int(bool(block_overrides_window)),
                   *strides], dtype=mx.int32)
    po, pm, pl = launch(
        ATTN_TILE,
        inputs=[
            mx.contiguous(q), k, v,
            mx.contiguous(q_pos.astype(mx.int32)), mx.contiguous(k_pos.astype(mx.int32)),
            mx.contiguous(q_block.astype(mx.int32)) if blocks else none,
            mx.contiguous(k_block.astype(mx.int32)) if blocks else none,
            ip, mx.array([scale], dtype=mx.float32),
        ],
        template=[("T", q.dtype), ("KT", k.dtype), ("D", D), ("G", plan.G), ("BQ", plan.BQ), ("TG", TG),
                  ("BK", plan.BK), ("HAS_BLOCKS", blocks)],
        grid=(plan.groups * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(plan.groups, plan.R, D), (plan.groups, plan.R), (plan.groups, plan.R)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    rows = B * Hkv * plan.QT * plan.R
    (out,) = launch(
        ATTN_COMBINE,
        inputs=[po, pm, pl, mx.array([L, plan.NS, plan.QT, Hkv], dtype=mx.int32)],
        template=[("T", q.dtype), ("D", D), ("R", plan.R), ("BQ", plan.BQ), ("TGC", TG_COMBINE)],
        grid=(rows * TG_COMBINE, 1, 1),
        threadgroup=(TG_COMBINE, 1, 1),
        output_shapes=[(B, Hq, L, D)],
        output_dtypes=[q.dtype],
    )
    return out


# (B, Hq, Hkv, L, S, D, window, blocks): Gemma 4's decode shapes at both head dims, a windowed prefill with a
# vision block, and a batched ring decode with per-row positions (B > 1: each row its own offset, wrap point and
# empty slots), small enough to compile and run in well under a second on a GPU.
SELF_CHECK_CASES = (
    (1, 16, 1, 1, 300, 512, None, False),
    (1, 16, 8, 1, 40, 256, 16, False),
    (1, 4, 2, 33, 100, 64, 16, True),
    (3, 16, 8, 1, 40, 256, 16, False),
)


def _self_check_positions(B: int, L: int, S: int) -> tuple[mx.array, mx.array]:
    """(q_pos, k_pos): shared (L,), (S,) for B == 1; per row (B, L), (B, S) otherwise, row b a ring of S slots
    holding positions 3b .. 3b+S-1 wrapped at slot S - 11b, its last b slots empty, its queries at the end."""
    if B == 1:
        return mx.arange(S - L, S), mx.arange(S)
    slot, row = mx.arange(S)[None, :], mx.arange(B)[:, None]
    k_pos = mx.where(slot >= S - row, -1, (slot + 11 * row) % S + 3 * row)
    return mx.arange(S - L, S)[None, :] + 3 * row, k_pos


def self_check(launch, dtypes=(mx.float32, mx.bfloat16)) -> str | None:
    """None when the kernels behind ``launch`` agree with the reference path on SELF_CHECK_CASES, else why not.

    The Metal and CUDA bodies are verified here only by emulation and compile checks; this is the check on the
    machine itself, run once before the first kernel call. A compile error, a launch error or a wrong result all
    come back as a reason, so the caller can fall back to the reference path instead of failing or misleading.
    """
    from . import reference

    key = mx.random.key(0)
    for dtype in dtypes:
        for B, Hq, Hkv, L, S, D, window, blocks in SELF_CHECK_CASES:
            kq, kk, kv, key = mx.random.split(key, 4)
            q = mx.random.normal((B, Hq, L, D), key=kq).astype(dtype)
            k = mx.random.normal((B, Hkv, S, D), key=kk).astype(dtype)
            v = mx.random.normal((B, Hkv, S, D), key=kv).astype(dtype)
            q_pos, k_pos = _self_check_positions(B, L, S)
            args = dict(scale=D ** -0.5, q_pos=q_pos, k_pos=k_pos, window=window,
                        q_block=mx.full((L,), 1) if blocks else None, block_overrides_window=False,
                        k_block=mx.where(mx.arange(S) >= S - 5, 1, 0) if blocks else None)
            case = f"{dtype} B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} D={D} window={window}"
            try:
                got = attention_kernel(q, k, v, **args, launch=launch).astype(mx.float32)
                mx.eval(got)
            except Exception as err:  # compile or launch failure on this machine
                return f"{case}: {type(err).__name__}: {str(err)[:300]}"
            want = reference.attention(q, k, v, **args, dense_limit=1 << 24, key_block=4096).astype(mx.float32)
            tol = 1e-4 if dtype == mx.float32 else 2e-2
            err = mx.max(mx.abs(got - want)).item()
            if not err <= tol:  # also catches NaN
                return f"{case}: max |kernel - reference| = {err:.3g} > {tol}"
    return None
