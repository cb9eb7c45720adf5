"""A checkpoint's own chat template, rendered with jinja2 the way transformers' apply_chat_template does (5.23).

Same sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols, the ``generation`` tag), the same globals
(raise_exception, strftime_now, a plain ``dict``, a ``namespace`` that refuses underscore names), the same tojson
filter, and the same inputs: messages with None-valued keys dropped and reasoning aliased under reasoning_content /
thinking, everything reduced to plain JSON data, tools as JSON schemas (functions converted), the tokenizer's
named special tokens, and extra keyword arguments such as enable_thinking. So the string is identical.

Templates come from the Hub, so rendering is bounded as well as sandboxed: every loop iteration and macro call
is a step, and every string or list a template builds (operators, ``~``, method calls, filters, the output) is
checked against a size limit before it is built; both limits grow with the size of the data given
(``RenderLimits``). Going over one, and any failure inside the template (RecursionError, OverflowError,
ZeroDivisionError, MemoryError, TypeError...), is a TemplateError.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import json
import operator
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache, wraps
from pathlib import Path

import jinja2
import jinja2.visitor
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


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """How much one rendering may do: a fixed allowance plus an allowance per character of the data given."""

    steps: int = 250_000  # loop iterations and macro calls (Gemma's templates take about 10 per message)
    steps_per_char: int = 4
    chars: int = 16 << 20  # the longest string or list a template may build, and the output's length
    chars_per_char: int = 4


class _Budget:
    """The limits of one rendering, and what it has used of them."""

    def __init__(self, limits: RenderLimits, data_chars: int):
        self.max_steps = limits.steps + limits.steps_per_char * data_chars
        self.max_chars = limits.chars + limits.chars_per_char * data_chars
        self.steps = 0

    def step(self):
        self.steps += 1
        if self.steps > self.max_steps:
            raise _LimitError(f"the chat template ran more than {self.max_steps} loop iterations or macro calls")

    def size(self, n: int, what: str = "a value"):
        if n > self.max_chars:
            raise _LimitError(f"the chat template built {what} of length {n}, over its limit of {self.max_chars}")


class _LimitError(Exception):
    pass


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")
# A width or precision in a %- or {}-format spec: the output is at least that long.
_FORMAT_WIDTHS = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


def _length(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _check_result(value):
    _BUDGET.get().size(_length(value))
    return value


def _check_format(fmt):
    if isinstance(fmt, str):
        for m in _FORMAT_WIDTHS.finditer(fmt):
            for width in m.groups():
                if width:
                    _BUDGET.get().size(int(width), "a formatted field")


# Methods and filters whose integer arguments are (at least) the length of what they build.
_WIDTH_ARGUMENTS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs", "indent", "batch"})


def _precheck(name: str, obj, args, kwargs):
    # Sizes known before building: widths and counts given as arguments, replace/join totals, format specs.
    budget = _BUDGET.get()
    if name in _WIDTH_ARGUMENTS:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool):
                budget.size(abs(arg), f"a value ({name} with argument {arg})")
    if name == "replace" and len(args) >= 2 and isinstance(obj, str) and isinstance(args[0], str):
        old, new = args[0], args[1]
        budget.size(len(obj) + (len(obj) + 1 if not old else obj.count(old)) * _length(new), "a replaced string")
    elif name == "join":
        items = obj if isinstance(obj, str) and not args else args[0] if args else obj
        sep = obj if isinstance(obj, str) and args else (args[0] if args and isinstance(args[0], str) else "")
        if isinstance(items, (list, tuple, str)):
            budget.size(sum(_length(i) for i in items) + len(items) * _length(sep), "a joined string")
    elif name == "format":
        _check_format(obj)
    elif name == "tojson" and isinstance(kwargs.get("indent", args[0] if args else None), int):
        budget.size(abs(kwargs.get("indent", args[0] if args else 0)) * _length(obj), "indented JSON")


def _binop(op: str, left, right):
    budget = _BUDGET.get()
    if op == "+":
        budget.size(_length(left) + _length(right))
    elif op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
            budget.size(len(seq) * max(n, 0))
        elif isinstance(left, int) and isinstance(right, int):
            budget.size((left.bit_length() + right.bit_length()) // 8, "a number (bytes)")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        budget.size(left.bit_length() * right // 8, "a number (bytes)")
    elif op == "%":
        _check_format(left)
    return _check_result(_BINOPS[op](left, right))


_BINOPS = {"+": operator.add, "*": operator.mul, "**": operator.pow, "%": operator.mod}


def _concat(*values):
    # The `~` operator, which the sandbox does not intercept.
    parts = [v if isinstance(v, str) else str(v) for v in values]
    _BUDGET.get().size(sum(map(len, parts)))
    return "".join(parts)


def _bounded_filter(name: str, f):
    @wraps(f)
    def bounded(*args, **kwargs):
        # Filters get (context / eval context / environment first when they ask for it), then the value.
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext,
                                                          jinja2.Environment))]
        if values:
            _precheck(name, values[0], values[1:], kwargs)
        return _check_result(f(*args, **kwargs))
    return bounded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    # transformers' sandbox, with every operator, call and filter a template can grow data through size-checked,
    # and a step counted on each loop iteration and macro call.
    intercepted_binops = frozenset(_BINOPS)

    def call_binop(self, context, operator_, left, right):
        return _binop(operator_, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        name = getattr(__obj, "__name__", "")
        _precheck(name, getattr(__obj, "__self__", None), args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None

        def checked(*args, **kwargs):
            _check_format(value.__self__)
            return wrapper(*args, **kwargs)
        return checked

    def _parse(self, source, name, filename):
        return _Instrument().visit(super()._parse(source, name, filename))


def _hook(name: str, args=()) -> jinja2.nodes.Call:
    return jinja2.nodes.Call(jinja2.nodes.ExtensionAttribute(_Limits.identifier, name), list(args), [], None, None)


class _Instrument(jinja2.visitor.NodeTransformer):
    # Rewrites a parsed template: a step at the top of every loop, macro and call block body, and `~` as a call
    # to the checked concatenation (the sandbox intercepts operators but not `~`).
    def generic_visit(self, node, *args, **kwargs):
        node = super().generic_visit(node, *args, **kwargs)
        if isinstance(node, (jinja2.nodes.For, jinja2.nodes.Macro, jinja2.nodes.CallBlock)):
            node.body.insert(0, jinja2.nodes.ExprStmt(_hook("_step")))
        return node

    def visit_Concat(self, node):  # noqa: N802 (jinja's visitor naming)
        return _hook("_concat", [self.visit(n) for n in node.nodes])


class _Limits(jinja2.ext.Extension):
    # The hooks the rewritten template calls.
    def _step(self):
        _BUDGET.get().step()

    def _concat(self, *values):
        return _concat(*values)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[_Generation, _Limits, jinja2.ext.loopcontrols])
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None
    except RecursionError:
        raise TemplateError("the chat template is nested too deeply to parse") from None


def _data_chars(*values) -> int:
    """Characters of the strings in values, plus one per item (iteratively: data may nest deeply)."""
    total, stack = 0, list(values)
    while stack:
        v = stack.pop()
        total += 1
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def _plain(value, escape=None):
    # Templates come from the Hub: rebuild what they see from JSON types, so no rich object (an image with a
    # .save method, an array) is reachable from template code. Templates only test media keys, never read them.
    # escape (given for message data) is applied to every string, keys included.
    if isinstance(value, str):
        return escape(str(value)) if escape else str(value)
    if value is None or type(value) in (int, float, bool):
        return value
    for base in (bool, int, float):  # subclasses (enums, numpy scalars) drop back to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k, escape): _plain(v, escape) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, escape) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, escape) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / mlx scalar
        return _plain(value.item(), escape)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), escape) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump(), escape)
    return f"<{type(value).__name__}>"


def _prepare_message(message, escape=None) -> dict:
    if not isinstance(message, Mapping) or "role" not in message:
        raise TemplateError(f"each message must be a dict with a 'role', got {message!r}")
    message = _plain({k: v for k, v in message.items() if v is not None}, escape)
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

    def __init__(self, source: str | dict[str, str], special_tokens: dict[str, str] | None = None,
                 limits: RenderLimits = RenderLimits()):
        # A dict holds named templates ("default", "tool_use", ...), as in tokenizer_config.json.
        self.templates = dict(source) if isinstance(source, Mapping) else {"default": source}
        if not self.templates or not all(isinstance(k, str) and isinstance(t, str) and t
                                         for k, t in self.templates.items()):
            raise TemplateError("a chat template must be a non-empty string, or a mapping of names to such strings")
        self.special_tokens = dict(special_tokens or {})
        self.limits = limits
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
        sources = ((path / "chat_template.jinja", lambda: _read_text(path / "chat_template.jinja")),
                   (path / "tokenizer_config.json", lambda: config.get("chat_template")),
                   (path / "chat_template.json", lambda: _read_json(path / "chat_template.json").get("chat_template")))
        for file, read in sources:  # in order, each read only if those before hold none
            template = read()
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
                if not all(isinstance(t, Mapping) and "name" in t and "template" in t for t in template):
                    raise TemplateError(f"{file}: chat_template must list objects with a name and a template")
                template = {t["name"]: t["template"] for t in template}
            if template:
                try:
                    return cls(template, tokens)
                except TemplateError as e:
                    raise TemplateError(f"{file}: {e}") from None
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
               escape=None, **extra) -> str:
        """The prompt text for messages, ending with the model's turn opener when add_generation_prompt.

        enable_thinking reaches the template even when False (for Gemma's templates the same as leaving it out);
        extra keyword arguments become template variables; template_name picks one of several named templates.
        escape (e.g. Tokenizer.protect) is applied to every string of the messages, tools and documents, so that
        what they hold stays plain text while the template's own markup stays special.
        """
        if not messages:
            raise TemplateError("cannot render an empty conversation")
        try:
            chat = [_prepare_message(m, escape) for m in messages]
            schemas = None if tools is None else _plain([_tool_schema(t) for t in tools], escape)
            variables = {**self.special_tokens, **_plain(extra), "enable_thinking": enable_thinking}
            documents = _plain(documents, escape)
        except RecursionError:
            raise TemplateError("the messages, tools or documents are nested too deeply") from None
        template = _compile(self._pick(template_name, tools))
        budget = _Budget(self.limits, _data_chars(chat, schemas, documents, variables))
        token = _BUDGET.set(budget)
        try:
            out, size = [], 0
            for piece in template.generate(messages=chat, tools=schemas, documents=documents,
                                           add_generation_prompt=add_generation_prompt, **variables):
                size += len(piece)
                budget.size(size, "an output")
                out.append(piece)
            return "".join(out)
        except _LimitError as e:
            raise TemplateError(f"{e}; the template is looping or blowing up") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure of Hub code is the template's, reported as such
            line = _template_line(e.__traceback__)
            where = f" at template line {line}" if line else ""
            raise TemplateError(f"the chat template failed{where}: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(token)


def _read_json(file: Path) -> dict:
    """A side file's JSON object ({} if absent), through the one safe reader (FIFOs, size, depth, UTF-8)."""
    from .jsonfile import read_json_object

    return read_json_object(file, error=TemplateError, missing={})


MAX_TEMPLATE_BYTES = 4 * 2**20  # Gemma 4's template is 12 KB


def _read_text(file: Path) -> str | None:
    """The UTF-8 text of a template file (None if absent); a TemplateError naming it if it cannot be one."""
    from .jsonfile import open_regular

    f = open_regular(file, TemplateError, file.name)
    if f is None:
        return None
    with f:
        raw = f.read(MAX_TEMPLATE_BYTES + 1)
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{file}: more than {MAX_TEMPLATE_BYTES} bytes is too large for a chat template")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{file} is not UTF-8 text (byte {e.start})") from None
    return text
