"""Checking the shared kernel bodies without a Mac or a GPU (used by tests/test_kernels_*.py).

Three views of one body, each driven through launch.attention_kernel, so they see the exact launch plan the
GPU backends use:

- Metal: MLX writes the MSL itself. ``metal_kernel`` objects cannot run without Metal, but while
  ``mx.export_function`` traces, calls are recorded instead of raising, and ``verbose=True`` prints the generated
  source. That text (what a Mac would compile, minus MLX's preamble) is parsed by libclang as C++17 against
  src/verify/metal_shim.h, whose address spaces are real clang address spaces.
- CUDA: a replica of MLX 0.32's ``build_kernel`` (mlx/backend/cuda/custom_kernel.cpp) writes the source, which
  NVRTC from the pip wheels compiles to PTX with MLX's own JIT headers and include paths. MLX embeds those headers
  in libmlx.so of the mlx-cuda-12 wheel; ``mlx_cuda_headers`` downloads that wheel with pip at test time and reads
  them out of it (nothing third-party is committed).
- CPU: g++ compiles the body behind src/kx_cpu.h (threads + barriers) and ctypes runs it on real data, through
  the same strides MLX would pass (a view of a preallocated cache stays a view).

Tools come from the ``kernels`` extra (libclang, nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12) plus g++;
each ``find_*`` returns None with a reason when its tool is missing, so tests can skip cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx import settings
from .launch import Launcher
from .sources import KernelSpec, read


class ToolMissing(RuntimeError):
    """A verification tool could not be found or obtained; the message says how to get it."""


# --------------------------------------------------------------------------------------------------- oracle

def oracle_attention(q, k, v, scale, q_pos, k_pos, window=None, q_block=None, k_block=None, override=False):
    """float64 numpy attention straight from the brief's definition (not from masks.allowed): causal, the window
    k > q - W, vision blocks (bidirectional inside a block; past the window only with override), empty slots
    k_pos < 0, GQA by head groups; a query with no visible key gives zeros. Positions and block ids are (L,)/(S,)
    for every batch entry, or (B, L)/(B, S) per row: then each row is its own problem, evaluated on its own."""
    if any(x is not None and np.ndim(x) == 2 for x in (q_pos, k_pos, q_block, k_block)):
        def row(x, b):
            return x if x is None or np.ndim(x) == 1 else np.asarray(x)[b]
        return np.concatenate([
            oracle_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], scale, row(q_pos, b), row(k_pos, b), window,
                             row(q_block, b), row(k_block, b), override) for b in range(np.shape(q)[0])])
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
    same = np.zeros((q_pos.shape[0], k_pos.shape[1]), dtype=bool)
    if q_block is not None and k_block is not None:
        qb, kb = np.asarray(q_block)[:, None], np.asarray(k_block)[None, :]
        same = (qb == kb) & (qb >= 0)
    visible = (k_pos >= 0) & ((k_pos <= q_pos) | same)
    if window is not None:
        visible &= (k_pos > q_pos - window) | (same & override)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.where(visible, np.einsum("bhld,bhsd->bhls", q, k) * scale, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    p = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    return np.einsum("bhls,bhsd->bhld", p, v) / np.where(total > 0, total, 1.0)


# --------------------------------------------------------------------------------------------- Metal capture

@contextlib.contextmanager
def _capture_stdout_fd():
    """Capture what C++ writes to fd 1 (MLX prints generated sources with std::cout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    box: dict[str, str] = {}
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield box
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            box["out"] = tmp.read().decode()


def capture_metal(fn, *arrays) -> dict[str, str]:
    """Generated MSL of every metal_kernel launch fn(*arrays, launch=...) makes: {kernel name: source}."""
    launcher = Launcher("metal", verbose=True)
    with _capture_stdout_fd() as box, tempfile.TemporaryDirectory() as tmp:
        try:
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), lambda *xs: fn(*xs, launch=launcher), *arrays)
        except ValueError as err:
            # Tracing is done by then; only writing the file fails (e.g. Contiguous has no serializer).
            if "Unable to serialize" not in str(err):
                raise
    found = re.findall(r"Generated source code for `([^`]+)`:\n```\n(.*?)\n```", box["out"], flags=re.S)
    return dict(found)


