"""The ops entry points on their reference path: backend selection, attention against the float64 oracle on the
model's real caches, its memory bound at long context, and the patch projection against float64."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import FullCache, RingCache
from gemma_mlx import settings
from gemma_mlx.kernels import ops, reference, verify


def _rand(rng, shape, dtype=mx.float32):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


@pytest.fixture(params=["dense", "blocked"])
def path(request):
    if request.param == "blocked":
        with settings.override(attention_dense_limit=0, attention_key_block=7):  # block edges inside windows, rings
            yield request.param
    else:
        yield request.param


def _check(q, k, v, scale, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False, atol=2e-6):
    got = ops.attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block,
                        k_block=k_block, block_overrides_window=override)
    assert got.dtype == q.dtype and got.shape == q.shape
    blk = {} if q_block is None else dict(q_block=np.array(q_block), k_block=np.array(k_block))
    want = verify.oracle_attention(_np(q), _np(k), _np(v), scale, np.array(q_pos), np.array(k_pos), window,
                                   override=override, **blk)
    np.testing.assert_allclose(_np(got), want, atol=atol, rtol=1e-5)


def test_backend_is_selected_once_with_an_override():
    assert ops.BACKEND == ("metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available()
                           else "reference")
    code = "from gemma_mlx.kernels import ops; print(ops.BACKEND, ops._LAUNCH)"
    env = dict(os.environ, GEMMA_MLX_KERNELS="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "None"]
    env["GEMMA_MLX_KERNELS"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "GEMMA_MLX_KERNELS must be" in bad.stderr


def test_ring_buffer_wraparound_window_edges(path):
    """Decode and short chunks over RingCache's whole ring, in ring order, from the first token (partial window)
    through several wraps, including a rollback that leaves empty slots."""
    rng = np.random.default_rng(0)
    W = 9
    ring = RingCache(window=W, extra=4)  # 12 slots
    pos = 0
    for step, n in enumerate([3, 1, 4, 1, 1, 2, 4, 1, 3, 1, 1, 1]):
        k, v = _rand(rng, (1, 2, n, 16)), _rand(rng, (1, 2, n, 16))
        keys, values, k_pos = ring.update(k, v)
        q = _rand(rng, (1, 6, n, 16))  # GQA 3:1
        _check(q, keys, values, 0.5, mx.arange(pos, pos + n, dtype=mx.int32), k_pos, window=W)
        pos += n
        if step == 7:
            ring.trim(3)
            pos -= 3
    assert pos > ring.size  # wrapped


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (16, 1)])
@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_full_cache_view_offsets_and_head_groups(path, hq, hkv, window):
    rng = np.random.default_rng(hq + hkv + (window or 0))
    cache = FullCache(step=32)
    cache.update(_rand(rng, (1, hkv, 11, 8)), _rand(rng, (1, hkv, 11, 8)))
    keys, values, k_pos = cache.update(_rand(rng, (1, hkv, 5, 8)), _rand(rng, (1, hkv, 5, 8)))
    _check(_rand(rng, (1, hq, 5, 8)), keys, values, 0.7, mx.arange(11, 16, dtype=mx.int32), k_pos, window)


@pytest.mark.parametrize("override", [False, True])
def test_vision_blocks(path, override):
    rng = np.random.default_rng(3)
    L = 20
    blocks = mx.array([-1, 0, 0, 0, 0, 0, 0, -1, -1, 1, 1, 1, -1, 2, 2, 2, 2, 2, 2, -1], dtype=mx.int32)
    pos = mx.arange(L, dtype=mx.int32)
    _check(_rand(rng, (1, 4, L, 8)), _rand(rng, (1, 2, L, 8)), _rand(rng, (1, 2, L, 8)), 1.0, pos, pos, window=4,
           q_block=blocks, k_block=blocks, override=override)


def test_no_visible_key_gives_zeros(path):
    q = mx.ones((1, 2, 2, 8))
    k = v = mx.ones((1, 1, 4, 8))
    out = ops.attention(q, k, v, scale=1.0, q_pos=mx.array([3, 50], dtype=mx.int32),
                        k_pos=mx.array([-1, 1, 2, -1], dtype=mx.int32), window=5)
    assert np.array_equal(np.array(out)[:, :, 1], np.zeros((1, 2, 8))) and np.all(np.array(out)[:, :, 0] == 1)


def test_blocked_equals_dense_in_bfloat16():
    rng = np.random.default_rng(4)
    q, k, v = _rand(rng, (1, 16, 3, 64), mx.bfloat16), _rand(rng, (1, 1, 40, 64), mx.bfloat16), \
        _rand(rng, (1, 1, 40, 64), mx.bfloat16)
    args = dict(scale=0.125, q_pos=mx.arange(37, 40, dtype=mx.int32), k_pos=mx.arange(40, dtype=mx.int32), window=20)
    dense = ops.attention(q, k, v, **args)
    with settings.override(attention_dense_limit=0, attention_key_block=6):
        blocked = ops.attention(q, k, v, **args)
    diff = np.abs(_np(blocked) - _np(dense))
    assert diff.max() <= 2.0 ** -7 * np.abs(_np(dense)).max()


def test_bad_window_is_rejected():
    with pytest.raises(ValueError, match="window"):
        ops.attention(mx.ones((1, 1, 1, 8)), mx.ones((1, 1, 1, 8)), mx.ones((1, 1, 1, 8)), scale=1.0,
                      q_pos=mx.array([0]), k_pos=mx.array([0]), window=0)


def _scratch(L, S, D=512, Hq=16, dtype=mx.bfloat16):
    """Peak memory of one attention call beyond its inputs (the K/V cache and q)."""
    rng = np.random.default_rng(0)
    q = _rand(rng, (1, Hq, L, D), dtype)
    k, v = _rand(rng, (1, 1, S, D), dtype), _rand(rng, (1, 1, S, D), dtype)
    q_pos, k_pos = mx.arange(S - L, S, dtype=mx.int32), mx.arange(S, dtype=mx.int32)
    mx.eval(q, k, v, q_pos, k_pos)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(reference.attention(q, k, v, scale=1.0, q_pos=q_pos, k_pos=k_pos, dense_limit=settings.get().attention_dense_limit,
                                key_block=settings.get().attention_key_block))
    return mx.get_peak_memory() - base


def test_reference_scratch_is_flat_in_context_length():
    """Gemma 4 full-layer shapes (D=512, 16 query heads on one KV head, bfloat16 cache): decode at 16K and 64K
    keys, a 4-query chunk at 8K and 32K. Neither the score matrix nor a float32 copy of the cache (256 MB of K+V
    at 64K) is ever built; the scratch is the same at both lengths."""
    decode = _scratch(1, 16384), _scratch(1, 65536)
    chunk = _scratch(4, 8192), _scratch(4, 32768)
    for short, long in (decode, chunk):
        assert long <= short + 2**20, (short / 2**20, long / 2**20)
        assert long < 64 * 2**20


def _oracle_patch_embed(x, w1, b1, W, b, w2, b2, eps):
    def ln(h, w_, b_):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + eps) * w_ + b_
    return ln(ln(x, w1, b1) @ W.T + b, w2, b2)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_patch_embed_against_float64(dtype):
    """Real widths (6912 -> 3840), pixels in [0, 1] (mean ≈ 0.5 ≫ what the LayerNorm divides by, the hard case
    for low-precision statistics)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (6, 6912)).astype(np.float32)
    w1, b1 = 1 + 0.1 * rng.standard_normal(6912), 0.1 * rng.standard_normal(6912)
    W, b = rng.standard_normal((3840, 6912)) / np.sqrt(6912), 0.1 * rng.standard_normal(3840)
    w2, b2 = 1 + 0.1 * rng.standard_normal(3840), 0.1 * rng.standard_normal(3840)
    params = [mx.array(a.astype(np.float32)).astype(dtype) for a in (w1, b1, W, b, w2, b2)]
    got = ops.patch_embed(mx.array(x), *params, eps=1e-5)
    assert got.shape == (6, 3840) and got.dtype == dtype
    want = _oracle_patch_embed(x.astype(np.float64), *(_np(p) for p in params), eps=1e-5)
    err = np.abs(_np(got) - want).max()
    # float32: GEMM rounding over 6912 terms. bfloat16: the rounding points transformers has (inputs, both
    # LayerNorm outputs and the GEMM output in bfloat16) stay within one bfloat16 ulp of the largest output.
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want).max())) - 7)
    assert err < (1e-4 if dtype == mx.float32 else ulp), (err, ulp)


def test_layer_norm_statistics_are_float32_for_bfloat16_input():
    """The LayerNorm of bfloat16 pixels equals float64 to float32 accuracy (mean and variance are not taken in
    bfloat16, whose 8-bit mantissa loses the variance of [0, 1] pixels around their 0.5 mean)."""
    rng = np.random.default_rng(6)
    x = mx.array(rng.uniform(0, 1, (4, 6912)).astype(np.float32)).astype(mx.bfloat16)
    w, b = mx.ones((6912,), mx.bfloat16), mx.zeros((6912,), mx.bfloat16)
    got = reference.layer_norm_f32(x, w, b, 1e-5)
    assert got.dtype == mx.float32
    h = _np(x)
    want = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    assert np.abs(_np(got) - want).max() < 1e-5
