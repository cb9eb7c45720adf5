"""Per-row positions (issue #12): one attention call runs B sequences, each at its own positions, with its own ring
order and wrap point, empty slots, window edge and vision blocks, through the mask rule, the reference path (dense
and blocked) and the shared kernel bodies (CPU emulation).

The proof is that row b of a batched call equals row b run alone (B=1) with its own 1-D positions: bit for bit
where the arithmetic is the same (the reference path; the kernels whenever the batched and solo launch plans have
the same key slices), else within float32 error (the kernels when split-K slices differ; the solo run over only the
row's valid keys, whose sums have a different length). Each batch is also checked against the float64 oracle.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import settings

from gemma_mlx.cache import RingCache
from gemma_mlx.kernels import launch, ops, reference, verify
from gemma_mlx.kernels.launch import attention_kernel
from gemma_mlx.model import masks
from kernel_tools import needs_tool

D = 64  # a multiple of 32, so the same problems run on the reference path and through the kernel bodies


def _rand(rng, shape, dtype=mx.float32):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _f64(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ problems

def ring_decode(dtype, rng):
    """Decode for 4 sequences over their own RingCaches (window 9, 12 slots): one partial ring (empty slots), one
    just full, two wrapped at different slots, one of them rolled back (empty slots inside the ring)."""
    keys, values, k_pos, q_pos = [], [], [], []
    for b, (n, trim) in enumerate([(5, 0), (11, 0), (19, 0), (30, 2)]):
        ring = RingCache(window=9, extra=4)
        for chunk in (n // 2, n - n // 2):
            ring.update(_rand(rng, (1, 2, chunk, D), dtype), _rand(rng, (1, 2, chunk, D), dtype))
        ring.trim(trim)
        kb, vb, pb = ring.update(_rand(rng, (1, 2, 1, D), dtype), _rand(rng, (1, 2, 1, D), dtype))
        keys.append(kb)
        values.append(vb)
        k_pos.append(pb)
        q_pos.append(mx.array([ring.offset - 1], dtype=mx.int32))
    kp = np.array(mx.stack(k_pos))
    assert len({tuple(np.flatnonzero(r == r.max())) for r in kp}) == 4  # the newest slot differs in every row
    return dict(q=_rand(rng, (4, 6, 1, D), dtype), k=mx.concatenate(keys), v=mx.concatenate(values), scale=0.3,
                q_pos=mx.stack(q_pos), k_pos=mx.stack(k_pos), window=9)


def full_rows(dtype, rng, window=None):
    """Two queries per row over full caches of 3, 17, 40 and 0 tokens padded to 40 slots (-1): the empty row and,
    with a window, the row whose queries sit far past its keys see nothing and must give zeros."""
    lengths, S = (3, 17, 40, 0), 40
    k_pos = np.full((4, S), -1, np.int32)
    q_pos = np.zeros((4, 2), np.int32)
    for b, n in enumerate(lengths):
        k_pos[b, :n] = np.arange(n)
        q_pos[b] = (n - 2, n - 1) if n >= 2 else (0, 1)
    q_pos[0] = (60, 61)  # past its 3 keys: nothing visible under a window, everything without one
    return dict(q=_rand(rng, (4, 4, 2, D), dtype), k=_rand(rng, (4, 1, S, D), dtype),
                v=_rand(rng, (4, 1, S, D), dtype), scale=0.2, q_pos=mx.array(q_pos), k_pos=mx.array(k_pos),
                window=window)


def chunk_with_vision_block(dtype, rng, override=False):
    """An 8-token prefill chunk for 4 sequences at offsets 0, 5, 11 and 3, window 4; only row 1's chunk holds an
    image block (5 tokens, longer than the window), so only row 1 has bidirectional keys."""
    L, offsets = 8, (0, 5, 11, 3)
    B, S = len(offsets), max(offsets) + L
    k_pos = np.full((B, S), -1, np.int32)
    for b, o in enumerate(offsets):
        k_pos[b, :o + L] = np.arange(o + L)
    q_pos = np.array([np.arange(o, o + L) for o in offsets], np.int32)
    q_block = np.full((B, L), -1, np.int32)
    q_block[1, 1:6] = 0
    q_block = mx.array(q_block)
    k_block = masks.key_blocks(mx.array(k_pos), mx.array(offsets, dtype=mx.int32), q_block)
    return dict(q=_rand(rng, (B, 4, L, D), dtype), k=_rand(rng, (B, 2, S, D), dtype),
                v=_rand(rng, (B, 2, S, D), dtype), scale=0.25, q_pos=mx.array(q_pos), k_pos=mx.array(k_pos),
                window=4, q_block=q_block, k_block=k_block, block_overrides_window=override)


PROBLEMS = {
    "ring_decode": ring_decode,
    "full_rows": full_rows,
    "full_rows_window": lambda dtype, rng: full_rows(dtype, rng, window=5),
    "vision_block_one_row": chunk_with_vision_block,
    "vision_block_one_row_override": lambda dtype, rng: chunk_with_vision_block(dtype, rng, override=True),
}


def _args(p):
    return {key: val for key, val in p.items() if key not in ("q", "k", "v")}


def solo(p, b, trimmed=False):
    """Row b as a problem of its own (B=1, 1-D positions); trimmed keeps only its valid (k_pos >= 0) slots."""
    keep = np.flatnonzero(np.array(p["k_pos"][b]) >= 0) if trimmed else slice(None)
    keep_mx = mx.array(keep) if trimmed else None
    out = {}
    for key, val in p.items():
        if key in ("q",):
            out[key] = val[b:b + 1]
        elif key in ("k", "v"):
            out[key] = val[b:b + 1] if not trimmed else mx.take(val[b:b + 1], keep_mx, axis=2)
        elif key in ("k_pos", "k_block") and val is not None:
            out[key] = val[b] if not trimmed else mx.take(val[b], keep_mx)
        elif key in ("q_pos", "q_block") and val is not None:
            out[key] = val[b]
        else:
            out[key] = val
    return out


def oracle(p):
    blk = {} if p.get("q_block") is None else dict(q_block=np.array(p["q_block"]), k_block=np.array(p["k_block"]))
    return verify.oracle_attention(_f64(p["q"]), _f64(p["k"]), _f64(p["v"]), p["scale"], np.array(p["q_pos"]),
                                   np.array(p["k_pos"]), p["window"], override=p.get("block_overrides_window", False),
                                   **blk)


def close_to_oracle(got, want, dtype):
    if dtype == mx.float32:
        np.testing.assert_allclose(_f64(got), want, atol=2e-6, rtol=1e-5)
    else:
        np.testing.assert_allclose(_f64(got), want, atol=2.0 ** -6, rtol=2.0 ** -6)


def within_rounding(got, want, dtype):
    """float32: a few float32 ulps. bfloat16/float16: the same float32 value up to its final rounding (one ulp)."""
    g, w = _f64(got), _f64(want)
    ulp = {mx.float32: 2.0 ** -20, mx.bfloat16: 2.0 ** -7, mx.float16: 2.0 ** -10}[dtype]
    assert np.all(np.abs(g - w) <= ulp * np.abs(w) + 1e-6), np.abs(g - w).max()


# ------------------------------------------------------------------------------------------------ mask rule

def test_allowed_broadcasts_per_row_inputs_with_the_one_rule():
    """(B, L, S) from any mix of shared and per-row inputs equals stacking the 1-D rule row by row; all-1-D inputs
    still give (L, S)."""
    rng = np.random.default_rng(0)
    B, L, S = 3, 5, 11
    q_rows = mx.array(rng.integers(0, 20, (B, L)).astype(np.int32))
    k_rows = mx.array(rng.integers(-1, 20, (B, S)).astype(np.int32))
    qb_rows = mx.array(rng.integers(-1, 2, (B, L)).astype(np.int32))
    kb_rows = mx.array(rng.integers(-1, 2, (B, S)).astype(np.int32))
    assert masks.allowed(q_rows[0], k_rows[0], window=4).shape == (L, S)
    for window in (None, 4):
        for override in (False, True):
            for q_shared in (False, True):
                for k_shared in (False, True):
                    q, qb = (q_rows[0], qb_rows[0]) if q_shared else (q_rows, qb_rows)
                    k, kb = (k_rows[0], kb_rows[0]) if k_shared else (k_rows, kb_rows)
                    if q_shared and k_shared:
                        continue
                    got = masks.allowed(q, k, window=window, q_block=qb, k_block=kb,
                                        block_overrides_window=override)
                    want = mx.stack([masks.allowed(
                        q if q_shared else q[b], k if k_shared else k[b], window=window,
                        q_block=qb if q_shared else qb[b], k_block=kb if k_shared else kb[b],
                        block_overrides_window=override) for b in range(B)])
                    assert got.shape == (B, L, S) and mx.array_equal(got, want).item()


def test_key_blocks_per_row():
    """Per-row key blocks: each row's keys at or after its own chunk start take its own queries' block ids."""
    k_pos = mx.array([[0, 1, 2, 3, -1], [4, 5, 6, 2, 3]], dtype=mx.int32)  # row 1 is a wrapped ring
    q_block = mx.array([[0, 0], [-1, 3]], dtype=mx.int32)
    got = masks.key_blocks(k_pos, mx.array([2, 5], dtype=mx.int32), q_block)
    assert got.tolist() == [[-1, -1, 0, 0, -1], [-1, -1, 3, -1, -1]]
    for b, start in enumerate((2, 5)):
        assert mx.array_equal(got[b], masks.key_blocks(k_pos[b], start, q_block[b])).item()
    shared = masks.key_blocks(mx.array([3, 4, 5], dtype=mx.int32), 4, mx.array([7, 8], dtype=mx.int32))
    assert shared.tolist() == [-1, 7, 8]


def test_bad_row_shapes_are_rejected_naming_the_argument():
    q, k = mx.ones((2, 1, 3, 8)), mx.ones((2, 1, 5, 8))
    ok = dict(scale=1.0, q_pos=mx.zeros((2, 3), mx.int32), k_pos=mx.zeros((5,), mx.int32))
    assert ops.attention(q, k, k, **ok).shape == q.shape
    for name, bad in (("q_pos", mx.zeros((3, 3), mx.int32)), ("k_pos", mx.zeros((2, 4), mx.int32)),
                      ("k_block", mx.zeros((1, 5), mx.int32))):
        args = dict(ok, q_block=mx.zeros((3,), mx.int32), k_block=mx.zeros((5,), mx.int32))
        args[name] = bad
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            ops.attention(q, k, k, **args)


# ------------------------------------------------------------------------------------------ reference path

@pytest.fixture(params=["dense", "blocked"])
def path(request):
    if request.param == "blocked":
        # block edges inside windows, rings and the image block
        with settings.override(attention_dense_limit=0, attention_key_block=5):
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_reference_rows_equal_each_row_alone(path, problem, dtype):
    p = PROBLEMS[problem](dtype, np.random.default_rng(1))
    got = ops.attention(p["q"], p["k"], p["v"], **_args(p))
    assert got.shape == p["q"].shape and got.dtype == dtype
    close_to_oracle(got, oracle(p), dtype)
    for b in range(p["q"].shape[0]):
        alone = solo(p, b)
        want = ops.attention(alone["q"], alone["k"], alone["v"], **_args(alone))
        assert mx.array_equal(got[b:b + 1], want).item(), (problem, b)  # bit-identical
        if (np.array(p["k_pos"][b]) >= 0).any():
            short = solo(p, b, trimmed=True)
            within_rounding(got[b:b + 1], ops.attention(short["q"], short["k"], short["v"], **_args(short)), dtype)


def test_rows_that_see_nothing_are_zeros(path):
    p = full_rows(mx.float32, np.random.default_rng(2), window=5)
    out = np.array(ops.attention(p["q"], p["k"], p["v"], **_args(p)))
    assert np.isfinite(out).all()
    assert np.all(out[0] == 0) and np.all(out[3] == 0)  # far past its keys; no keys at all
    assert np.all(out[1] != 0) and np.all(out[2] != 0)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def test_shared_positions_equal_the_same_positions_per_row(path, dtype):
    """1-D positions keep their meaning: identical bits to the same positions tiled to (B, L) / (B, S)."""
    p = chunk_with_vision_block(dtype, np.random.default_rng(3))
    shared = dict(_args(p), q_pos=p["q_pos"][1], k_pos=p["k_pos"][1], q_block=p["q_block"][1],
                  k_block=p["k_block"][1])
    tiled = {key: (mx.broadcast_to(val, (4, val.shape[0])) if key in ("q_pos", "k_pos", "q_block", "k_block")
                   else val) for key, val in shared.items()}
    a = ops.attention(p["q"], p["k"], p["v"], **shared)
    b = ops.attention(p["q"], p["k"], p["v"], **tiled)
    assert mx.array_equal(a, b).item()


# ------------------------------------------------------------------------------------------- kernel bodies

gxx, why = verify.find_gxx()
needs_gxx = needs_tool(gxx is None, why)


@pytest.fixture(scope="module")
def emu():
    return verify.CpuEmulator()


def kernel(emu, p):
    out = attention_kernel(p["q"], p["k"], p["v"], **{**dict(q_block=None, k_block=None,
                                                                block_overrides_window=False), **_args(p)},
                           launch=emu)
    mx.eval(out)
    return out


@needs_gxx
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("problem", ["ring_decode", "full_rows_window", "vision_block_one_row_override"])
def test_kernel_rows_equal_each_row_alone(emu, problem, dtype):
    """The shared attn_tile/attn_combine bodies with per-row positions: against the oracle, the reference path and
    each row run alone. Below 256 keys both launches have one key slice, so the arithmetic and the bits agree."""
    p = PROBLEMS[problem](dtype, np.random.default_rng(4))
    got = kernel(emu, p)
    assert np.isfinite(np.array(got.astype(mx.float32))).all()
    close_to_oracle(got, oracle(p), dtype)
    ref = reference.attention(p["q"], p["k"], p["v"], **{**dict(q_block=None, k_block=None), **_args(p)},
                              dense_limit=1 << 24, key_block=4096)
    if dtype == mx.float32:  # another summation order than the reference's matmuls
        np.testing.assert_allclose(_f64(got), _f64(ref), atol=2e-5, rtol=1e-4)
    else:  # the same float32 values from the same rounded inputs, up to the final rounding
        within_rounding(got, ref, dtype)
    for b in range(p["q"].shape[0]):
        alone = kernel(emu, solo(p, b))
        assert mx.array_equal(got[b:b + 1], alone).item(), (problem, b)
    if problem == "full_rows_window":  # rows 0 and 3 see no key: exact zeros, not NaN
        out = np.array(got.astype(mx.float32))
        assert np.all(out[[0, 3]] == 0) and np.all(out[[1, 2]] != 0)


@needs_gxx
def test_kernel_rows_at_gemma_full_layer_shape(emu):
    """Gemma 4's full-layer decode (D=512, 16 query heads on one KV head, bfloat16) for 4 sequences of 300, 41, 177
    and 1 cached tokens in one padded cache: split over the keys, each row equal to its solo run bit for bit."""
    rng = np.random.default_rng(8)
    S, lengths = 300, (300, 41, 177, 1)
    k_pos = np.full((4, S), -1, np.int32)
    for b, n in enumerate(lengths):
        k_pos[b, :n] = np.arange(n)
    p = dict(q=_rand(rng, (4, 16, 1, 512), mx.bfloat16), k=_rand(rng, (4, 1, S, 512), mx.bfloat16),
             v=_rand(rng, (4, 1, S, 512), mx.bfloat16), scale=0.05, q_pos=mx.array([[n - 1] for n in lengths]),
             k_pos=mx.array(k_pos), window=None)
    emu.calls.clear()
    got = kernel(emu, p)
    assert emu.calls[0]["groups"] == 8  # 2 key slices per row
    close_to_oracle(got, oracle(p), mx.bfloat16)
    for b in range(4):
        assert mx.array_equal(got[b:b + 1], kernel(emu, solo(p, b))).item(), b


@needs_gxx
def test_kernel_rows_under_a_different_key_split_agree_within_float32(emu, monkeypatch):
    """When the batch has enough groups to need fewer key slices than a row alone (split-K), the per-slice sums
    are merged in a different grouping: equal within float32 rounding, not bit for bit."""
    monkeypatch.setattr(launch, "TARGET_GROUPS", 8)
    rng = np.random.default_rng(5)
    S, lengths = 600, (600, 350, 90, 520)
    k_pos = np.full((4, S), -1, np.int32)
    for b, n in enumerate(lengths):
        k_pos[b, :n] = np.arange(n)
    p = dict(q=_rand(rng, (4, 4, 1, D)), k=_rand(rng, (4, 1, S, D)), v=_rand(rng, (4, 1, S, D)), scale=0.2,
             q_pos=mx.array([[n - 1] for n in lengths], dtype=mx.int32), k_pos=mx.array(k_pos), window=None)
    batched, alone = launch.plan_attention(4, 4, 1, 1, S, D, 4), launch.plan_attention(1, 4, 1, 1, S, D, 4)
    assert batched.NS < alone.NS
    got = kernel(emu, p)
    close_to_oracle(got, oracle(p), mx.float32)
    for b in range(4):
        np.testing.assert_allclose(_f64(got[b:b + 1]), _f64(kernel(emu, solo(p, b))), atol=1e-6, rtol=1e-5)


@needs_gxx
def test_kernel_skips_tiles_no_query_of_a_row_can_see(emu):
    """Decode for rows of very different lengths in one padded cache, plus a window: each row's K/V tiles are loaded
    only where its own positions may be visible (its empty tail and the keys before its window are skipped)."""
    rng = np.random.default_rng(6)
    S, lengths, W = 200, (200, 37, 120, 0), 50
    k_pos = np.full((4, S), -1, np.int32)
    for b, n in enumerate(lengths):
        k_pos[b, :n] = np.arange(n)
    q_pos = np.array([[max(n - 1, 0)] for n in lengths], np.int32)
    p = dict(q=_rand(rng, (4, 2, 1, D)), k=_rand(rng, (4, 1, S, D)), v=_rand(rng, (4, 1, S, D)), scale=0.2,
             q_pos=mx.array(q_pos), k_pos=mx.array(k_pos), window=W)
    emu.calls.clear()
    got = kernel(emu, p)
    close_to_oracle(got, oracle(p), mx.float32)
    tile = emu.calls[0]
    BK, NS = tile["template"]["BK"], tile["groups"] // 4
    expected = sum(bool(np.any((kp >= 0) & (kp <= q) & (kp > q - W)))
                   for kp_row, (q,) in zip(k_pos, q_pos) for kp in np.split(kp_row, range(BK, S, BK)))
    assert NS == 1 and BK == 16 and tile["tiles_loaded"] == expected
    # By hand: row 0 sees 150..199 (tiles 9-12), row 1 0..36 (tiles 0-2), row 2 70..119 (tiles 4-7), row 3
    # nothing: 11 of the 52 tiles, for each of the one KV head's groups.
    assert expected == 4 + 3 + 4 + 0


@needs_gxx
def test_kernel_shared_positions_equal_the_same_positions_per_row(emu):
    """Row stride 0 (shared 1-D positions) and per-row copies of the same positions run the same arithmetic."""
    p = chunk_with_vision_block(mx.bfloat16, np.random.default_rng(7))
    shared = dict(p, q_pos=p["q_pos"][2], k_pos=p["k_pos"][2], q_block=p["q_block"][1], k_block=p["k_block"][1])
    tiled = {key: (mx.broadcast_to(val, (4, val.shape[0])) if key in ("q_pos", "k_pos", "q_block", "k_block")
                   else val) for key, val in shared.items()}
    assert mx.array_equal(kernel(emu, shared), kernel(emu, tiled)).item()


@needs_gxx
@pytest.mark.parametrize("stride", ["kpo", "qpo", "kbo"])
def test_kernel_check_catches_a_body_that_ignores_a_row_stride(stride, monkeypatch):
    """Negative control: a body that reads row 0's keys (or queries, or key blocks) for every row fails the
    per-row comparison above."""
    from gemma_mlx.kernels import sources

    text = sources.read("attn_tile.body")
    cut = f"{stride} = int64_t(b) * "
    assert text.count(cut) == 1
    planted = text.replace(cut, f"{stride} = int64_t(0) * ")
    real = sources.read
    monkeypatch.setattr(sources, "read", lambda name: planted if name == "attn_tile.body" else real(name))
    problem = "vision_block_one_row" if stride == "kbo" else "ring_decode"
    p = PROBLEMS[problem](mx.float32, np.random.default_rng(4))
    with pytest.raises(AssertionError):
        close_to_oracle(kernel(verify.CpuEmulator(), p), oracle(p), mx.float32)
