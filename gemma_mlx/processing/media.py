"""Reading media sources (paths, bytes, file objects) with errors that name the file."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import MediaError


def describe(src) -> str:
    """A short name for a media source, for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def open_binary(src):
    """A readable binary file object for a path, bytes or file object; MediaError if it is missing or empty."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise MediaError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: file is empty")
        return open(path, "rb")
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise MediaError("media bytes are empty")
        return io.BytesIO(src)
    if hasattr(src, "read"):
        return src
    raise MediaError(f"cannot read media from a {type(src).__name__}; pass a path, bytes or a file object")
