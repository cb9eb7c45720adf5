"""Gemma 4's tool-call syntax, its tool-response text, and the split of a model turn into thought, calls and answer.

A call is ``<|tool_call>call:NAME{key:value,...}<tool_call|>``: keys are bare, strings sit between ``<|"|>``
delimiters (and may hold braces, commas, colons and quotes), numbers and true/false are bare (the template writes a
null as ``None``), objects and lists nest, whitespace between items is allowed. Names may be namespaced
(``mcp:server:tool``, ``a.b-c``).

Parsing never drops or half-parses: a call that does not parse comes back as a ToolCallError holding its raw text.
It takes one pass over the text (a call's text cannot hold another ``<|tool_call>``), nesting deeper than
MAX_NESTING levels is an error, and numbers Python cannot hold exactly (ints of more digits than ``int()`` reads,
floats beyond the double range) are kept as their exact text.
By default the parser is lenient about slips models make (single- or double-quoted strings, quoted keys,
``key=value``, Python's True/False, trailing commas) and lists each repair on the call; ``strict=True`` rejects them.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
STRING_DELIM = '<|"|>'
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
# Where the answer of a model turn ends (the content closers of transformers' Gemma 4 response template).
ANSWER_END = ("<turn|>", RESPONSE_OPEN, "<eos>")

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"\w[\w.\-:/]*")
# A bare key: anything but structure, quotes and "<" (which opens <|"|>); inner spaces allowed ("first name").
_KEY = re.compile(r"[^{}\[\],:=\"'<\s](?:[^{}\[\],:=\"'<\n]*[^{}\[\],:=\"'<\s])?")
_SINGLE_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'", re.S)
_WORDS = {"true": True, "false": False, "null": None, "None": None}
_LENIENT_WORDS = {"True": True, "False": False}
_JSON = json.JSONDecoder()
_SPACE = re.compile(r"\s*")
# Deeper arguments than any real tool takes; the bound keeps parsing iterative-safe (no RecursionError).
MAX_NESTING = 64
_NOT_CLOSED = "tool call is not closed with <tool_call|>"
_ANSWER_END = re.compile("|".join(map(re.escape, ANSWER_END)))
_EVENTS = re.compile("|".join(map(re.escape, (CALL_OPEN, THOUGHT_OPEN, THOUGHT_CLOSE, *ANSWER_END))))


@dataclass
class ToolCall:
    """A parsed call: name, arguments, its raw text (tags included), and any lenient repairs it needed."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""
    repairs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The call as a transformers/OpenAI ``tool_calls`` entry, ready to go back into a chat history."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallError:
    """Text that opened a tool call but does not parse as one: the raw text and why."""

    raw: str
    reason: str


@dataclass
class ParsedResponse:
    """A model turn taken apart: the answer, the thought text (None without a thought channel), the tool calls
    and anything that looked like a call but did not parse."""

    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)


class _SyntaxError(ValueError):
    pass


