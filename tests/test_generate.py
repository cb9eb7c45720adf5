"""Generation against transformers' greedy generate, cache reuse across turns (also past the window), sampling."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.api import load
from gemma_mlx.cache import make_cache
from gemma_mlx.chat import Chat
from gemma_mlx.errors import ContextLengthError
from gemma_mlx.generate import PromptCache, SamplingOptions, stream_tokens
from gemma_mlx.tiny import MEDIA_TOKEN_STRINGS
from gemma_mlx.tokenizer import write_byte_tokenizer
from hf_tiny import TOKENS, VOCAB


@pytest.fixture(scope="module")
def tiny(tiny_gemma4, tmp_path_factory, fixtures_dir):
    """(torch model, our Gemma) over the tiny checkpoint, given a byte tokenizer and the real chat template."""
    hf, src = tiny_gemma4
    d = tmp_path_factory.mktemp("tiny_chat")
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


# Random weights happily sample media placeholder ids, which a later prompt could not re-read without media.
MEDIA_IDS = sorted(TOKENS.values())
GREEDY = SamplingOptions(temperature=0.0, max_tokens=120, eos_ids=(), suppress_ids=tuple(MEDIA_IDS))


def ours(g, ids, opts=GREEDY, **kw):
    return list(stream_tokens(g.model, np.array(ids), opts=opts, **kw))


def test_greedy_equals_transformers_past_the_window(tiny):
    hf, g = tiny
    prompt = [2, 105] + [int(i) for i in np.random.RandomState(0).randint(5, 400, 20)]
    want = hf_greedy(hf, prompt, 120)
    assert ours(g, prompt) == want  # 120 tokens, the window is 8


def test_greedy_with_prompt_cache_reuse_equals_transformers(tiny):
    hf, g = tiny
    cache = PromptCache(make_cache(g.config.text, ring_extra=4))  # rolling back far needs the checkpoint
    p1 = [2, 105] + list(range(200, 230))
    first = ours(g, p1, cache=cache, checkpoint_at=len(p1) - 3)
    p2 = p1[:-3] + [300, 301] + first[:50] + [106, 105] + list(range(120, 140))  # history re-rendered
    want = hf_greedy(hf, p2, 110)
    opts = SamplingOptions(temperature=0.0, max_tokens=110, eos_ids=(), suppress_ids=tuple(MEDIA_IDS))
    from gemma_mlx.generate import GenerationStats

    stats = GenerationStats()
    got = list(stream_tokens(g.model, np.array(p2), opts=opts, cache=cache, stats=stats))
    assert stats.reused_tokens == len(p1) - 3  # restored the checkpoint although the ring had wrapped
    assert got == want
    stats = GenerationStats()  # an edit of the last few tokens rolls back within the ring (extra 4)
    edited = p2 + got[:106] + [7]
    again = list(stream_tokens(g.model, np.array(edited), opts=opts, cache=cache, stats=stats))
    assert stats.reused_tokens == len(p2) + 106 and again == hf_greedy(hf, edited, 110)


def test_greedy_with_an_image_equals_transformers_generate(tiny):
    hf, g = tiny
    rng = np.random.RandomState(3)
    px = rng.rand(1, 4, 6912).astype(np.float32)
    pos = np.array([[[0, 0], [1, 0], [0, 1], [1, 1]]])
    prompt = [2, 105, 40, TOKENS["boi_token_id"]] + [TOKENS["image_token_id"]] * 4 + [TOKENS["eoi_token_id"], 41]
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]])
    want = hf_greedy(hf, prompt, 40, pixel_values=torch.tensor(px), image_position_ids=torch.tensor(pos),
                     mm_token_type_ids=torch.tensor(types))
    g.model.vision_mask = "all"  # transformers' generate with a dynamic cache uses its plain-forward masks
    try:
        got = ours(g, prompt, SamplingOptions(temperature=0.0, max_tokens=40, eos_ids=(), suppress_ids=tuple(MEDIA_IDS)),
                   media=dict(pixel_values=px, image_position_ids=pos))
    finally:
        g.model.vision_mask = "sliding"
    assert got == want


def test_seeded_sampling_is_reproducible_and_suppressed_ids_never_appear(tiny):
    _, g = tiny
    opts = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=7, max_tokens=200, eos_ids=(),
                           suppress_ids=tuple(range(256, 512)))
    a, b = ours(g, [2, 105, 50], opts), ours(g, [2, 105, 50], opts)
    assert a == b and len(set(a)) > 5
    assert all(t < 256 for t in a)


def test_stops_on_eos_and_stop_strings_and_reports_stats(tiny):
    _, g = tiny
    free = ours(g, [2, 105, 50], SamplingOptions(temperature=0.0, max_tokens=30, eos_ids=()))
    eos = free[5]
    stopped = ours(g, [2, 105, 50], SamplingOptions(temperature=0.0, max_tokens=30, eos_ids=(eos,)))
    assert stopped == free[: free.index(eos) + 1]
    result = g.generate("hello", greedy=True, max_tokens=20)
    s = result.stats
    assert s.prompt_tokens > 10 and s.generated_tokens == len(result.tokens) and s.generation_tps > 0
    assert s.peak_memory_gb > 0 and "tok/s" in s.summary()
    text = g.generate("hello", greedy=True, max_tokens=20).text
    if len(text) > 4:
        cut = g.generate("hello", greedy=True, max_tokens=20, stop=[text[2:4]])
        assert cut.finish_reason == "stop_string" and cut.text == text[: text.index(text[2:4])]


def test_context_limit_is_a_clear_error(tiny):
    _, g = tiny
    with pytest.raises(ContextLengthError, match="context allowed is 30 tokens"):
        g.generate("x" * 40, max_tokens=5, max_context=30)


def test_chat_reuses_the_cache_past_the_window_and_matches_a_fresh_run(tiny):
    _, g = tiny
    chat = Chat(g, system="brief", greedy=True, max_tokens=40)
    chat.cache = PromptCache(make_cache(g.config.text, ring_extra=2))
    first = chat.ask("first question")
    second = chat.ask("second one")
    assert second.stats.reused_tokens > first.stats.prompt_tokens - 20  # only the new turn was prefilled
    fresh = Chat(g, system="brief", greedy=True, max_tokens=40)
    fresh.messages = [dict(m) for m in chat.messages[:-1]]
    fresh._media = list(chat._media)
    again = _last_result(fresh._stream(add_generation_prompt=True))
    assert again.tokens == second.tokens
    retried = _last_result(chat.retry())
    assert retried.tokens == second.tokens and retried.stats.reused_tokens > 0


def test_chat_save_load_and_tool_round_trip(tiny, tmp_path):
    _, g = tiny
    tools = [{"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    chat = Chat(g, system="s", tools=tools, enable_thinking=True, greedy=True, max_tokens=10)
    chat.ask("hi")
    chat.messages[-1]["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    result = _last_result(chat.send_tool_results([{"name": "f", "response": {"ok": True}}]))
    assert result is not None and chat.messages[-1]["tool_responses"][0]["name"] == "f"
    chat.save(tmp_path / "c.json")
    loaded = Chat.load(g, tmp_path / "c.json", greedy=True, max_tokens=10)
    assert loaded.messages == chat.messages and loaded.enable_thinking and loaded.tools == tools


def _last_result(stream):
    result = None
    for item in stream:
        result = item
    return result
