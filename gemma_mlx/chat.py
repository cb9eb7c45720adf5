"""A multi-turn chat session in the checkpoint's own template, reusing the KV cache across turns.

Every turn renders the whole conversation with the template, so the history is exactly what transformers'
apply_chat_template would give, and prefills only what differs from what the caches hold. The Gemma 4 template
re-renders a finished model turn differently from the generation prompt it was produced after (without the
empty thought channel, without thinking), so the next turn must roll back to the start of that model turn. The
session keeps a snapshot of the caches there, which works also once the sliding window's ring has wrapped.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .api import Attachments, Gemma, user_message
from .events import Event, Result, TextStream, final_result
from .generation import GenerationStats, RunOptions
from .errors import InputError
from .prefill import DEFAULT_PREFILL_CHUNK


class Chat:
    """A conversation with history, system prompt, thinking, tools and attachments.

    ``send`` streams the reply to a user message (text Events, then the final one with the Result); ``ask``
    returns the Result. A turn stopped mid-answer (should_stop, or Ctrl-C) keeps what was said, marked
    ``"interrupted": True`` in its message; one stopped before its first token leaves the history as it was.
    When the model calls tools, run them and hand their results to ``send_tool_results``: the model goes on with
    the same turn.
    """

    def __init__(self, gemma: Gemma, *, system: str | None = None, enable_thinking: bool = False,
                 tools: list | None = None, max_context: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, allow_special_in_content: bool = False, **sampling):
        gemma.options(**sampling)  # refuse a bad option now, not at the first message
        self.gemma = gemma
        self.system = system
        self.enable_thinking = enable_thinking
        self.tools = tools
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.allow_special_in_content = allow_special_in_content  # see Gemma.render
        self.sampling = sampling
        self.cache = gemma.new_cache(max_context)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt, tools and settings stay)."""
        self.messages: list[dict] = []  # without the system prompt
        self._media: list[Attachments] = []  # one per user message, in order
        self.last: Result | None = None

    @property
    def history(self) -> list[dict]:
        """The conversation as the template sees it: the system prompt, then the messages."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    # -- turns ----------------------------------------------------------------------------------------

    def send(self, text: str, *, images=(), audios=(), videos=(), enable_thinking: bool | None = None,
             should_stop: Callable[[], bool] | None = None, **media_options) -> Iterator[Event]:
        """Stream the reply to a user message with optional attachments (paths, bytes, PIL images, arrays)."""
        media = self.gemma.load_media(images, audios, videos, **media_options)
        self.messages.append(user_message(text, media))
        self._media.append(media)
        yield from self._turn(enable_thinking, should_stop, "send")

    def ask(self, text: str, **kwargs) -> Result:
        """The finished reply to a user message (keywords as for send)."""
        return final_result(self.send(text, **kwargs))

    def send_tool_results(self, results: list[dict], *, should_stop: Callable[[], bool] | None = None
                          ) -> Iterator[Event]:
        """Give the model the results of its pending tool calls and stream the rest of its turn.

        results: [{"name": tool name, "response": dict or any JSON value}], one per call, in order.
        """
        pending = self.messages[-1] if self.messages else {}
        if pending.get("role") != "assistant" or not pending.get("tool_calls") or pending.get("tool_responses"):
            raise InputError("there are no pending tool calls to answer")
        names = [c["function"]["name"] for c in pending["tool_calls"]]
        for r in results:
            if not isinstance(r, dict) or "name" not in r or "response" not in r:
                raise InputError(f"each tool result must be a dict with 'name' and 'response', got {r!r}")
            if r["name"] not in names:
                raise InputError(f"a result for {r['name']!r}, but the model called {', '.join(names)}")
        pending["tool_responses"] = [{"name": r["name"], "response": r["response"]} for r in results]
        yield from self._turn(None, should_stop, "tools")

    def ask_tool_results(self, results: list[dict], **kwargs) -> Result:
        """The rest of the model's turn once it has the results of its tool calls (see send_tool_results)."""
        return final_result(self.send_tool_results(results, **kwargs))

    def retry(self, *, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Stream a new reply to the last user message, replacing the previous reply."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None or last_user == len(self.messages) - 1:
            raise InputError("there is no reply to retry")
        del self.messages[last_user + 1:]
        yield from self._turn(None, should_stop, "retry")

    def undo(self) -> None:
        """Drop the last user message and everything after it."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise InputError("there is nothing to undo")
        del self.messages[last_user:]
        self._media.pop()
        self.last = None

    def _turn(self, enable_thinking: bool | None, should_stop, mode: str) -> Iterator[Event]:
        """Stream the model's turn; mode is "send" (a new user message), "retry" or "tools" (after results)."""
        g = self.gemma
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        conversation = self.history
        special = self.allow_special_in_content
        text = g.render(conversation, tools=self.tools, enable_thinking=thinking, allow_special_in_content=special)
        head = g.render(conversation, tools=self.tools, enable_thinking=thinking, add_generation_prompt=False,
                        allow_special_in_content=special)
        # The generation prompt is where the next turn's rendering will part from this one: snapshot there.
        tail = g.tokenizer.encode(text[len(head):]) if text.startswith(head) else []
        media = Attachments()
        for m in self._media:
            media.extend(m)
        before = len(self.messages)
        opts = g.options(**self.sampling)
        run = RunOptions(prefill_chunk=self.prefill_chunk, max_context=self.max_context,
                         checkpoint_at=-len(tail) if tail else None, should_stop=should_stop)
        tokens: list[int] = []  # what has been streamed, to keep if a hard interrupt ends the turn
        recorded = False
        try:
            for event in g.stream_text(text, media, opts=opts, cache=self.cache, run=run):
                tokens += event.tokens
                if event.done:
                    self._record(event.result, mode)
                    recorded = True
                yield event
        except KeyboardInterrupt:
            # A hard interrupt can land halfway through writing the caches: start them afresh. What was said is
            # kept as an interrupted reply, as when should_stop ends the turn.
            self.cache.reset()
            if not recorded:
                self._record(self._interrupted_result(tokens, opts), mode)
            raise
        except BaseException:
            if not recorded:
                self._forget_turn(before, mode)
            raise

    def _interrupted_result(self, tokens: list[int], opts) -> Result:
        """The Result of a turn cut off after tokens, decoded again from its token ids."""
        stream = TextStream(self.gemma.tokenizer, opts.stop, opts.eos_ids)
        for token in tokens:
            stream.add(token)
        stream.finish()
        stats = GenerationStats(generated_tokens=len(tokens), finish_reason="interrupted")
        return stream.final_event("interrupted", stats).result

    def _forget_turn(self, before: int, mode: str) -> None:
        # A turn that failed or was stopped before its first token leaves the history as it was before it.
        del self.messages[before:]
        if mode == "tools":
            self.messages[-1].pop("tool_responses", None)
        elif mode == "send":
            self.messages.pop()
            self._media.pop()

    def _record(self, result: Result, mode: str) -> None:
        self.last = result
        if result.finish_reason == "interrupted" and not result.tokens:
            self._forget_turn(len(self.messages), mode)
            return
        continuing = mode == "tools"
        content = result.content
        mt = self.gemma.media_tokens
        if mt is not None:  # a sampled media token would re-render as a placeholder with no media behind it
            for token in (mt.image, mt.audio, mt.video, mt.boi, mt.eoi, mt.boa, mt.eoa):
                content = content.replace(token, "")
        message = {"role": "assistant", "content": content}
        if result.tool_calls:
            # The template writes a model turn as calls, responses, then content, and closes the turn after
            # content; text before the calls would close the turn before the responses, so it is kept aside.
            message = {"role": "assistant", "content": "", "tool_calls": [c.as_dict() for c in result.tool_calls]}
            if content:
                message["text_before_calls"] = content
        if result.thinking:
            message["reasoning_content"] = result.thinking
        if result.finish_reason == "interrupted":
            message["interrupted"] = True  # kept, and marked: the reply was cut off (the template ignores the mark)
        if continuing and not result.tool_calls:
            self.messages[-1]["content"] = content  # the answer closes the same model turn
            if result.thinking:
                self.messages[-1]["reasoning_content"] = result.thinking
            if message.get("interrupted"):
                self.messages[-1]["interrupted"] = True
        else:
            self.messages.append(message)

    # -- persistence ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the conversation (messages, system prompt, settings, attachment paths) as JSON."""
        data = {"system": self.system, "enable_thinking": self.enable_thinking, "tools": self.tools,
                "messages": self.messages}
        try:
            text = json.dumps(data, indent=2, ensure_ascii=False)
        except TypeError as e:
            raise InputError(f"this conversation cannot be saved as JSON ({e}); tools given as Python "
                             f"functions cannot be saved, give their JSON schemas instead") from None
        Path(path).write_text(text + "\n")

    @classmethod
    def load(cls, gemma: Gemma, path: str | Path, **kwargs) -> Chat:
        """A session continuing a conversation written by save; attachments are read again from their paths."""
        try:
            data = json.loads(Path(path).read_text())
            messages = list(data["messages"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a saved conversation: {e}") from None
        settings = {"system": data.get("system"), "enable_thinking": data.get("enable_thinking", False),
                    "tools": data.get("tools")}
        chat = cls(gemma, **{**settings, **kwargs})
        for m in messages:
            if m.get("role") == "user" and isinstance(m.get("content"), list):
                m, media = chat._reattach(m)
                chat._media.append(media)
            elif m.get("role") == "user":
                chat._media.append(Attachments())
            chat.messages.append(m)
        return chat

    def _reattach(self, message: dict) -> tuple[dict, Attachments]:
        found = {"image": [], "audio": [], "video": []}
        parts = []
        for part in message["content"]:
            kind, src = part.get("type"), part.get("path")
            if kind in found:
                if not src or not Path(src).is_file():
                    warnings.warn(f"a saved {kind} ({src or 'given as data, not a path'}) cannot be attached "
                                  f"again; the conversation goes on without it", stacklevel=3)
                    continue
                found[kind].append(src)
            parts.append(part)
        media = self.gemma.load_media(found["image"], found["audio"], found["video"])
        return dict(message, content=parts), media
