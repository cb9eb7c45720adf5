"""The one safe reader for a checkpoint's JSON side files (config.json, the safetensors index, tokenizer_config.json,
generation_config.json, processor configs).

A checkpoint directory is untrusted input: a file may be a FIFO (opening it blocks forever), a directory, a
dangling link, gigabytes long, not UTF-8, nested deeper than Python's recursion limit, or hold numbers Python
refuses to convert. Each of those becomes the caller's typed error naming the file, never a hang or a traceback.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import ConfigError, GemmaMLXError

# Real side files are at most a few MB (Gemma's tokenizer_config.json with its template is ~20 KB, a 12B index
# ~60 KB); tokenizer.json (32 MB) is read by the Rust tokenizer, not here.
MAX_JSON_BYTES = 64 * 1024 * 1024
# Configs nest 4-5 levels; far below the depth at which json (or any recursive walk of the result) recurses out.
MAX_JSON_DEPTH = 64


def regular_file(path: Path, error: type[GemmaMLXError] = ConfigError, what: str = "file") -> os.stat_result | None:
    """The stat of path (links followed) if it is a regular file, None if nothing is there; error otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: {what} is a dangling symbolic link") from None
        return None
    except (OSError, ValueError) as e:  # permission, a too-long name, an embedded NUL byte
        raise error(f"{path}: {what} cannot be read: {e.strerror if isinstance(e, OSError) else e}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise error(f"{path}: {what} is {kind}")
    return info


def open_regular(path: Path, error: type[GemmaMLXError] = ConfigError, what: str = "file"):
    """A binary file object for path if it is a regular file (links followed), None if nothing is there.

    Opened non-blocking and checked on the open descriptor, so a FIFO swapped in after a check cannot block.
    """
    if regular_file(path, error, what) is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"{path}: {what} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path}: {what} is not a regular file")
    return os.fdopen(fd, "rb")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when value nests containers deeper than limit (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_json(path: str | os.PathLike, *, error: type[GemmaMLXError] = ConfigError, missing: Any = ...,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON in path; ``missing`` if there is no file (when given), else an error naming the file."""
    path = Path(path)
    f = open_regular(path, error)
    if f is None:
        if missing is not ...:
            return missing
        raise error(f"{path}: no such file")
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a JSON side file (limit {max_bytes})")
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{path}: cannot be read: {e.strerror}") from None
    if len(raw) > max_bytes:  # the file grew after the stat
        raise error(f"{path}: too large for a JSON side file (limit {max_bytes} bytes)")
    return parse_json(raw, error, str(path))


def parse_json(raw: bytes, error: type[GemmaMLXError], name: str, object_pairs_hook=None) -> Any:
    """The JSON value in raw (UTF-8, at most MAX_JSON_DEPTH deep); error naming ``name`` when it is not."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{name} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise error(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{name}: JSON nested too deeply (limit {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # a number of more than 4300 digits, or the hook's refusal
        raise error(f"{name}: unreadable JSON value: {e}") from None
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise error(f"{name}: JSON nested too deeply (limit {MAX_JSON_DEPTH} levels)")
    return value


def read_json_object(path: str | os.PathLike, *, error: type[GemmaMLXError] = ConfigError, missing: Any = ...,
                     max_bytes: int = MAX_JSON_BYTES) -> Any:
    """As read_json, but the file must hold a JSON object (``missing``, when given, if there is no file)."""
    if missing is not ... and regular_file(Path(path), error) is None:
        return missing
    value = read_json(path, error=error, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not a {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
