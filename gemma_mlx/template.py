"""A checkpoint's own chat template, rendered with jinja2 the way transformers' apply_chat_template does (5.23).

Same sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols, the ``generation`` tag), the same globals
(raise_exception, strftime_now, a plain ``dict``, a ``namespace`` that refuses underscore names), the same tojson
filter, and the same inputs: messages with None-valued keys dropped and reasoning aliased under reasoning_content /
thinking, everything reduced to plain JSON data, tools as JSON schemas (functions converted), the tokenizer's
named special tokens, and extra keyword arguments such as enable_thinking. So the string is identical.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError
from .tokenizer import special_tokens_map

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not, and templates rely on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # A callable that builds plain dicts: no class object for the template to introspect.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Underscore attributes on a namespace are a way into CPython internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


class _Generation(jinja2.ext.Extension):
    # transformers' {% generation %} tag (marks assistant text for training masks); rendering passes it through.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


def _plain(value):
    # Templates come from the Hub: rebuild what they see from JSON types, so no rich object (an image with a
    # .save method, an array) is reachable from template code. Templates only test media keys, never read them.
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, bool, int, float):  # subclasses (enums, numpy scalars) drop back to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / mlx scalar
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_message(message) -> dict:
    if not isinstance(message, Mapping) or "role" not in message:
        raise TemplateError(f"each message must be a dict with a 'role', got {message!r}")
    message = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:  # transformers' aliasing: templates read one name or another
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _tool_schema(tool) -> dict:
    if isinstance(tool, Mapping):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        from transformers.utils import get_json_schema  # only functions need it (type hints + Google docstring)

        return get_json_schema(tool)
    raise TemplateError(f"a tool must be a JSON schema dict or a documented function, got {tool!r}")


def _template_line(tb) -> int | None:
    line = None
    while tb is not None:  # jinja rewrites tracebacks so template frames carry template line numbers
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A chat template plus the special-token strings (bos_token, ...) it may reference."""

    def __init__(self, source: str | dict[str, str], special_tokens: dict[str, str] | None = None):
        # A dict holds named templates ("default", "tool_use", ...), as in tokenizer_config.json.
        self.templates = dict(source) if isinstance(source, Mapping) else {"default": source}
        self.special_tokens = dict(special_tokens or {})
        for template in self.templates.values():
            _compile(template)

    @property
    def source(self) -> str:
        """The default template's text."""
        return self.templates.get("default") or next(iter(self.templates.values()))

    @classmethod
    def from_dir(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """The template of a checkpoint: chat_template.jinja, else tokenizer_config.json's chat_template, else
        chat_template.json's; special tokens from tokenizer_config.json, overridden by special_tokens."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        tokens = {**special_tokens_map(config), **(special_tokens or {})}
        if (path / "chat_template.jinja").is_file():
            return cls((path / "chat_template.jinja").read_text(encoding="utf-8"), tokens)
        for template in (config.get("chat_template"), _read_json(path / "chat_template.json").get("chat_template")):
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
                template = {t["name"]: t["template"] for t in template}
            if template:
                return cls(template, tokens)
        raise TemplateError(f"{path} has no chat template (chat_template.jinja, tokenizer_config.json "
                            "or chat_template.json)")

    def _pick(self, name: str | None, tools) -> str:
        if name is not None:
            if name not in self.templates:
                raise TemplateError(f"no chat template named {name!r}; there are {sorted(self.templates)}")
            return self.templates[name]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise TemplateError(f"several chat templates and none is 'default': name one of {sorted(self.templates)}")

    def render(self, messages: list[dict], *, tools: list | None = None, documents: list[dict] | None = None,
               add_generation_prompt: bool = True, enable_thinking: bool = False, template_name: str | None = None,
               **extra) -> str:
        """The prompt text for messages, ending with the model's turn opener when add_generation_prompt.

        enable_thinking reaches the template even when False (for Gemma's templates the same as leaving it out);
        extra keyword arguments become template variables; template_name picks one of several named templates.
        """
        if not messages:
            raise TemplateError("cannot render an empty conversation")
        chat = [_prepare_message(m) for m in messages]
        schemas = None if tools is None else _plain([_tool_schema(t) for t in tools])
        variables = {**self.special_tokens, **_plain(extra), "enable_thinking": enable_thinking}
        template = _compile(self._pick(template_name, tools))
        try:
            return template.render(messages=chat, tools=schemas, documents=_plain(documents),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refused these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            line = _template_line(e.__traceback__)
            where = f" at template line {line}" if line else ""
            raise TemplateError(f"the chat template failed{where}: {type(e).__name__}: {e}") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemplateError(f"{file} is not valid JSON: {e}") from None
