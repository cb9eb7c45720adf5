"""Skips for the kernel checks' tools (g++, ThreadSanitizer, libclang, NVRTC, MLX's CUDA headers).

A developer without a tool gets a skip that says how to install it. CI (``CI`` set) installs every tool through
the test extra, so there a missing tool fails the run: the kernel checks can never stop running unnoticed.
"""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def needs_tool(missing: bool, reason: str):
    """A skipif mark for a missing tool, or, in CI, an error at collection naming the tool."""
    if missing and IN_CI:
        raise RuntimeError(f"CI runs every kernel check, but a tool is missing: {reason}")
    return pytest.mark.skipif(missing, reason=reason)


def skip_for_tool(reason: str):
    """Inside a test or fixture: skip for a tool that turned out to be missing, or fail in CI."""
    if IN_CI:
        pytest.fail(f"CI runs every kernel check, but a tool is missing: {reason}")
    pytest.skip(reason)
