"""A multi-turn chat session in the checkpoint's own template, reusing the KV cache across turns.

Each turn renders the whole conversation with the template (so history follows the official format) and
prefills only what differs from what the caches hold. The template re-renders a finished model turn without
the generation prompt it was produced after; the session keeps a snapshot of the caches at that point, so the
next turn rolls back to it instead of re-reading the conversation, also once the sliding window has wrapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .api import Attachments, Gemma, Piece, Result, user_message
from .cache import make_cache
from .errors import InputError
from .generate import PromptCache


class Chat:
    """A conversation: ``send`` streams a reply, ``ask`` returns it; history, system prompt, thinking, tools."""

    def __init__(self, gemma: Gemma, *, system: str | None = None, enable_thinking: bool = False,
                 tools: list[dict] | None = None, max_context: int | None = None, **sampling):
        self.gemma = gemma
        self.system = system
        self.enable_thinking = enable_thinking
        self.tools = tools
        self.max_context = max_context
        self.sampling = sampling
        self.messages: list[dict] = []
        self._media: list[Attachments] = []  # one per user message, in order
        self.last: Result | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.messages, self._media, self.last = [], [], None
        self.cache = PromptCache(make_cache(self.gemma.config.text))

    def _conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _all_media(self) -> Attachments:
        out = Attachments()
        for m in self._media:
            out.images += m.images
            out.audios += m.audios
            out.videos += m.videos
        return out

    def _stream(self, add_generation_prompt: bool) -> Iterator[Piece | Result]:
        g = self.gemma
        conversation = self._conversation()
        text = g.render(conversation, tools=self.tools, enable_thinking=self.enable_thinking,
                        add_generation_prompt=add_generation_prompt)
        media = self._all_media()
        checkpoint = None
        if add_generation_prompt:
            # Where the next turn's rendering will part from this one: the start of the generation prompt.
            head = g.render(conversation, tools=self.tools, enable_thinking=self.enable_thinking,
                            add_generation_prompt=False)
            if text.startswith(head):
                checkpoint = len(g.encode(head, media)[0])
        for item in g.stream_text(text, media, opts=g.options(**self.sampling), cache=self.cache,
                                  max_context=self.max_context, checkpoint_at=checkpoint):
            if isinstance(item, Result):
                self._record(item)
            yield item

    def _record(self, result: Result) -> None:
        parsed = result.parsed
        mt = self.gemma.media_tokens
        if mt is not None:
            # A sampled media token would re-render as a placeholder with no media behind it.
            for token in (mt.image, mt.audio, mt.video, mt.boi, mt.eoi, mt.boa, mt.eoa):
                parsed.content = parsed.content.replace(token, "")
        if self.messages and self.messages[-1]["role"] == "assistant" and self.messages[-1].get("tool_responses"):
            last = self.messages[-1]  # continuing the same model turn after tool results
            last["content"] = (last.get("content") or "") + parsed.content
        else:
            message = {"role": "assistant", "content": parsed.content}
            if parsed.thinking:
                message["reasoning_content"] = parsed.thinking
            self.messages.append(message)
        if parsed.tool_calls:
            self.messages[-1]["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.tool_calls]
        self.last = result

    def send(self, text: str, *, images=(), audios=(), videos=(), **media_options) -> Iterator[Piece | Result]:
        """Stream the reply to a user message (with optional attachments), ending with its Result."""
        media = self.gemma.load_media(images, audios, videos, **media_options)
        self.messages.append(user_message(text, media))
        self._media.append(media)
        try:
            yield from self._stream(add_generation_prompt=True)
        except BaseException:
            if self.last is None or self.messages[-1]["role"] == "user":
                self.messages.pop()  # an interrupted or failed turn leaves no half-recorded history
                self._media.pop()
            raise

    def ask(self, text: str, **kwargs) -> Result:
        """The finished reply to a user message."""
        return _last(self.send(text, **kwargs))

    def send_tool_results(self, results: list[dict]) -> Iterator[Piece | Result]:
        """Give the model the results of its tool calls ([{"name", "response"}]) and stream its continuation."""
        if not self.messages or self.messages[-1]["role"] != "assistant" or not self.messages[-1].get("tool_calls"):
            raise InputError("there are no pending tool calls to answer")
        self.messages[-1]["tool_responses"] = list(results)
        yield from self._stream(add_generation_prompt=False)

    def retry(self) -> Iterator[Piece | Result]:
        """Stream a new reply to the last user message, replacing the previous one."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise InputError("nothing to retry")
        self.messages.pop()
        yield from self._stream(add_generation_prompt=True)

    def save(self, path: str | Path) -> None:
        """Write the conversation (messages, system prompt, settings) as JSON; attachments are not stored."""
        data = {"system": self.system, "enable_thinking": self.enable_thinking, "tools": self.tools,
                "messages": self.messages}
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, gemma: Gemma, path: str | Path, **kwargs) -> Chat:
        """A session continuing a conversation saved with save (its text; attachments are not restored)."""
        data = json.loads(Path(path).read_text())
        chat = cls(gemma, system=data.get("system"), enable_thinking=data.get("enable_thinking", False),
                   tools=data.get("tools"), **kwargs)
        for m in data.get("messages", []):
            if isinstance(m.get("content"), list):  # media parts cannot be replayed without their files
                m = dict(m, content=" ".join(p.get("text", "") for p in m["content"] if p.get("type") == "text"))
            chat.messages.append(m)
            if m["role"] == "user":
                chat._media.append(Attachments())
        return chat


def _last(stream) -> Result:
    result = None
    for item in stream:
        result = item
    return result
