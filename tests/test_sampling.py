"""The batched sampler against mlx-lm's sample_utils on fixed logits: the same processed logits and filters,
draws from the same distribution, per-row options in one batch, per-row seeds independent of the batch, and
SamplingOptions.check refusing values of the wrong type or range."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import sample_utils

from gemma_mlx.errors import InputError
from gemma_mlx.generation import SamplingOptions
from gemma_mlx.sampling import RowSampler, _filter, sample

V = 40


def fixed_logits(seed: int) -> mx.array:
    return mx.array(np.random.RandomState(seed).normal(0, 2.0, (1, V)).astype(np.float32))


def theirs_filtered(logits, *, top_p=1.0, min_p=0.0, top_k=0):
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < top_p < 1:
        logprobs = sample_utils.apply_top_p(logprobs, top_p)
    if min_p:
        logprobs = sample_utils.apply_min_p(logprobs, min_p)
    if top_k:
        logprobs = sample_utils.apply_top_k(logprobs, top_k)
    return logprobs


CASES = [dict(top_p=0.9), dict(min_p=0.1), dict(top_k=7), dict(top_p=0.8, min_p=0.05, top_k=10),
         dict(top_p=0.5, top_k=3), dict()]


def test_filters_equal_mlx_lm_for_every_row_of_one_batch():
    logits = mx.concatenate([fixed_logits(i) for i in range(len(CASES))])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ours = _filter(logprobs, [RowSampler(**c) for c in CASES])
    for b, case in enumerate(CASES):
        want = theirs_filtered(logits[b : b + 1], **case)
        assert np.array_equal(np.isinf(np.array(ours[b])), np.isinf(np.array(want[0]))), case
        kept = ~np.isinf(np.array(want[0]))
        np.testing.assert_allclose(np.array(ours[b])[kept], np.array(want[0])[kept], rtol=1e-6)
        assert 0 < kept.sum() < V or not case


def test_processors_equal_mlx_lm():
    logits = fixed_logits(3)
    recent = [3, 5, 5, 9, 11, 3]
    bias = {2: 1.5, 7: -math.inf, 11: -0.5}
    row = RowSampler(repetition_penalty=1.3, presence_penalty=0.7, logit_bias=bias)
    row.remember(recent)
    ours = row.process(mx.array(logits))
    want = mx.array(logits)
    for p in sample_utils.make_logits_processors(bias, 1.3, 64, 0.7, 64):
        want = p(mx.array(recent), want)
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-6)
    assert not np.allclose(np.array(ours), np.array(logits))


def empirical(tokens, n=V) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=n) / len(tokens)


@pytest.mark.parametrize("case", [dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=8, min_p=0.02),
                                  dict(temperature=1.0)])
def test_draws_follow_the_same_distribution_as_mlx_lm(case):
    logits = fixed_logits(11)
    n = 3000
    rows = [RowSampler(seed=i, **case) for i in range(n)]
    ours = np.array(sample(mx.repeat(logits, n, axis=0), rows))
    sampler = sample_utils.make_sampler(case["temperature"], case.get("top_p", 1.0), case.get("min_p", 0.0), 1,
                                        case.get("top_k", 0))
    mx.random.seed(0)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    theirs = np.array(sampler(mx.repeat(logprobs, n, axis=0)))
    filtered = theirs_filtered(logits, **{k: v for k, v in case.items() if k != "temperature"})
    exact = np.array(mx.softmax(filtered / case["temperature"], axis=-1)[0])
    p_ours, p_theirs = empirical(ours), empirical(theirs)
    assert set(np.flatnonzero(p_ours)) <= set(np.flatnonzero(exact))  # never outside what the filters keep
    # Total variation from the exact distribution: ~0.04 expected at 3000 draws over <= 40 tokens.
    assert 0.5 * np.abs(p_ours - exact).sum() < 0.08
    assert 0.5 * np.abs(p_ours - p_theirs).sum() < 0.12


def test_greedy_rows_beside_sampled_rows_take_the_argmax():
    logits = mx.concatenate([fixed_logits(1), fixed_logits(2), fixed_logits(1)])
    tokens = np.array(sample(logits, [RowSampler(temperature=0), RowSampler(temperature=2.0, seed=1),
                                      RowSampler(temperature=0, logit_bias={int(np.argmax(np.array(logits[2]))):
                                                                            -math.inf})]))
    assert tokens[0] == int(np.argmax(np.array(logits[0])))
    assert tokens[2] == int(np.argsort(np.array(logits[2]))[-2])  # the best one is banned


def draws(seed, batch_seeds, steps=20):
    """Row 0's tokens (seed given) over steps, beside other rows seeded as batch_seeds."""
    rows = [RowSampler(temperature=1.0, seed=seed)] + [RowSampler(temperature=1.0, seed=s) for s in batch_seeds]
    out = []
    for i in range(steps):
        logits = mx.concatenate([fixed_logits(100 + i)] * len(rows))
        out.append(int(sample(logits, rows)[0]))
    return out


def test_a_seeded_row_draws_the_same_whatever_the_batch():
    alone = draws(5, [])
    assert draws(5, [1, 2, 3]) == alone
    assert draws(5, [6, 7, 8, 9, 10, 11, 12]) == alone
    assert draws(6, []) != alone


def test_penalties_see_the_rows_own_tokens():
    row = RowSampler(temperature=0, repetition_penalty=1e6)
    logits = mx.concatenate([fixed_logits(4)])
    first = int(sample(logits, [row])[0])
    second = int(sample(logits, [row])[0])
    assert second != first  # its own first token is penalised away
    other = RowSampler(temperature=0)
    assert int(sample(logits, [other])[0]) == first


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", True), ("temperature", "1"),
    ("repetition_penalty", float("nan")), ("presence_penalty", float("inf")), ("presence_penalty", False),
    ("max_tokens", 2.5), ("max_tokens", True), ("max_tokens", 0), ("seed", -1), ("seed", 2**70), ("seed", 1.0),
    ("seed", True), ("top_k", 3.0), ("top_p", float("nan")), ("min_p", 2.0), ("logit_bias", {1: float("nan")}),
    ("logit_bias", {"a": 1.0}), ("logit_bias", [1, 2]), ("stop", ("",)),
])
def test_check_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(InputError, match=field.split("_")[0]):
        SamplingOptions(**{field: value}).check()


def test_check_accepts_the_edges():
    SamplingOptions(seed=0).check()
    SamplingOptions(seed=2**64 - 1, logit_bias={3: -math.inf, 4: 2}, top_k=0, min_p=1.0, top_p=1.0).check()