class _Parser:
    # Parses one call's text: the window from after <|tool_call> up to the next <|tool_call> (a call never holds
    # another opener), so parsing every call of a text costs one pass over it.
    def __init__(self, text: str, strict: bool):
        self.text, self.i, self.strict = text, 0, strict
        self.repairs: list[str] = []
        self.depth = 0

    def fail(self, what: str):
        raise _SyntaxError(f"{what} at {self.text[self.i:self.i + 24]!r}")

    def relax(self, repair: str):
        if self.strict:
            self.fail(f"{repair} (strict mode)")
        if repair not in self.repairs:
            self.repairs.append(repair)

    def at(self, token: str) -> bool:
        return self.text.startswith(token, self.i)

    def skip_ws(self):
        self.i = _SPACE.match(self.text, self.i).end()

    def call(self) -> tuple[str, dict]:
        self.skip_ws()
        if not self.at("call:"):
            self.fail("expected 'call:'")
        self.i += len("call:")
        m = _NAME.match(self.text, self.i)
        if not m:
            self.fail("expected a tool name")
        self.i = m.end()
        self.skip_ws()
        if not self.at("{"):
            self.fail("expected '{' after the tool name")
        return m.group(), self.obj()

    def string(self) -> str:
        t = self.text
        if self.at(STRING_DELIM):
            end = t.find(STRING_DELIM, self.i + len(STRING_DELIM))
            if end < 0:
                self.fail("unterminated string")
            s, self.i = t[self.i + len(STRING_DELIM):end], end + len(STRING_DELIM)
            return s
        if self.at('"'):
            self.relax('"double-quoted" string')
            try:
                s, self.i = _JSON.raw_decode(t, self.i)
            except json.JSONDecodeError:
                self.fail("malformed double-quoted string")
            return s
        self.relax("'single-quoted' string")
        m = _SINGLE_QUOTED.match(t, self.i)
        if not m:
            self.fail("unterminated single-quoted string")
        self.i = m.end()
        return re.sub(r"\\(.)", r"\1", m.group(1), flags=re.S)

    def value(self) -> Any:
        self.skip_ws()
        if self.at(STRING_DELIM) or self.at('"') or self.at("'"):
            return self.string()
        if self.at("{"):
            return self.obj()
        if self.at("["):
            return self.nested("[", "]", lambda out: out.append(self.value()), [])
        for words, lenient in ((_WORDS, False), (_LENIENT_WORDS, True)):
            for word, val in words.items():
                if self.at(word) and not (self.text[self.i + len(word):self.i + len(word) + 1].isalnum()):
                    if lenient:
                        self.relax("Python True/False")
                    self.i += len(word)
                    return val
        m = _NUMBER.match(self.text, self.i)
        if m:
            self.i = m.end()
            return _number(m.group())
        self.fail("expected a value")

    def key(self) -> str:
        self.skip_ws()
        if self.at(STRING_DELIM):
            return self.string()
        if self.at('"') or self.at("'"):
            self.relax("quoted key")
            return self.string()
        m = _KEY.match(self.text, self.i)
        if not m:
            self.fail("expected a key")
        self.i = m.end()
        return m.group()

    def member(self, out: dict):
        key = self.key()
        self.skip_ws()
        if self.at("="):
            self.relax("key=value")
        elif not self.at(":"):
            self.fail(f"expected ':' after key {key!r}")
        self.i += 1
        if key in out:  # keeping either value would silently lose the other
            self.fail(f"duplicate key {key!r}")
        out[key] = self.value()

    def obj(self) -> dict:
        return self.nested("{", "}", self.member, {})

    def nested(self, open_: str, close: str, read, out):
        # Depth is bounded so that hostile nesting is a reported error, not a RecursionError.
        if self.depth >= MAX_NESTING:
            self.fail(f"arguments nested deeper than {MAX_NESTING} levels")
        self.depth += 1
        out = self.items(open_, close, read, out)
        self.depth -= 1
        return out

    def items(self, open_: str, close: str, read, out):
        self.i += len(open_)
        self.skip_ws()
        if self.at(close):
            self.i += 1
            return out
        while True:
            read(out)
            self.skip_ws()
            if self.at(","):
                self.i += 1
                self.skip_ws()
                if self.at(close):
                    self.relax("trailing comma")
                    self.i += 1
                    return out
            elif self.at(close):
                self.i += 1
                return out
            else:
                self.fail(f"expected ',' or {close!r}")


def _number(s: str) -> int | float | str:
    # A number Python cannot hold exactly as int/float (more digits than int() reads and str() writes, or a float
    # beyond the double range) is kept as its exact digits rather than raised on or turned into inf.
    if not any(c in s for c in ".eE"):
        limit = sys.get_int_max_str_digits()
        return int(s) if not limit or len(s.lstrip("-")) <= limit else s
    value = float(s)
    return value if math.isfinite(value) else s


def _read_call(text: str, start: int, stop: int, strict: bool) -> tuple[ToolCall | ToolCallError, int]:
    """The call opened at start (its window ends at stop, the next opener or the end) and where it ends."""
    body = start + len(CALL_OPEN)
    close = text.find(CALL_CLOSE, body, stop)
    if close < 0:  # not closed: nothing to parse, the raw text runs up to the next call or the end
        return ToolCallError(raw=text[start:stop], reason=_NOT_CLOSED), stop
    p = _Parser(text[body:stop], strict)
    try:
        name, args = p.call()
        p.skip_ws()
        if not p.at(CALL_CLOSE):
            p.fail("unexpected text after the arguments")
        end = body + p.i + len(CALL_CLOSE)
        return ToolCall(name, args, raw=text[start:end], repairs=p.repairs), end
    except _SyntaxError as e:  # the bad call spans up to its first closing tag
        end = close + len(CALL_CLOSE)
        return ToolCallError(raw=text[start:end], reason=str(e)), end


