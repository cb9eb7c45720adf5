"""Hostile text: tool-call text that used to be dropped or crash the parser, chat templates that hang or blow up,
special-token strings inside message content, prompts too big to tokenize, and invalid UTF-8.

Every case that could run away is bounded in the test itself (a subprocess with a timeout and an address-space
limit), so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gemma_mlx.tools import MAX_NESTING, ToolCall, ToolCallError, parse_tool_calls, split_response

Q = '<|"|>'


def call(body: str) -> str:
    return f"<|tool_call>{body}<tool_call|>"


def run_bounded(code: str, timeout: float = 60, memory_gb: float = 2.0) -> str:
    """stdout of code run in a fresh interpreter under a timeout and an address-space limit (fails the test
    on a crash, a hang or a blow-up)."""
    limit = int(memory_gb * 2**30)
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# -- tool calls ----------------------------------------------------------------------------------------


def test_a_call_before_a_thought_closer_is_a_call_not_thinking():
    r = split_response(call("call:f{a:1}") + "<channel|>The answer<turn|>")
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("f", {"a": 1})]
    assert r.content == "The answer" and r.thinking == "" and not r.errors


def test_thought_markers_inside_a_string_argument_are_its_text():
    body = f"call:f{{s:{Q}a <channel|> b <|channel> c <turn|> d{Q}}}"
    r = split_response("<|channel>thought\nplan<channel|>" + call(body) + "done")
    assert [c.arguments for c in r.tool_calls] == [{"s": "a <channel|> b <|channel> c <turn|> d"}]
    assert (r.thinking, r.content) == ("plan", "done")


def test_a_call_inside_an_unclosed_thought_is_returned():
    r = split_response("<|channel>thought\nI need the weather. " + call(f"call:w{{city:{Q}Paris{Q}}}"))
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("w", {"city": "Paris"})]
    assert r.thinking == "I need the weather." and r.content == ""
    broken = split_response("<|channel>thought\nhm <|tool_call>call:w{city:")
    assert broken.tool_calls == [] and [e.raw for e in broken.errors] == ["<|tool_call>call:w{city:"]


def test_an_unclosed_call_ends_where_the_answer_ends():
    r = split_response("<|tool_call>call:f{a:1<turn|>\n<|turn>user\nmore<tool_call|>")
    assert [e.raw for e in r.errors] == ["<|tool_call>call:f{a:1"] and r.content == ""


def test_deep_nesting_is_a_reported_error_not_a_recursion_error():
    for depth in (MAX_NESTING - 1, MAX_NESTING + 1, 250, 5000):
        value = "[" * depth + "1" + "]" * depth
        (item,) = parse_tool_calls(call(f"call:f{{a:{value}}}"))
        if depth < MAX_NESTING:  # the arguments object is one level
            assert isinstance(item, ToolCall)
        else:
            assert isinstance(item, ToolCallError) and "nested deeper" in item.reason
            assert item.raw == call(f"call:f{{a:{value}}}")
    value = "{k:" * 250 + "1" + "}" * 250
    (item,) = parse_tool_calls(call(f"call:f{{a:{value}}}"))
    assert isinstance(item, ToolCallError) and "nested deeper" in item.reason


def test_huge_numbers_are_kept_exactly():
    big, neg = "7" * 5000, "-" + "3" * 4400
    (c,) = parse_tool_calls(call(f"call:f{{a:{big},b:{neg},c:1e999,d:{'9' * 400}.5,e:12}}"))
    assert c.arguments == {"a": big, "b": neg, "c": "1e999", "d": "9" * 400 + ".5", "e": 12}
    assert isinstance(c.arguments["e"], int)


def test_repeated_unclosed_openers_take_one_pass():
    # The quadratic scan took over 30 s on 1 MB; a linear one takes about a second. The subprocess's timeout
    # only guards against the quadratic behaviour coming back (2 MB: minutes), it measures nothing.
    out = run_bounded("""
        from gemma_mlx.tools import parse_tool_calls, split_response
        for unit in ("<|tool_call>", "<|tool_call>call:f{a:<|\\"|>", '<|tool_call>call:f{a:"x', "<|tool_call>call:f{"):
            text = unit * (2_000_000 // len(unit))
            n = text.count("<|tool_call>")
            items = parse_tool_calls(text)
            assert len(items) == n and all(type(i).__name__ == "ToolCallError" for i in items), unit
            assert "".join(i.raw for i in items) == text
            r = split_response(text + "<channel|>" * 1000 + "<|channel>" * 1000)
            assert len(r.errors) == n
        print("ok")
    """, timeout=120)
    assert out.strip() == "ok"
