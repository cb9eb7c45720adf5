"""The shared attention bodies, compiled with g++ behind the CPU macro layer (threads + barriers) and run through
the same launch plan the Metal/CUDA backends use, against the float64 oracle and the reference path.

Shapes are Gemma 4's where it matters (full layers: D=512, 16 query heads on 1 KV head; sliding layers: D=256,
16 on 8, window arithmetic over a wrapped ring), with short contexts so the emulation stays quick. The caches are
the model's own (gemma_mlx.cache), so in-place reading is checked on what the model really passes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import FullCache, RingCache
from gemma_mlx.kernels import launch, reference, verify
from gemma_mlx.kernels.launch import attention_kernel
from kernel_tools import needs_tool

gxx, why = verify.find_gxx()
pytestmark = needs_tool(gxx is None, why)


@pytest.fixture(scope="module")
def emu():
    return verify.CpuEmulator()


def _rand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _f64(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def run_kernel(emu, q, k, v, scale, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False):
    out = attention_kernel(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block,
                           k_block=k_block, block_overrides_window=override, launch=emu)
    mx.eval(out)
    return out


def check(emu, q, k, v, scale, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False):
    """Kernel vs float64 oracle (float32 tolerance on float32 inputs) and vs the reference (same rounding)."""
    got = run_kernel(emu, q, k, v, scale, q_pos, k_pos, window, q_block, k_block, override)
    assert got.shape == q.shape and got.dtype == q.dtype
    blk = {} if q_block is None else dict(q_block=np.array(q_block), k_block=np.array(k_block))
    want = verify.oracle_attention(_f64(q), _f64(k), _f64(v), scale, np.array(q_pos), np.array(k_pos), window,
                                   override=override, **blk)
    ref = reference.attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block,
                              k_block=k_block, block_overrides_window=override, dense_limit=1 << 24,
                              key_block=4096)
    g, r = _f64(got), _f64(ref)
    assert np.isfinite(g).all()
    if q.dtype == mx.float32:
        np.testing.assert_allclose(g, want, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)
    else:
        # Same float32 arithmetic from the same rounded inputs; only the final rounding to q's dtype may differ.
        ulp = 2.0 ** (-7 if q.dtype == mx.bfloat16 else -10)
        assert np.all(np.abs(g - r) <= ulp * np.abs(r) + 1e-6)
        np.testing.assert_allclose(g, want, atol=4 * ulp, rtol=4 * ulp)
    return got


def test_full_layer_decode_reads_the_preallocated_cache_in_place(emu):
    """D=512 MQA decode over a FullCache view; split over the keys (3 slices), strides are the buffer's."""
    rng = np.random.default_rng(0)
    cache = FullCache(step=1024)
    for n in (300, 100):  # prefill, then more
        cache.update(_rand(rng, (1, 1, n, 512), mx.bfloat16), _rand(rng, (1, 1, n, 512), mx.bfloat16))
    keys, values, k_pos = cache.update(_rand(rng, (1, 1, 1, 512), mx.bfloat16),
                                       _rand(rng, (1, 1, 1, 512), mx.bfloat16))
    assert keys.shape[2] == 401 and cache.capacity == 1024
    q = _rand(rng, (1, 16, 1, 512), mx.bfloat16)
    emu.calls.clear()
    check(emu, q, keys, values, 0.05, mx.array([400], dtype=mx.int32), k_pos)
    tile = emu.calls[0]
    assert tile["kernel"] == "gemma_attn_tile"
    assert tile["strides"]["k"] == (1024 * 512, 1024 * 512, 512, 1)  # the buffer, not a 401-row copy
    assert tile["template"]["G"] == 16 and tile["groups"] == 2  # 16 query rows per K/V tile, 2 key slices


