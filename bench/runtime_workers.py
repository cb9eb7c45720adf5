"""One runtime's measurements in a fresh process (bench_runtime.py runs each of these as a subprocess).

    python bench/runtime_workers.py SPEC.json RESULT.json

SPEC names the runtime (gemma-mlx, mlx-lm, mlx-vlm, transformers), its model directory and what to measure;
the worker writes a dict of results (and the prompt's last-position logits, for the logit check) and exits.
A fresh process per runtime keeps every peak-memory number its own. Each peak is MLX's allocator peak
(mx.get_peak_memory, reset before each phase) for the MLX runtimes and the process's peak RSS for all.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def rss_gb() -> float:
    """This process's peak RSS (VmHWM: per address space, so not inherited from the parent across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def mlx_lm_view(path: Path) -> Path:
    """mlx-lm fills fields the checkpoint leaves out with Gemma 4 E2B values (per-layer embeddings, KV sharing):
    its known config bug. A view of the same files whose config spells them out (symlinks + a new config)."""
    view = path.parent / (path.name + "_mlx_lm_view")
    view.mkdir(exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False)
    (view / "config.json").write_text(json.dumps(cfg))
    return view


def layer_shapes(path: Path):
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    return [((cfg["num_global_key_value_heads"], cfg["global_head_dim"]) if t == "full_attention"
             else (cfg["num_key_value_heads"], cfg["head_dim"])) for t in cfg["layer_types"]]


# ---------------------------------------------------------------------------------------------------- MLX


class MLXRuntime:
    """The calls each MLX runtime's own generate loop makes, behind one interface."""

    def __init__(self, kind: str, path: Path):
        import mlx.core as mx

        self.kind, self.path, self.mx = kind, path, mx
        if kind == "gemma-mlx":
            from gemma_mlx import load

            self.g = load(path)  # float32 compute on a CPU by default
            self.model = self.g.model
        elif kind == "mlx-lm":
            from mlx_lm import load

            self.model, self.tokenizer = load(str(mlx_lm_view(path)))
            self.model.set_dtype(mx.float32)  # float32 activations, as ours on a CPU (half is ~8x slower here)
            self.lm = self.model
        else:
            from mlx_vlm.utils import load_model

            self.model = load_model(path)
            self.model.set_dtype(mx.float32)
            self.lm = self.model.language_model
        self.shapes = layer_shapes(path)

    def make_cache(self):
        if self.kind == "gemma-mlx":
            from gemma_mlx.cache import make_cache

            return make_cache(self.model.config.text)
        return self.lm.make_cache()

    def prefill(self, ids: np.ndarray, caches):
        """Last-position logits after feeding ids, the way each runtime's generate does it: ours asks for one
        row of logits; mlx-lm / mlx-vlm evaluate only the caches for all but the last token (their lazy
        logits are never computed), then run the last token."""
        mx = self.mx
        x = mx.array(ids[None].astype(np.int32))
        if self.kind == "gemma-mlx":
            logits = self.model(x, cache=caches, logits_to_keep=1)
        else:
            if x.shape[1] > 1:
                self.lm(x[:, :-1], cache=caches)
                mx.eval([c.state for c in caches])
            out = self.lm(x[:, -1:], cache=caches)
            logits = out.logits if hasattr(out, "logits") else out
        logits = logits[0, -1]
        mx.eval(logits)
        return logits

    def fill(self, depth: int):
        """Caches holding depth positions of random keys/values, written straight into the cache objects."""
        mx = self.mx
        caches = self.make_cache()
        if self.kind == "gemma-mlx":
            from gemma_mlx.cache import FullCache, RingCache

            for spec, c in zip(self.model.config.text.layers, caches):
                if isinstance(c, FullCache):
                    c.step = max(c.step, depth + 1024)
                    k = mx.random.normal((1, spec.num_kv_heads, depth, spec.head_dim))
                    c.update(k, k)
                elif isinstance(c, RingCache):
                    n = min(depth, c.size)
                    k = mx.random.normal((1, spec.num_kv_heads, n, spec.head_dim))
                    c.keys = mx.zeros((1, spec.num_kv_heads, c.size, spec.head_dim))
                    c.values = mx.zeros_like(c.keys)
                    c._write(k, k, depth - n)  # the newest n positions, in their ring slots
                    c.offset = depth
            mx.eval([c.state for c in caches if c is not None])
            return caches
        for c, (heads, dim) in zip(caches, self.shapes):
            n = min(depth, getattr(c, "max_size", depth) or depth)
            k = mx.random.normal((1, heads, n, dim))
            c.update_and_fetch(k, k)
            c.offset = depth
            if hasattr(c, "_idx"):
                c._idx = c.keys.shape[2]
        mx.eval([c.state for c in caches])
        return caches

    def media_ttft(self, name: str, file: str) -> dict:
        """Seconds from the call to the first generated token, with the runtime's own media prompt path."""
        if self.kind == "gemma-mlx":
            t = time.perf_counter()
            r = self.g.generate("Describe it.", max_tokens=1, greedy=True, **{name + "s": [file]})
            return {"s": time.perf_counter() - t, "prompt_tokens": getattr(r.stats, "prompt_tokens", None)}
        if self.kind == "mlx-lm":
            return {"na": "mlx-lm runs text only"}
        from mlx_vlm.generate.dispatch import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import load_processor

        if not hasattr(self, "processor"):
            self.processor = load_processor(self.path, add_detokenizer=True)
        extra = {"num_images": 1} if name == "image" else {"num_audios": 1} if name == "audio" else {"video": file}
        prompt = apply_chat_template(self.processor, self.model.config, "Describe it.", **extra)
        media = {"image": [file]} if name == "image" else {"audio": [file]} if name == "audio" else {"video": [file]}
        t = time.perf_counter()
        for r in stream_generate(self.model, self.processor, prompt, max_tokens=1, temperature=0.0, **media):
            break
        return {"s": time.perf_counter() - t, "prompt_tokens": getattr(r, "prompt_tokens", None)}


