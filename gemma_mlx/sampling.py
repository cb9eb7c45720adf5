"""The token sampler: batched logits (B, V) in, one token per row out, every row with its own options and state.

The semantics are mlx-lm's (``mlx_lm.sample_utils``; tests compare the distributions): logits processors first
(logit bias, then the sign-aware repetition penalty, then the presence penalty, both over the row's recent
tokens, each distinct token penalised once), then log-probabilities, then the filters top-p, min-p and top-k on
the untempered log-probabilities, then a draw from softmax(logprobs / temperature); temperature 0 is argmax.

Each row owns its random key: a seeded row draws the same tokens whether it runs alone or beside seven others,
and whatever the other rows' seeds, because no row ever touches the global random state.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

PENALTY_CONTEXT = 64  # tokens the repetition and presence penalties look back over
SEED_LIMIT = 2**64  # seeds are 64-bit (mx.random.key)


@dataclass
class RowSampler:
    """One row's sampling options and state: its random key and the recent tokens the penalties look at."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    key: mx.array | None = None
    recent: mx.array | None = None  # (n,) int32, the last PENALTY_CONTEXT tokens (prompt tail, then output)

    def __post_init__(self):
        if self.key is None:
            self.key = mx.random.key(self.seed if self.seed is not None else secrets.randbits(63))
        self._bias = None
        if self.logit_bias:
            self._bias = (mx.array(list(self.logit_bias), dtype=mx.int32),
                          mx.array(list(self.logit_bias.values()), dtype=mx.float32))

    @classmethod
    def from_options(cls, opts, vocab_size: int, prompt_ids=()) -> RowSampler:
        """A row for SamplingOptions opts (suppress_ids become a -inf bias) that has seen prompt_ids."""
        bias = {int(t): float(b) for t, b in (getattr(opts, "logit_bias", None) or {}).items()}
        bias.update({int(t): -math.inf for t in opts.suppress_ids})
        row = cls(temperature=opts.temperature, top_k=opts.top_k if opts.top_k < vocab_size else 0,
                  top_p=opts.top_p, min_p=opts.min_p, repetition_penalty=opts.repetition_penalty,
                  presence_penalty=opts.presence_penalty, logit_bias=bias, seed=opts.seed)
        row.remember(np.asarray(prompt_ids, dtype=np.int32).reshape(-1))
        return row

    @property
    def penalised(self) -> bool:
        """Whether the recent tokens matter to this row (a penalty is on)."""
        return bool(self.repetition_penalty not in (None, 1.0) or self.presence_penalty)

    def remember(self, tokens) -> None:
        """Add tokens (ids, possibly still lazy) to the penalties' context."""
        if not self.penalised:
            return
        tokens = mx.array(tokens, dtype=mx.int32).reshape(-1) if not isinstance(tokens, mx.array) \
            else tokens.astype(mx.int32).reshape(-1)
        self.recent = tokens if self.recent is None else mx.concatenate([self.recent, tokens])
        self.recent = self.recent[-PENALTY_CONTEXT:]

    def process(self, logits: mx.array) -> mx.array:
        """The row's logits (1, V) after bias and penalties."""
        if self._bias is not None:
            logits = logits.at[:, self._bias[0]].add(self._bias[1].astype(logits.dtype))
        if self.recent is not None and self.recent.size:
            if self.repetition_penalty not in (None, 1.0):
                picked = logits[:, self.recent]
                p = self.repetition_penalty
                logits[:, self.recent] = mx.where(picked < 0, picked * p, picked / p)
            if self.presence_penalty:
                logits[:, self.recent] = logits[:, self.recent] - self.presence_penalty
        return logits

    def next_key(self) -> mx.array:
        """A fresh key for this step's draw; the row's key moves on."""
        self.key, sub = mx.random.split(self.key)
        return sub


def sample(logits: mx.array, rows: list[RowSampler]) -> mx.array:
    """Tokens (B,) uint32 for logits (B, V), row b drawn under rows[b]; each row then remembers its token."""
    B, V = logits.shape
    if len(rows) != B:
        raise ValueError(f"{B} rows of logits but {len(rows)} samplers")
    if any(r._bias is not None or r.penalised for r in rows):
        logits = mx.concatenate([r.process(logits[b : b + 1]) for b, r in enumerate(rows)], axis=0)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    greedy = mx.argmax(logprobs, axis=-1)
    sampled = [b for b, r in enumerate(rows) if r.temperature > 0]
    if sampled:
        logprobs = _filter(logprobs, rows)
        temps = mx.array([max(r.temperature, 1e-30) for r in rows], dtype=mx.float32)[:, None]
        noise = mx.stack([mx.random.gumbel(shape=(V,), key=r.next_key()) if r.temperature > 0
                          else mx.zeros((V,)) for r in rows])
        drawn = mx.argmax(logprobs.astype(mx.float32) / temps + noise, axis=-1)
        is_sampled = mx.array([r.temperature > 0 for r in rows])
        tokens = mx.where(is_sampled, drawn, greedy)
    else:
        tokens = greedy
    tokens = tokens.astype(mx.uint32)
    for b, r in enumerate(rows):
        r.remember(tokens[b : b + 1])
    return tokens


def _filter(logprobs: mx.array, rows: list[RowSampler]) -> mx.array:
    """logprobs with what each row's top-p, min-p and top-k (in that order, as mlx-lm) leave out set to -inf."""
    neg_inf = mx.array(-mx.inf, dtype=logprobs.dtype)
    top_p = np.array([r.top_p for r in rows], dtype=np.float32)
    if np.any((top_p > 0) & (top_p < 1)):
        # Drop, from the least likely up, the tokens whose mass above them already reaches top_p.
        sorted_lp = mx.sort(logprobs, axis=-1)
        probs = mx.exp(sorted_lp.astype(mx.float32))
        above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
        total = above[..., :1] + probs[..., :1]
        p = mx.array(top_p)[:, None]
        dropped = (above >= p * total).sum(axis=-1, keepdims=True)
        threshold = mx.take_along_axis(sorted_lp, dropped, axis=-1)
        on = mx.array((top_p > 0) & (top_p < 1))[:, None]
        logprobs = mx.where(on & (logprobs < threshold), neg_inf, logprobs)
    min_p = np.array([r.min_p for r in rows], dtype=np.float32)
    if np.any(min_p > 0):
        with np.errstate(divide="ignore"):
            log_min_p = mx.array(np.log(min_p))[:, None]  # log 0 = -inf removes nothing
        cut = mx.max(logprobs, axis=-1, keepdims=True) + log_min_p
        logprobs = mx.where(logprobs < cut, neg_inf, logprobs)
    top_k = np.array([r.top_k for r in rows], dtype=np.int32)
    V = logprobs.shape[-1]
    if np.any((top_k > 0) & (top_k < V)):
        kth = mx.sort(logprobs, axis=-1)[:, ::-1]
        k = mx.array(np.clip(top_k, 1, V) - 1)[:, None]
        threshold = mx.take_along_axis(kth, k, axis=-1)
        on = mx.array((top_k > 0) & (top_k < V))[:, None]
        logprobs = mx.where(on & (logprobs < threshold), neg_inf, logprobs)
    return logprobs
