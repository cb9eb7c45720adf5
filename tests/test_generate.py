"""The generation engine against transformers' greedy generate, past the sliding window (8 on the tiny model):
prompt-cache reuse, rollback after the ring has wrapped, interruption, sampling, stops, limits and stats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gemma_mlx.api import load
from gemma_mlx.cache import PromptCache, make_cache
from gemma_mlx.errors import ContextLengthError, InputError
from gemma_mlx.events import Event, TextStream
from gemma_mlx.generation import GenerationStats, RunOptions, SamplingOptions, stream_tokens
from gemma_mlx.processing.prompt import PreparedPrompt
from gemma_mlx.tiny import MEDIA_TOKEN_STRINGS
from gemma_mlx.tokenizer import write_byte_tokenizer
from hf_tiny import TOKENS, VOCAB

# Random weights happily sample media placeholder ids; transformers and we must suppress the same ones.
MEDIA_IDS = sorted(TOKENS.values())


def greedy(n: int, **kw) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, max_tokens=n, eos_ids=(), suppress_ids=tuple(MEDIA_IDS), **kw)


@pytest.fixture(scope="module")
def tiny(tiny_gemma4, tmp_path_factory, fixtures_dir):
    """(torch model, our Gemma) over one tiny checkpoint, with a byte tokenizer and the real chat template."""
    hf, src = tiny_gemma4
    d = tmp_path_factory.mktemp("tiny_generate")
    for f in src.iterdir():
        shutil.copy(f, d / f.name)
    write_byte_tokenizer(d, {MEDIA_TOKEN_STRINGS[k]: v for k, v in TOKENS.items()}, VOCAB)
    shutil.copy(fixtures_dir / "gemma4-tokenizer" / "chat_template.jinja", d / "chat_template.jinja")
    return hf, load(d)


def hf_greedy(hf, ids, n, **inputs):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, suppress_tokens=MEDIA_IDS, **inputs)
    return out[0, len(ids):].tolist()


RUN_KEYS = {"prefill_chunk", "max_context", "checkpoint_at", "should_stop"}


def ours(g, ids, opts, *, media=None, **kw):
    prompt = PreparedPrompt.from_ids(ids, g.config.token_ids, media)
    run = RunOptions(**{k: kw.pop(k) for k in RUN_KEYS & set(kw)})
    return list(stream_tokens(g.model, prompt, opts, run=run, **kw))


def prompt(n: int, seed: int = 0) -> list[int]:
    return [2, 105] + [int(i) for i in np.random.RandomState(seed).randint(5, 400, n - 2)]


def test_greedy_equals_transformers_for_120_tokens_past_the_window_in_any_chunking(tiny):
    hf, g = tiny
    p = prompt(22)
    want = hf_greedy(hf, p, 120)
    assert ours(g, p, greedy(120)) == want  # the window is 8: it wraps 17 times
    assert ours(g, p, greedy(120), prefill_chunk=3) == want


def test_prompt_cache_reuse_across_turns_equals_transformers(tiny):
    hf, g = tiny
    cache = PromptCache(make_cache(g.config.text, ring_extra=4))
    p1 = prompt(30, seed=1)
    first = ours(g, p1, greedy(40), cache=cache, checkpoint_at=-3)  # "-3": the generation prompt's 3 tokens
    # The next turn re-renders the history: it parts from what the caches hold 3 tokens before the end of p1,
    # 40 tokens back, far beyond what a ring of 8 - 1 + 4 can roll back: the checkpoint must serve.
    p2 = p1[:-3] + [300, 301] + first[:30] + [106, 105] + list(range(120, 140))
    stats = GenerationStats()
    got = ours(g, p2, greedy(110), cache=cache, stats=stats)
    assert stats.reused_tokens == len(p1) - 3
    assert got == hf_greedy(hf, p2, 110)
    # An edit of the last few tokens rolls back inside the ring, which has wrapped many times by now.
    edited = p2 + got[:106] + [7]
    stats = GenerationStats()
    again = ours(g, edited, greedy(10), cache=cache, stats=stats)
    assert stats.reused_tokens == len(p2) + 106
    assert again == hf_greedy(hf, edited, 10)
    # Parting earlier than the ring reaches, with no checkpoint there: everything is computed again, correctly.
    early = p2[:20] + [9, 9, 9]
    stats = GenerationStats()
    assert ours(g, early, greedy(10), cache=cache, stats=stats) == hf_greedy(hf, early, 10)
    assert stats.reused_tokens == 0


def test_retry_after_the_ring_wrapped_rolls_back_and_repeats_a_fresh_run(tiny):
    _, g = tiny
    cache = PromptCache(make_cache(g.config.text, ring_extra=32))  # a ring of 39 slots
    p = prompt(20, seed=2)
    first = ours(g, p, greedy(25), cache=cache)  # 44 positions: the ring has wrapped
    ring = next(c for c in cache.caches if hasattr(c, "window"))
    assert ring.offset > ring.size
    stats = GenerationStats()
    assert ours(g, p, greedy(25), cache=cache, stats=stats) == first
    assert stats.reused_tokens == len(p) - 1  # rolled back 25 tokens after the wrap, not recomputed


def test_greedy_with_an_image_equals_transformers_generate(tiny):
    hf, g = tiny
    rng = np.random.RandomState(3)
    px = rng.rand(1, 4, 6912).astype(np.float32)
    pos = np.array([[[0, 0], [1, 0], [0, 1], [1, 1]]])
    p = [2, 105, 40, TOKENS["boi_token_id"]] + [TOKENS["image_token_id"]] * 4 + [TOKENS["eoi_token_id"], 41]
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]])
    want = hf_greedy(hf, p, 40, pixel_values=torch.tensor(px), image_position_ids=torch.tensor(pos),
                     mm_token_type_ids=torch.tensor(types))
    g.model.vision_mask = "all"  # transformers' generate with a dynamic cache uses its plain-forward masks
    try:
        got = ours(g, p, greedy(40), media=dict(pixel_values=px, image_position_ids=pos))
    finally:
        g.model.vision_mask = "sliding"
    assert got == want


def test_interrupting_leaves_the_cache_reusable(tiny):
    hf, g = tiny
    cache = PromptCache(make_cache(g.config.text, ring_extra=4))
    p = prompt(25, seed=4)
    polls = iter(range(100))
    stats = GenerationStats()
    got = ours(g, p, greedy(50), cache=cache, stats=stats, should_stop=lambda: next(polls) >= 5, prefill_chunk=8)
    assert stats.finish_reason == "interrupted" and len(got) == 2  # 4 polls between prefill chunks, then tokens
    p2 = p + got + [11, 12]
    stats = GenerationStats()
    assert ours(g, p2, greedy(20), cache=cache, stats=stats) == hf_greedy(hf, p2, 20)
    assert stats.reused_tokens == len(p) + 2
    # Stopped in the middle of a prefill: what was prefilled is kept and reused.
    cache = PromptCache(make_cache(g.config.text))
    polls = iter(range(100))
    assert ours(g, p, greedy(5), cache=cache, prefill_chunk=8, should_stop=lambda: next(polls) >= 1) == []
    stats = GenerationStats()
    assert ours(g, p, greedy(20), cache=cache, stats=stats) == hf_greedy(hf, p, 20)
    assert stats.reused_tokens == 16


def test_seeded_sampling_is_reproducible_and_never_emits_suppressed_ids(tiny):
    _, g = tiny
    opts = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=7, max_tokens=60, eos_ids=(),
                           suppress_ids=tuple(range(256, 512)))
    a, b = ours(g, [2, 105, 50], opts), ours(g, [2, 105, 50], opts)
    assert a == b and len(set(a)) > 15
    assert all(t < 256 for t in a)
    from dataclasses import replace

    assert ours(g, [2, 105, 50], replace(opts, seed=8)) != a
    filtered = replace(opts, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.5, presence_penalty=2.0)
    assert ours(g, [2, 105, 50], filtered) == ours(g, [2, 105, 50], filtered) != a


def test_gemma4_generation_defaults_come_from_generation_config(tmp_path):
    from gemma_mlx.config import load_config
    from gemma_mlx.tiny import gemma4_config, write_random_checkpoint

    out = write_random_checkpoint(tmp_path, gemma4_config(num_hidden_layers=1))  # Gemma 4's generation_config
    d = SamplingOptions.from_dir(out, load_config(out))
    assert (d.temperature, d.top_k, d.top_p, d.eos_ids) == (1.0, 64, 0.95, (1, 106, 50))
    assert set(d.suppress_ids) == {TOKENS["eoi_token_id"], TOKENS["eoa_token_index"]}


def test_stops_on_eos(tiny):
    _, g = tiny
    free = ours(g, [2, 105, 50], greedy(30))
    eos = free[5]
    stats = GenerationStats()
    opts = SamplingOptions(temperature=0.0, max_tokens=30, eos_ids=(eos,), suppress_ids=tuple(MEDIA_IDS))
    stopped = ours(g, [2, 105, 50], opts, stats=stats)
    assert stopped == free[: free.index(eos) + 1] and stats.finish_reason == "stop"


def test_stop_strings_are_never_streamed(tiny):
    _, g = tiny
    enc = g.tokenizer.encode

    def run(text, stop):
        s = TextStream(g.tokenizer, stop, (106,))
        pieces = [p.text for t in enc(text) for p in s.add(t)] + [p.text for p in s.finish()]
        assert not any("\ufffd" in p for p in pieces)  # never half a character
        return "".join(pieces), s.final_text(), s.stopped

    assert run("one STOP two", ("STOP",)) == ("one ", "one ", True)
    assert run("café ☕ — STOP", ("STOP",)) == ("café ☕ — ",) * 2 + (True,)  # bytes of a character held together
    assert run("a ST and STO but not STOP", ("STOPPED",)) == ("a ST and STO but not STOP",) * 2 + (False,)
    assert run("x<turn|>", ()) == ("x", "x<turn|>", False)  # EOS text is kept in the raw text, never shown
    result = g.generate("hello", greedy=True, max_tokens=20)
    if len(result.content) > 4:
        stop = result.content[2:4]
        events = list(g.stream("hello", greedy=True, max_tokens=20, stop=[stop]))
        final = events[-1]
        assert final.done and all(not e.done for e in events[:-1])
        assert final.finish_reason == "stop_string" and stop not in "".join(e.text for e in events)
        assert final.result.text == result.text[: result.text.index(stop)]


def test_thought_and_tool_call_text_stream_apart(tiny):
    _, g = tiny
    s = TextStream(g.tokenizer, (), (106, 50))
    text = '<|channel>thought\nLet me see.<channel|>It is <|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|><|tool_response>'
    ids = g.tokenizer.encode(text)
    events = [p for t in ids for p in s.add(t)] + s.finish()
    merged = {}
    for e in events:
        merged[e.kind] = merged.get(e.kind, "") + e.text
    assert merged == {"thinking": "Let me see.", "answer": "It is ", "tool_call": 'call:f{a:<|"|>x<|"|>}'}
    assert s.final_text() == text
    final = s.final_event("stop", None)
    # Every token id goes with exactly one event, in order; the structural ones with the text after them.
    assert [t for e in events + [final] for t in e.tokens] == ids
    assert final.result.tokens == ids and final.result.thinking == "Let me see."


def test_streams_yield_events_whose_tokens_are_the_result_tokens(tiny):
    _, g = tiny
    events = list(g.stream("hello", greedy=True, max_tokens=30))
    assert all(isinstance(e, Event) for e in events) and [e.done for e in events].count(True) == 1
    final = events[-1]
    assert final.done and final.stats is final.result.stats and final.parsed is final.result.parsed
    assert [t for e in events for t in e.tokens] == final.result.tokens and len(final.result.tokens) == 30
    assert "".join(str(e) for e in events).strip() == final.result.content.strip()
    assert {e.kind for e in events[:-1]} <= {"answer", "thinking", "tool_call"} and final.kind == "done"


def test_context_limits(tiny):
    _, g = tiny
    with pytest.raises(ContextLengthError, match="context allowed is 30 tokens"):
        g.generate("x" * 40, max_tokens=5, max_context=30)
    r = g.generate("x", greedy=True, max_tokens=500, max_context=40)  # room for only a few tokens: stop there
    assert r.finish_reason == "context" and r.stats.prompt_tokens + len(r.tokens) == 40


def test_options_are_checked(tiny):
    _, g = tiny
    for bad in (dict(top_p=0), dict(temperature=-1), dict(min_p=2), dict(max_tokens=0), dict(stop=[""])):
        with pytest.raises(InputError):
            g.generate("x", **bad)
    with pytest.raises(TypeError, match="temprature"):
        g.generate("x", temprature=0.5)


def test_every_result_carries_stats(tiny):
    _, g = tiny
    r = g.generate("hello", greedy=True, max_tokens=20)
    s = r.stats
    assert s.prompt_tokens > 10 and s.generated_tokens == len(r.tokens) == 20 and s.finish_reason == "length"
    assert s.prompt_tps > 0 and s.generation_tps > 0 and s.peak_memory_gb > 0
    assert "tok/s" in s.summary() and "peak memory" in s.summary()
    assert r.as_dict()["stats"]["generated_tokens"] == 20
