"""The live kernels (Metal on a Mac, CUDA on NVIDIA) against the reference path at Gemma 4 12B sizes, up to 128K
keys, and their scratch memory. Skipped on machines without either backend (every Linux CPU, CI included): this
file is what a Mac or GPU run adds to the CPU emulation, MSL parse and NVRTC checks.

    pytest tests/test_kernels_device.py        # on a Mac (Metal) or an NVIDIA machine with mlx-cuda
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import settings
from gemma_mlx.kernels import launch, ops, reference

pytestmark = pytest.mark.skipif(
    ops.BACKEND == "reference",
    reason="no Metal or CUDA backend here (or GEMMA_MLX_KERNELS=reference): the kernels cannot run; "
           "see test_kernels_emulation.py / test_kernels_codegen.py for what is checked without one")


def _rand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def compare(q, k, v, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False, scale=1.0):
    args = dict(scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block, k_block=k_block,
                block_overrides_window=override)
    got = ops.attention(q, k, v, **args)
    assert ops._LAUNCH is not None, "the kernels failed their self-check: ops fell back to the reference path"
    want = reference.attention(q, k, v, **args, dense_limit=settings.get().attention_dense_limit,
                               key_block=settings.get().attention_key_block)
    g = np.array(got.astype(mx.float32), np.float64)
    w = np.array(want.astype(mx.float32), np.float64)
    assert np.isfinite(g).all()
    if q.dtype == mx.float32:
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    else:
        ulp = 2.0 ** (-7 if q.dtype == mx.bfloat16 else -10)
        assert np.all(np.abs(g - w) <= 2 * ulp * np.abs(w) + 1e-4), np.abs(g - w).max()


def test_self_check_passes_on_this_machine():
    """What ops runs before the first kernel call: compiles and launches both kernels at both head dims."""
    assert launch.self_check(ops._LAUNCH or launch.Launcher(ops.BACKEND)) is None


@pytest.mark.parametrize("S", [4096, 32768, 131072])
def test_full_layer_decode_over_a_preallocated_cache(S):
    rng = np.random.default_rng(S)
    buf_k = _rand(rng, (1, 1, S + 4096, 512), mx.bfloat16)
    buf_v = _rand(rng, (1, 1, S + 4096, 512), mx.bfloat16)
    q = _rand(rng, (1, 16, 1, 512), mx.bfloat16) * 0.05
    compare(q, buf_k[..., :S, :], buf_v[..., :S, :], mx.array([S - 1], dtype=mx.int32), mx.arange(S, dtype=mx.int32))


def test_sliding_decode_over_a_wrapped_ring():
    rng = np.random.default_rng(1)
    size, last = 1279, 40000
    k_pos = mx.array(np.roll(np.arange(last - size, last, dtype=np.int32), 555))
    q = _rand(rng, (1, 16, 1, 256), mx.bfloat16) * 0.1
    k, v = _rand(rng, (1, 8, size, 256), mx.bfloat16), _rand(rng, (1, 8, size, 256), mx.bfloat16)
    compare(q, k, v, mx.array([last - 1], dtype=mx.int32), k_pos, window=1024)


@pytest.mark.parametrize("S", [8192, 32768])
def test_full_layer_prefill_chunk(S):
    rng = np.random.default_rng(S + 1)
    q = _rand(rng, (1, 16, 512, 512), mx.bfloat16) * 0.05
    k, v = _rand(rng, (1, 1, S, 512), mx.bfloat16), _rand(rng, (1, 1, S, 512), mx.bfloat16)
    compare(q, k, v, mx.arange(S - 512, S, dtype=mx.int32), mx.arange(S, dtype=mx.int32))


@pytest.mark.parametrize("override", [False, True])
def test_sliding_prefill_chunk_with_an_image_block(override):
    rng = np.random.default_rng(2)
    L, S, start = 512, 1535, 5000
    q = _rand(rng, (1, 16, L, 256), mx.bfloat16) * 0.1
    k, v = _rand(rng, (1, 8, S, 256), mx.bfloat16), _rand(rng, (1, 8, S, 256), mx.bfloat16)
    k_pos = mx.arange(start - 1023, start + L, dtype=mx.int32)
    q_pos = mx.arange(start, start + L, dtype=mx.int32)
    q_block = np.full(L, -1, np.int32)
    q_block[100:380] = 0  # a 280-token image
    k_block = np.concatenate([np.full(1023, -1, np.int32), q_block])
    compare(q, k, v, q_pos, k_pos, window=1024, q_block=mx.array(q_block), k_block=mx.array(k_block),
            override=override)


def test_batched_decode_with_per_row_positions():
    """One decode step for 4 sequences (issue #12): sliding rings of 1279 slots wrapped at different slots, one ring
    not yet full, and full-layer caches of different lengths padded to one buffer; each row also equals its solo
    run through the kernels."""
    rng = np.random.default_rng(4)
    size, lasts = 1279, (40000, 1279, 900, 5555)
    k_pos = np.full((4, size), -1, np.int32)
    for b, last in enumerate(lasts):
        first = max(0, last - size)
        slots = np.arange(first, last) % size
        k_pos[b, slots] = np.arange(first, last)
    q = _rand(rng, (4, 16, 1, 256), mx.bfloat16) * 0.1
    k, v = _rand(rng, (4, 8, size, 256), mx.bfloat16), _rand(rng, (4, 8, size, 256), mx.bfloat16)
    q_pos = mx.array([[last - 1] for last in lasts], dtype=mx.int32)
    compare(q, k, v, q_pos, mx.array(k_pos), window=1024)

    S, lengths = 40000, (40000, 7, 20000, 31111)
    full_pos = np.full((4, S), -1, np.int32)
    for b, n in enumerate(lengths):
        full_pos[b, :n] = np.arange(n)
    q = _rand(rng, (4, 16, 1, 512), mx.bfloat16) * 0.05
    k, v = _rand(rng, (4, 1, S, 512), mx.bfloat16), _rand(rng, (4, 1, S, 512), mx.bfloat16)
    q_pos = mx.array([[n - 1] for n in lengths], dtype=mx.int32)
    compare(q, k, v, q_pos, mx.array(full_pos))
    batched = ops.attention(q, k, v, scale=1.0, q_pos=q_pos, k_pos=mx.array(full_pos))
    for b in range(4):
        alone = ops.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], scale=1.0, q_pos=q_pos[b],
                              k_pos=mx.array(full_pos[b]))
        diff = mx.max(mx.abs(batched[b:b + 1].astype(mx.float32) - alone.astype(mx.float32))).item()
        assert diff <= 2.0 ** -7, (b, diff)  # split-K slices may differ between the two launches


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_odd_shapes(dtype):
    rng = np.random.default_rng(3)
    q = _rand(rng, (2, 8, 19, 128), dtype) * 0.1
    k, v = _rand(rng, (2, 2, 300, 128), dtype), _rand(rng, (2, 2, 300, 128), dtype)
    compare(q, k, v, mx.arange(281, 300, dtype=mx.int32), mx.arange(300, dtype=mx.int32), window=37)


def test_kernel_scratch_is_flat_in_context_length():
    """Prefill chunk 512 at D=512 MQA: peak memory beyond the inputs is the same over 8K and 32K keys."""
    def scratch(S):
        rng = np.random.default_rng(0)
        q = _rand(rng, (1, 16, 512, 512), mx.bfloat16)
        k, v = _rand(rng, (1, 1, S, 512), mx.bfloat16), _rand(rng, (1, 1, S, 512), mx.bfloat16)
        q_pos, k_pos = mx.arange(S - 512, S, dtype=mx.int32), mx.arange(S, dtype=mx.int32)
        mx.eval(q, k, v, q_pos, k_pos)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(ops.attention(q, k, v, scale=1.0, q_pos=q_pos, k_pos=k_pos))
        mx.synchronize()
        return mx.get_peak_memory() - base

    short, long = scratch(8192), scratch(32768)
    assert long <= short + 2**20, (short / 2**20, long / 2**20)
