"""Reading media sources (paths, bytes, file objects) with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MediaError


def describe(src) -> str:
    """A short name for a media source, for error messages: the path, or the kind and size of the object."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    name = getattr(src, "name", None)  # open file objects know their path
    if isinstance(name, str):
        return name
    return f"<{type(src).__name__}>"


def read_bytes(src) -> bytes:
    """The whole content of a path, bytes or binary file object; MediaError if it is missing, a directory or empty."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.exists():
            raise MediaError(f"{path}: no such file")
        if not path.is_file():
            raise MediaError(f"{path}: not a regular file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise MediaError(f"{path}: cannot read ({e.strerror or e})") from None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
        if isinstance(data, str):
            raise MediaError(f"{describe(src)}: opened in text mode; open media files with 'rb'")
    else:
        raise MediaError(f"cannot read media from a {type(src).__name__}; pass a path, bytes or a binary file object")
    if not data:
        raise MediaError(f"{describe(src)}: file is empty")
    return data