def timed(fn, repeat: int) -> float:
    fn()  # warm up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def work_mlx(spec: dict) -> dict:
    import mlx.core as mx

    res, peaks = {}, {}

    def phase(name):
        peaks[name] = max(peaks.get(name, 0.0), mx.get_peak_memory() / 1e9)
        mx.reset_peak_memory()

    mx.reset_peak_memory()
    t = time.perf_counter()
    rt = MLXRuntime(spec["runtime"], Path(spec["model"]))
    res["load_s"] = time.perf_counter() - t
    phase("load")
    tok = np.array([7])
    for d in spec["depths"]:
        caches = rt.fill(d)
        res[f"decode_tps@{d}"] = 1 / timed(lambda: rt.prefill(tok, caches), spec["decode_steps"])
        print(f"    {spec['runtime']} decode at {d}: {res[f'decode_tps@{d}']:.3f} tok/s", flush=True)
        del caches
        if d in spec["chunk_depths"]:
            caches = rt.fill(d)
            ids = np.full(spec["chunk"], 9)
            t = time.perf_counter()
            rt.prefill(ids, caches)
            res[f"prefill_tps@{d}"] = spec["chunk"] / (time.perf_counter() - t)
            print(f"    {spec['runtime']} {spec['chunk']}-token chunk at {d}: {res[f'prefill_tps@{d}']:.3f} tok/s",
                  flush=True)
            del caches
        gc.collect()
        phase("text")
    # The prompt from an empty cache after the depth phases, so every runtime's first-call costs are paid.
    prompt = np.array(spec["prompt_ids"])
    if len(prompt):
        caches = rt.make_cache()
        t = time.perf_counter()
        logits = rt.prefill(prompt, caches)
        res["prefill_prompt_tps"] = len(prompt) / (time.perf_counter() - t)
        np.save(spec["logits_out"], np.array(logits.astype(mx.float32)))
        del caches, logits
        phase("text")
    res["peak_rss_text_gb"] = rss_gb()
    for name, file in spec.get("media", {}).items():
        try:
            r = rt.media_ttft(name, file)
        except Exception as e:  # a peer's media path that fails on this model is reported, not fatal
            r = {"na": f"{type(e).__name__}: {str(e)[:160]}"}
        res[f"ttft_{name}"] = r
        print(f"    {spec['runtime']} {name}: {r}", flush=True)
        phase("media")
    res["peak_gb"] = peaks
    res["peak_rss_gb"] = rss_gb()
    return res


# ------------------------------------------------------------------------------------------- transformers


def work_transformers(spec: dict) -> dict:
    import torch
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.set_num_threads(spec.get("threads", 2))
    res = {}
    t = time.perf_counter()
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32).eval()
    res["load_s"] = time.perf_counter() - t
    with torch.inference_mode():
        prompt = torch.tensor([spec["prompt_ids"]])
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        res["prefill_prompt_tps"] = prompt.shape[1] / (time.perf_counter() - t)
        np.save(spec["logits_out"], out.logits[0, -1].float().numpy())
        # Real (not synthetic) depths: transformers prefills a few thousand tokens in seconds on this CPU.
        for d in spec["depths"]:
            ids = torch.full((1, d), 9)
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            res[f"prefill_{d}_tps"] = d / (time.perf_counter() - t)
            cache = out.past_key_values
            tok = torch.tensor([[7]])

            def step():
                model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)

            res[f"decode_tps@{d}"] = 1 / timed(step, spec["decode_steps"])  # depth grows by a few tokens
            print(f"    transformers decode at {d}: {res[f'decode_tps@{d}']:.3f} tok/s", flush=True)
            del out, cache
            gc.collect()
    res["peak_rss_gb"] = rss_gb()
    return res


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["runtime"] == "transformers":
        res = work_transformers(spec)
    else:
        res = work_mlx(spec)
    Path(sys.argv[2]).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
