"""A quantized Linear that knows when dequantizing first is faster."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..platform import dense_prefill_enabled

# Below this many rows (decode, short chunks) the quantized mat-vec reads 8x fewer bytes and wins.
DENSE_MIN_ROWS = 16


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose multi-row float32 products use dequantize + GEMM when a fast BLAS is loaded."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows >= DENSE_MIN_ROWS and x.dtype == mx.float32 and dense_prefill_enabled():
            w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                              mode=self.mode)
            y = x @ w.astype(mx.float32).T
            return y + self["bias"] if "bias" in self else y
        return super().__call__(x)


def use_prefill_friendly_linears(model: nn.Module) -> None:
    """Swap every nn.QuantizedLinear in model for the QuantizedLinear above (same parameters, same names)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
