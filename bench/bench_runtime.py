"""Speed and memory of gemma-mlx next to mlx-lm, mlx-vlm and transformers, on the same weights, in one run.

Models: random-weight gemma4_unified checkpoints written by this script, with the real 12B attention shapes
(16 query heads, sliding layers 8 KV heads × 256, full layers 1 KV head × 512, window 1024, vocab 262144):

- ``wide2``: the real widths (hidden 3840, MLP 15360), one sliding + one full layer;
- ``narrow6``: six layers in the real 5:1 sliding:full pattern (one period of the 12B's 48 layers) with the real
  head shapes but hidden 1024 / MLP 4096, so attention (whose cost per layer is the 12B's) is a larger share of
  each step, and a deeper stack fits the time budget.

Each bf16 checkpoint is converted to uniform 4-bit, group 64, by every converter (gemma-mlx convert,
mlx_vlm.convert, mlx_lm.convert; each timed with its peak RSS in a fresh process), and each MLX runtime runs its
own converter's output in a fresh process (bench/runtime_workers.py); transformers runs the bf16 checkpoint in
float32 (torch, 2 threads) as the float reference. Measured:

- load time; prefill tokens/s of a prompt from an empty cache (also the logit check: each runtime's last-position
  logits against transformers' float logits, KL and max |Δ|);
- decode tokens/s and a 128-token prefill chunk at depths 2K, 8K, 32K. MLX's CPU backend is slow (the peers'
  4-bit matmuls prefill a few tokens/s at these widths), so every MLX runtime's caches are FILLED SYNTHETICALLY
  to the depth (random keys/values written straight into its cache objects) instead of prefilled; transformers
  prefills its (shallow) depths for real;
- peak memory per phase (load, text, media: MLX's allocator peak, plus process peak RSS);
- time to first token for an image, an audio clip and a video (gemma-mlx and mlx-vlm; mlx-lm has no media);
- decode's distance from the memory-bandwidth limit: bytes read per token over this machine's copy bandwidth.

    python bench/bench_runtime.py                 # default set, < 10 minutes on a 2-core CPU
    python bench/bench_runtime.py --quick         # smoke run
    python bench/bench_runtime.py --full          # 512-token prompts, peers' chunks at every depth, larger media

Writes bench_runtime.json, bench_runtime.md and (with matplotlib) bench_runtime.png under --out. Every runtime
runs under the same BLAS setting (reported). Peers come from the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
VARIANTS = {
    "wide2": dict(layers=2, hidden_size=3840, intermediate_size=15360),
    "narrow6": dict(layers=6, hidden_size=1024, intermediate_size=4096),
}
MLX_RUNTIMES = ("gemma-mlx", "mlx-lm", "mlx-vlm")
COLORS = {"gemma-mlx": "tab:blue", "mlx-lm": "tab:orange", "mlx-vlm": "tab:green", "transformers": "tab:red"}
CONVERTER_OF = {"gemma-mlx": "gemma-mlx convert", "mlx-vlm": "mlx_vlm.convert", "mlx-lm": "mlx_lm.convert"}


# ------------------------------------------------------------------------------------------------ inputs


def write_media(work: Path, size: str) -> dict:
    """An image, an audio clip and a video, as files every runtime reads. small: 240×240, 1 s, 2 frames of
    144×144; large: 768×768, 5 s, 8 frames of 256×256. (Both processors scale images up to the 280-token budget,
    so an image is ~280 soft tokens either way; video frames get their own smaller budget.)"""
    import wave

    import av
    from PIL import Image

    side, seconds, frames, vside = (240, 1, 2, 144) if size == "small" else (768, 5, 8, 256)
    rng = np.random.default_rng(0)
    files = {"image": work / "image.png", "audio": work / "audio.wav", "video": work / "video.mp4"}
    Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(files["image"])
    with wave.open(str(files["audio"]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((rng.uniform(-0.3, 0.3, 16000 * seconds) * 32767).astype(np.int16).tobytes())
    with av.open(str(files["video"]), "w") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width = stream.height = vside
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray((rng.random((vside, vside, 3)) * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return {k: str(v) for k, v in files.items()}


def add_media_tokens(src: Path):
    """The media token names the real release's tokenizer_config carries (mlx-vlm's processor reads them)."""
    p = src / "tokenizer_config.json"
    c = json.loads(p.read_text())
    c["extra_special_tokens"] = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
                                 "video_token": "<|video|>"}
    p.write_text(json.dumps(c, indent=2))


def convert_all(src: Path, work: Path, converters) -> dict:
    """Each converter on the same bf16 checkpoint (uniform 4-bit, group 64), timed with its peak RSS."""
    from bench_convert import run
    from runtime_workers import mlx_lm_view

    exe = str(Path(sys.executable).parent / "gemma-mlx")
    q = ["-q", "--q-bits", "4", "--q-group-size", "64"]
    cmds = {
        "gemma-mlx convert": [exe, "convert", str(src), "-o", str(work / "q4_ours"), "-q", "4", "--group-size", "64",
                              "--recipe", "uniform", "--quiet"],
        "mlx_vlm.convert": [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src), "--mlx-path",
                            str(work / "q4_vlm"), *q],
        "mlx_lm.convert": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                           str(work / "q4_lm"), *q],
    }
    out = {}
    for name in converters:
        r = run(name, cmds[name])
        if name == "mlx_lm.convert" and "error" in r:
            # Its known config bug (E2B defaults for fields the checkpoint leaves out): report the failure, then
            # convert the same weights through a view whose config spells those fields out.
            out["mlx_lm.convert (as is)"] = r
            r = run(name, [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(mlx_lm_view(src)),
                           "--mlx-path", str(work / "q4_lm"), *q])
            r["note"] = "with the config workaround (hidden_size_per_layer_input/num_kv_shared_layers spelled out)"
        dest = {"gemma-mlx convert": "q4_ours", "mlx_vlm.convert": "q4_vlm", "mlx_lm.convert": "q4_lm"}[name]
        if (work / dest).is_dir():
            r["output_gb"] = round(sum(f.stat().st_size for f in (work / dest).glob("*.safetensors")) / 1e9, 3)
            r["path"] = str(work / dest)
        print(f"  {name}: {r}", flush=True)
        out[name] = r
    return out


def run_worker(spec: dict, work: Path, timeout: float) -> dict:
    tag = f"{spec['runtime']}"
    sp, rp = work / f"spec_{tag}.json", work / f"result_{tag}.json"
    sp.write_text(json.dumps(spec))
    rp.unlink(missing_ok=True)
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(HERE / "runtime_workers.py"), str(sp), str(rp)], timeout=timeout,
                           stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0 or not rp.exists():
        tail = [l for l in p.stderr.strip().splitlines() if l.strip()][-1:] or [""]
        return {"error": f"exit {p.returncode}: {tail[0][:240]}"}
    res = json.loads(rp.read_text())
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


def logit_check(ref: np.ndarray, x: np.ndarray) -> dict:
    ref, x = ref.astype(np.float64), x.astype(np.float64)
    lp = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
    lq = x - x.max() - np.log(np.exp(x - x.max()).sum())
    return {"kl": float((np.exp(lp) * (lp - lq)).sum()), "max_abs": float(np.abs(ref - x).max()),
            "top1_same": bool(ref.argmax() == x.argmax()), "ref_std": float(ref.std())}


def copy_bandwidth_gbs() -> float:
    import mlx.core as mx

    a = mx.random.normal((64 * 1024 * 1024,))  # 256 MB
    mx.eval(a)
    mx.eval(a + 1.0)
    t = time.perf_counter()
    for _ in range(3):
        mx.eval(a + 1.0)
    return 2 * a.nbytes * 3 / (time.perf_counter() - t) / 1e9  # read + write


# ------------------------------------------------------------------------------------------------ report


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}g}"


def ratio(ours, peer, higher_better: bool):
    if not ours or not peer:
        return "n/a"
    return f"{(ours / peer) if higher_better else (peer / ours):.2f}×"


def table(variant: str, v: dict, args) -> list[str]:
    res, peers = v["runtimes"], [p for p in ("mlx-lm", "mlx-vlm", "transformers") if p in v["runtimes"]]
    ours = res["gemma-mlx"]
    mlx_peers = [p for p in peers if p != "transformers"]
    head = ["measure", "gemma-mlx", *peers, *[f"ours/{p}" for p in peers]]
    lines = [f"**{variant}** ({v['describe']}; 4-bit weights {v['weights_gb']} GB ours)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def val(p, key):
        r = res.get(p, {})
        x = r.get(key)
        return x["s"] if isinstance(x, dict) and "s" in x else x if isinstance(x, (int, float)) else None

    def row(label, key, higher, only=None, digits=3):
        cells = [label, fmt(val("gemma-mlx", key), digits)]
        cols = only if only is not None else peers
        for p in peers:
            x = val(p, key) if p in cols else None
            if x is None and "error" in res.get(p, {}):
                cells.append("failed")
            elif x is None and isinstance(res.get(p, {}).get(key), dict):
                cells.append("n/a")
            else:
                cells.append(fmt(x, digits))
        cells += [ratio(val("gemma-mlx", key), val(p, key) if p in cols else None, higher) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")

    conv = v["convert"]
    for p in ["gemma-mlx", *mlx_peers]:
        res.setdefault(p, {})["convert_s"] = conv.get(CONVERTER_OF[p], {}).get("seconds")
        res[p]["convert_anon_gb"] = conv.get(CONVERTER_OF[p], {}).get("peak_anon_gb")
    row("convert time (s)", "convert_s", False, only=mlx_peers)
    row("convert peak anon. RSS (GB)", "convert_anon_gb", False, only=mlx_peers)
    row("load (s)", "load_s", False)
    row(f"prefill {v['prompt_len']}-token prompt (tok/s)", "prefill_prompt_tps", True)
    for d in v["depths"]:
        row(f"decode @{d // 1024}K (tok/s)", f"decode_tps@{d}", True, only=mlx_peers)
    for d in v["hf_depths"]:
        row(f"transformers: prefill {d} tokens, real (tok/s)", f"prefill_{d}_tps", True, only=["transformers"])
        row(f"transformers: decode @{d}, real prefill (tok/s)", f"decode_tps@{d}", True, only=["transformers"])
    for d in v["depths"]:
        row(f"prefill {v['chunk']}-token chunk @{d // 1024}K (tok/s)", f"prefill_tps@{d}", True, only=mlx_peers)
    for p in ["gemma-mlx", *mlx_peers]:
        pk = res.get(p, {}).get("peak_gb", {})
        res[p]["peak_text"] = max(pk.get("load", 0), pk.get("text", 0)) or None
        res[p]["peak_media"] = pk.get("media")
    row("peak MLX memory, text phases (GB)", "peak_text", False, only=mlx_peers)
    if any(res[p].get("peak_media") for p in res if p in MLX_RUNTIMES):
        row("peak MLX memory, media phases (GB)", "peak_media", False, only=mlx_peers)
    row("peak RSS, text phases (GB)", "peak_rss_text_gb", False, only=mlx_peers)
    row("peak RSS, whole run (GB)", "peak_rss_gb", False)
    for m in ("image", "audio", "video"):
        if f"ttft_{m}" in ours:
            tokens = ours[f"ttft_{m}"].get("prompt_tokens")
            row(f"TTFT {m} ({tokens} prompt tokens ours) (s)", f"ttft_{m}", False, only=mlx_peers)
    lines.append("")
    if "logits" in v:
        checks = ", ".join(f"{p}: KL {c['kl']:.2g}, max |Δ| {c['max_abs']:.2g}{'' if c['top1_same'] else ' (top-1 differs)'}"
                           if "kl" in c else f"{p}: {c['error']}" for p, c in v["logits"].items())
        lines.append(f"Logit check against transformers float32 on the {v['prompt_len']}-token prompt (logit std "
                     f"{next(iter(c['ref_std'] for c in v['logits'].values() if 'ref_std' in c), 0):.2g}): "
                     f"{checks}.")
    for p, r in res.items():
        for m in ("image", "audio", "video"):
            x = r.get(f"ttft_{m}")
            if isinstance(x, dict) and "na" in x and p != "mlx-lm":
                lines.append(f"{p} {m}: n/a ({x['na']}).")
        if "error" in r:
            lines.append(f"{p}: failed ({r['error']}).")
    for name, c in v["convert"].items():
        if "error" in c:
            lines.append(f"{name}: failed ({c['error'][:200].strip()}).")
        elif "note" in c:
            lines.append(f"{name}: {c['note']}.")
    bw = v["bandwidth"]
    for d in v["depths"]:
        tps = val("gemma-mlx", f"decode_tps@{d}")
        if tps:
            b = v["bytes_per_token_gb"][str(d)]
            lines.append(f"Decode @{d // 1024}K: {tps:.2f} tok/s × {b:.2f} GB read per token (weights + KV cache) = "
                         f"{b * tps:.2f} GB/s, {100 * b * tps / bw:.0f}% of the {bw:.1f} GB/s copy bandwidth.")
    return lines


def chart(report: dict, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
        return
    variants = list(report["variants"])
    fig, axes = plt.subplots(2, len(variants), figsize=(5.5 * len(variants), 7.5), squeeze=False)
    for j, name in enumerate(variants):
        v = report["variants"][name]
        for i, (key, label) in enumerate((("decode_tps", "decode tokens/s"), ("prefill_tps", "prefill tokens/s"))):
            ax = axes[i][j]
            for rt, r in v["runtimes"].items():
                pts = [(d, r[f"{key}@{d}"]) for d in v["depths"] + v.get("hf_depths", []) if f"{key}@{d}" in r]
                if rt == "transformers" and key == "prefill_tps":
                    pts = [(d, r[f"prefill_{d}_tps"]) for d in v.get("hf_depths", []) if f"prefill_{d}_tps" in r]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", color=COLORS.get(rt), label=rt + (" (real prefill, float32)"
                                                                     if rt == "transformers" else ""))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context depth (tokens)")
            ax.set_ylabel(label + ("" if key == "decode_tps" else f" ({v['chunk']}-token chunk)"))
            ax.set_title(f"{name}: {label} vs depth", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(f"4-bit g64, {report['machine']}, caches filled synthetically", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bench_runtime.png", dpi=110)


# ------------------------------------------------------------------------------------------------ main


def main():
    from gemma_mlx.platform import fast_blas_loaded, reexec_with_fast_blas

    reexec_with_fast_blas()  # every runtime (worker processes inherit LD_PRELOAD) shares the same BLAS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    ap.add_argument("--depths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=None,
                    help="prompt length from an empty cache, also the logit check (default: per variant)")
    ap.add_argument("--peer-chunk-depths", type=int, nargs="*", default=None,
                    help="depths at which the peers' (slow) chunk prefill is timed (default: per variant)")
    ap.add_argument("--hf-depths", type=int, nargs="*", default=None, help="transformers' real-prefill depths")
    ap.add_argument("--media", choices=["small", "large", "none"], default=None)
    ap.add_argument("--media-variants", nargs="*", default=None, help="variants whose media TTFT is timed")
    ap.add_argument("--peers", nargs="*", default=["mlx-lm", "mlx-vlm", "transformers"])
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="narrow6 only, depth 2K, short prompt: a smoke run")
    ap.add_argument("--full", action="store_true", help="512-token prompts, peers' chunks at every depth, "
                    "5 s audio / 8-frame video, media on both variants (about an hour on 2 cores)")
    ap.add_argument("--memory-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="also run ours with GEMMA_MLX_DENSE_PREFILL=0 to attribute its text peak")
    ap.add_argument("--work", default=".", help="where the temporary checkpoints go")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    # Per-variant plans. The peers' 4-bit prefill runs MLX's quantized matmul (~3 GFLOP/s here), so in the
    # default set their long prefills are spent where they say most: on narrow6 (attention-heavy).
    if args.quick:
        plan = {"narrow6": dict(prompt=16, chunk=16, peer_chunk_depths=[2048], media=True)}
        args.depths, args.hf_depths, args.media, args.memory_probe = [2048], [512], "small", False
    elif args.full:
        plan = {v: dict(prompt=512, chunk=args.chunk, peer_chunk_depths=args.depths, media=True) for v in VARIANTS}
        args.hf_depths = [512, 2048] if args.hf_depths is None else args.hf_depths
        args.media = args.media or "large"
    else:
        plan = {"wide2": dict(prompt=64, chunk=args.chunk, peer_chunk_depths=[], media=False),
                "narrow6": dict(prompt=128, chunk=args.chunk, peer_chunk_depths=[32768], media=True)}
    args.hf_depths = [512] if args.hf_depths is None else args.hf_depths
    args.media = args.media or "small"
    for name, p in plan.items():
        if args.prompt is not None:
            p["prompt"] = args.prompt
        if args.peer_chunk_depths is not None:
            p["peer_chunk_depths"] = args.peer_chunk_depths
        if args.media_variants is not None:
            p["media"] = name in args.media_variants
    if args.variants:
        plan = {v: plan.get(v, dict(prompt=args.prompt or 128, chunk=args.chunk, peer_chunk_depths=[args.depths[0]],
                                    media=True)) for v in args.variants}
    args.plan = plan
    sys.path.insert(0, str(HERE))
    from bench_convert import synthetic_checkpoint

    import mlx.core as mx

    started = time.perf_counter()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    report = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu or 'CPU'}), "
                         f"{mem:.0f} GiB RAM, no GPU" if not mx.metal.is_available() else
                         f"{platform.system()} {platform.machine()} with Metal", "mlx": mx.__version__,
              "blas": "OpenBLAS preloaded for every runtime" if fast_blas_loaded() else "reference BLAS",
              "command": " ".join(["python", "bench/bench_runtime.py", *sys.argv[1:]]), "chunk": args.chunk,
              "plan": plan,
              "cache_fill": "synthetic: random K/V written into each MLX runtime's caches to reach a depth; "
                            "transformers prefills its depths for real", "variants": {}}
    for name in ("mlx_lm", "mlx_vlm", "transformers", "torch"):
        try:
            report[name] = __import__(name).__version__
        except Exception:
            report[name] = None
    report["bandwidth_gbs"] = bandwidth = round(copy_bandwidth_gbs(), 2)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        media_files = write_media(tmp, args.media) if args.media != "none" else {}
        for vname, vplan in plan.items():
            vcfg = VARIANTS[vname]
            work = tmp / vname
            work.mkdir()
            t = time.perf_counter()
            src = synthetic_checkpoint(work / "bf16", vcfg["layers"], vcfg["hidden_size"], vcfg["intermediate_size"],
                                       snap_bits=4)
            add_media_tokens(src)
            print(f"[{vname}] bf16 checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
            converters = ["gemma-mlx convert"] + [CONVERTER_OF[p] for p in args.peers if p in CONVERTER_OF]
            conv = convert_all(src, work, converters)
            cfg = json.loads((src / "config.json").read_text())["text_config"]
            prompt_ids = rng.integers(10, 250, vplan["prompt"]).tolist()
            v = {"describe": f"{vcfg['layers']} layers ({cfg['layer_types'].count('sliding_attention')} sliding + "
                             f"{cfg['layer_types'].count('full_attention')} full), hidden {vcfg['hidden_size']}, "
                             f"MLP {vcfg['intermediate_size']}",
                 "config": vcfg, "convert": conv, "depths": args.depths, "hf_depths": [], "prompt_len": vplan["prompt"],
                 "chunk": vplan["chunk"], "peer_chunk_depths": vplan["peer_chunk_depths"],
                 "weights_gb": conv["gemma-mlx convert"].get("output_gb"), "runtimes": {}, "bandwidth": bandwidth}
            media = media_files if vplan["media"] else {}
            for rt in ["gemma-mlx"] + args.peers:
                spec = {"runtime": rt, "prompt_ids": prompt_ids, "decode_steps": args.decode_steps,
                        "logits_out": str(work / f"logits_{rt}.npy")}
                if rt == "transformers":
                    spec.update(model=str(src), depths=args.hf_depths)
                    v["hf_depths"] = args.hf_depths
                else:
                    c = conv.get(CONVERTER_OF[rt], {})
                    if "path" not in c:
                        v["runtimes"][rt] = {"error": f"no model: {CONVERTER_OF[rt]} failed"}
                        continue
                    spec.update(model=c["path"], depths=args.depths, chunk=vplan["chunk"],
                                chunk_depths=args.depths if rt == "gemma-mlx" else vplan["peer_chunk_depths"],
                                media={} if rt == "mlx-lm" else media)
                print(f"[{vname}] {rt} ...", flush=True)
                v["runtimes"][rt] = r = run_worker(spec, work, timeout=1800)
                print(f"[{vname}] {rt}: {json.dumps(r)[:600]}", flush=True)
            if args.memory_probe:
                # 16 prompt rows: the dense path's threshold (gemma_mlx.model.linear.DENSE_MIN_ROWS).
                spec = {"runtime": "gemma-mlx", "prompt_ids": prompt_ids[:16], "decode_steps": 1, "depths": [],
                        "chunk_depths": [], "chunk": 0, "media": {}, "model": conv["gemma-mlx convert"]["path"],
                        "logits_out": str(work / "logits_probe.npy")}
                probe = {}
                for setting in ("1", "0"):
                    os.environ["GEMMA_MLX_DENSE_PREFILL"] = setting
                    r = run_worker(spec, work, timeout=900)
                    probe["dense" if setting == "1" else "quantized"] = {
                        "prefill_tps": r.get("prefill_prompt_tps"), "peak_text_gb": r.get("peak_gb", {}).get("text"),
                        "peak_load_gb": r.get("peak_gb", {}).get("load"), "error": r.get("error")}
                os.environ.pop("GEMMA_MLX_DENSE_PREFILL")
                v["memory_probe"] = {"prompt_len": len(spec["prompt_ids"]), **probe}
                print(f"[{vname}] memory probe: {v['memory_probe']}", flush=True)
            ref = work / "logits_transformers.npy"
            if ref.exists():
                v["logits"] = {rt: (logit_check(np.load(ref), np.load(work / f"logits_{rt}.npy"))
                                    if (work / f"logits_{rt}.npy").exists() else {"error": "no logits"})
                               for rt in ["gemma-mlx", *[p for p in args.peers if p in MLX_RUNTIMES]]}
            # Bytes a decode step must read: every weight once plus the K/V it attends to (float32 caches).
            kv = {}
            for d in args.depths:
                b = 0
                for t in cfg["layer_types"]:
                    heads, dim = ((cfg["num_global_key_value_heads"], cfg["global_head_dim"]) if t == "full_attention"
                                  else (cfg["num_key_value_heads"], cfg["head_dim"]))
                    b += 2 * heads * dim * 4 * (d if t == "full_attention" else min(d, cfg["sliding_window"]))
                kv[str(d)] = (v["weights_gb"] or 0) + b / 1e9
            v["bytes_per_token_gb"] = kv
            report["variants"][vname] = v
            import shutil

            shutil.rmtree(work)  # the next variant's checkpoints need the disk
    report["wall_s"] = round(time.perf_counter() - started, 1)
    lines = [f"{report['machine']}; mlx {report['mlx']}, mlx-lm {report['mlx_lm']}, mlx-vlm {report['mlx_vlm']}, "
             f"transformers {report['transformers']} (torch {report['torch']}, float32, 2 threads); "
             f"{report['blas']}; copy bandwidth {bandwidth} GB/s. `{report['command']}` took "
             f"{report['wall_s'] / 60:.1f} min.", "",
             "Random-weight gemma4_unified with the real 12B head shapes (16 query heads, sliding 8 KV × 256, full 1 "
             "KV × 512, window 1024, vocab 262144); each MLX runtime runs its own converter's uniform 4-bit g64 "
             "output; transformers runs the bf16 checkpoint in float32. MLX caches are filled synthetically (random "
             "K/V written into each runtime's cache objects) to reach each depth; transformers' depths are real "
             "prefills. Ratios are ours/peer for tokens/s and peer/ours for seconds and memory: above 1× favours "
             "gemma-mlx.", ""]
    for vname, v in report["variants"].items():
        lines += table(vname, v, args)
        if "memory_probe" in v:
            mp = v["memory_probe"]
            lines.append(f"Memory probe ({mp['prompt_len']}-token prompt, ours): peak "
                         f"{fmt(mp['dense']['peak_text_gb'])} GB with the dequantize + float32 GEMM prefill path at "
                         f"{fmt(mp['dense']['prefill_tps'])} tok/s, {fmt(mp['quantized']['peak_text_gb'])} GB with "
                         f"GEMMA_MLX_DENSE_PREFILL=0 at {fmt(mp['quantized']['prefill_tps'])} tok/s.")
        lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    (out / "bench_runtime.md").write_text("\n".join(lines) + "\n")
    chart(report, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
