"""The engine against solo runs on a tiny random model (window 8, ring extra 4: rings wrap at different steps):
greedy tokens equal token for token at batch 4 and 8, with joins, early leaves, a cancel and a repeated prompt;
seeded sampling identical whatever the batch; per-row trim after the ring wrapped."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_mlx.cache import BatchCaches, make_cache
from gemma_mlx.engine import Engine
from gemma_mlx.cache import PromptCache
from gemma_mlx.generation import SamplingOptions, stream_tokens
from gemma_mlx.processing.prompt import PreparedPrompt
from gemma_mlx.tiny import TINY_TOKEN_IDS, gemma4_config, write_random_checkpoint
from gemma_mlx.weights import load_model

MEDIA = tuple(sorted(TINY_TOKEN_IDS.values()))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_engine")
    write_random_checkpoint(d, gemma4_config(sliding_window=8), seed=0)
    return load_model(d)[0]


def opts(n, **kw):
    return SamplingOptions(**{"temperature": 0.0, "max_tokens": n, "eos_ids": (), "suppress_ids": MEDIA, **kw})


def prompt(n, seed):
    return [2, 105] + [int(i) for i in np.random.RandomState(seed).randint(5, 400, n - 2)]


def solo(model, p, o):
    prepared = PreparedPrompt.from_ids(p, model.config.token_ids)
    return list(stream_tokens(model, prepared, o, cache=PromptCache(make_cache(model.config.text, ring_extra=4))))


@pytest.mark.parametrize("batch", [4, 8])
def test_greedy_batch_equals_solo_past_the_window(model, batch):
    prompts = [prompt(3 + 5 * i, i) for i in range(batch)]
    o = opts(30)
    engine = Engine(model, ring_extra=4, prefill_chunk=4)
    handles = [engine.submit(p, o) for p in prompts]
    engine.run(handles)
    for h, p in zip(handles, prompts):
        assert h.tokens == solo(model, p, o)
        assert h.finish_reason == "length"


def test_joining_leaving_cancelled_and_repeated_prompts(model):
    engine = Engine(model, ring_extra=4, prefill_chunk=3)
    a, b = prompt(12, 1), prompt(20, 2)
    ha, hb = engine.submit(a, opts(25)), engine.submit(b, opts(8))  # b leaves early
    for _ in range(12):
        engine.step()
    hc, hd = engine.submit(a, opts(25)), engine.submit(prompt(30, 3), opts(20))  # a again, joining mid-way
    for _ in range(6):
        engine.step()
    hd.cancel()
    engine.run([ha, hb, hc, hd])
    assert ha.tokens == solo(model, a, opts(25)) == hc.tokens
    assert hb.tokens == solo(model, b, opts(8))
    assert hd.finish_reason == "interrupted"
    assert hd.tokens == solo(model, prompt(30, 3), opts(20))[: len(hd.tokens)]


def test_seeded_sampling_is_the_same_whatever_the_batch(model):
    o = opts(20, temperature=1.0, top_k=0, top_p=1.0, seed=11)
    p = prompt(9, 5)
    alone = Engine(model, ring_extra=4)
    h = alone.submit(p, o)
    alone.run([h])
    crowd = Engine(model, ring_extra=4)
    hs = [crowd.submit(prompt(5 + i, 20 + i), opts(20, temperature=1.0, seed=i)) for i in range(3)]
    h2 = crowd.submit(p, o)
    crowd.run(hs + [h2])
    assert h2.tokens == h.tokens == solo(model, p, o)


def test_batched_rows_trim_after_the_ring_wrapped_like_their_solo_caches(model):
    cfg = model.config.text
    engine = Engine(model, ring_extra=4)
    handles = [engine.submit(prompt(n, n), opts(40)) for n in (6, 15)]
    for _ in range(20):
        engine.step()
    batch: BatchCaches = engine.batch
    before = batch.offsets
    assert np.all(before > cfg.sliding_window + 4)  # wrapped
    assert batch.max_trim().tolist() == [4, 4]
    batch.trim([3, 1])
    assert (before - batch.offsets).tolist() == [3, 1]
    for b in range(2):
        row = batch.row(b)
        assert {c.offset for c in row if c is not None} == {int(batch.offsets[b])}
    with pytest.raises(ValueError):
        batch.trim([5, 0])  # beyond what the ring keeps
    del handles