def find_libclang():
    try:
        import clang.cindex as cindex

        cindex.Index.create()
    except Exception as err:  # ImportError, or a libclang.so that does not load
        return None, f"libclang unavailable ({err}); pip install -e '.[kernels]'"
    return cindex, ""


def metal_parse(msl: str) -> list[str]:
    """Warnings and errors from parsing generated MSL as C++17 against the Metal shim (empty: clean)."""
    cindex, reason = find_libclang()
    if cindex is None:
        raise ToolMissing(reason)
    # The explicit instantiation carries Metal attributes clang rejects in that position.
    text = re.sub(r"template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\]", "template", msl)
    # clang refuses an address space on automatic variables; Metal's threadgroup locals live for the group.
    text = text.replace("#define KX_SHARED_ARRAY(T, name, n) threadgroup T name[n]",
                        "#define KX_SHARED_ARRAY(T, name, n) static threadgroup T name[n]")
    text = read("verify/metal_shim.h") + text.replace("#include <metal_simdgroup>", "")
    tu = cindex.Index.create().parse(
        "kernel.cpp", args=["-x", "c++", "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes"],
        unsaved_files=[("kernel.cpp", text)])
    return [str(d) for d in tu.diagnostics if d.severity >= cindex.Diagnostic.Warning]


# ------------------------------------------------------------------------------------------- CUDA (NVRTC)

_CUDA_TYPE = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.int32: "int32_t",
              mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint16: "uint16_t", mx.uint8: "uint8_t",
              mx.bool_: "bool"}
_MLX_TYPE = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
             mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint16: "uint16_t", mx.uint8: "uint8_t",
             mx.bool_: "bool"}


def _template_hash(template) -> str:
    out = ""
    for _, val in template:
        if isinstance(val, bool):
            out += "_t" if val else "_f"
        elif isinstance(val, int):
            out += f"_{val}"
        else:
            out += "_" + _MLX_TYPE[val]
    return out


def cuda_source(spec: KernelSpec, inputs, template, output_dtypes) -> tuple[str, str]:
    """(source, kernel name) exactly as MLX 0.32's cuda_kernel would build them (build_kernel replica)."""
    source = spec.source("cuda")
    name = f"custom_kernel_{spec.name}{_template_hash(template)}"
    text = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
    text += spec.header("cuda") + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    for arg, arr in zip(spec.inputs, inputs):
        text += f"    const {_CUDA_TYPE[arr.dtype]}* {arg},\n"
        if arr.ndim > 0:
            if f"{arg}_shape" in source:
                text += f"    const __grid_constant__ Shape {arg}_shape,\n"
            if f"{arg}_strides" in source:
                text += f"    const __grid_constant__ Strides {arg}_strides,\n"
            if f"{arg}_ndim" in source:
                text += f"    const __grid_constant__ int {arg}_ndim,\n"
    text += ",\n".join(f"    {_CUDA_TYPE[dt]}* {arg}" for arg, dt in zip(spec.outputs, output_dtypes)) + ") {\n"
    if template:
        for arg, val in template:
            if isinstance(val, bool):
                text += f"  constexpr bool {arg} = {str(val).lower()};\n"
            elif isinstance(val, int):
                text += f"  constexpr int {arg} = {val};\n"
            else:
                text += f"  using {arg} = {_CUDA_TYPE[val]};\n"
        text += "\n"
    text += source + "\n}\n\n} // namespace mlx::core::cu\n"
    return text, "mlx::core::cu::" + name


