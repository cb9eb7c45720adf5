"""Convert time and peak memory: gemma-mlx vs mlx_lm.convert vs mlx_vlm.convert on the same checkpoint.

A synthetic bf16 gemma4_unified checkpoint with the real 12B shapes (hidden 3840, MLP 15360, vocab 262144,
head dims 256/512; 48 layers by default: 23.9 GB in ~4 GB shards, like the hub release) is written first, then
each converter makes a uniform 4-bit group-64 model from it in a fresh process whose peak RSS is read from the
kernel. Work files go to --work (default: the system temp directory).

    python bench/bench_convert.py [--layers 48] [--work DIR] [--out bench/results]

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

from gemma_mlx.config import parse_config
from gemma_mlx.convert.hf import expected_shapes
from gemma_mlx.convert.writer import published_config
from gemma_mlx.tiny import gemma4_config

REAL_IDS = dict(boi_token_id=255999, eoi_token_id=258882, image_token_id=258880, video_token_id=258884,
                boa_token_id=256000, eoa_token_index=258883, audio_token_id=258881)
# Runs the command, polling its anonymous RSS (memory it really needs: memory-mapped checkpoint pages are
# file-backed and dropped under pressure, but ru_maxrss counts them too). Prints both peaks in KiB.
MEASURE = """
import resource, subprocess, sys, time
def anon(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:])
peak = 0
while p.poll() is None:
    peak = max(peak, anon(p.pid))
    time.sleep(0.05)
