"""Generation: chunked prefill of what the caches do not already hold, then a pipelined decode loop.

The decode loop keeps the device busy as mlx-lm does: the graph of step n+1 is built on the still-lazy token n
and queued with ``mx.async_eval`` before the host waits for token n, so graph building, detokenising and
streaming all overlap device work. Sampling and penalties are sampling.py's (mlx-lm's semantics, per row).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import FLOAT_KV, KVSetting, PromptCache
from .errors import ContextLengthError, InputError
from .prefill import DEFAULT_PREFILL_CHUNK, prefill
from .sampling import PENALTY_CONTEXT, SEED_LIMIT, RowSampler, sample
from .processing.prompt import PreparedPrompt


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
    logit_bias: dict | None = None  # token id -> added to its logit (-inf never emits it)
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
        """These options, or an InputError naming the first value out of range or of the wrong type."""
        def number(name, value, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")

        def integer(name, value, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"{name} must be an integer, got {value!r}")

        for name in ("temperature", "top_p", "min_p"):
            number(name, getattr(self, name))
        number("repetition_penalty", self.repetition_penalty, optional=True)
        number("presence_penalty", self.presence_penalty, optional=True)
        integer("top_k", self.top_k)
        integer("max_tokens", self.max_tokens)
        integer("seed", self.seed, optional=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InputError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                integer("a logit_bias token id", token)
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) \
                        or bias == math.inf:
                    raise InputError(f"logit_bias for token {token} must be a number (or -inf), got {bias!r}")
        problems = [
            (self.temperature < 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}"),
            (self.repetition_penalty is not None and self.repetition_penalty <= 0,
             f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"),
            (self.max_tokens < 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.seed is not None and not 0 <= self.seed < SEED_LIMIT,
             f"seed must be in [0, 2**64), got {self.seed}"),
            (any(not isinstance(s, str) or not s for s in self.stop), "stop strings must be non-empty strings"),
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




class _Interrupted(Exception):
    pass


def peak_memory_gb() -> float:
    """Peak memory since the last reset: MLX's allocator peak, else (if it reports none) the process's peak RSS."""
    peak = mx.get_peak_memory()
    if peak == 0:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak / 1e9


def _make_step(model, opts: SamplingOptions):
    """(first, step): first samples from prompt logits; step runs one token through the model and samples."""
    cfg = model.config
    placeholders = mx.array([t for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id)
                             if t is not None] or [-1])
    rows: list[RowSampler] = []

    def first(hidden: mx.array, prompt_ids: np.ndarray) -> mx.array:
        rows[:] = [RowSampler.from_options(opts, cfg.text.vocab_size, prompt_ids[-PENALTY_CONTEXT:])]
        return sample(model.logits(hidden)[:, -1, :], rows)

    def step(token: mx.array, caches) -> mx.array:
        # A sampled placeholder id embeds as pad, as in transformers (decode steps carry no media).
        ids = mx.where(mx.any(token[:, None] == placeholders, axis=-1), cfg.text.pad_token_id, token)
        hidden = model.hidden_states(model.language_model.embed(ids[None]), cache=caches)
        return sample(model.logits(hidden)[:, -1, :], rows)

    return first, step


@dataclass(frozen=True)
class RunOptions:
    """How one generation runs, apart from what it samples: prefill chunking, context limit, checkpoint, stopping.

    checkpoint_at marks where the next prompt is expected to part from this one (a snapshot of the caches is
    kept there; negative counts from the end). should_stop is polled between prefill chunks and between tokens.
    """

    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_context: int | None = None
    checkpoint_at: int | None = None
    should_stop: Callable[[], bool] | None = None
    kv: KVSetting = FLOAT_KV  # how a cache made for this run stores K/V (a given PromptCache keeps its own)


def stream_tokens(model, prompt: PreparedPrompt, opts: SamplingOptions, *, cache: PromptCache | None = None,
                  run: RunOptions = RunOptions(), stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids (an EOS that ends generation included) for a prepared prompt.

    With a PromptCache, the longest prefix it holds is reused and only the rest is prefilled. When should_stop
    says so, generation ends with finish_reason "interrupted". A prompt that leaves no room in max_context is a
    ContextLengthError; one that leaves less than max_tokens ends with finish_reason "context" when the room is
    used up. stats, when given, is filled in as generation goes.
    """
    opts.check()
    ids = prompt.input_ids
    if not len(ids):
        raise InputError("the prompt is empty")
    limit = run.max_context or model.config.text.max_position_embeddings
    if len(ids) >= limit:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context allowed is {limit} tokens, "
                                 f"which leaves no room for an answer; shorten the prompt (or the conversation) "
                                 f"or allow a longer context")
    budget = min(opts.max_tokens, limit - len(ids))
    checkpoint_at = run.checkpoint_at
    if checkpoint_at is not None and checkpoint_at < 0:
        checkpoint_at += len(ids)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    cache = cache if cache is not None else PromptCache.new(model, max_context=run.max_context, kv=run.kv)
    reuse = stats.reused_tokens = cache.rewind(prompt.keys, prompt.spans)
    cache.keys = list(prompt.keys)  # claimed before the caches are written; the next rewind reconciles
    first, step = _make_step(model, opts)
    mx.reset_peak_memory()
    should_stop = run.should_stop

    def on_chunk(done, total):
        if should_stop is not None and should_stop():
            raise _Interrupted

    start = time.perf_counter()
    try:
        if checkpoint_at is not None and reuse <= checkpoint_at < len(ids) and not any(
                s.start < checkpoint_at < s.end for s in prompt.spans):
            if reuse < checkpoint_at:
                prefill(model, prompt, cache.caches, reuse, checkpoint_at, run.prefill_chunk, on_chunk)
            cache.checkpoint = (checkpoint_at, cache.snapshot())
            reuse = checkpoint_at
        hidden = prefill(model, prompt, cache.caches, reuse, len(ids), run.prefill_chunk, on_chunk)
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

