"""Gemma 4 tool calls: lossless on what the real templates write, lenient (and saying so) on model slips, loud on
anything else; tool-response text equal to the templates'; the response splitter; and mlx-lm's parser beside ours."""

from __future__ import annotations

import random
import shutil

import pytest

from conftest import TOKENIZER
from gemma_mlx.template import ChatTemplate
from gemma_mlx.tools import (
    ToolCall,
    ToolCallError,
    format_tool_call,
    format_tool_response,
    format_value,
    parse_tool_calls,
    split_response,
)

FIXTURE = TOKENIZER
Q = '<|"|>'

ARGUMENTS = [
    {"city": "Paris"},
    {"query": 'braces {inside}, commas, colons: and "quotes" \'too\' <b> [x]', "limit": 5, "ratio": -0.25,
     "tiny": 1.5e-05, "huge": 1e+20, "neg_exp": -2.5e-7, "zero": 0},
    {"flags": [True, False, None], "nested": {"a": {"b": [1, {"c": "d"}]}, "empty": {}}, "list": [], "s": ""},
    {"Zeta": 1, "alpha": 2, "Beta": {"y": "é 日本 😀", "X": "line\nbreak\ttab"}},
    {"first name": "Ada", "dotted.key": 1, "dash-key": [[1, 2], [3]]},
]


@pytest.fixture(scope="module", params=("chat_template.jinja", "chat_template_31b_it.jinja"))
def template(request, tmp_path_factory) -> ChatTemplate:
    d = tmp_path_factory.mktemp("template")
    shutil.copy(FIXTURE / "tokenizer_config.json", d)
    shutil.copy(FIXTURE / request.param, d / "chat_template.jinja")
    return ChatTemplate.from_dir(d)


def call(body: str) -> str:
    return f"<|tool_call>{body}<tool_call|>"


def calls_only(items):
    assert all(isinstance(i, ToolCall) for i in items), items
    return [(c.name, c.arguments) for c in items]


def render_calls(template, calls) -> str:
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                                                     for n, a in calls]}]
    return template.render(messages, add_generation_prompt=False)


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_round_trip_through_the_real_template(template, arguments):
    calls = [("mcp:search:web", arguments), ("a.b-c", {"k": 1})]
    text = render_calls(template, calls)
    assert "".join(call(format_tool_call(n, a)) for n, a in calls) in text  # our writer equals the template's
    items = parse_tool_calls(text, strict=True)
    assert calls_only(items) == calls and all(not c.repairs for c in items)
    assert items[0].raw == call(format_tool_call(*calls[0]))


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab {}[],:"\'<>|\n\\é😀=') for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([rng.uniform(-1e3, 1e3), rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{rng.randint(0, 99)}_{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_random_arguments_round_trip():
    rng = random.Random(0)
    for _ in range(300):
        args = {f"arg{i}": random_value(rng) for i in range(rng.randint(0, 5))}
        (parsed,) = parse_tool_calls(call(format_tool_call("f", args)), strict=True)
        assert isinstance(parsed, ToolCall) and parsed.arguments == args


def test_spacing_several_calls_and_names():
    spaced = f"call:get_weather{{ city : {Q}Paris, FR{Q} ,\n days: 3 , opts: {{ a: [1 , 2] }} }}"
    text = ("Let me check. " + call(spaced)
            + call("call:a.b-c{x:[1, 2 , 3]}") + " and " + call("call:mcp:server:tool{}") + " done")
    assert calls_only(parse_tool_calls(text, strict=True)) == [
        ("get_weather", {"city": "Paris, FR", "days": 3, "opts": {"a": [1, 2]}}), ("a.b-c", {"x": [1, 2, 3]}),
        ("mcp:server:tool", {})]
    r = split_response(text)
    assert r.content == "Let me check.  and  done" and len(r.tool_calls) == 3 and not r.errors


@pytest.mark.parametrize("body, arguments, repairs", [
    ("call:f{city:'Paris', n:'it\\'s'}", {"city": "Paris", "n": "it's"}, ["'single-quoted' string"]),
    ('call:f{"city": "Par\\"is", "n": 2}', {"city": 'Par"is', "n": 2}, ["quoted key", '"double-quoted" string']),
    ("call:f{a=1, b = True}", {"a": 1, "b": True}, ["key=value", "Python True/False"]),
    ("call:f{a:[1,2,], b:{c:3,},}", {"a": [1, 2], "b": {"c": 3}}, ["trailing comma"]),
])
def test_lenient_repairs_are_reported_and_strict_rejects_them(body, arguments, repairs):
    (lenient,) = parse_tool_calls(call(body))
    assert isinstance(lenient, ToolCall) and lenient.arguments == arguments and lenient.repairs == repairs
    (strict,) = parse_tool_calls(call(body), strict=True)
    assert isinstance(strict, ToolCallError) and "strict mode" in strict.reason and strict.raw == call(body)


@pytest.mark.parametrize("body, reason", [
    ("call:f{city: Paris}", "expected a value"),  # a bare word: where would the string end?
    (f"call:f{{city:{Q}Paris}}", "unterminated string"),
    ("call:f{a:1,a:2}", "duplicate key 'a'"),
    ("call:f{a:1} trailing", "unexpected text after the arguments"),
    ("call:{a:1}", "expected a tool name"),
    ("call:f x{a:1}", "expected '{' after the tool name"),
    ("f{a:1}", "expected 'call:'"),
    ("call:f{a:1 b:2}", "expected ',' or '}'"),
    ("call:f{a:[1 2]}", "expected ',' or ']'"),
    ("call:f{a:1.2.3}", "expected ',' or '}'"),
    ("call:f{:1}", "expected a key"),
    ("call:f{a 1}", "expected ':' after key 'a 1'"),
    ("call:f{a:'x}", "unterminated single-quoted string"),
])
def test_malformed_calls_keep_their_raw_text(body, reason):
    items = parse_tool_calls("before " + call(body) + " " + call("call:ok{v:1}"))
    assert len(items) == 2 and calls_only(items[1:]) == [("ok", {"v": 1})]  # a bad call never hides a good one
    assert isinstance(items[0], ToolCallError) and reason in items[0].reason and items[0].raw == call(body)


