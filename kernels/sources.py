"""Kernel sources: the shared bodies under src/ and the per-backend text MLX (or the CPU emulation) compiles.

A body is written once against the KX_* macros. Each backend gets: header = its macro layer + kx_common.h, and
source = its prologue (thread/group/lane/warp ids under backend-neutral names) + the body. Files are read with
importlib.resources, so an installed wheel works from any directory (package data: ``src/*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

BACKENDS = ("metal", "cuda", "cpu")


@lru_cache(maxsize=None)
def read(name: str) -> str:
    return resources.files(__package__).joinpath("src", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class KernelSpec:
    """One shared body and the names MLX binds its inputs and outputs to."""

    name: str
    body: str  # file under src/
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def header(self, backend: str) -> str:
        return read(f"kx_{backend}.h") + read("kx_common.h")

    def source(self, backend: str) -> str:
        return read(f"prologue_{backend}.inc") + read(self.body)


ATTN_TILE = KernelSpec(
    name="gemma_attn_tile",
    body="attn_tile.body",
    inputs=("q", "k", "v", "q_pos", "k_pos", "q_blk", "k_blk", "ip", "fp"),
    outputs=("po", "pm", "pl"),
)

ATTN_COMBINE = KernelSpec(
    name="gemma_attn_combine",
    body="attn_combine.body",
    inputs=("po", "pm", "pl", "ip"),
    outputs=("o",),
)

SPECS = (ATTN_TILE, ATTN_COMBINE)