def test_sliding_decode_over_a_wrapped_ring_with_empty_slots(emu):
    """D=256, 16 query heads on 8 KV heads, the ring returned whole in ring order after wrapping and a rollback."""
    rng = np.random.default_rng(1)
    ring = RingCache(window=64, extra=16)
    for n in (16,) * 12 + (7,):  # 199 positions through a 79-slot ring
        ring.update(_rand(rng, (1, 8, n, 256), mx.bfloat16), _rand(rng, (1, 8, n, 256), mx.bfloat16))
    ring.trim(5)  # the newest 5 slots become empty (-1)
    keys, values, k_pos = ring.update(_rand(rng, (1, 8, 1, 256), mx.bfloat16),
                                      _rand(rng, (1, 8, 1, 256), mx.bfloat16))
    pos = np.array(k_pos)
    assert (pos < 0).sum() == 4 and not np.all(np.diff(pos[pos >= 0]) > 0)  # empty slots, wrapped order
    q = _rand(rng, (1, 16, 1, 256), mx.bfloat16)
    emu.calls.clear()
    check(emu, q, keys, values, 1 / 16, mx.array([ring.offset - 1], dtype=mx.int32), k_pos, window=64)
    assert emu.calls[0]["strides"]["k"] == (8 * 79 * 256, 79 * 256, 256, 1)