def test_unclosed_calls_are_errors_not_drops():
    text = "<|tool_call>call:f{a:1" + call("call:g{b:2}") + " tail <|tool_call>call:h{c:3}"
    first, second, third = parse_tool_calls(text)
    assert first == ToolCallError("<|tool_call>call:f{a:1", "tool call is not closed with <tool_call|>")
    assert calls_only([second]) == [("g", {"b": 2})]
    assert third == ToolCallError("<|tool_call>call:h{c:3}", "tool call is not closed with <tool_call|>")
    r = split_response(text + "<|tool_response>")
    assert r.content == "tail" and [e.raw for e in r.errors] == [first.raw, third.raw]


def test_close_tag_inside_a_string_is_text():
    (c,) = parse_tool_calls(call(f"call:f{{s:{Q}a <tool_call|> b{Q}}}"))
    assert c.arguments == {"s": "a <tool_call|> b"}


@pytest.mark.parametrize("result", [
    {"temperature": 21, "sky": "clear, {mild}", "Wind": {"kph": 5.5, "gusts": None}, "ok": True},
    ["a", 1, {"b": False}], "plain text: {not json}", 42, -0.5, None, True, {},
])
def test_format_tool_response_equals_the_template(template, result):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_w",
                                                                                       "arguments": {}}}],
                 "tool_responses": [{"name": "get_w", "response": result}]}]
    text = template.render(messages, add_generation_prompt=False)
    assert f"<|tool_response>{format_tool_response('get_w', result)}<tool_response|>" in text
    if "format_tool_response_block" in template.source and isinstance(result, str):  # OpenAI-style tool message
        messages = [messages[0], {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "get_w", "arguments": {}}}]}, {"role": "tool", "tool_call_id": "1", "content": result}]
        assert format_tool_response("get_w", result) in template.render(messages)


def test_format_value_matches_jinja_dictsort_and_numbers():
    assert format_value({"b": 1, "A": 2, "a": 3}) == "{A:2,a:3,b:1}"  # case-insensitive, stable
    assert format_value([1e-05, 1e20, 0.1, -3, None, False]) == "[1e-05,1e+20,0.1,-3,None,false]"
    assert format_tool_response("t", "x") == f"response:t{{value:{Q}x{Q}}}"


def test_split_response():
    r = split_response(f"<|channel>thought\nThe user wants weather.\n<channel|>Sure. {call('call:w{c:1}')}"
                       "<|tool_response>")
    assert (r.thinking, r.content, [c.name for c in r.tool_calls], r.errors) == (
        "The user wants weather.", "Sure.", ["w"], [])
    plain = split_response(" Just an answer. <turn|>\n<|turn>user\nignored")
    assert plain.thinking is None and plain.content == "Just an answer." and not plain.tool_calls
    assert split_response("Done<eos>junk").content == "Done"
    cut = split_response("<|channel>thought\nstill thinking when the tokens ran out")
    assert cut.thinking == "still thinking when the tokens ran out" and cut.content == ""
    primed = split_response("thought opened by the prompt<channel|>Answer<turn|>")
    assert (primed.thinking, primed.content) == ("thought opened by the prompt", "Answer")
    empty = split_response("<|channel>thought\n<channel|>Hi<turn|>")
    assert (empty.thinking, empty.content) == ("", "Hi")
    bad = split_response(call("call:f{a:}") + "ok")
    assert bad.content == "ok" and bad.errors[0].raw == call("call:f{a:}") and not bad.tool_calls


def test_tool_call_as_dict_renders_back_to_the_same_text(template):
    text = render_calls(template, [("mcp:x:y", ARGUMENTS[2])])
    (c,) = parse_tool_calls(text)
    again = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [c.as_dict()]}],
                            add_generation_prompt=False)
    assert again == text


# The cases anchors.md §1.3 / §6 item 6 report mlx-lm 0.32.2 failing on, and what we return instead.
MLX_LM_FAILURES = [
    ("call:f{a:1, b:2}", ("f", {"a": 1, "b": 2})),                      # a space after the comma
    ("call:google:mcp:x{q:1}", ("google:mcp:x", {"q": 1})),              # a namespaced name
    ("call:f{city:'Paris'}", ("f", {"city": "Paris"})),                  # single quotes (lenient, reported)
    ("call:f{a=1}", ("f", {"a": 1})),                                     # key=value (lenient, reported)
    # Two more the real template itself writes: a null argument (rendered "None") and a key that is not \w+.
    ("call:f{a:None}", ("f", {"a": None})),
    ("call:f{dash-key:1}", ("f", {"dash-key": 1})),
]


@pytest.mark.parametrize("body, expected", MLX_LM_FAILURES)
def test_cases_mlx_lm_gets_wrong(body, expected):
    (ours,) = parse_tool_calls(call(body))
    assert calls_only([ours]) == [expected]
    import mlx_lm
    from mlx_lm.tool_parsers import gemma4

    if mlx_lm.__version__ == "0.32.2":  # the version anchors.md measured; newer ones may have fixed it
        try:
            theirs = gemma4.parse_tool_call(call(body))
        except Exception:
            theirs = None
        assert theirs is None or (theirs["name"], theirs["arguments"]) != expected