print("RESULT", p.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, peak)
"""


def snapped(shape, bits: int) -> mx.array:
    """Random bf16 weights w = s·(q - 2^(bits-1)), q uniform in [0, 2^bits), per group of 64 a power-of-two-ish
    scale s and both end levels present: MLX's affine quantize then picks exactly this grid (its zero-exact edge
    rule included), so quantizing to `bits` at group 64 is lossless. Std ~0.018, like 0.02·N(0, 1)."""
    levels = 2**bits
    q = mx.random.randint(0, levels, (shape[0] * shape[1] // 64, 64), dtype=mx.uint8)
    q[:, 0] = 0
    q[:, 1] = levels - 1
    s = mx.array([0.75, 1.0, 1.5], dtype=mx.bfloat16)[mx.random.randint(0, 3, (q.shape[0], 1))] * (2.0**-8 * 16 / levels)
    return ((q.astype(mx.bfloat16) - levels // 2) * s).reshape(shape)


def synthetic_checkpoint(path: Path, layers: int, hidden_size: int = 3840, intermediate_size: int = 15360,
                         snap_bits: int | None = None) -> Path:
    """Random bf16 weights with the real 12B shapes, in ~4 GB shards with an index, as the hub release is laid
    out; written a tensor at a time (the full 48 layers are 24 GB). config.json in the published spelling
    (global_head_dim, hidden_size_per_layer_input 0), which every converter reads. hidden_size /
    intermediate_size narrow the model (the attention head shapes, vocabulary and layer pattern stay real).
    snap_bits draws every matrix whose rows split into groups of 64 on a snap_bits-bit grid that MLX's affine
    quantize (group 64) reproduces exactly (see snapped), so the 4-bit runtimes compute the bf16 model itself
    and can be checked against a float reference."""
    types = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6) + ["sliding_attention"] * (layers % 6)
    types[-1] = "full_attention"
    cfg = gemma4_config(vocab_size=262144, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                        sliding_window=1024, layer_types=types, mm_embed_dim=hidden_size, mm_posemb_size=1120,
                        token_ids=REAL_IDS, dtype="bfloat16")
    cfg = published_config(cfg)
    path.mkdir(parents=True)
    count, current, size = 0, {}, 0
    for name, shape in expected_shapes(parse_config(cfg)).items():
        if "norm" in name or name.endswith(("layer_scalar", "_ln1.weight", "_ln2.weight")):
            value = 1.0 + 0.1 * mx.random.normal(shape)
        else:
            value = 0.02 * mx.random.normal(shape)
            if snap_bits and len(shape) == 2 and shape[-1] % 64 == 0:
                value = snapped(shape, snap_bits)
        current[name] = value.astype(mx.bfloat16)
        mx.eval(current[name])
        size += current[name].nbytes
        if size > 4e9:
            count += 1
            mx.save_safetensors(str(path / f"part-{count}.safetensors"), current, metadata={"format": "pt"})
            current, size = {}, 0
    count += 1
    mx.save_safetensors(str(path / f"part-{count}.safetensors"), current, metadata={"format": "pt"})
    del current
    weight_map = {}
    for i in range(count):
        final = path / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (path / f"part-{i + 1}.safetensors").rename(final)
        weight_map.update({k: final.name for k in mx.load(str(final))})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106, 50]}))
    # Peers load a tokenizer and template with the weights.
    from importlib.resources import files

    from gemma_mlx.tiny import MEDIA_TOKEN_STRINGS
    from gemma_mlx.tokenizer import write_byte_tokenizer

    write_byte_tokenizer(path, {MEDIA_TOKEN_STRINGS[k]: v for k, v in cfg.items() if k in MEDIA_TOKEN_STRINGS},
                         cfg["text_config"]["vocab_size"])
    (path / "chat_template.jinja").write_text(files("gemma_mlx").joinpath("assets/chat_template.jinja").read_text())
    return path


def run(name: str, cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        return {"converter": name, "error": (out.stderr + out.stdout)[-500:]}
    _, rc, seconds, rss_kib, anon_kib = line.split()
    result = {"converter": name, "seconds": round(float(seconds), 1), "peak_rss_gb": round(int(rss_kib) / 1e6, 2),
              "peak_anon_gb": round(int(anon_kib) / 1e6, 2)}
    if rc != "0":
        result["error"] = f"exit code {rc}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shard-size", type=int, default=5 * 2**30, help="our shard size (bytes)")
    ap.add_argument("--work", default=None, help="directory for the checkpoint and outputs")
    args = ap.parse_args()
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        src = synthetic_checkpoint(work / "src", args.layers)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB bf16, {args.layers} layers ({time.perf_counter() - t:.0f} s)")
        exe = str(Path(sys.executable).parent / "gemma-mlx")
        runs = [
            ("gemma-mlx convert", [exe, "convert", str(src), "-o", str(work / "ours"), "-q", "4",
                                   "--recipe", "uniform", "--shard-size", str(args.shard_size), "--quiet"]),
            ("mlx_lm.convert", [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                                "--mlx-path", str(work / "mlx_lm"), "-q", "--q-bits", "4", "--q-group-size", "64"]),
            ("mlx_vlm.convert", [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src),
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
            r["anon_vs_ours"] = round(r["peak_anon_gb"] / max(ours["peak_anon_gb"], 1e-9), 2)
    report = {"checkpoint_gb": round(size / 1e9, 2), "layers": args.layers, "results": results,
              "machine": f"{sys.platform}, {__import__('os').cpu_count()} cores", "mlx": mx.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_convert.json").write_text(json.dumps(report, indent=2))
    lines = [f"Synthetic {report['checkpoint_gb']} GB bf16 gemma4_unified checkpoint ({args.layers} layers, real "
             "12B widths) to uniform 4-bit g64 (ours with shards of "
             f"{args.shard_size / 2**20:.0f} MiB). Peak RSS counts memory-mapped checkpoint pages (file-backed, "
             "dropped under memory pressure); peak anonymous RSS is the memory a converter really needs.", "",
             "| converter | time (s) | peak RSS (GB) | peak anonymous RSS (GB) | output (GB) | time / ours | "
             "anonymous RSS / ours |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['converter']} | failed: {r['error'][:90]} | | | | | |")
        else:
            lines.append(f"| {r['converter']} | {r['seconds']} | {r['peak_rss_gb']} | {r['peak_anon_gb']} | "
                         f"{r.get('output_gb', '')} | {r.get('time_vs_ours', '')} | {r.get('anon_vs_ours', '')} |")
    (out / "bench_convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