@dataclass
class CudaCapture:
    """A launch callable that records the CUDA source of each launch and returns zero outputs."""

    sources: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __call__(self, spec, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        self.sources[spec.name] = cuda_source(spec, inputs, template, output_dtypes)
        return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def find_nvrtc() -> tuple[Path | None, Path | None, str]:
    """(libnvrtc.so.12, cuda_runtime include dir, reason if missing) from the nvidia-* pip wheels."""
    for site in _site_dirs():
        lib = site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
        inc = site / "nvidia" / "cuda_runtime" / "include"
        if lib.is_file() and (inc / "cuda_bf16.h").is_file():
            return lib, inc, ""
    return None, None, "NVRTC not installed; pip install -e '.[kernels]' (nvidia-cuda-nvrtc-cu12, -runtime-cu12)"


def _elf_sections(data: bytes):
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = raw[shstrndx][4]
    out = {}
    for name, typ, _, addr, off, size, *_ in raw:
        end = data.index(b"\0", names_off + name)
        out[data[names_off + name:end].decode()] = (typ, addr, off, size)
    return out


def _embedded_jit_headers(lib: bytes, config_h: bytes) -> dict[str, str]:
    """MLX's JIT headers from libmlx.so: two static tables, include names and sources (jit_module.cpp).

    Both are arrays of pointers, filled by R_X86_64_RELATIVE relocations; the name table is found by its first
    entry, the source table as the nearby run of the same length whose strings are all sources. The copy of
    config.h must equal the wheel's own config.h (bin2h replaces the '©' bytes with spaces), which checks the
    pairing.
    """
    secs = _elf_sections(lib)
    _, _, rela_off, rela_size = secs[".rela.dyn"]
    target = {}
    for j in range(0, rela_size, 24):
        r_off, r_info, r_add = struct.unpack_from("<QQq", lib, rela_off + j)
        if r_info & 0xFFFFFFFF == 8:
            target[r_off] = r_add
    _, ro_addr, ro_off, ro_size = secs[".rodata"]

    def cstr(va):
        if not ro_addr <= va < ro_addr + ro_size:
            return None
        o = va - ro_addr + ro_off
        return lib[o:lib.index(b"\0", o)]

    prefix = b"mlx/backend/cuda/device/"
    first = lib.find(prefix + b"atomic_ops.cuh\0", ro_off, ro_off + ro_size)
    first_va = first - ro_off + ro_addr
    table = next(off for off, add in target.items() if add == first_va)
    names = []
    while (s := cstr(target.get(table + 8 * len(names), -1))) is not None and s.startswith(prefix):
        names.append(s.decode())
    n = len(names)
    for start in range(table - 8 * (n + 64), table + 8 * (n + 64), 8):
        texts = [cstr(target.get(start + 8 * i, -1)) for i in range(n)]
        if all(t is not None and t.startswith(b"// Copyright") for t in texts):
            headers = dict(zip(names, (t.decode("utf-8", "replace") for t in texts)))
            want = config_h.replace("\u00a9".encode(), b"  ").decode()
            if headers.get(prefix.decode() + "config.h") == want:
                return headers
    raise ToolMissing("could not locate MLX's embedded CUDA JIT headers in libmlx.so")


def mlx_cuda_headers(cache: Path | None = None) -> tuple[dict[str, str], Path]:
    """({include name: source} of MLX's CUDA JIT headers, its bundled CCCL include dir) for this MLX version.

    Downloaded once with pip (mlx-cuda-12 of the installed MLX version, ~90 MB, not installed) into ``cache``.
    """
    version = mx.__version__
    cache = settings.get().kernel_cache if cache is None else cache
    root = cache / f"mlx-cuda-{version}"
    done = root / "headers"
    cccl = root / "cccl"
    if not done.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                   f"mlx-cuda-12=={version}"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            except (subprocess.SubprocessError, OSError) as err:
                raise ToolMissing(f"cannot download mlx-cuda-12=={version} for its CUDA headers: {err}") from err
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                headers = _embedded_jit_headers(zf.read("mlx/lib/libmlx.so"),
                                                zf.read("mlx/include/mlx/backend/cuda/device/config.h"))
                staging = Path(tempfile.mkdtemp(dir=cache if cache.is_dir() else None))
                for info in zf.infolist():
                    if info.filename.startswith("mlx/include/cccl/") and not info.is_dir():
                        zf.extract(info, staging)
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cccl, ignore_errors=True)
        shutil.move(str(staging / "mlx" / "include" / "cccl"), cccl)
        shutil.rmtree(staging, ignore_errors=True)
        tmp_done = root / "headers.tmp"
        shutil.rmtree(tmp_done, ignore_errors=True)
        for name, text in headers.items():
            (tmp_done / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_done / name).write_text(text)
        tmp_done.rename(done)  # last: a half-written cache is never taken for a complete one
    headers = {str(p.relative_to(done)): p.read_text() for p in sorted(done.rglob("*")) if p.is_file()}
    return headers, cccl


