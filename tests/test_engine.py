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


def test_memory_limit_makes_sequences_wait_and_refuses_what_never_fits(model):
    from gemma_mlx.errors import InputError

    probe = Engine(model, ring_extra=4)
    o = opts(12)
    a, b, c = prompt(10, 4), prompt(14, 5), prompt(9, 6)
    for p in (a, b, c):
        probe.submit(p, o)
    need = [probe.sequence_bytes(seq) for seq in probe.waiting]
    limit = need[0] + need[1] + need[2] // 2  # a and b fit together; c must wait for one of them to leave
    engine = Engine(model, ring_extra=4, memory_limit=limit)
    handles = [engine.submit(p, o) for p in (a, b, c)]
    most = 0
    while engine.busy:
        engine.step()
        most = max(most, len(engine.running) + (engine.joining is not None))
        assert engine._in_use() <= limit
    engine.run(handles)
    assert most == 2
    for h, p in zip(handles, (a, b, c)):
        assert h.tokens == solo(model, p, o)
    with pytest.raises(InputError, match="memory limit"):
        Engine(model, ring_extra=4, memory_limit=need[0] // 2).submit(a, o)


def test_prompt_store_starts_a_new_sequence_at_the_cached_prefix(model):
    engine = Engine(model, ring_extra=4, prefill_chunk=4, store_bytes=1 << 30)
    first = prompt(30, 7)
    h1 = engine.submit(first, opts(6))
    engine.run([h1])
    assert engine.store_prefixes() == [len(first) + 5]  # the prompt and all but the last (uncached) token
    follow_up = first + h1.tokens + [106, 107] + prompt(8, 8)[2:]  # a multi-turn client: history + its new turn
    h2 = engine.submit(follow_up, opts(6))
    engine.run([h2])
    assert h2.stats.reused_tokens > len(first)  # past the window (8): the ring was restored from the store
    assert h2.tokens == solo(model, follow_up, opts(6))
    tiny = Engine(model, ring_extra=4, store_bytes=1)  # a store too small for any cache keeps nothing
    tiny.run([tiny.submit(first, opts(3))])
    assert tiny.store_prefixes() == []
