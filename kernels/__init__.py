"""Attention and patch-projection ops: Metal kernels on Macs, CUDA twins on NVIDIA, a pure-MLX reference elsewhere."""

from .ops import BACKEND, attention, patch_embed

__all__ = ["BACKEND", "attention", "patch_embed"]
