"""A quantized Linear that knows when dequantizing first is faster."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..platform import dense_prefill_enabled

# Below this many rows (decode, short chunks) the quantized mat-vec reads 8x fewer bytes and wins.
DENSE_MIN_ROWS = 16
# The dense path dequantizes this many bytes of float32 weight at a time. Dequantizing a whole matrix at once
# held several float32 copies of it (measured: 2.3 GB of scratch for a 12B MLP on 512 rows, 14.6 GB for the
# 262144-row tied head). Blocks that stay in cache are also faster: a 12B MLP on 16 / 512 rows took 1.18 / 1.98 s
# with 64 MB blocks, 0.34 / 1.73 s with 8 MB, and slower again below 4 MB (scratch 274 -> 24 MB on 16 rows).
DENSE_BLOCK_BYTES = 8 << 20


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose multi-row float32 products use dequantize + GEMM when a fast BLAS is loaded."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows >= DENSE_MIN_ROWS and x.dtype == mx.float32 and dense_prefill_enabled():
            return self._dense(x)
        return super().__call__(x)

    def _dense(self, x: mx.array) -> mx.array:
        weight, scales, biases = self["weight"], self["scales"], self.get("biases")
        out_features, in_features = scales.shape[0], x.shape[-1]
        block = max(1, DENSE_BLOCK_BYTES // (4 * in_features))
        parts = []
        for r0 in range(0, out_features, block):
            rs = slice(r0, min(r0 + block, out_features))
            w = mx.dequantize(weight[rs], scales[rs], None if biases is None else biases[rs], self.group_size,
                              self.bits, mode=self.mode).astype(mx.float32)
            parts.append(x @ w.T)
            if len(parts) > 1:
                mx.eval(parts[-2])  # one block's dequantized weight alive at a time, whatever MLX schedules
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return y + self["bias"] if "bias" in self else y


def use_prefill_friendly_linears(model: nn.Module) -> None:
    """Swap every nn.QuantizedLinear in model for the QuantizedLinear above (same parameters, same names)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
