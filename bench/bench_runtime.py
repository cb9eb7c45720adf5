"""Speed and memory of gemma-mlx next to mlx-lm and mlx-vlm, on the same 4-bit weights, in one run.

A random-weight gemma4_unified checkpoint with the real 12B widths (hidden 3840, MLP 15360, 16 query heads,
sliding 8×256 / full 1×512 KV heads, window 1024, vocab 262144) and few layers (default: one sliding + one
full) is written, converted once to uniform 4-bit g64 by our converter (mlx-vlm and mlx-lm load that directory
too), then every runtime is timed on it:

- load time; decode tokens/s and a 128-token prefill chunk at depths 2K, 8K and 32K. MLX's CPU backend is slow
  (mlx-lm prefills ~5 tokens/s at these widths), so each runtime's caches are FILLED SYNTHETICALLY to the
  depth (random keys/values written straight into its cache objects) instead of prefilling thousands of tokens;
- peak memory per runtime (MLX's allocator peak);
- prefill tokens/s of a 512-token prompt from an empty cache;
- time to first token for an image (256 soft tokens), an audio clip (5 s) and a video (8 frames) in gemma-mlx
  (the peers' multimodal prompt APIs differ too much for a like-for-like call; mlx-lm has no media at all);
- decode's distance from the memory-bandwidth limit: bytes read per token over this machine's measured copy
  bandwidth.

    python bench/bench_runtime.py [--layers 2] [--depths 2048 8192 32768] [--out bench/results]

Writes bench_runtime.json, bench_runtime.md and (with matplotlib) bench_runtime.png. Every runtime runs under the
same BLAS setting (reported). Peers come from the `bench` extra.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.platform import fast_blas_loaded

DECODE_STEPS = 3


def build(work: Path, layers: int) -> Path:
    from bench_convert import synthetic_checkpoint

    from gemma_mlx.convert import convert

    src = synthetic_checkpoint(work / "bf16", layers)  # with a byte tokenizer and the chat template
    out = work / "q4"
    convert(src, out, bits=4, group_size=64, recipe="uniform", progress=False)
    return out


def fill_ours(model, depth: int):
    from gemma_mlx.cache import FullCache, RingCache, make_cache

    caches = make_cache(model.config.text)
    dtype = mx.float32
    for spec, c in zip(model.config.text.layers, caches):
        if isinstance(c, FullCache):
            c.step = max(c.step, depth + 1024)
            k = mx.random.normal((1, spec.num_kv_heads, depth, spec.head_dim), dtype=dtype)
            c.update(k, k)
        elif isinstance(c, RingCache):
            n = min(depth, c.size)
            k = mx.random.normal((1, spec.num_kv_heads, n, spec.head_dim), dtype=dtype)
            c.keys = mx.zeros((1, spec.num_kv_heads, c.size, spec.head_dim), dtype=dtype)
            c.values = mx.zeros_like(c.keys)
            c._write(k, k, depth - n)  # the newest n positions, in their ring slots
            c.offset = depth
    mx.eval([c.state for c in caches if c is not None])
    return caches


def fill_peer(caches, depth: int, layer_shapes):
    for c, (heads, dim) in zip(caches, layer_shapes):
        n = min(depth, getattr(c, "max_size", depth) or depth)
        k = mx.random.normal((1, heads, n, dim))
        c.update_and_fetch(k, k)
        c.offset = depth
        if hasattr(c, "_idx"):
            c._idx = c.keys.shape[2]
    mx.eval([c.state for c in caches])
    return caches


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def run_ours(path: Path, depths, chunk: int, prompt: int, video: Path) -> dict:
    from gemma_mlx import load

    mx.reset_peak_memory()
    t = time.perf_counter()
    g = load(path)
    res = {"load_s": time.perf_counter() - t}
    model = g.model
    tok = mx.array([[7]])
    if prompt:
        from gemma_mlx.cache import make_cache

        caches = make_cache(model.config.text)
        ids = mx.array(np.full((1, prompt), 9, np.int32))
        t = time.perf_counter()
        mx.eval(model(ids, cache=caches, logits_to_keep=1))
        res[f"prefill_tps_{prompt}_prompt"] = prompt / (time.perf_counter() - t)
    for d in depths:
        caches = fill_ours(model, d)

        def step():
            mx.eval(model(tok, cache=caches, logits_to_keep=1))

        res[f"decode_tps@{d}"] = 1 / timed(step, DECODE_STEPS)
        print(f"  gemma-mlx decode at {d}: {res[f'decode_tps@{d}']:.3f} tok/s", flush=True)
        caches = fill_ours(model, d)
        ids = mx.array(np.full((1, chunk), 9, np.int32))
        t = time.perf_counter()
        mx.eval(model(ids, cache=caches, logits_to_keep=1))
        res[f"prefill_tps@{d}"] = chunk / (time.perf_counter() - t)
        del caches
        gc.collect()
    rng = np.random.default_rng(0)
    for name, media in (("image", {"images": [(rng.random((768, 768, 3)) * 255).astype(np.uint8)]}),
                        ("audio", {"audios": [(rng.uniform(-0.3, 0.3, 16000 * 5).astype(np.float32), 16000)]}),
                        ("video", {"videos": [video]})):
        t = time.perf_counter()
        g.generate("Describe it.", max_tokens=1, greedy=True, **media)
        res[f"ttft_{name}_s"] = time.perf_counter() - t
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return res


def run_peer(kind: str, path: Path, depths, chunk: int, prompt: int) -> dict:
    mx.reset_peak_memory()
    t = time.perf_counter()
    if kind == "mlx-lm":
        from mlx_lm import load

        # mlx-lm fills fields the checkpoint leaves out with Gemma 4 E2B values (per-layer embeddings, KV
        # sharing): its known config bug. Give it a view of the same weights whose config spells them out.
        view = path.parent / "mlx_lm_view"
        view.mkdir(exist_ok=True)
        for f in path.iterdir():
            if f.name != "config.json" and not (view / f.name).exists():
                (view / f.name).symlink_to(f.resolve())
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"].update(hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False)
        (view / "config.json").write_text(json.dumps(cfg))
        model, _ = load(str(view))
        lm = model
    else:
        from mlx_vlm.utils import load_model

        model = load_model(path)
        model.set_dtype(mx.float32) if hasattr(model, "set_dtype") else None
        lm = model.language_model
    res = {"load_s": time.perf_counter() - t}
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    shapes = [((cfg["num_global_key_value_heads"], cfg["global_head_dim"]) if t == "full_attention"
               else (cfg["num_key_value_heads"], cfg["head_dim"])) for t in cfg["layer_types"]]
    tok = mx.array([[7]])
    if prompt:
        caches = lm.make_cache()
        ids = mx.array(np.full((1, prompt), 9, np.int32))
        t = time.perf_counter()
        out = lm(ids, cache=caches)
        mx.eval(out.logits if hasattr(out, "logits") else out)
        res[f"prefill_tps_{prompt}_prompt"] = prompt / (time.perf_counter() - t)
    for d in depths:
        caches = fill_peer(lm.make_cache(), d, shapes)

        def step():
            out = lm(tok, cache=caches)
            mx.eval(out.logits if hasattr(out, "logits") else out)

        res[f"decode_tps@{d}"] = 1 / timed(step, DECODE_STEPS)
        print(f"  {kind} decode at {d}: {res[f'decode_tps@{d}']:.3f} tok/s", flush=True)
        caches = fill_peer(lm.make_cache(), d, shapes)
        ids = mx.array(np.full((1, chunk), 9, np.int32))
        t = time.perf_counter()
        out = lm(ids, cache=caches)
        mx.eval(out.logits if hasattr(out, "logits") else out)
        res[f"prefill_tps@{d}"] = chunk / (time.perf_counter() - t)
        del caches
        gc.collect()
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return res


def write_video(path: Path, frames: int = 8) -> Path:
    """A small synthetic H.264 clip (256×256, 4 fps) to time the video path."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width = stream.height = 256
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray((rng.random((256, 256, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def copy_bandwidth_gbs() -> float:
    a = mx.random.normal((64 * 1024 * 1024,))  # 256 MB
    mx.eval(a)
    t = timed(lambda: mx.eval(a + 1.0), 3)
    return 2 * a.nbytes / t / 1e9  # read + write


def main():
    from gemma_mlx.platform import reexec_with_fast_blas

    reexec_with_fast_blas()  # every runtime in this process then shares the same (fast, if installed) BLAS
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--depths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="prefill length from an empty cache (0 = skip)")
    ap.add_argument("--quick", action="store_true", help="depth 2K only, 128-token prompt: a smoke run")
    ap.add_argument("--peers", nargs="*", default=["mlx-lm", "mlx-vlm"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.quick:
        args.depths, args.prompt = [2048], 128
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = build(Path(tmp), args.layers)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        video = write_video(Path(tmp) / "clip.mp4")
        print(f"model ready: {path}", flush=True)
        results = {"gemma-mlx": run_ours(path, args.depths, args.chunk, args.prompt, video)}
        print("gemma-mlx", results["gemma-mlx"], flush=True)
        for peer in args.peers:
            try:
                results[peer] = run_peer(peer, path, args.depths, args.chunk, args.prompt)
            except Exception as e:  # a peer that cannot run this model is reported, not fatal
                results[peer] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(peer, results[peer], flush=True)
    bandwidth = copy_bandwidth_gbs()
    report = {"machine": f"{sys.platform} CPU, {__import__('os').cpu_count()} cores", "mlx": mx.__version__,
              "blas": "fast BLAS preloaded" if fast_blas_loaded() else "reference BLAS", "layers": args.layers,
              "weights_gb": round(weight_bytes / 1e9, 3), "copy_bandwidth_gbs": round(bandwidth, 1),
              "cache_fill": "synthetic (random K/V written into each runtime's caches)", "results": results}
    ours = results["gemma-mlx"]
    lines = [f"{report['machine']}, mlx {mx.__version__}, {report['blas']}; {args.layers}-layer 12B-wide model, "
             f"{report['weights_gb']} GB of 4-bit weights; caches filled synthetically to each depth.", "",
             "| measure | gemma-mlx | " + " | ".join(args.peers) + " | " + " | ".join(f"ours/{p}" for p in args.peers)
             + " |", "|---|---|" + "---|" * (2 * len(args.peers))]
    keys = ["load_s"] + ([f"prefill_tps_{args.prompt}_prompt"] if args.prompt else [])
    keys += [f"{m}@{d}" for m in ("decode_tps", "prefill_tps") for d in args.depths] + ["peak_memory_gb"]
    for key in keys:
        row = [key, f"{ours[key]:.3g}"]
        ratios = []
        for p in args.peers:
            v = results[p].get(key)
            row.append(f"{v:.3g}" if v is not None else "n/a")
            if v:
                better_high = key.startswith(("decode", "prefill"))
                ratios.append(f"{(ours[key] / v) if better_high else (v / ours[key]):.2f}×")
            else:
                ratios.append("n/a")
        lines.append("| " + " | ".join(row + ratios) + " |")
    for key in ("ttft_image_s", "ttft_audio_s", "ttft_video_s"):
        lines.append(f"| {key} | {ours[key]:.3g} |" + " n/a |" * (2 * len(args.peers)))
    per_token = report["weights_gb"]
    for d in args.depths:
        tps = ours[f"decode_tps@{d}"]
        lines.append(f"\nDecode at depth {d}: {tps:.2f} tok/s reads ≥ {per_token:.2f} GB of weights per token = "
                     f"{per_token * tps:.2f} GB/s, {100 * per_token * tps / bandwidth:.0f}% of this machine's "
                     f"{bandwidth:.1f} GB/s copy bandwidth.")
    lines.append("\nRatios: ours/peer for tokens/s (higher is better for us), peer/ours for seconds and memory.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    (out / "bench_runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            if "error" not in r:
                ax.plot(args.depths, [r[f"decode_tps@{d}"] for d in args.depths], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Decode speed vs depth (12B widths, 4-bit, CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_runtime.png", dpi=120)
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