def test_full_layer_prefill_chunk_at_an_offset(emu):
    """A 13-token chunk continuing a 35-token cache (causal): tiles after the last query are never loaded."""
    rng = np.random.default_rng(2)
    cache = FullCache(step=256)
    cache.update(_rand(rng, (1, 1, 35, 512), mx.bfloat16), _rand(rng, (1, 1, 35, 512), mx.bfloat16))
    keys, values, k_pos = cache.update(_rand(rng, (1, 1, 13, 512), mx.bfloat16),
                                       _rand(rng, (1, 1, 13, 512), mx.bfloat16))
    q = _rand(rng, (1, 16, 13, 512), mx.bfloat16)
    emu.calls.clear()
    check(emu, q, keys, values, 0.05, mx.arange(35, 48, dtype=mx.int32), k_pos)
    tile = emu.calls[0]
    BK = tile["template"]["BK"]
    # One query per group (BQ=1 at D=512 with 16 heads): query p needs tiles up to p // BK.
    assert tile["tiles_loaded"] == sum(p // BK + 1 for p in range(35, 48)) < 13 * -(-48 // BK)


def test_sliding_prefill_skips_tiles_outside_the_window(emu):
    """A 40-token chunk over the window's past (the ring's long-chunk path): far tiles are skipped, not masked."""
    rng = np.random.default_rng(3)
    ring = RingCache(window=32, extra=8)
    ring.update(_rand(rng, (1, 8, 8, 256), mx.bfloat16), _rand(rng, (1, 8, 8, 256), mx.bfloat16))
    for _ in range(8):
        ring.update(_rand(rng, (1, 8, 8, 256), mx.bfloat16), _rand(rng, (1, 8, 8, 256), mx.bfloat16))
    start = ring.offset
    keys, values, k_pos = ring.update(_rand(rng, (1, 8, 40, 256), mx.bfloat16),
                                      _rand(rng, (1, 8, 40, 256), mx.bfloat16))
    q = _rand(rng, (1, 16, 40, 256), mx.bfloat16)
    q_pos = mx.arange(start, start + 40, dtype=mx.int32)
    emu.calls.clear()
    check(emu, q, keys, values, 1 / 16, q_pos, k_pos, window=32)
    tile = emu.calls[0]
    BK, BQ = tile["template"]["BK"], tile["template"]["BQ"]
    pos, qp = np.array(k_pos), np.array(q_pos)
    S = len(pos)
    expected = 0
    for q0 in range(0, 40, BQ):
        lo, hi = qp[q0:q0 + BQ].min(), qp[q0:q0 + BQ].max()
        for k0 in range(0, S, BK):
            kp = pos[k0:k0 + BK]
            expected += bool(np.any((kp >= 0) & (kp <= hi) & (kp > lo - 32)))
    all_tiles = -(-40 // BQ) * 8 * -(-S // BK)
    assert tile["tiles_loaded"] == expected * 8 < all_tiles  # 8 KV heads


@pytest.mark.parametrize("override", [False, True])
def test_vision_blocks_window_and_override(emu, override):
    """Bidirectional blocks (one longer than the window), with and without the block overriding the window."""
    rng = np.random.default_rng(4)
    L = S = 40
    q, k, v = _rand(rng, (1, 4, L, 64), mx.float32), _rand(rng, (1, 2, S, 64), mx.float32), \
        _rand(rng, (1, 2, S, 64), mx.float32)
    blocks = np.full(L, -1, dtype=np.int32)
    blocks[3:17] = 0  # 14 tokens > window 6
    blocks[20:24] = 1
    pos = mx.arange(S, dtype=mx.int32)
    b = mx.array(blocks)
    check(emu, q, k, v, 0.3, pos, pos, window=6, q_block=b, k_block=b, override=override)


@pytest.mark.parametrize("window", [None, 1, 5, 16])
def test_gqa_window_edges_partial_query_tiles_float16(emu, window):
    """GQA 4:1 at D=128 in float16; 19 queries at an offset (a partial last query tile)."""
    rng = np.random.default_rng(5)
    q, k, v = _rand(rng, (1, 8, 19, 128), mx.float16), _rand(rng, (1, 2, 50, 128), mx.float16), \
        _rand(rng, (1, 2, 50, 128), mx.float16)
    check(emu, q, k, v, 0.1, mx.arange(31, 50, dtype=mx.int32), mx.arange(50, dtype=mx.int32), window=window)


def test_multi_head_batch_and_split_float32(emu):
    """MHA, batch 2, two queries over 700 keys: split over the keys, combined across slices."""
    rng = np.random.default_rng(6)
    q, k, v = _rand(rng, (2, 2, 2, 64), mx.float32), _rand(rng, (2, 2, 700, 64), mx.float32), \
        _rand(rng, (2, 2, 700, 64), mx.float32)
    emu.calls.clear()
    check(emu, q, k, v, 0.2, mx.array([698, 699], dtype=mx.int32), mx.arange(700, dtype=mx.int32), window=300)
    assert emu.calls[0]["groups"] > 2 * 2  # more than one key slice per (batch, head)


def test_rows_that_see_nothing_are_zero_not_nan(emu):
    """An all-empty cache, and queries whose window holds no cached key."""
    rng = np.random.default_rng(7)
    q, k, v = _rand(rng, (1, 16, 1, 512), mx.float32), _rand(rng, (1, 1, 9, 512), mx.float32), \
        _rand(rng, (1, 1, 9, 512), mx.float32)
    out = run_kernel(emu, q, k, v, 1.0, mx.array([5], dtype=mx.int32), mx.full((9,), -1, dtype=mx.int32))
    assert np.array_equal(np.array(out), np.zeros(q.shape, np.float32))
    q2 = _rand(rng, (1, 4, 3, 64), mx.float32)
    k2, v2 = _rand(rng, (1, 2, 10, 64), mx.float32), _rand(rng, (1, 2, 10, 64), mx.float32)
    out2 = check(emu, q2, k2, v2, 1.0, mx.array([30, 31, 100], dtype=mx.int32), mx.arange(10, 20, dtype=mx.int32),
                 window=12)
    assert np.all(np.array(out2)[:, :, 2] == 0) and np.all(np.array(out2)[:, :, 0] != 0)


def test_self_check_passes_on_correct_kernels(emu):
    """The on-machine check a Mac or GPU runs before the first kernel call accepts the (emulated) shared bodies."""
    assert launch.self_check(emu) is None


def _plant_wrong_scale(monkeypatch):
    from gemma_mlx.kernels import sources

    text = sources.read("attn_tile.body")
    assert text.count("const float scale = fp[0];") == 1
    planted = text.replace("const float scale = fp[0];", "const float scale = 1.01f * fp[0];")
    real = sources.read
    monkeypatch.setattr(sources, "read", lambda name: planted if name == "attn_tile.body" else real(name))


def test_self_check_rejects_wrong_kernels(emu, monkeypatch):
    _plant_wrong_scale(monkeypatch)
    problem = launch.self_check(emu)
    assert problem is not None and "max |kernel - reference|" in problem and "D=512" in problem


def test_ops_fall_back_to_the_reference_when_the_self_check_fails(emu, monkeypatch):
    """A kernel that fails its self-check on the user's machine costs a warning and speed, never a wrong answer."""
    from gemma_mlx.kernels import ops

    _plant_wrong_scale(monkeypatch)
    monkeypatch.setattr(ops, "BACKEND", "emulated")
    monkeypatch.setattr(ops, "_LAUNCH", emu)
    monkeypatch.setattr(ops, "_CHECKED", False)
    rng = np.random.default_rng(3)
    q, k = _rand(rng, (1, 4, 1, 64), mx.float32), _rand(rng, (1, 2, 9, 64), mx.float32)
    args = dict(scale=0.125, q_pos=mx.array([8]), k_pos=mx.arange(9), window=4)
    with pytest.warns(RuntimeWarning, match="failed their self-check"):
        got = ops.attention(q, k, k, **args)
    assert ops.BACKEND == "reference" and ops._LAUNCH is None and ops._CHECKED
    want = reference.attention(q, k, k, **args, dense_limit=1 << 24, key_block=4096)
    assert mx.array_equal(got, want).item()


def test_launch_plans_fit_the_hardware():
    """Every plan the dispatcher can make: whole threadgroups, rows mapped onto warps, tiles within 32 KB."""
    for D in (64, 128, 256, 512):
        for Hq, Hkv in ((16, 1), (16, 8), (8, 2), (4, 4), (3, 1)):
            for L in (1, 2, 3, 8, 17, 512):
                for itemsize in (2, 4):
                    p = launch.plan_attention(1, Hq, Hkv, L, 5000, D, itemsize)
                    R = p.R
                    assert p.BQ >= 1 and p.QT * p.BQ >= L and (p.QT - 1) * p.BQ < L
                    assert (R % launch.NW == 0) if R >= launch.NW else (launch.NW % R == 0)
                    wr = max(1, launch.NW // R)
                    assert D % (32 * wr) == 0
                    shared = 2 * p.BK * D * itemsize + 2 * p.BK * 4 + launch.NW * p.BK * 4
                    assert shared <= 32768 and p.BK <= launch.TG
                    assert p.NS * p.SPLIT >= 5000 and p.SPLIT % p.BK == 0


# ------------------------------------------------------------------------------------------- ThreadSanitizer

def _tsan_case(launcher):
    """Decode-sized rows (R = 2 < 8 warps: the head dim is split over 4 warps, which adds the partial-sum
    barrier) with vision blocks and a window, so every barrier of attn_tile is on the path."""
    rng = np.random.default_rng(8)
    q, k, v = _rand(rng, (1, 4, 1, 128), mx.float32), _rand(rng, (1, 2, 40, 128), mx.float32), \
        _rand(rng, (1, 2, 40, 128), mx.float32)
    blocks = mx.array(np.r_[np.full(30, -1), np.zeros(10)].astype(np.int32))
    args = dict(scale=0.3, q_pos=mx.array([39], dtype=mx.int32), k_pos=mx.arange(40, dtype=mx.int32), window=9,
                q_block=blocks[-1:], k_block=blocks, block_overrides_window=True)
    return attention_kernel(q, k, v, **args, launch=launcher), reference.attention(
        q, k, v, **args, dense_limit=1 << 24, key_block=4096)


tsan, no_tsan = verify.find_tsan() if gxx else (False, why)
needs_tsan = needs_tool(not tsan, no_tsan)


@needs_tsan
def test_no_data_race_under_thread_sanitizer():
    emu = verify.CpuEmulator(tsan=True)
    got, ref = _tsan_case(emu)
    assert emu.calls[0]["template"]["G"] * emu.calls[0]["template"]["BQ"] < launch.NW
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-6)


BARRIERS = [
    "    KX_SYNC();  // every thread is done reading the previous tile\n",
    "      kblk_tile[kx_tid] = (HAS_BLOCKS && j < k_end) ? k_blk[kbo + j] : -1;\n    }\n    KX_SYNC();\n",
    "    KX_SYNC();\n\n    float s[RW][BK];",
    "for (int jj = 0; jj < BK; ++jj) partial[int(kx_warp) * BK + jj] = s[0][jj];\n      KX_SYNC();\n",
]


@needs_tsan
@pytest.mark.parametrize("barrier", range(len(BARRIERS)))
def test_thread_sanitizer_catches_each_missing_barrier(barrier, monkeypatch):
    """Negative control: drop any one of attn_tile's barriers and the race is reported (deterministically:
    ThreadSanitizer reasons about happens-before, not timing)."""
    from gemma_mlx.kernels import sources

    text = sources.read("attn_tile.body")
    cut = BARRIERS[barrier]
    assert text.count(cut) == 1
    planted = text.replace(cut, cut.replace("KX_SYNC();", ""))
    real = sources.read
    monkeypatch.setattr(sources, "read", lambda name: planted if name == "attn_tile.body" else real(name))
    with pytest.raises(RuntimeError, match="ThreadSanitizer: data race"):
        _tsan_case(verify.CpuEmulator(tsan=True))
