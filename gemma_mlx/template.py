"""The checkpoint's own chat template, rendered with jinja2 the way transformers' apply_chat_template does.

Same sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols), the same globals (raise_exception,
strftime_now) and tojson filter, and the same variables (messages, tools, add_generation_prompt, the special
tokens, and extra keyword arguments such as enable_thinking), so the output string is identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not, and templates rely on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = special_tokens or {}
        self._template = _compile(source)

    @classmethod
    def from_dir(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """The template of a checkpoint: chat_template.jinja, else tokenizer_config.json's chat_template."""
        path = Path(path)
        file = path / "chat_template.jinja"
        if file.is_file():
            return cls(file.read_text(), special_tokens)
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: the default one renders chats
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return cls(template, special_tokens)
        raise TemplateError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               enable_thinking: bool = False, **extra) -> str:
        """The prompt text for messages, ending with the model's turn opener when add_generation_prompt."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise TemplateError(f"each message must be a dict with a 'role', got {m!r}")
        chat = [_alias_reasoning(dict(m)) for m in messages]
        variables = dict(self.special_tokens)
        variables.update(extra)
        if enable_thinking:
            variables["enable_thinking"] = True
        try:
            return self._template.render(messages=chat, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refused these messages: {e}") from None