@dataclass
class NvrtcResult:
    ok: bool
    log: str
    ptx: str


def nvrtc_compile(source: str, kernel: str, arch: str = "compute_90a") -> NvrtcResult:
    """Compile like MLX's JIT (jit_module.cpp): its headers in memory, its include paths, its flags."""
    lib_path, cuda_inc, reason = find_nvrtc()
    if lib_path is None:
        raise ToolMissing(reason)
    headers, cccl = mlx_cuda_headers()
    lib = ctypes.CDLL(str(lib_path))
    prog = ctypes.c_void_p()
    names = list(headers)
    c_names = (ctypes.c_char_p * len(names))(*(n.encode() for n in names))
    c_texts = (ctypes.c_char_p * len(names))(*(headers[n].encode() for n in names))
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", len(names), c_texts, c_names):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        lib.nvrtcAddNameExpression(prog, kernel.encode())
        opts = [b"--device-as-default-execution-space", f"--gpu-architecture={arch}".encode(),
                f"--include-path={cccl}".encode(), f"--include-path={cuda_inc}".encode()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value
        return NvrtcResult(rc == 0, log.value.decode(errors="replace"), ptx.decode(errors="replace"))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# --------------------------------------------------------------------------------------- CPU emulation

_CPU_TYPE = {mx.float32: "float", mx.float16: "kx_f16", mx.bfloat16: "kx_bf16", mx.int32: "int32_t"}
_NP_VIEW = {mx.float32: (mx.float32, np.float32), mx.float16: (mx.uint16, np.uint16),
            mx.bfloat16: (mx.uint16, np.uint16), mx.int32: (mx.int32, np.int32)}


def find_gxx() -> tuple[str | None, str]:
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        return None, "g++ not found (the CPU emulation needs g++ >= 12 for <barrier>)"
    return gxx, ""


def find_tsan() -> tuple[bool, str]:
    """Whether g++ can build and run a ThreadSanitizer program here (libtsan comes with Debian's g++)."""
    gxx, reason = find_gxx()
    if gxx is None:
        return False, reason
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "t.cpp", Path(tmp) / "t"
        src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
        proc = subprocess.run([gxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)], capture_output=True)
        if proc.returncode or subprocess.run([str(exe)], capture_output=True).returncode:
            return False, "g++ cannot build or run ThreadSanitizer programs here (libtsan missing?)"
    return True, ""


def cpu_translation_unit(spec: KernelSpec, input_dtypes, template, output_dtypes, symbol: str) -> str:
    """C++ for one instantiation: template values as constants, the body as a function of one threadgroup."""
    source = spec.source("cpu")
    consts = []
    for arg, val in template:
        if isinstance(val, bool):
            consts.append(f"constexpr bool {arg} = {str(val).lower()};")
        elif isinstance(val, int):
            consts.append(f"constexpr int {arg} = {val};")
        else:
            consts.append(f"using {arg} = {_CPU_TYPE[val]};")
    params, casts, n = [], [], 0
    for arg, dt in zip(spec.inputs, input_dtypes):
        params.append(f"const {_CPU_TYPE[dt]}* {arg}")
        casts.append(f"(const {_CPU_TYPE[dt]}*)bufs[{n}]")
        if f"{arg}_strides" in source:
            params.append(f"const int64_t* {arg}_strides")
            casts.append(f"strides[{n}]")
        n += 1
    for arg, dt in zip(spec.outputs, output_dtypes):
        params.append(f"{_CPU_TYPE[dt]}* {arg}")
        casts.append(f"({_CPU_TYPE[dt]}*)bufs[{n}]")
        n += 1
    return (
        read("kx_cpu.h") + read("kx_common.h")
        + f"namespace {symbol}_ns {{\n" + "\n".join(consts) + "\n"
        + f"void body(uint32_t kx_bid, KxCtx& kx_c, {', '.join(params)}) {{\n" + source + "\n}\n}\n"
        + f'extern "C" int {symbol}(int tg, int groups, void** bufs, const int64_t* const* strides) {{\n'
        + f"  return kx_launch(tg, groups, [&](uint32_t bid, KxCtx& c) {{ {symbol}_ns::body(bid, c, "
        + ", ".join(casts) + "); });\n}\n"
    )


