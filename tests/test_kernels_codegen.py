"""The generated kernel sources: Metal (captured from MLX, parsed by libclang with an address-space shim) and CUDA
(MLX's build_kernel replica, compiled by NVRTC with MLX's own JIT headers). Negative controls show that each
check fails on the mistakes it is meant to catch. Needs the `kernels` extra; skips with the reason otherwise.
"""

from __future__ import annotations

import re

import mlx.core as mx
import pytest

from gemma_mlx.kernels import sources, verify
from gemma_mlx.kernels.launch import attention_kernel
from kernel_tools import needs_tool, skip_for_tool

CASES = {
    # name: (q shape, kv shape, dtype, window, blocks, per-row positions)
    "full_decode_bf16": ((1, 16, 1, 512), (1, 1, 300, 512), mx.bfloat16, None, False, False),
    "sliding_decode_bf16": ((1, 16, 1, 256), (1, 8, 1279, 256), mx.bfloat16, 1024, False, False),
    "full_prefill_bf16": ((1, 16, 64, 512), (1, 1, 4096, 512), mx.bfloat16, None, False, False),
    "sliding_prefill_vision_bf16": ((1, 16, 64, 256), (1, 8, 1087, 256), mx.bfloat16, 1024, True, False),
    "decode_f16_tiny_cache": ((1, 8, 2, 128), (1, 2, 5, 128), mx.float16, 4, False, False),  # <8 keys: constant
    "prefill_f32": ((2, 4, 33, 64), (2, 2, 100, 64), mx.float32, 16, True, False),
    # One decode step for 4 sequences at their own positions (q_pos (4, 1), k_pos (4, S)): the engine's case.
    "rows_sliding_decode_bf16": ((4, 16, 1, 256), (4, 8, 1279, 256), mx.bfloat16, 1024, False, True),
    "rows_prefill_vision_f32": ((3, 4, 9, 64), (3, 2, 40, 64), mx.float32, 16, True, True),
}


def _arrays(case):
    qs, ks, dtype, window, blocks, rows = CASES[case]
    B, L, S = qs[0], qs[2], ks[2]
    arrays = [mx.zeros(qs, dtype), mx.zeros(ks, dtype), mx.zeros(ks, dtype),
              mx.arange(S - L, S, dtype=mx.int32), mx.arange(S, dtype=mx.int32)]
    if rows:
        arrays[3:5] = [mx.broadcast_to(a, (B, a.shape[0])) for a in arrays[3:5]]
    if blocks:
        arrays += [mx.zeros((B, L) if rows else (L,), mx.int32), mx.zeros((B, S) if rows else (S,), mx.int32)]
    return arrays, window


def _attention(window):
    def fn(q, k, v, q_pos, k_pos, q_block=None, k_block=None, *, launch):
        return attention_kernel(q, k, v, scale=1.0, q_pos=q_pos, k_pos=k_pos, window=window, q_block=q_block,
                                k_block=k_block, block_overrides_window=False, launch=launch)
    return fn


def metal_sources(case) -> dict[str, str]:
    arrays, window = _arrays(case)
    return verify.capture_metal(_attention(window), *arrays)


def cuda_sources(case) -> dict[str, tuple[str, str]]:
    arrays, window = _arrays(case)
    capture = verify.CudaCapture()
    _attention(window)(*arrays, launch=capture)
    return capture.sources


@pytest.fixture
def planted(monkeypatch):
    """Replace a string in one body file for the duration of a test (negative controls)."""
    def plant(body, old, new):
        text = sources.read(body)
        assert old in text
        real = sources.read
        monkeypatch.setattr(sources, "read", lambda name: text.replace(old, new, 1) if name == body else real(name))
    return plant


# ---------------------------------------------------------------------------------------------- Metal (MSL)

libclang, no_libclang = verify.find_libclang()
needs_libclang = needs_tool(libclang is None, no_libclang)


