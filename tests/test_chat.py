"""The Chat session and the Python API: the official multi-turn format, cache reuse across turns (also once the
ring has wrapped), thinking, tool rounds in one model turn, interruption, attachments, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma_mlx
from gemma_mlx import api
from gemma_mlx.cache import make_cache
from gemma_mlx.chat import Chat
from gemma_mlx.errors import ContextLengthError, InputError
from gemma_mlx.events import final_result
from gemma_mlx.cache import PromptCache
from gemma_mlx.tiny import write_demo_model

GREEDY = dict(greedy=True, max_tokens=24)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    """The tiny random Gemma 4 demo model: real chat template, byte tokenizer, window 16."""
    return gemma_mlx.load(write_demo_model(tmp_path_factory.mktemp("chat") / "tiny"))


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("ring_extra", [4, 256])
def test_turns_follow_the_template_reuse_the_cache_and_equal_fresh_runs(g, ring_extra):
    """ring_extra 4: the ring wraps and the answer is too long to roll back, so the checkpoint at the start of
    the model turn serves; 256: the answer is rolled back inside the ring. Either way a turn prefills only what
    the caches do not hold, and answers exactly as a fresh run on the whole conversation."""
    chat = Chat(g, system="Be brief.", **GREEDY)
    chat.cache = PromptCache(make_cache(g.config.text, ring_extra=ring_extra))
    generation_prompt = len(g.tokenizer.encode("<|turn>model\n<|channel>thought\n<channel|>"))
    held, head = [], 0  # what the caches hold after a turn; where its model turn starts
    for question in ("What is MLX?", "And Metal?", "Thanks!"):
        result = chat.ask(question)
        conversation = chat.history[:-1]
        ids = g.encode(g.render(conversation)).input_ids.tolist()
        assert result.stats.prompt_tokens == len(ids)
        assert result.tokens == g.generate(conversation, **GREEDY).tokens  # a fresh run, no cache
        if held:
            expected = common_prefix(held, ids) if ring_extra == 256 else head
            assert result.stats.reused_tokens == expected >= head  # the whole previous conversation
        head = len(ids) - generation_prompt
        # The last token goes through the model only when it is an EOS (the step after it is already queued).
        held = ids + (result.tokens if result.finish_reason == "stop" else result.tokens[:-1])
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3


def test_retry_after_the_ring_wrapped_repeats_the_answer(g):
    chat = Chat(g, **GREEDY)
    chat.cache = PromptCache(make_cache(g.config.text, ring_extra=2))
    first = chat.ask("Tell me something.")
    again = final_result(chat.retry())
    assert again.tokens == first.tokens and len(chat.messages) == 2
    head = g.render(chat.history[:1], add_generation_prompt=False)
    assert again.stats.reused_tokens == len(g.encode(head))  # the checkpoint: only the model turn re-runs


class Script:
    """Stands in for the engine: records the prompts it is given and answers with scripted text."""

    def __init__(self, monkeypatch, g, *replies):
        self.g, self.replies, self.prompts = g, list(replies), []
        monkeypatch.setattr(api, "stream_tokens", self)

    def __call__(self, model, prompt, opts, *, stats, **kw):
        self.prompts.append(self.g.tokenizer.decode(prompt.input_ids))
        stats.prompt_tokens, stats.finish_reason = len(prompt), "stop"
        for token in self.g.tokenizer.encode(self.replies.pop(0)):
            stats.generated_tokens += 1
            yield token


def test_thinking_is_off_by_default_switchable_per_request_and_kept_apart(g, monkeypatch):
    script = Script(monkeypatch, g, "Paris.<turn|>", "<|channel>thought\nThe user asks again.<channel|>Still Paris.<turn|>",
                    "Yes.<turn|>")
    chat = Chat(g)
    assert chat.ask("Capital of France?").content == "Paris."
    assert "<|think|>" not in script.prompts[0] and script.prompts[0].endswith(
        "<|turn>model\n<|channel>thought\n<channel|>")
    result = chat.ask("Sure?", enable_thinking=True)
    assert script.prompts[1].startswith("<bos><|turn>system\n<|think|>") and script.prompts[1].endswith(
        "<|turn>model\n")
    assert (result.thinking, result.content) == ("The user asks again.", "Still Paris.")
    assert chat.messages[-1] == {"role": "assistant", "content": "Still Paris.",
                                 "reasoning_content": "The user asks again."}
    chat.ask("OK.")
    # History in the official format: thought text is not replayed.
    assert "<|turn>model\nStill Paris.<turn|>\n<|turn>user\nOK.<turn|>" in script.prompts[2]
    assert script.prompts[2] == g.render(chat.history[:-1])


def test_tool_calls_are_parsed_answered_and_continue_the_same_turn(g, monkeypatch):
    script = Script(monkeypatch, g,
                    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
                    "It is 15 degrees.<turn|>", "You are welcome.<turn|>")
    chat = Chat(g, tools=[WEATHER])
    first = chat.ask("Weather in Paris?")
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert "<|tool>declaration:get_weather{" in script.prompts[0]
    with pytest.raises(InputError, match="called get_weather"):
        chat.ask_tool_results([{"name": "get_time", "response": {}}])
    second = chat.ask_tool_results([{"name": "get_weather", "response": {"temperature": 15}}])
    assert second.content == "It is 15 degrees."
    # The results go into the model's open turn; no new turn starts.
    assert script.prompts[1].endswith('<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}'
                                      "<tool_call|><|tool_response>response:get_weather{temperature:15}"
                                      "<tool_response|><|channel>thought\n<channel|>")
    chat.ask("Thanks")
    assert ("<tool_response|>It is 15 degrees.<turn|>\n<|turn>user\nThanks<turn|>" in script.prompts[2])
    assert script.prompts[2] == g.render(chat.history[:-1], tools=[WEATHER])
    with pytest.raises(InputError, match="no pending tool calls"):
        chat.ask_tool_results([{"name": "get_weather", "response": 1}])


def test_a_tool_call_that_does_not_parse_is_reported_with_its_raw_text(g, monkeypatch):
    Script(monkeypatch, g, "<|tool_call>call:get_weather{city:Paris<tool_call|><|tool_response>")
    result = Chat(g, tools=[WEATHER]).ask("Weather?")
    assert result.tool_calls == [] and len(result.tool_errors) == 1
    assert result.tool_errors[0].raw == "<|tool_call>call:get_weather{city:Paris<tool_call|>"


def test_stopped_and_failed_turns(g):
    chat = Chat(g, max_tokens=200, seed=0)
    polls = iter(range(1000))
    partial = chat.ask("Go on and on.", should_stop=lambda: next(polls) >= 4)
    assert partial.finish_reason == "interrupted" and 0 < len(partial.tokens) < 200
    # What was said is kept, marked as cut off, and the next turn sees it as the model's reply.
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1] == {"role": "assistant", "content": partial.content, "interrupted": True}
    unanswered = chat.ask("Again?", should_stop=lambda: True)
    assert unanswered.tokens == [] and len(chat.messages) == 2  # stopped before a word: the message is dropped
    chat.max_context = 40
    with pytest.raises(ContextLengthError):
        chat.ask("This no longer fits.")
    assert len(chat.messages) == 2
    chat.max_context = None
    after = chat.ask("Still there?")
    assert after.stats.reused_tokens > 0 and len(chat.messages) == 4
    assert "interrupted" not in chat.messages[3]
    chat.undo()
    assert len(chat.messages) == 2
    chat.reset()
    assert chat.messages == [] and chat.last is None


def test_a_hard_interrupt_keeps_what_was_streamed_marked(g):
    """A second Ctrl-C (KeyboardInterrupt) ends the turn at once: the text streamed so far is kept, marked, and
    the caches start afresh (it may have landed between two layers' writes)."""
    chat = Chat(g, max_tokens=200, seed=0)
    polls = iter(range(1000))

    def hard_stop():
        if next(polls) >= 6:
            raise KeyboardInterrupt
        return False

    streamed = []
    with pytest.raises(KeyboardInterrupt):
        for event in chat.send("Go on and on.", should_stop=hard_stop):
            streamed += event.tokens
    assert streamed and chat.last.tokens == streamed and chat.last.finish_reason == "interrupted"
    assert chat.messages[-1] == {"role": "assistant", "content": chat.last.content, "interrupted": True}
    assert chat.cache.keys == [] and chat.cache.offset == 0
    after = chat.ask("Still there?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2 and after.tokens
    # Before its first token, a hard interrupt drops the message, as a soft one does.
    with pytest.raises(KeyboardInterrupt):
        list(chat.send("Once more.", should_stop=lambda: (_ for _ in ()).throw(KeyboardInterrupt)))
    assert len(chat.messages) == 4


def test_attachments_reuse_and_save_load(g, fixtures_dir, tmp_path):
    image = str((fixtures_dir / "media" / "chelsea.png").resolve())  # attachments are kept by resolved path
    audio = str(fixtures_dir / "media" / "speech_16k.flac")
    chat = Chat(g, system="Describe.", **GREEDY)
    first = chat.ask("What is this?", images=[image], audios=[audio])
    second = chat.ask("And the colours?")
    user = chat.messages[0]["content"]
    # Stored as the absolute, resolved path (a saved chat then loads from any directory, and ../shared may be a
    # symlink), so that is what to expect, not the spelling given.
    assert [p["type"] for p in user] == ["image", "audio", "text"] and user[0]["path"] == str(Path(image).resolve())
    # Everything up to the previous model turn, the image and the speech included, came from the cache.
    first_ids = g.encode(g.render(chat.history[:2]), chat._media[0]).input_ids.tolist()
    second_ids = g.encode(g.render(chat.history[:4]), chat._media[0]).input_ids.tolist()
    held = first_ids + first.tokens[: len(first.tokens) - (first.finish_reason != "stop")]
    assert second.stats.reused_tokens == common_prefix(held, second_ids)
    assert second.stats.reused_tokens > max(i for i, t in enumerate(first_ids) if t in g.media_tokens.ids.values())
    assert second.tokens == g.generate(chat.history[:-1], images=[image], audios=[audio], **GREEDY).tokens
    path = tmp_path / "conversation.json"
    chat.save(path)
    loaded = Chat.load(g, path, **GREEDY)
    assert loaded.messages == chat.messages and loaded.system == "Describe."
    text = g.render(loaded.history)
    assert g.encode(text, loaded._media[0]).keys == g.encode(text, chat._media[0]).keys  # same media, same keys
    assert loaded.ask("More?").tokens == chat.ask("More?").tokens
    # Media given as data has no path to come back from: loading says so and goes on without it.
    chat = Chat(g, **GREEDY)
    chat.ask("And this?", images=[np.zeros((64, 64, 3), np.uint8)])
    chat.save(path)
    with pytest.warns(UserWarning, match="cannot be attached again"):
        loaded = Chat.load(g, path)
    assert [p["type"] for p in loaded.messages[0]["content"]] == ["text"]
    with pytest.raises(InputError, match="not a saved conversation"):
        Chat.load(g, tmp_path / "missing.json")


def test_python_api(g):
    ids = np.array([[2, 105, 40, 41]])
    assert g(ids).shape == (1, 4, g.config.text.vocab_size)  # the raw forward
    result = gemma_mlx.generate(g, "Hello", **GREEDY)
    events = list(gemma_mlx.stream_generate(str(g.model_dir), "Hello", **GREEDY))
    assert all(isinstance(e, gemma_mlx.Event) for e in events) and events[-1].done
    assert all(e.kind == "answer" for e in events[:-1])
    assert "".join(map(str, events)).strip() == result.content
    assert events[-1].result.tokens == result.tokens
    assert json.loads(json.dumps(result.as_dict()))["finish_reason"] == "length"
    cache = g.new_cache()
    g.generate("Hello", cache=cache, **GREEDY)
    assert g.generate("Hello", cache=cache, **GREEDY).stats.reused_tokens == result.stats.prompt_tokens - 1
