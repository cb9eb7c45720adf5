"""The attention reference path against a float64 numpy oracle, and its memory bound at long context."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import settings
from gemma_mlx.kernels import ops


def oracle(q, k, v, scale, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False):
    """Straight from the brief's definition, in float64: causal, k > q - W, vision blocks, empty slots."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros((B, Hq, L, v.shape[-1]))
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        for i in range(L):
            qp = q_pos[i]
            keep = []
            for j, kp in enumerate(k_pos):
                if kp < 0:
                    continue
                same = q_block is not None and q_block[i] >= 0 and q_block[i] == k_block[j]
                visible = kp <= qp or same
                in_window = window is None or kp > qp - window or (same and override)
                if visible and in_window:
                    keep.append(j)
            if not keep:
                continue
            s = np.array([q[0, h, i] @ k[0, kh, j] for j in keep], dtype=np.float64) * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[0, h, i] = p @ v[0, kh, keep].astype(np.float64)
    return out


def run(q, k, v, scale, q_pos, k_pos, **kw):
    mk = {key: (mx.array(val) if isinstance(val, np.ndarray) else val) for key, val in kw.items()}
    return np.array(ops.attention(mx.array(q), mx.array(k), mx.array(v), scale=scale, q_pos=mx.array(q_pos),
                                  k_pos=mx.array(k_pos), **mk))


@pytest.fixture(params=["dense", "blocked"])
def path(request):
    if request.param == "blocked":
        with settings.override(attention_dense_limit=0, attention_key_block=5):  # odd block edges inside windows
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("window", [None, 1, 4, 7])
def test_window_edges_and_head_groups(path, hq, hkv, window):
    rng = np.random.default_rng(hq * 10 + hkv + (window or 0))
    L, S, D = 6, 17, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, hq, L, D), (1, hkv, S, D), (1, hkv, S, D)))
    q_pos = np.arange(S - L, S, dtype=np.int32)  # a chunk at an offset, continuing a cache
    k_pos = np.arange(S, dtype=np.int32)
    got = run(q, k, v, 0.7, q_pos, k_pos, window=window)
    np.testing.assert_allclose(got, oracle(q, k, v, 0.7, q_pos, k_pos, window), atol=2e-6)


def test_ring_buffer_order_and_empty_slots(path):
    rng = np.random.default_rng(1)
    D, R = 16, 12
    q, k, v = rng.standard_normal((1, 2, 1, D)), rng.standard_normal((1, 1, R, D)), rng.standard_normal((1, 1, R, D))
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    k_pos = (np.arange(R) + 30) % R + 20  # a wrapped ring: slot s holds position p with p % R == s
    k_pos = k_pos.astype(np.int32)
    k_pos[[3, 7]] = -1  # empty slots
    q_pos = np.array([k_pos.max()], dtype=np.int32)
    for window in (None, 5, 8):
        np.testing.assert_allclose(run(q, k, v, 1.0, q_pos, k_pos, window=window),
                                   oracle(q, k, v, 1.0, q_pos, k_pos, window), atol=2e-6)


@pytest.mark.parametrize("override", [False, True])
def test_vision_blocks_with_and_without_window_override(path, override):
    rng = np.random.default_rng(2)
    L = S = 14
    q, k, v = (rng.standard_normal((1, 2, L, 8)).astype(np.float32) for _ in range(3))
    pos = np.arange(S, dtype=np.int32)
    blocks = np.array([-1, -1, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1, -1, -1], dtype=np.int32)
    kw = dict(window=3, q_block=blocks, k_block=blocks, block_overrides_window=override)
    got = run(q, k, v, 1.0, pos, pos, **kw)
    np.testing.assert_allclose(got, oracle(q, k, v, 1.0, pos, pos, 3, blocks, blocks, override), atol=2e-6)


def test_a_query_that_sees_nothing_gives_zeros(path):
    q = np.ones((1, 1, 1, 4), np.float32)
    k = v = np.ones((1, 1, 3, 4), np.float32)
    out = run(q, k, v, 1.0, np.array([5], np.int32), np.array([-1, -1, -1], np.int32))
    assert np.array_equal(out, np.zeros_like(out))


def test_scratch_does_not_grow_with_context():
    """Long prefill through the blocked path: peak memory minus the K/V themselves stays flat from 16K to 64K keys
    (the dense score matrix would grow from 64 MB to 256 MB)."""
    def peak_scratch(S):
        rng = np.random.default_rng(0)
        q = mx.array(rng.standard_normal((1, 4, 256, 128), dtype=np.float32))
        k = mx.array(rng.standard_normal((1, 1, S, 128), dtype=np.float32))
        v = mx.array(rng.standard_normal((1, 1, S, 128), dtype=np.float32))
        q_pos = mx.arange(S - 256, S, dtype=mx.int32)
        k_pos = mx.arange(S, dtype=mx.int32)
        mx.eval(q, k, v, q_pos, k_pos)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(ops.attention(q, k, v, scale=1.0, q_pos=q_pos, k_pos=k_pos, window=None))
        return mx.get_peak_memory() - base

    short, long = peak_scratch(16384), peak_scratch(65536)
    assert long < short + 32 * 2**20, (short / 2**20, long / 2**20)
    assert long < 160 * 2**20  # far below the 256 MB dense score matrix alone
