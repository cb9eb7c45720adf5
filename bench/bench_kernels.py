"""Attention and patch-projection ops per backend: time, bytes/s and peak scratch memory at Gemma 4 12B shapes.

For every op and size, each available path is timed:
- ``reference``: the pure-MLX path (blocked online softmax, float32 statistics), run on every machine;
- ``kernel``: the Metal kernels (Macs) or their CUDA twins (NVIDIA), only where that backend is live;
- ``mlx_sdpa``: MLX's own ``mx.fast.scaled_dot_product_attention`` with a boolean mask array (the window has no
  other spelling), for comparison. On a CPU it is MLX's unfused path: it builds the score matrix.

bytes/s counts the K/V cache bytes the op must read plus q and the output, over the median time. "scratch" is
the peak memory of the call beyond its inputs (MLX allocator peak minus what was allocated before): for a
memory-bounded path it must not grow with the context. The long-context prefill rows (512-token chunk at
D=512, 16 query heads on one KV head, over 8K and 32K keys; 128K on a GPU) are the memory figures.

Patch projection (LayerNorm 6912 -> Dense 6912x3840 + bias -> LayerNorm 3840): the reference, its stages
timed one by one, and the LN-folded variant (gamma/beta of the first LayerNorm folded into the weights, the
normalisation applied after the GEMM), with their errors against float64: the numbers behind the decision in
the README.

    python bench/bench_kernels.py [--quick] [--out bench/results]

On a Linux CPU the process first re-executes itself with OpenBLAS preloaded when it is installed (float32 GEMM
~100x faster; every path shares it) and computes in float32. Writes bench_kernels.json and bench_kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import settings
from gemma_mlx.kernels import ops, reference
from gemma_mlx.platform import fast_blas_loaded

GPU = ops.BACKEND in ("metal", "cuda")


def timed(fn, runs: int) -> tuple[float, float]:
    """(median seconds, peak scratch bytes) of fn() after one warm-up; fn returns what to evaluate."""
    mx.eval(fn())
    times, peak = [], 0
    for _ in range(runs):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
        peak = max(peak, mx.get_peak_memory() - base)
    return statistics.median(times), peak


def attention_case(name, *, Hq, Hkv, D, L, S, window, ring, dtype, runs):
    """One attention call at Gemma 4 shapes; ring=True lays the keys out as a wrapped ring with window arithmetic."""
    rng = np.random.default_rng(0)

    def rand(shape):
        return mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    q, k, v = rand((1, Hq, L, D)), rand((1, Hkv, S, D)), rand((1, Hkv, S, D))
    last = S + 5000 if ring else S  # a ring that has wrapped: slot s holds the newest position = s (mod S)
    k_pos = np.arange(last - S, last, dtype=np.int32)
    if ring:
        k_pos = np.roll(k_pos, 777)
    q_pos = mx.arange(last - L, last, dtype=mx.int32)
    k_pos = mx.array(k_pos)
    mx.eval(q, k, v, q_pos, k_pos)
    args = dict(scale=1.0, q_pos=q_pos, k_pos=k_pos, window=window)
    limits = settings.get()
    paths = {"reference": lambda: reference.attention(q, k, v, **args, dense_limit=limits.attention_dense_limit,
                                                      key_block=limits.attention_key_block)}
    if GPU:
        paths["kernel"] = lambda: ops.attention(q, k, v, **args)
    score_bytes = Hq * L * S * 4
    if score_bytes <= (8 << 30 if GPU else 2 << 30):
        from gemma_mlx.model.masks import allowed

        mask = allowed(q_pos, k_pos, window=window)
        mx.eval(mask)
        paths["mlx_sdpa"] = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    moved = (2 * Hkv * S * D + 2 * Hq * L * D) * dtype.size
    flops = 4 * Hq * L * D * min(S, window or S)
    rows = []
    for path, fn in paths.items():
        sec, peak = timed(fn, runs)
        rows.append({"op": name, "keys": S, "queries": L, "path": path, "ms": sec * 1e3,
                     "GB_per_s": moved / sec / 1e9, "GFLOP_per_s": flops / sec / 1e9, "scratch_MB": peak / 2**20})
        print(rows[-1], flush=True)
    if "kernel" in paths:
        ref, got = paths["reference"](), paths["kernel"]()
        row = next(r for r in rows if r["path"] == "kernel")
        row["max_abs_diff_vs_reference"] = float(mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max())
    return rows


def layer_norm_f64(h, w, b, eps):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def patch_case(P, dtype, runs):
    rng = np.random.default_rng(1)
    x = mx.array(rng.uniform(0, 1, (P, 6912)).astype(np.float32))
    ws = [1 + 0.1 * rng.standard_normal(6912), 0.1 * rng.standard_normal(6912),
          rng.standard_normal((3840, 6912)) / np.sqrt(6912), 0.1 * rng.standard_normal(3840),
          1 + 0.1 * rng.standard_normal(3840), 0.1 * rng.standard_normal(3840)]
    w1, b1, W, b, w2, b2 = (mx.array(a.astype(np.float32)).astype(dtype) for a in ws)
    mx.eval(x, w1, b1, W, b, w2, b2)
    f32 = mx.float32
    # LN folding, precomputed once per checkpoint: W' = W diag(g1), b' = b + W b1, c = colsum(W') per output.
    Wf = (W.astype(f32) * w1.astype(f32)).astype(dtype)
    bf = (b.astype(f32) + W.astype(f32) @ b1.astype(f32)).astype(dtype)
    c = Wf.astype(f32).sum(axis=1)
    mx.eval(Wf, bf, c)

    def folded():
        xd = x.astype(dtype)
        xf = xd.astype(f32)
        mu = xf.mean(-1, keepdims=True)
        rstd = mx.rsqrt(((xf - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        y = ((xd @ Wf.T).astype(f32) - mu * c) * rstd + bf.astype(f32)
        return reference.layer_norm_f32(y.astype(dtype), w2, b2, 1e-5).astype(dtype)

    h1 = reference.layer_norm_f32(x.astype(dtype), w1, b1, 1e-5).astype(dtype)
    g = mx.addmm(b, h1, W.T)
    mx.eval(h1, g)
    paths = {
        "reference": lambda: ops.patch_embed(x, w1, b1, W, b, w2, b2),
        "ln_folded": folded,
        "stage: LN1 (cast + LayerNorm 6912)": lambda: reference.layer_norm_f32(x.astype(dtype), w1, b1, 1e-5)
        .astype(dtype),
        "stage: GEMM + bias (addmm)": lambda: mx.addmm(b, h1, W.T),
        "stage: LN2 (LayerNorm 3840)": lambda: reference.layer_norm_f32(g, w2, b2, 1e-5).astype(dtype),
    }
    want = layer_norm_f64(layer_norm_f64(np.array(x, np.float64), *(np.array(a.astype(f32), np.float64)
                                                                     for a in (w1, b1)), 1e-5)
                          @ np.array(W.astype(f32), np.float64).T + np.array(b.astype(f32), np.float64),
                          np.array(w2.astype(f32), np.float64), np.array(b2.astype(f32), np.float64), 1e-5)
    flops = 2 * P * 6912 * 3840
    rows = []
    for path, fn in paths.items():
        sec, peak = timed(fn, runs)
        row = {"op": "patch_embed", "patches": P, "dtype": str(dtype).split(".")[-1], "path": path,
               "ms": sec * 1e3, "GFLOP_per_s": flops / sec / 1e9, "scratch_MB": peak / 2**20}
        if not path.startswith("stage"):
            row["max_abs_err_vs_f64"] = float(np.abs(np.array(fn().astype(f32), np.float64) - want).max())
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(report) -> str:
    lines = [f"{report['machine']}, mlx {report['mlx']}, kernels backend: {report['backend']}, {report['blas']}, "
             f"attention in {report['attention_dtype']}.", "",
             "| op | keys | queries | path | time (ms) | speed vs reference | GB/s | GFLOP/s | scratch (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["attention"]:
        ref = next(x for x in report["attention"] if x["op"] == r["op"] and x["keys"] == r["keys"]
                   and x["path"] == "reference")
        lines.append(f"| {r['op']} | {r['keys']} | {r['queries']} | {r['path']} | {r['ms']:.1f} | "
                     f"{ref['ms'] / r['ms']:.2f}× | {r['GB_per_s']:.2f} | {r['GFLOP_per_s']:.1f} | "
                     f"{r['scratch_MB']:.1f} |")
    lines += ["", "| patch projection | patches | dtype | time (ms) | GFLOP/s | share of reference | "
              "max abs err vs float64 |", "|---|---|---|---|---|---|---|"]
    for r in report["patch_embed"]:
        ref = next(x for x in report["patch_embed"] if x["patches"] == r["patches"] and x["dtype"] == r["dtype"]
                   and x["path"] == "reference")
        err = f"{r['max_abs_err_vs_f64']:.3g}" if "max_abs_err_vs_f64" in r else ""
        lines.append(f"| {r['path']} | {r['patches']} | {r['dtype']} | {r['ms']:.2f} | {r['GFLOP_per_s']:.1f} | "
                     f"{r['ms'] / ref['ms']:.1%} | {err} |")
    return "\n".join(lines) + "\n"


def main():
    from gemma_mlx.platform import reexec_with_fast_blas

    reexec_with_fast_blas()
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short contexts and one run each: a smoke test")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dtype = mx.bfloat16 if GPU else mx.float32  # float32 on a CPU: bfloat16 GEMMs there are ~8x slower
    runs = 1 if args.quick else 3
    long = [2048, 4096] if args.quick else [8192, 32768] + ([131072] if GPU else [])
    chunk = 64 if args.quick else 512
    attention = []
    for S in long:
        attention += attention_case("full decode (D=512, 16q/1kv)", Hq=16, Hkv=1, D=512, L=1, S=S, window=None,
                                    ring=False, dtype=dtype, runs=runs)
    attention += attention_case("sliding decode (D=256, 16q/8kv, ring)", Hq=16, Hkv=8, D=256, L=1, S=1279,
                                window=1024, ring=True, dtype=dtype, runs=runs)
    for S in long:
        attention += attention_case(f"full prefill chunk {chunk} (D=512, 16q/1kv)", Hq=16, Hkv=1, D=512, L=chunk,
                                    S=S, window=None, ring=False, dtype=dtype, runs=runs)
    attention += attention_case(f"sliding prefill chunk {chunk} (D=256, 16q/8kv)", Hq=16, Hkv=8, D=256, L=chunk,
                                S=1023 + chunk, window=1024, ring=False, dtype=dtype, runs=runs)
    patches = []
    for P in ([64] if args.quick else [280, 1120]):
        patches += patch_case(P, dtype, runs)
    report = {"machine": f"{sys.platform} {'GPU' if GPU else 'CPU'}, {os.cpu_count()} cores", "mlx": mx.__version__,
              "backend": ops.BACKEND, "blas": "OpenBLAS preloaded" if fast_blas_loaded() else "reference BLAS",
              "attention_dtype": str(dtype).split(".")[-1], "attention": attention, "patch_embed": patches}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_kernels_quick" if args.quick else "bench_kernels"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
