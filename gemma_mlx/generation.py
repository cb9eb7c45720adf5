"""Generation: chunked prefill of what the caches do not already hold, then a pipelined decode loop.

The decode loop keeps the device busy as mlx-lm does: the graph of step n+1 is built on the still-lazy token n
and queued with ``mx.async_eval`` before the host waits for token n, so graph building, detokenising and
streaming all overlap device work. Sampling and penalties reuse ``mlx_lm.sample_utils``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import make_cache, max_trim, restore_caches, snapshot_caches, trim_caches
from .errors import ContextLengthError, InputError, WeightsError
from .model import masks
from .prefill import DEFAULT_PREFILL_CHUNK, prefill

PENALTY_CONTEXT = 64  # tokens the repetition and presence penalties look back over


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens and when to stop. ``from_dir`` reads the defaults from generation_config.json."""

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
        """The defaults transformers' generate would use for this checkpoint (its generation_config.json).

        As there: sampling only when the file says do_sample (Gemma 4's does: temperature 1.0, top_k 64,
        top_p 0.95), otherwise greedy; EOS ids from the file and the model config; suppress_tokens never emitted.
        """
        from .config import GENERATION_CONFIG, MAX_VOCAB, parse_generation_config
        from .jsonfile import read_json_object

        eos = tuple(config.eos_token_ids) if config is not None and config.eos_token_ids else (1,)
        path = Path(model_dir) / GENERATION_CONFIG
        vocab = config.text.vocab_size if config is not None else MAX_VOCAB
        g = parse_generation_config(read_json_object(path, missing={}), vocab, file=str(path))
        return cls(
            temperature=g.temperature if g.do_sample else 0.0, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
            repetition_penalty=g.repetition_penalty, eos_ids=tuple(dict.fromkeys(g.eos_ids + eos)),
            suppress_ids=g.suppress_ids, stop=g.stop,
        )

    def greedy(self) -> SamplingOptions:
        """The same options, always taking the most likely token."""
        return replace(self, temperature=0.0)

    def check(self) -> SamplingOptions:
        """These options, or an InputError naming the first value out of range."""
        problems = [
            (self.temperature < 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}"),
            (self.repetition_penalty is not None and self.repetition_penalty <= 0,
             f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"),
            (self.max_tokens < 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for bad, message in problems:
            if bad:
                raise InputError(message)
        return self


@dataclass
class GenerationStats:
    """What one generation cost: tokens, seconds and peak memory; ``finish_reason`` says why it ended."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens the cache already held (not computed again)
    prompt_seconds: float = 0.0  # until the first token was ready
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""  # "stop" (EOS), "stop_string", "length", "context", "interrupted"

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens computed per second (reused tokens cost nothing, so they do not count)."""
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second after the first."""
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """The stats as plain JSON data, rates included."""
        return {**asdict(self), "prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}

    def summary(self) -> str:
        """One human line: prompt and generation speed, peak memory."""
        reused = f" ({self.reused_tokens} reused)" if self.reused_tokens else ""
        memory = (f"{self.peak_memory_gb:.2f} GB" if self.peak_memory_gb >= 1
                  else f"{self.peak_memory_gb * 1000:.0f} MB")
        return (f"prompt {self.prompt_tokens} tokens{reused} at {self.prompt_tps:.1f} tok/s · generated "
                f"{self.generated_tokens} tokens at {self.generation_tps:.1f} tok/s · peak memory {memory}")


@dataclass
class PromptCache:
    """KV caches plus the keys of the tokens they hold, so that a later prompt reuses their common prefix.

    A key is a token id, or for a media soft token (id, fingerprint of its image, frame or clip): the same
    placeholder id with a different picture behind it must not count as a match.
    """

    caches: list
    keys: list = field(default_factory=list)
    # (position, snapshot) where the next prompt is expected to part from this one. Chat templates re-render a
    # finished model turn differently from the generation prompt it was produced after (the Gemma 4 template
    # drops the empty thought channel and any thinking), so the next turn must roll back to the start of that
    # turn. Once the sliding ring has wrapped it cannot roll back that far; restoring the snapshot can.
    checkpoint: tuple[int, list] | None = None

    @classmethod
    def new(cls, model, *, max_context: int | None = None) -> PromptCache:
        """Empty caches for model (full-attention buffers capped at max_context when given)."""
        return cls(make_cache(model.config.text, max_size=max_context))

    def reset(self) -> None:
        """Forget everything the caches hold."""
        for c in self.caches:
            if c is not None:
                c.reset()
        self.keys, self.checkpoint = [], None

    def _reconcile(self) -> None:
        # Keys are claimed before the caches are written (prefill) or just after (decode), so an interrupted
        # generation can leave them a little apart: keep only what both agree on.
        offsets = {c.offset for c in self.caches if c is not None}
        if len(offsets) != 1:  # an interrupt between layers: nothing can be trusted
            self.reset()
            return
        offset = offsets.pop()
        if offset > len(self.keys):
            if offset - len(self.keys) > max_trim(self.caches):
                self.reset()
                return
            trim_caches(self.caches, offset - len(self.keys))
        del self.keys[offset:]

    def rewind(self, keys: list, token_types: np.ndarray | None = None) -> int:
        """Roll the caches back to the longest prefix of keys they can reuse; return its length."""
        self._reconcile()
        n = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            n += 1
        n = min(n, len(keys) - 1)  # the last prompt token must run to give the next token's logits
        if token_types is not None:
            # Never resume inside a media run: a vision block attends both ways and must run whole, and the
            # prefill embeds media item by item.
            while 0 < n < len(keys) and token_types[n] != 0 and token_types[n - 1] == token_types[n]:
                n -= 1
        if len(self.keys) - n <= max_trim(self.caches):
            trim_caches(self.caches, len(self.keys) - n)
        elif self.checkpoint is not None and self.checkpoint[0] <= n:
            n = self.checkpoint[0]
            restore_caches(self.caches, self.checkpoint[1])
        else:
            n = 0
            for c in self.caches:
                if c is not None:
                    c.reset()
        del self.keys[n:]
        if self.checkpoint is not None and self.checkpoint[0] > n:
            self.checkpoint = None
        return n


def _sample_utils():
    """mlx_lm.sample_utils, loaded without running mlx_lm's package __init__.

    That __init__ imports mlx-lm's loaders, hence transformers and torch: seconds at every start of the CLI, for
    a module that needs only mlx.
    """
    if "mlx_lm.sample_utils" in sys.modules:
        return sys.modules["mlx_lm.sample_utils"]
    name = "gemma_mlx._mlx_lm_sample_utils"
    if name not in sys.modules:
        package = importlib.util.find_spec("mlx_lm")  # finds the package without importing it
        spec = importlib.util.spec_from_file_location(name, Path(package.origin).parent / "sample_utils.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class _Interrupted(Exception):
    pass


def peak_memory_gb() -> float:
    """Peak memory since the last reset: MLX's allocator peak, else (if it reports none) the process's peak RSS."""
    peak = mx.get_peak_memory()
    if peak == 0:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak / 1e9


def media_after(media: dict, token_types: np.ndarray, start: int) -> dict:
    """The media inputs whose soft tokens lie at or after start (a media run never straddles start)."""
    if not media or start == 0:
        return media
    types = np.asarray(token_types)[:start]
    runs = {}
    for kind in (masks.TOKEN_TYPE_IMAGE, masks.TOKEN_TYPE_VIDEO, masks.TOKEN_TYPE_AUDIO):
        inside = types == kind
        runs[kind] = int(inside[0]) + int(np.sum(inside[1:] & ~inside[:-1])) if len(inside) else 0
    kind_of = {"pixel_values": masks.TOKEN_TYPE_IMAGE, "image_position_ids": masks.TOKEN_TYPE_IMAGE,
               "video_pixel_values": masks.TOKEN_TYPE_VIDEO, "video_position_ids": masks.TOKEN_TYPE_VIDEO,
               "audio_features": masks.TOKEN_TYPE_AUDIO, "audio_mask": masks.TOKEN_TYPE_AUDIO}
    out = {}
    for key, value in media.items():
        rest = value[runs[kind_of[key]]:]
        if len(rest):
            out[key] = rest
    return out


def _make_step(model, opts: SamplingOptions):
    """(first, step): first samples from prompt logits; step runs one token through the model and samples."""
    utils = _sample_utils()
    top_k = opts.top_k if opts.top_k < model.config.text.vocab_size else 0  # mlx-lm refuses k >= vocab
    sampler = utils.make_sampler(opts.temperature, opts.top_p, opts.min_p, 1, top_k)
    bias = {int(t): -float("inf") for t in opts.suppress_ids}
    processors = utils.make_logits_processors(bias or None, opts.repetition_penalty, PENALTY_CONTEXT,
                                              opts.presence_penalty, PENALTY_CONTEXT)
    cfg = model.config
    placeholders = mx.array([t for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id)
                             if t is not None] or [-1])
    state = {}

    def sample(logits: mx.array) -> mx.array:
        for p in processors:
            logits = p(state["recent"], logits)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        if processors:
            state["recent"] = mx.concatenate([state["recent"], token.astype(mx.int32)])[-PENALTY_CONTEXT:]
        return token

    def first(hidden: mx.array, prompt_ids: np.ndarray) -> mx.array:
        state["recent"] = mx.array(prompt_ids[-PENALTY_CONTEXT:])
        return sample(model.logits(hidden)[:, -1, :])

    def step(token: mx.array, caches) -> mx.array:
        # A sampled placeholder id embeds as pad, as in transformers (decode steps carry no media).
        ids = mx.where(mx.any(token[:, None] == placeholders, axis=-1), cfg.text.pad_token_id, token)
        hidden = model.hidden_states(model.language_model.embed(ids[None]), cache=caches)
        return sample(model.logits(hidden)[:, -1, :])

    return first, step


def stream_tokens(model, input_ids, *, opts: SamplingOptions, cache: PromptCache | None = None,
                  media: dict | None = None, token_types: np.ndarray | None = None, token_keys: list | None = None,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_context: int | None = None,
                  stats: GenerationStats | None = None, checkpoint_at: int | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield generated token ids (an EOS that ends generation included) for a prompt of token ids.

    With a PromptCache, the longest prefix it holds is reused and only the rest is prefilled; checkpoint_at marks
    where the next prompt is expected to part from this one (a snapshot is kept there; negative counts from the
    end). should_stop is polled between prefill chunks and between tokens; when it says so, generation ends with
    finish_reason "interrupted". A prompt that leaves no room in max_context is a ContextLengthError; one that
    leaves less than max_tokens ends with finish_reason "context" when the room is used up.
    """
    opts.check()
    ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
    if not len(ids):
        raise InputError("the prompt is empty")
    limit = max_context or model.config.text.max_position_embeddings
    if len(ids) >= limit:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context allowed is {limit} tokens, "
                                 f"which leaves no room for an answer; shorten the prompt (or the conversation) "
                                 f"or allow a longer context")
    budget = min(opts.max_tokens, limit - len(ids))
    if checkpoint_at is not None and checkpoint_at < 0:
        checkpoint_at += len(ids)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    types = np.asarray(token_types).reshape(-1) if token_types is not None else model.token_types(ids)
    keys = list(token_keys) if token_keys is not None else ids.tolist()
    cache = cache if cache is not None else PromptCache.new(model, max_context=max_context)
    reuse = stats.reused_tokens = cache.rewind(keys, types)
    cache.keys = keys  # claimed before the caches are written; the next rewind reconciles after an interrupt
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    first, step = _make_step(model, opts)
    mx.reset_peak_memory()

    def on_chunk(done, total):
        if should_stop is not None and should_stop():
            raise _Interrupted

    start = time.perf_counter()
    try:
        embeddings = model.embed_inputs(ids[None, reuse:], **media_after(media or {}, types, reuse))
        if checkpoint_at is not None and reuse <= checkpoint_at < len(ids):
            if reuse < checkpoint_at:
                prefill(model, embeddings[:, : checkpoint_at - reuse], types[None, reuse:checkpoint_at],
                        cache.caches, prefill_chunk, on_chunk)
            cache.checkpoint = (checkpoint_at, snapshot_caches(cache.caches))
            embeddings, reuse = embeddings[:, checkpoint_at - reuse:], checkpoint_at
        hidden = prefill(model, embeddings, types[None, reuse:], cache.caches, prefill_chunk, on_chunk)
    except _Interrupted:
        stats.prompt_seconds, stats.finish_reason = time.perf_counter() - start, "interrupted"
        stats.peak_memory_gb = peak_memory_gb()
        return
    token = first(hidden, ids)
    mx.eval(token)
    stats.prompt_seconds = time.perf_counter() - start

    start = time.perf_counter()
    eos = set(opts.eos_ids)
    stats.finish_reason = "length" if budget == opts.max_tokens else "context"
    try:
        for n in range(budget):
            last = n + 1 == budget
            if not last:  # queue step n+1 on the lazy token n before waiting for it
                next_token = step(token, cache.caches)
                mx.async_eval(next_token)
            current = token.item()
            if not last:
                cache.keys.append(current)  # step n+1 wrote token n into the caches
            stats.generated_tokens = n + 1
            yield current
            if current in eos:
                stats.finish_reason = "stop"
                break
            if should_stop is not None and should_stop():
                stats.finish_reason = "interrupted"
                break
            if not last:
                token = next_token
    finally:
        stats.generation_seconds = time.perf_counter() - start
        stats.peak_memory_gb = peak_memory_gb()

