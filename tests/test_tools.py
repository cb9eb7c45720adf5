"""Tool-call parsing: lossless on what the real template writes, and loud about anything else."""

from __future__ import annotations

import pytest

from gemma_mlx.template import ChatTemplate
from gemma_mlx.tools import parse_tool_calls, split_response

Q = '<|"|>'


def call(body: str) -> str:
    return f"<|tool_call>{body}<tool_call|>"


@pytest.mark.parametrize("arguments", [
    {"city": "Paris"},
    {"query": 'braces {inside}, commas, colons: and "quotes"', "limit": 5, "ratio": -0.25, "big": 1.5e-3},
    {"flags": [True, False, None], "nested": {"a": {"b": [1, {"c": "d"}]}, "empty": {}}, "list": []},
])
def test_round_trip_through_the_real_template(fixtures_dir, arguments):
    template = ChatTemplate.from_dir(fixtures_dir / "gemma4-tokenizer")
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                    "name": "mcp:search:web", "arguments": arguments}}]}]
    text = template.render(messages, add_generation_prompt=False)
    calls, errors, _ = parse_tool_calls(text)
    assert not errors
    assert [(c.name, c.arguments) for c in calls] == [("mcp:search:web", arguments)]


def test_spacing_several_calls_and_names():
    text = ("Let me check. " + call(f"call:get_weather{{city: {Q}Paris, FR{Q}, days: 3}}")
            + call(f"call:a.b-c{{x:[1, 2 , 3]}}") + " done")
    calls, errors, rest = parse_tool_calls(text)
    assert not errors and rest == "Let me check.  done"
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris, FR", "days": 3}), ("a.b-c", {"x": [1, 2, 3]})]


@pytest.mark.parametrize("body, reason", [
    ("call:f{city: 'Paris'}", "expected a value"),
    (f"call:f{{city:{Q}Paris}}", "unterminated string"),
    ("call:f{a:1,a:2}", "duplicate key"),
    ("call:f{a:1} trailing", "unexpected text"),
    ("call:{a:1}", "invalid tool name"),
    ("f{a:1}", "expected 'call:'"),
])
def test_malformed_calls_are_reported_with_raw_text(body, reason):
    calls, errors, _ = parse_tool_calls("before " + call(body) + " " + call("call:ok{v:1}"))
    assert [c.name for c in calls] == ["ok"]  # a bad call never hides a good one
    assert len(errors) == 1 and reason in errors[0].reason and errors[0].raw == call(body)


def test_unclosed_call_is_an_error_not_a_drop():
    calls, errors, _ = parse_tool_calls("<|tool_call>call:f{a:1}")
    assert not calls and errors[0].raw == "<|tool_call>call:f{a:1}" and "not closed" in errors[0].reason


def test_split_response_separates_thought_calls_and_answer():
    text = f"<|channel>thought\nThe user wants weather.<channel|>Sure. {call('call:w{c:1}')}<|tool_response>"
    r = split_response(text)
    assert r.thinking == "The user wants weather." and r.content == "Sure."
    assert [c.name for c in r.tool_calls] == ["w"] and not r.errors
    plain = split_response("Just an answer.<turn|>")
    assert plain.thinking is None and plain.content == "Just an answer." and not plain.tool_calls
