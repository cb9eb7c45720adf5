"""What every stream of a model turn yields: ``Event``s, the last of which carries the finished ``Result``.

``Gemma.stream``, ``gemma_mlx.stream_generate``, ``Chat.send`` and the CLI all produce or consume this one type:
text events (``kind`` "answer", "thinking" or "tool_call", with the token ids behind the text) and one final
event (``kind`` "done") whose ``result`` has the raw text, parsed answer / thinking / tool calls, the finish
reason and the stats. ``str(event)`` is its text, so ``print(event, end="")`` streams a reply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .generation import GenerationStats
from .tokenizer import Tokenizer
from .tools import ParsedResponse, ToolCall, ToolCallError, split_response

DONE = "done"
TEXT_KINDS = ("answer", "thinking", "tool_call")


@dataclass
class Result:
    """A finished model turn: its raw text (special tokens written out), its parts, why it stopped, and stats."""

    text: str
    tokens: list[int]
    parsed: ParsedResponse
    finish_reason: str  # "stop" (EOS), "stop_string", "length" (max_tokens), "context", "interrupted"
    stats: GenerationStats

    @property
    def content(self) -> str:
        """The answer, without thought text or tool calls."""
        return self.parsed.content

    @property
    def thinking(self) -> str | None:
        """The thought text (None when the model did not think)."""
        return self.parsed.thinking

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls that parsed."""
        return self.parsed.tool_calls

    @property
    def tool_errors(self) -> list[ToolCallError]:
        """Text that opened a tool call but did not parse, raw text kept."""
        return self.parsed.errors

    def as_dict(self) -> dict:
        """The result as plain JSON data."""
        return {"text": self.text, "content": self.content, "thinking": self.thinking,
                "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in self.tool_calls],
                "tool_errors": [{"raw": e.raw, "reason": e.reason} for e in self.tool_errors],
                "finish_reason": self.finish_reason, "tokens": self.tokens, "stats": self.stats.as_dict()}


@dataclass(frozen=True)
class Event:
    """One item of a stream: a piece of text of one kind and its token ids, or (kind "done") the turn's end."""

    text: str = ""
    kind: str = "answer"  # "answer", "thinking", "tool_call"; "done" for the final event
    tokens: tuple[int, ...] = ()  # ids generated since the previous event
    result: Result | None = None  # only on the final event

    def __str__(self) -> str:
        return self.text

    @property
    def done(self) -> bool:
        """Whether this is the final event (the one with the Result)."""
        return self.kind == DONE

    @property
    def finish_reason(self) -> str | None:
        """Why generation ended (final event only): "stop", "stop_string", "length", "context", "interrupted"."""
        return self.result.finish_reason if self.result is not None else None

    @property
    def parsed(self) -> ParsedResponse | None:
        """The parsed answer, thinking and tool calls (final event only)."""
        return self.result.parsed if self.result is not None else None

    @property
    def stats(self) -> GenerationStats | None:
        """Tokens, speeds and peak memory (final event only)."""
        return self.result.stats if self.result is not None else None


def final_result(events: Iterable[Event]) -> Result:
    """The Result of a stream, consumed to its end."""
    result = None
    for event in events:
        if event.done:
            result = event.result
    if result is None:
        raise RuntimeError("the stream ended without its final event")
    return result


class TextStream:
    """Generated tokens in, Events out: thought, tool-call and answer text apart, structural tokens hidden, and
    text that could be the start of a stop string held back until it is known not to be one.

    Each token id goes with the first event emitted after it, so the events' tokens, joined, are all the
    tokens added (the final event carries those no text came from).
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], hidden_ids):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer()
        switches = {"<|channel>": "thinking", "<channel|>": "answer", "<|tool_call>": "tool_call",
                    "<tool_call|>": "answer"}
        self.switch = {tokenizer.token_to_id(t): kind for t, kind in switches.items()
                       if tokenizer.token_to_id(t) is not None}
        self.hidden = set(hidden_ids)  # EOS ids: they end the turn, they are not text to show
        self.stop = stop
        self.kind = "answer"
        self.header = ""  # the "thought\n" label after <|channel> names the channel; it is not thought text
        self.text = ""  # everything, special tokens written out
        self.pending: list[tuple[str, str, int]] = []  # (kind, visible text, its offset in self.text)
        self.cut: int | None = None  # where a stop string starts, once one has appeared
        self.searched = 0  # stop strings were looked for in text before this offset
        self.unsent: list[int] = []  # tokens added since the last event
        self._tokens: list[int] = []

    def _visible(self, s: str) -> None:
        if self.kind == "thinking" and self.header:
            k = len(os.path.commonprefix([s, self.header]))
            if k == len(s) or k == len(self.header):
                self.header = self.header[k:]
                self.text, s = self.text + s[:k], s[k:]
            else:
                self.header = ""
        if s:
            self.pending.append((self.kind, s, len(self.text)))
            self.text += s

    def add(self, token: int) -> list[Event]:
        """The events that can be shown now that token has been generated."""
        self.unsent.append(token)
        self._tokens.append(token)
        s = self.detok.add_token(token)
        if token in self.switch or token in self.hidden:
            special = self.tokenizer.id_to_token(token) or ""
            if s.endswith(special):  # text completed by this token (a held-back byte sequence) comes first
                self._visible(s[: len(s) - len(special)])
                self.text += special
            else:
                self._visible(s)
            if token in self.switch:
                self.kind = self.switch[token]
                self.header = "thought\n" if self.kind == "thinking" else ""
        else:
            self._visible(s)
        return self._flush()

    def finish(self) -> list[Event]:
        """The last text events, once generation has ended."""
        self._visible(self.detok.finalize())
        return self._flush(final=True)

    def final_event(self, finish_reason: str, stats) -> Event:
        """The event that ends the stream: the Result of the turn, with the tokens no text event carried."""
        text = self.final_text()
        result = Result(text, self.tokens, split_response(text), finish_reason, stats)
        tokens, self.unsent = tuple(self.unsent), []
        return Event(kind=DONE, tokens=tokens, result=result)

    def _flush(self, final: bool = False) -> list[Event]:
        if self.stop and self.cut is None:
            found = [i for i in (self.text.find(s, self.searched) for s in self.stop) if i >= 0]
            if found:
                self.cut = min(found)
            self.searched = max(0, len(self.text) - max(map(len, self.stop)) + 1)
        limit = self.cut if self.cut is not None else len(self.text) - (0 if final else self._held())
        out: list[list[str]] = []  # [kind, text]
        while self.pending and self.pending[0][2] < limit:
            kind, s, at = self.pending.pop(0)
            if at + len(s) > limit:
                self.pending.insert(0, (kind, s[limit - at:], limit))
                s = s[: limit - at]
            if out and out[-1][0] == kind:
                out[-1][1] += s
            else:
                out.append([kind, s])
        events = [Event(text, kind) for kind, text in out]
        if events:
            events[0] = Event(events[0].text, events[0].kind, tuple(self.unsent))
            self.unsent = []
        return events

    def _held(self) -> int:
        # The longest end of the text that a stop string begins with.
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared."""
        return self.cut is not None

    @property
    def tokens(self) -> list[int]:
        """Every token added so far."""
        return self._tokens

    def final_text(self) -> str:
        """The raw text of the turn (special tokens written out), cut before a stop string."""
        return self.text if self.cut is None else self.text[: self.cut]
