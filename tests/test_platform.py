"""CPU fast paths: dequantize + GEMM for multi-row quantized products gives the quantized matmul's result."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gemma_mlx.model.linear import DENSE_MIN_ROWS, QuantizedLinear, use_prefill_friendly_linears
from gemma_mlx.platform import dense_prefill_enabled


@pytest.mark.parametrize("bits, group_size, bias", [(4, 64, False), (8, 32, True)])
def test_dense_prefill_path_equals_quantized_matmul(monkeypatch, bits, group_size, bias):
    mx.random.seed(0)
    layer = nn.Linear(128, 96, bias=bias)
    model = nn.Sequential(layer)
    nn.quantize(model, group_size=group_size, bits=bits)
    use_prefill_friendly_linears(model)
    q = model.layers[0]
    assert isinstance(q, QuantizedLinear)
    x = mx.random.normal((2, DENSE_MIN_ROWS, 128))
    monkeypatch.setenv("GEMMA_MLX_DENSE_PREFILL", "0")
    assert not dense_prefill_enabled()
    reference = np.array(q(x))
    monkeypatch.setenv("GEMMA_MLX_DENSE_PREFILL", "1")
    assert dense_prefill_enabled()
    dense = np.array(q(x))
    assert np.abs(dense - reference).max() < 1e-4
    single = np.array(q(x[:, :1]))  # decode rows keep the quantized mat-vec
    assert np.abs(single - reference[:, :1]).max() < 1e-4
