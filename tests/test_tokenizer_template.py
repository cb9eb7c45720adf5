"""The real Gemma 4 tokenizer and chat templates: our output equals transformers' string for string, id for id."""

from __future__ import annotations

import shutil

import pytest

from gemma_mlx.errors import TemplateError
from gemma_mlx.template import ChatTemplate
from gemma_mlx.tokenizer import Tokenizer, write_byte_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "nullable": True},
                "where": {"type": "object", "description": "Coordinates",
                          "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                          "required": ["lat"]},
                "days": {"type": "array", "items": {"type": "integer"}},
            },
            "required": ["city"],
        },
    },
}

CHATS = {
    "single": [{"role": "user", "content": "Hello there!"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "media_parts": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this, then the sound."}, {"type": "audio"}]}],
    "tool_call_and_response": [
        {"role": "user", "content": "Weather in Paris?"},
        # Gemma's native form (both template revisions read it): results ride on the model turn.
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris", "where": {"lat": 48.85}}}}],
         "tool_responses": [{"name": "get_weather", "response": {"temperature": 21, "sky": "clear, {mild}"}}]},
    ],
    "thought_history": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Bye"},
    ],
}


@pytest.fixture(scope="module")
def gemma_tok(fixtures_dir):
    return Tokenizer.from_dir(fixtures_dir / "gemma4-tokenizer")


@pytest.fixture(scope="module", params=["chat_template.jinja", "chat_template_31b_it.jinja"])
def both_templates(request, fixtures_dir, tmp_path_factory):
    """(our template, transformers tokenizer) over a copy of the fixture dir using one template file."""
    from transformers import PreTrainedTokenizerFast

    src = fixtures_dir / "gemma4-tokenizer"
    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    shutil.copy(src / request.param, d / "chat_template.jinja")
    hf = PreTrainedTokenizerFast.from_pretrained(d)
    ours = ChatTemplate.from_dir(d, special_tokens={"bos_token": "<bos>", "eos_token": "<eos>"})
    return ours, hf


def test_46_reference_tokenization_cases(gemma_tok, fixtures_dir):
    d = fixtures_dir / "gemma4-tokenizer"
    inputs = d.joinpath("tokenization_cases.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = d.joinpath("tokenization_cases.out").read_text().split("\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    cases = [c for c in inputs]
    assert len(cases) == 46, len(cases)
    for text, expected in zip(cases, outputs):
        want = [int(x) for x in expected.split()]
        assert gemma_tok.encode(text) == want, repr(text)


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("thinking", [False, True])
def test_template_equals_transformers(both_templates, gemma_tok, name, thinking):
    ours, hf = both_templates
    tools = [WEATHER_TOOL] if name.startswith("tool") or name == "single" else None
    kwargs = {"enable_thinking": True} if thinking else {}
    want = hf.apply_chat_template(CHATS[name], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    got = ours.render(CHATS[name], tools=tools, add_generation_prompt=True, enable_thinking=thinking)
    assert got == want
    ids = gemma_tok.encode(got)
    assert ids == hf(want, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1  # the template writes <bos>; no second one


def test_non_thinking_prompt_ends_with_an_empty_thought_channel(both_templates):
    ours, _ = both_templates
    text = ours.render(CHATS["single"])
    assert text.startswith("<bos><|turn>user\nHello there!<turn|>\n<|turn>model\n")
    if "channel" in ours.source:
        assert text.endswith("<|turn>model\n<|channel>thought\n<channel|>") or text.endswith("<|turn>model\n")


def test_template_errors_are_typed(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.from_dir(tmp_path)


def test_streaming_detokenizer_is_utf8_safe(gemma_tok):
    text = "Grüße 😀 日本語 — ½ \n\tend"
    ids = gemma_tok.encode(text)
    det = gemma_tok.detokenizer()
    pieces = [det.add_token(i) for i in ids] + [det.finalize()]
    assert "".join(pieces) == text == gemma_tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_byte_tokenizer_round_trips_with_specials(tmp_path):
    media = {"<|image>": 500, "<image|>": 501, "<|image|>": 502}
    write_byte_tokenizer(tmp_path, media, vocab_size=512)
    tok = Tokenizer.from_dir(tmp_path)
    text = "<bos><|turn>user\nGrüße 😀<|image|><turn|>\n"
    ids = tok.encode(text)
    assert ids[:2] == [2, 105] and 502 in ids and ids[-2] == 106
    assert max(ids) < 512 and tok.decode(ids) == text