def _scan(text: str, strict: bool) -> tuple[list[ToolCall | ToolCallError], str]:
    items, rest, pos = [], [], 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        rest.append(text[pos:start])
        stop = text.find(CALL_OPEN, start + len(CALL_OPEN))
        item, pos = _read_call(text, start, stop if stop >= 0 else len(text), strict)
        items.append(item)
    rest.append(text[pos:])
    return items, "".join(rest)


def parse_tool_calls(text: str, *, strict: bool = False) -> list[ToolCall | ToolCallError]:
    """Every ``<|tool_call>…<tool_call|>`` in text, in order: a ToolCall, or a ToolCallError with the raw text."""
    return _scan(text, strict)[0]


def split_response(text: str, *, strict: bool = False) -> ParsedResponse:
    """Thought, answer, tool calls and unparseable calls of a generated model turn (special tokens kept in text).

    Follows Gemma 4's response schema: an optional ``<|channel>thought\\n…<channel|>``, tool calls, and the answer
    up to ``<turn|>``, ``<|tool_response>`` or ``<eos>``. A thought that never closes (the turn was cut short) is
    all thinking; a ``<channel|>`` with no opener closes a thought the prompt opened. Tool calls are read first
    wherever they are (in the answer or in a thought), so markers inside a call's strings are its text, and every
    call is returned or reported.
    """
    thoughts: list[str] = []
    answer: list[str] = []
    thought: list[str] | None = None  # the open thought's pieces
    items: list[ToolCall | ToolCallError] = []
    pos = 0
    while m := _EVENTS.search(text, pos):
        (answer if thought is None else thought).append(text[pos:m.start()])
        event, pos = m.group(), m.end()
        if event == CALL_OPEN:
            next_open = text.find(CALL_OPEN, pos)
            item, end = _read_call(text, m.start(), next_open if next_open >= 0 else len(text), strict)
            if isinstance(item, ToolCallError):  # a call that does not parse ends where the answer does
                cut = _ANSWER_END.search(text, m.start(), end)
                if cut:
                    item, end = ToolCallError(raw=text[m.start():cut.start()], reason=_NOT_CLOSED), cut.start()
            items.append(item)
            pos = end
        elif event == THOUGHT_OPEN and thought is None:
            thought = []
        elif event == THOUGHT_CLOSE and thought is not None:
            thoughts.append("".join(thought).removeprefix("thought").removeprefix("\n"))
            thought = None
        elif event == THOUGHT_CLOSE and not thoughts:  # (no opener came before)
            thoughts.append("".join(answer))  # the prompt opened this thought
            answer = []
        elif event in ANSWER_END:
            pos = len(text)
            break
        else:  # a nested opener, or a closer with nothing open: text
            (answer if thought is None else thought).append(event)
    (answer if thought is None else thought).append(text[pos:])
    if thought is not None:
        thoughts.append("".join(thought).removeprefix("thought").removeprefix("\n"))
    return ParsedResponse(
        content="".join(answer).strip(),
        thinking="\n".join(t.strip() for t in thoughts) if thoughts else None,
        tool_calls=[c for c in items if isinstance(c, ToolCall)],
        errors=[c for c in items if isinstance(c, ToolCallError)])


def _dictsort(d: Mapping):
    # Jinja's dictsort: by key, case-insensitively (stable for keys equal but for case).
    return sorted(d.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def format_value(value: Any) -> str:
    """A value as the chat template's format_argument macro writes it in calls and responses (bare keys)."""
    if isinstance(value, str):
        return STRING_DELIM + value + STRING_DELIM
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in _dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)  # numbers as Python prints them; None as "None", as Jinja renders it


def format_tool_call(name: str, arguments: Mapping) -> str:
    """``call:NAME{...}`` as the chat template renders an assistant tool call (between the call tags)."""
    return f"call:{name}{format_value(dict(arguments))}"


def format_tool_response(name: str, result: Any) -> str:
    """``response:NAME{...}`` as the chat template renders a tool result (non-dict results as ``{value:...}``);
    after the model stops on ``<|tool_response>``, append this plus ``<tool_response|>`` to continue its turn."""
    return f"response:{name}{format_value(result if isinstance(result, Mapping) else {'value': result})}"