def test_metal_sources_are_what_mlx_generates():
    """The capture holds MLX's real signature: strided K/V, constant-space small arrays, templated instantiation."""
    msl = metal_sources("full_decode_bf16")
    assert set(msl) == {"gemma_attn_tile", "gemma_attn_combine"}
    tile = msl["gemma_attn_tile"]
    assert "const device bfloat16_t* k [[buffer(1)]]" in tile
    assert re.search(r"const constant int64_t\* k_strides \[\[buffer\(\d+\)\]\]", tile)
    assert "const device int32_t* ip" in tile  # 8 parameters: device space
    assert "const constant float* fp" in tile  # < 8 elements: constant space
    assert "#define KX_SHARED_ARRAY(T, name, n) threadgroup T name[n]" in tile
    assert re.search(r"template \[\[host_name\(\"custom_kernel_gemma_attn_tile_[^\"]+\"\)\]\] \[\[kernel\]\]", tile)
    assert "<bfloat16_t, bfloat16_t, 512, 16, 1, 256, 8, 0>" in tile


@needs_libclang
@pytest.mark.parametrize("case", sorted(CASES))
def test_metal_sources_parse_clean(case):
    for name, msl in metal_sources(case).items():
        assert verify.metal_parse(msl) == [], (case, name)


@needs_libclang
def test_metal_parse_rejects_cuda_intrinsics(planted):
    planted("attn_tile.body", "float t = 0.0f;", "float t = __shfl_xor_sync(0xffffffffu, 0.0f, 1);")
    diags = verify.metal_parse(metal_sources("full_decode_bf16")["gemma_attn_tile"])
    assert any("undeclared identifier '__shfl_xor_sync'" in d for d in diags), diags


@needs_libclang
def test_metal_parse_rejects_address_space_mix(planted):
    # ip of attn_combine has 4 elements, so MLX puts it in the constant address space; using it as device memory
    # is a Metal compile error, and the shim's real address spaces make it one here too.
    planted("attn_combine.body", "if (l < L) {", "const device int* kx_wrong = ip; (void)kx_wrong;\n  if (l < L) {")
    diags = verify.metal_parse(metal_sources("full_decode_bf16")["gemma_attn_combine"])
    assert any("address space" in d or "cannot initialize" in d for d in diags), diags


# ---------------------------------------------------------------------------------------------- CUDA (NVRTC)

nvrtc_lib, _, no_nvrtc = verify.find_nvrtc()
needs_nvrtc = needs_tool(nvrtc_lib is None, no_nvrtc)


@pytest.fixture(scope="module")
def mlx_headers():
    try:
        return verify.mlx_cuda_headers()
    except verify.ToolMissing as err:
        skip_for_tool(str(err))


@needs_nvrtc
def test_mlx_cuda_headers_are_mlx_jit_headers(mlx_headers):
    headers, cccl = mlx_headers
    utils = headers["mlx/backend/cuda/device/utils.cuh"]
    assert "using Strides = cuda::std::array<int64_t, MAX_NDIM>;" in utils
    assert (cccl / "cuda" / "std" / "array").is_file()


@needs_nvrtc
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_sources_compile_with_nvrtc(case, mlx_headers):
    for name, (src, kernel) in cuda_sources(case).items():
        result = verify.nvrtc_compile(src, kernel)
        assert result.ok, (case, name, result.log)
        assert ".entry" in result.ptx and "warning" not in result.log, result.log


@needs_nvrtc
def test_cuda_compiles_for_ampere_too(mlx_headers):
    src, kernel = cuda_sources("full_decode_bf16")["gemma_attn_tile"]
    assert verify.nvrtc_compile(src, kernel, arch="compute_80").ok


@needs_nvrtc
def test_nvrtc_rejects_metal_intrinsics(planted, mlx_headers):
    planted("attn_tile.body", "float t = 0.0f;", "float t = simd_sum(0.0f);")
    src, kernel = cuda_sources("full_decode_bf16")["gemma_attn_tile"]
    result = verify.nvrtc_compile(src, kernel)
    assert not result.ok and 'identifier "simd_sum" is undefined' in result.log


# --------------------------------------------------------------------------------------- the shared subset

FORBIDDEN = ["std::", "double", "__shfl", "simd_", "threadIdx", "blockIdx", "__syncthreads", "threadgroup_barrier",
             "threadgroup ", "device ", "constant ", "__shared__", "expf", "metal::", "printf"]


@pytest.mark.parametrize("spec", sources.SPECS, ids=lambda s: s.name)
def test_shared_bodies_use_only_the_portable_subset(spec):
    code = re.sub(r"//[^\n]*", "", sources.read(spec.body))
    assert [w for w in FORBIDDEN if w in code] == []
    assert "return" not in code  # an early return before a barrier would hang a group on every backend
