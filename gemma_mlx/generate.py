"""Generation: chunked prefill (reusing a cached prefix), then a pipelined decode loop with stop conditions.

The loop keeps the device busy as mlx-lm does: step n+1 is queued with ``mx.async_eval`` before token n is
handed to the caller. Sampling and penalties reuse ``mlx_lm.sample_utils``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache import make_cache, max_trim, restore_caches, snapshot_caches, trim_caches
from .errors import ContextLengthError
from .prefill import DEFAULT_PREFILL_CHUNK, prefill


@dataclass
class SamplingOptions:
    """How to pick tokens and when to stop. Defaults come from the checkpoint's generation_config.json."""

    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] = (1,)
    suppress_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, model_dir: str | Path, config=None) -> SamplingOptions:
        """Defaults from generation_config.json (falling back to the model config's EOS ids)."""
        opts = cls(eos_ids=tuple(config.eos_token_ids) if config is not None and config.eos_token_ids else (1,))
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return opts
        g = json.loads(path.read_text())
        eos = g.get("eos_token_id", list(opts.eos_ids))
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        return replace(
            opts,
            temperature=float(g.get("temperature", opts.temperature)) if g.get("do_sample", True) else 0.0,
            top_k=int(g.get("top_k", opts.top_k) or 0), top_p=float(g.get("top_p", opts.top_p) or 0.0),
            min_p=float(g.get("min_p", 0.0) or 0.0), eos_ids=tuple(dict.fromkeys(eos + opts.eos_ids)),
            suppress_ids=tuple(g.get("suppress_tokens") or ()),
            repetition_penalty=g.get("repetition_penalty") if g.get("repetition_penalty") != 1.0 else None,
        )

    def greedy(self) -> SamplingOptions:
        return replace(self, temperature=0.0)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0

    @property
    def prompt_tps(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def summary(self) -> str:
        reused = f", {self.reused_tokens} reused" if self.reused_tokens else ""
        memory = (f"{self.peak_memory_gb:.2f} GB" if self.peak_memory_gb >= 1
                  else f"{self.peak_memory_gb * 1000:.0f} MB")
        return (f"prompt {self.prompt_tokens} tokens{reused} at {self.prompt_tps:.1f} tok/s · generated "
                f"{self.generated_tokens} tokens at {self.generation_tps:.1f} tok/s · peak memory {memory}")


@dataclass
class PromptCache:
    """KV caches plus the keys of the tokens they hold, so a later prompt can reuse the common prefix.

    A token's key is its id, or for media soft tokens (id, fingerprint of the media item): the same
    placeholder id with a different image must not count as a match.
    """

    caches: list
    keys: list = field(default_factory=list)
    # (position, snapshot) taken where the next prompt will diverge from what is cached: chat templates
    # re-render a model turn without the generation prompt it was produced after. Restoring it lets a new turn
    # reuse everything before that point even when rolling back further than the sliding ring allows.
    checkpoint: tuple[int, list] | None = None

    def rewind(self, keys: list) -> int:
        """Roll the caches back to the longest reusable prefix of keys; return its length."""
        n = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            n += 1
        n = min(n, len(keys) - 1)  # the last prompt token must run to produce logits
        if self.keys and len(self.keys) - n <= max_trim(self.caches):
            trim_caches(self.caches, len(self.keys) - n)
        elif self.checkpoint is not None and self.checkpoint[0] <= n:
            n = self.checkpoint[0]
            restore_caches(self.caches, self.checkpoint[1])
        else:
            n = 0
            for c in self.caches:
                if c is not None:
                    c.reset()
        self.keys = self.keys[:n]
        if self.checkpoint is not None and self.checkpoint[0] > n:
            self.checkpoint = None
        return n


def peak_memory_gb() -> float:
    """Peak memory of this generation: MLX's allocator peak, or on the CPU backend the process's peak RSS."""
    peak = mx.get_peak_memory()
    if peak == 0:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak / 1e9


def sample_step(logits: mx.array, history: list[int], opts: SamplingOptions, sampler, processors) -> mx.array:
    """The next token (1,) from last-position logits (1, vocab)."""
    if processors:
        context = mx.array(history[-64:] if history else [0])
        for p in processors:
            logits = p(context, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs)


def stream_tokens(model, input_ids: np.ndarray, *, opts: SamplingOptions, cache: PromptCache | None = None,
                  media: dict | None = None, token_types: np.ndarray | None = None, token_keys: list | None = None,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_context: int | None = None,
                  stats: GenerationStats | None = None, checkpoint_at: int | None = None) -> Iterator[int]:
    """Yield generated token ids (the EOS that ends generation included) for a prompt of token ids.

    With a PromptCache, the longest cached prefix is reused; checkpoint_at marks where the next prompt is
    expected to diverge (the start of the generation prompt), so a snapshot is kept there.
    """
    ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
    limit = max_context or model.config.text.max_position_embeddings
    if len(ids) + opts.max_tokens > limit:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens and up to {opts.max_tokens} more were asked "
                                 f"for, but the context allowed is {limit} tokens; shorten the prompt, lower "
                                 f"max_tokens or allow a longer context")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    keys = token_keys if token_keys is not None else ids.tolist()
    types = token_types if token_types is not None else model.token_types(ids)
    if cache is None:
        cache = PromptCache(make_cache(model.config.text))
    reuse = cache.rewind(keys)
    stats.reused_tokens = reuse

    if opts.seed is not None:
        mx.random.seed(opts.seed)
    sampler = make_sampler(opts.temperature, opts.top_p, opts.min_p, 1, opts.top_k)
    bias = {int(t): -float("inf") for t in opts.suppress_ids}
    processors = make_logits_processors(bias or None, opts.repetition_penalty, 64, opts.presence_penalty, 64)
    mx.reset_peak_memory()

    start = time.perf_counter()
    embeddings = model.embed_inputs(ids[None], **(media or {}))
    if checkpoint_at is not None and reuse < checkpoint_at < len(ids):
        prefill(model, embeddings[:, reuse:checkpoint_at], types[None, reuse:checkpoint_at], cache.caches,
                prefill_chunk)
        cache.checkpoint = (checkpoint_at, snapshot_caches(cache.caches))
        reuse = checkpoint_at
    hidden = prefill(model, embeddings[:, reuse:], types[None, reuse:], cache.caches, prefill_chunk)
    cache.keys = list(keys)
    history = ids.tolist()
    token = sample_step(model.logits(hidden)[:, -1, :], history, opts, sampler, processors)
    mx.eval(token)
    stats.prompt_seconds = time.perf_counter() - start

    start = time.perf_counter()
    eos = set(opts.eos_ids)
    try:
        for n in range(opts.max_tokens):
            current = int(token.item())
            history.append(current)
            done = current in eos or n + 1 == opts.max_tokens
            if not done:
                # Queue the next step before handing this token over, so the device works meanwhile.
                # Decode steps carry no media: a sampled placeholder id embeds as pad, as in transformers.
                hidden = model.hidden_states(model.embed_tokens([[current]]), cache=cache.caches)
                logits = model.logits(hidden)[:, -1, :]
                cache.keys.append(current)
                token = sample_step(logits, history, opts, sampler, processors)
                mx.async_eval(token)
            stats.generated_tokens = n + 1
            yield current
            if done:
                break
    finally:
        stats.generation_seconds = time.perf_counter() - start
        stats.peak_memory_gb = peak_memory_gb()
