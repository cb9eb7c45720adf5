"""Gemma 4's tool-call syntax and the split of a model turn into thought, tool calls and answer.

A call looks like ``<|tool_call>call:NAME{key:value,...}<tool_call|>``: keys are bare, strings sit between
``<|"|>`` delimiters (and may hold braces, commas, colons and quotes), numbers and true/false/null are bare,
objects and lists nest. A call that does not parse is returned as a ``ToolCallError`` carrying the raw text:
nothing is dropped or half-parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_DELIM = '<|"|>'
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
TURN_END, RESPONSE_OPEN = "<turn|>", "<|tool_response>"
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][\w.\-:]*")
_KEY = re.compile(r"[^\s{}\[\],:]+")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    raw: str = ""


@dataclass
class ToolCallError:
    raw: str
    reason: str


@dataclass
class ParsedResponse:
    """A model turn taken apart: thought text, the answer, tool calls, and anything unparseable."""

    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def fail(self, what: str):
        raise ValueError(f"{what} at offset {self.i}: {self.text[self.i:self.i + 20]!r}")

    def skip_ws(self):
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def expect(self, token: str):
        self.skip_ws()
        if not self.text.startswith(token, self.i):
            self.fail(f"expected {token!r}")
        self.i += len(token)

    def value(self) -> Any:
        self.skip_ws()
        t = self.text
        if t.startswith(STRING_DELIM, self.i):
            end = t.find(STRING_DELIM, self.i + len(STRING_DELIM))
            if end < 0:
                self.fail("unterminated string")
            s = t[self.i + len(STRING_DELIM):end]
            self.i = end + len(STRING_DELIM)
            return s
        if t.startswith("{", self.i):
            return self.obj()
        if t.startswith("[", self.i):
            self.i += 1
            items = []
            self.skip_ws()
            if t.startswith("]", self.i):
                self.i += 1
                return items
            while True:
                items.append(self.value())
                self.skip_ws()
                if t.startswith(",", self.i):
                    self.i += 1
                elif t.startswith("]", self.i):
                    self.i += 1
                    return items
                else:
                    self.fail("expected ',' or ']'")
        # The real template writes a null argument as Python's "None".
        for word, val in (("true", True), ("false", False), ("null", None), ("None", None)):
            if t.startswith(word, self.i):
                self.i += len(word)
                return val
        m = _NUMBER.match(t, self.i)
        if m:
            self.i = m.end()
            s = m.group()
            return float(s) if any(c in s for c in ".eE") else int(s)
        self.fail("expected a value")

    def obj(self) -> dict:
        self.expect("{")
        out: dict[str, Any] = {}
        self.skip_ws()
        if self.text.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.skip_ws()
            if self.text.startswith(STRING_DELIM, self.i):
                key = self.value()
            else:
                m = _KEY.match(self.text, self.i)
                if not m:
                    self.fail("expected a key")
                key, self.i = m.group(), m.end()
            self.expect(":")
            if key in out:
                self.fail(f"duplicate key {key!r}")
            out[key] = self.value()
            self.skip_ws()
            if self.text.startswith(",", self.i):
                self.i += 1
            elif self.text.startswith("}", self.i):
                self.i += 1
                return out
            else:
                self.fail("expected ',' or '}'")


def parse_call(body: str) -> ToolCall:
    """The call in ``call:NAME{...}`` (the text between the call tags); raises ValueError if malformed."""
    p = _Parser(body)
    p.expect("call:")
    # Namespaced names (mcp:server:tool) contain colons: the name runs up to the argument brace.
    brace = body.find("{", p.i)
    if brace < 0:
        p.fail("expected '{' after the tool name")
    name = body[p.i:brace].strip()
    if not _NAME.fullmatch(name):
        p.fail(f"invalid tool name {name!r}")
    p.i = brace
    args = p.obj()
    p.skip_ws()
    if p.i != len(body):
        p.fail("unexpected text after the arguments")
    return ToolCall(name=name, arguments=args, raw=body)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[ToolCallError], str]:
    """(calls, errors, remaining text) for every ``<|tool_call>…<tool_call|>`` in text."""
    calls, errors, rest = [], [], []
    pos = 0
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            rest.append(text[pos:])
            break
        rest.append(text[pos:start])
        end = text.find(CALL_CLOSE, start)
        if end < 0:
            errors.append(ToolCallError(raw=text[start:], reason="tool call is not closed with <tool_call|>"))
            break
        body = text[start + len(CALL_OPEN):end]
        try:
            calls.append(parse_call(body))
        except ValueError as e:
            errors.append(ToolCallError(raw=text[start:end + len(CALL_CLOSE)], reason=str(e)))
        pos = end + len(CALL_CLOSE)
    return calls, errors, "".join(rest)


def split_response(text: str) -> ParsedResponse:
    """Thought channel, tool calls and answer of a generated model turn (special tokens kept in text)."""
    thinking = None
    body = text
    for end in (TURN_END, RESPONSE_OPEN):
        if end in body:
            body = body[: body.index(end)]
    if THOUGHT_OPEN in body:
        start = body.index(THOUGHT_OPEN)
        close = body.find(THOUGHT_CLOSE, start)
        inner = body[start + len(THOUGHT_OPEN): close if close >= 0 else len(body)]
        thinking = inner.removeprefix("thought").removeprefix("\n")
        body = body[:start] + (body[close + len(THOUGHT_CLOSE):] if close >= 0 else "")
    calls, errors, rest = parse_tool_calls(body)
    return ParsedResponse(content=rest.strip(), thinking=thinking.strip() if thinking else thinking,
                          tool_calls=calls, errors=errors)