_EXE_MAIN = r"""
#include <cstdio>
// Standalone runner (ThreadSanitizer cannot be loaded into an uninstrumented Python): reads
// [n, tg, groups] then per buffer [bytes, n_strides, strides..., data], runs, writes every buffer back.
int main(int argc, char** argv) {
  if (argc != 3) return 3;
  FILE* in = std::fopen(argv[1], "rb");
  int64_t hdr[3];
  if (!in || std::fread(hdr, 8, 3, in) != 3) return 4;
  std::vector<std::vector<unsigned char>> bufs(hdr[0]);
  std::vector<std::vector<int64_t>> strides(hdr[0]);
  std::vector<void*> ptrs;
  std::vector<const int64_t*> sptrs;
  for (int64_t i = 0; i < hdr[0]; ++i) {
    int64_t nb, ns;
    if (std::fread(&nb, 8, 1, in) != 1 || std::fread(&ns, 8, 1, in) != 1) return 4;
    strides[i].resize(ns > 0 ? ns : 1);
    bufs[i].resize(nb > 0 ? nb : 1);
    if (ns > 0 && std::fread(strides[i].data(), 8, ns, in) != size_t(ns)) return 4;
    if (nb > 0 && std::fread(bufs[i].data(), 1, nb, in) != size_t(nb)) return 4;
    ptrs.push_back(bufs[i].data());
    sptrs.push_back(strides[i].data());
  }
  std::fclose(in);
  int rc = kx_run(int(hdr[1]), int(hdr[2]), ptrs.data(), sptrs.data());
  FILE* out = std::fopen(argv[2], "wb");
  for (auto& b : bufs) std::fwrite(b.data(), 1, b.size(), out);
  std::fclose(out);
  return rc;
}
"""


