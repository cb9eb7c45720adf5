"""CPU fast paths: dequantize + GEMM for multi-row quantized products gives the quantized matmul's result."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gemma_mlx import settings
from gemma_mlx.model import linear
from gemma_mlx.model.linear import DENSE_MIN_ROWS, QuantizedLinear, use_prefill_friendly_linears
from gemma_mlx.platform import dense_prefill_enabled


@pytest.mark.parametrize("bits, group_size, bias, mode, block_rows", [
    (4, 64, False, "affine", None), (8, 32, True, "affine", None),
    (4, 64, True, "affine", 20),  # 96 output rows dequantized 20 at a time: four blocks and a partial one
    (4, 32, False, "mxfp4", 40),  # no biases array
])
def test_dense_prefill_path_equals_quantized_matmul(monkeypatch, bits, group_size, bias, mode, block_rows):
    mx.random.seed(0)
    if block_rows:
        monkeypatch.setattr(linear, "DENSE_BLOCK_BYTES", 4 * 128 * block_rows)
    layer = nn.Linear(128, 96, bias=bias)
    model = nn.Sequential(layer)
    nn.quantize(model, group_size=group_size, bits=bits, mode=mode)
    use_prefill_friendly_linears(model)
    q = model.layers[0]
    assert isinstance(q, QuantizedLinear)
    x = mx.random.normal((2, DENSE_MIN_ROWS, 128))
    with settings.override(dense_prefill="off"):
        assert not dense_prefill_enabled()
        reference = np.array(q(x))
    with settings.override(dense_prefill="on"):
        assert dense_prefill_enabled()
        dense = np.array(q(x))
    assert np.abs(dense - reference).max() < 1e-4
    single = np.array(q(x[:, :1]))  # decode rows keep the quantized mat-vec
    assert np.abs(single - reference[:, :1]).max() < 1e-4
