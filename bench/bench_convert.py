"""Convert time and peak memory: gemma-mlx vs mlx_lm.convert vs mlx_vlm.convert on the same checkpoint.

A synthetic bf16 gemma4_unified checkpoint with the real 12B widths (hidden 3840, MLP 15360, vocab 262144,
head dims 256/512) and few layers is written first (the default, 2 layers, is ~3.6 GB), then each converter
makes a 4-bit group-64 model from it in a fresh process whose peak RSS is read from the kernel.

    python bench/bench_convert.py [--layers 2] [--out bench/results]

Writes bench_convert.json and bench_convert.md. mlx-lm / mlx-vlm come from the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gemma_mlx.tiny import gemma4_config, write_random_checkpoint

REAL_IDS = dict(boi_token_id=255999, eoi_token_id=258882, image_token_id=258880, video_token_id=258884,
                boa_token_id=256000, eoa_token_index=258883, audio_token_id=258881)
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('RESULT', rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def synthetic_checkpoint(path: Path, layers: int) -> Path:
    types = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6) + ["sliding_attention"] * (layers % 6)
    types[-1] = "full_attention"
    cfg = gemma4_config(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                        sliding_window=1024, layer_types=types, mm_embed_dim=3840, mm_posemb_size=1120,
                        token_ids=REAL_IDS, dtype="bfloat16")
    return write_random_checkpoint(path, cfg, dtype=mx.bfloat16, seed=0)


def run(name: str, cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        return {"converter": name, "error": (out.stderr or out.stdout)[-500:]}
    _, rc, seconds, rss_kib = line.split()
    result = {"converter": name, "seconds": round(float(seconds), 1), "peak_rss_gb": round(int(rss_kib) / 1e6, 2)}
    if rc != "0":
        result["error"] = f"exit code {rc}: {out.stdout[-300:]}"
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        src = synthetic_checkpoint(work / "src", args.layers)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB bf16, {args.layers} layers ({time.perf_counter() - t:.0f} s)")
        exe = str(Path(sys.executable).parent / "gemma-mlx")
        runs = [
            ("gemma-mlx convert", [exe, "convert", str(src), "-o", str(work / "ours"), "-q", "4"]),
            ("mlx_lm.convert", [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                                "--mlx-path", str(work / "mlx_lm"), "-q", "--q-bits", "4", "--q-group-size", "64"]),
            ("mlx_vlm.convert", [sys.executable, "-m", "mlx_vlm.convert", "--hf-path", str(src),
                                 "--mlx-path", str(work / "mlx_vlm"), "-q", "--q-bits", "4", "--q-group-size", "64"]),
        ]
        results = []
        for name, cmd in runs:
            r = run(name, cmd)
            dest = work / {"gemma-mlx convert": "ours", "mlx_lm.convert": "mlx_lm", "mlx_vlm.convert": "mlx_vlm"}[name]
            if dest.is_dir():
                r["output_gb"] = round(sum(f.stat().st_size for f in dest.glob("*.safetensors")) / 1e9, 2)
                shutil.rmtree(dest)
            print(r, flush=True)
            results.append(r)
    ours = results[0]
    for r in results:
        if "error" not in r and "error" not in ours:
            r["time_vs_ours"] = round(r["seconds"] / ours["seconds"], 2)
            r["rss_vs_ours"] = round(r["peak_rss_gb"] / ours["peak_rss_gb"], 2)
    report = {"checkpoint_gb": round(size / 1e9, 2), "layers": args.layers, "results": results,
              "machine": f"{sys.platform}, {__import__('os').cpu_count()} cores", "mlx": mx.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_convert.json").write_text(json.dumps(report, indent=2))
    lines = [f"Synthetic {report['checkpoint_gb']} GB bf16 gemma4_unified checkpoint ({args.layers} layers, real "
             "12B widths) to 4-bit g64.", "",
             "| converter | time (s) | peak RSS (GB) | output (GB) | time / ours | peak RSS / ours |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['converter']} | failed: {r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {r['converter']} | {r['seconds']} | {r['peak_rss_gb']} | {r.get('output_gb', '')} | "
                         f"{r.get('time_vs_ours', '')} | {r.get('rss_vs_ours', '')} |")
    (out / "bench_convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