class CpuEmulator:
    """A launch callable that runs each launch through the CPU emulation (compiled once per instantiation).

    ``calls`` keeps, per launch, the element strides each input was passed with (so a test can see that a cache
    view was read in place) and how many K/V tiles were loaded (so it can see tiles outside the window skipped).
    ``tsan=True`` builds each instantiation as a standalone program under ThreadSanitizer and fails a launch on
    any data race: a missing barrier between threadgroup-memory writes and reads is reported deterministically,
    whatever the thread timing (inputs are then passed as contiguous copies).
    """

    def __init__(self, tsan: bool = False, cache: Path | None = None):
        gxx, reason = find_gxx()
        if gxx is None:
            raise ToolMissing(reason)
        self.gxx = gxx
        self.tsan = tsan
        self.cache = (settings.get().kernel_cache if cache is None else cache) / "cpu"
        self.calls: list[dict] = []
        self._libs: dict[str, object] = {}

    def _build(self, spec, input_dtypes, template, output_dtypes):
        src = cpu_translation_unit(spec, input_dtypes, template, output_dtypes, "kx_run")
        if self.tsan:
            src += _EXE_MAIN
        flags = ["-fsanitize=thread", "-g", "-O1"] if self.tsan else ["-O2", "-shared", "-fPIC"]
        digest = hashlib.sha256((src + " ".join(flags)).encode()).hexdigest()[:20]
        if digest in self._libs:
            return self._libs[digest]
        target = self.cache / f"{spec.name}_{digest}{'.tsan' if self.tsan else '.so'}"
        if not target.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            cpp = target.with_suffix(".cpp")
            cpp.write_text(src)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            cmd = [self.gxx, "-std=c++20", "-pthread", *flags, str(cpp), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"g++ failed for {spec.name}:\n{proc.stderr[-4000:]}")
            tmp.replace(target)
        if self.tsan:
            built = target
        else:
            built = ctypes.CDLL(str(target))
            built.kx_run.restype = ctypes.c_int
            built.kx_tiles_loaded_last.restype = ctypes.c_long
        self._libs[digest] = built
        return built

    def _run_tsan(self, exe, arrays, strides, tg, groups, name, n_inputs):
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            with open(src, "wb") as f:
                f.write(np.array([len(arrays), tg, groups], dtype=np.int64).tobytes())
                for a, st in zip(arrays, strides):
                    f.write(np.array([a.nbytes, len(st)], dtype=np.int64).tobytes() + st.tobytes() + a.tobytes())
            env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0")
            proc = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, env=env)
            if proc.returncode or "ThreadSanitizer" in proc.stderr:
                raise RuntimeError(f"{name} under ThreadSanitizer (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
            data, off = dst.read_bytes(), 0
            for i, a in enumerate(arrays):
                if i >= n_inputs:  # outputs only; the inputs may be MLX's own read-only memory
                    a.reshape(-1).view(np.uint8)[:] = np.frombuffer(data[off:off + a.nbytes], dtype=np.uint8)
                off += max(a.nbytes, 1)
        return 0

    def __call__(self, spec, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        for x in inputs:
            if x.dtype not in _CPU_TYPE:
                raise TypeError(f"CPU emulation has no type for {x.dtype}")
        mx.eval(*inputs)
        built = self._build(spec, [x.dtype for x in inputs], template, output_dtypes)
        keep, arrays, strides = [], [], []
        record = {}
        for arg, x in zip(spec.inputs, inputs):
            as_mx, as_np = _NP_VIEW[x.dtype]
            a = np.asarray(memoryview(x.view(as_mx) if x.dtype != as_mx else x)).view(as_np)
            if a.ndim == 0:
                a = a.reshape(1)
            if self.tsan:
                a = np.ascontiguousarray(a)
            st = np.array([s // a.itemsize for s in a.strides] or [1], dtype=np.int64)
            keep.append(x)
            arrays.append(a)
            strides.append(st)
            record[arg] = tuple(int(s) for s in st)
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            _, as_np = _NP_VIEW[dt]
            o = np.full(shape, 0xFFFF if as_np == np.uint16 else np.nan, dtype=as_np)  # poison: unwritten = NaN
            outs.append(o)
            arrays.append(o)
            strides.append(np.zeros(0, dtype=np.int64))
        tg = threadgroup[0]
        groups = grid[0] // tg
        if grid[0] % tg or grid[1:] != (1, 1) or threadgroup[1:] != (1, 1):
            raise ValueError("the emulation runs 1-D grids made of whole threadgroups")
        if self.tsan:
            rc, tiles = self._run_tsan(built, arrays, strides, tg, groups, spec.name, len(inputs)), None
        else:
            ptrs = (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))
            sptrs = (ctypes.c_void_p * len(strides))(*(s.ctypes.data if s.size else None for s in strides))
            rc = built.kx_run(tg, groups, ptrs, sptrs)
            tiles = int(built.kx_tiles_loaded_last())
        if rc:
            raise RuntimeError(f"{spec.name}: emulation error {rc} (1: threadgroup memory over 32 KB)")
        self.calls.append({"kernel": spec.name, "strides": record, "template": dict(template),
                           "groups": groups, "threads": tg, "tiles_loaded": tiles})
        result = []
        for o, dt in zip(outs, output_dtypes):
            arr = mx.array(o)
            result.append(arr.view(dt) if dt in (mx.bfloat16, mx.float16) else arr)
        return result
