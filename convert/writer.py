"""The output side of a conversion: a plan of every tensor, shards written chunk by chunk, an atomic directory.

Every output tensor's name, dtype and shape is known before any data is read, so each shard's safetensors
header is written first and tensors are then streamed into their place, a block of rows at a time. Peak memory
is one block (~64 MB of float32 work) plus MLX's cache, whatever the size of a tensor, a shard or the model:
less than the "one shard plus one tensor" a buffered writer needs. Everything goes into a temporary directory
beside OUT, is re-opened and checked against the model definition, then renamed: an interrupted conversion
leaves OUT as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.config import GEMMA3_TEXT, load_config
from gemma_mlx.errors import ConfigError, ConvertError, WeightsError
from gemma_mlx.interrupts import held_off
from gemma_mlx.weights import apply_quantization, canonical_weights, read_safetensors_header, safetensors_files

from .quantize import QuantSpec, output_name, quant_spec

DEFAULT_SHARD_SIZE = 5 * 1024**3
CHUNK_BYTES = 64 * 2**20
SAFETENSORS_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32", mx.uint8: "U8"}
DTYPE_NAMES = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}


@dataclass
class Source:
    """One input tensor: its canonical name and shape, and a reader of row blocks.

    ``read(r0, r1)`` returns rows r0..r1 as a float mx.array, or, for a ``packed`` source (GGUF blocks already
    in MLX's affine layout), the (weight, scales, biases) of those rows. ``requantize`` forces a spec
    regardless of the recipe (GGUF blocks MLX cannot hold exactly).
    """

    name: str
    shape: tuple[int, ...]
    nbytes: int
    read: Callable[[int, int], Any]
    packed: QuantSpec | None = None
    requantize: QuantSpec | None = None


@dataclass
class Output:
    key: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass
class Planned:
    source: Source
    spec: QuantSpec | None
    outputs: list[Output] = field(default_factory=list)


@dataclass
class ConvertSummary:
    out: Path
    tensors: int
    bytes_on_disk: int
    parameters: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_on_disk / max(self.parameters, 1)

    def __str__(self) -> str:
        return (f"{self.out}: {self.tensors} tensors, {self.bytes_on_disk / 1e9:.2f} GB on disk, "
                f"{self.bits_per_weight:.2f} bits per weight, {self.seconds:.1f} s")


class Progress:
    """One status line (tensors and bytes) redrawn in a terminal; a line per tenth of the work otherwise."""

    def __init__(self, tensors: int, total: int, enabled: bool, stream=None):
        self.tensors, self.total, self.enabled = tensors, max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done_tensors = self.done_bytes = 0
        self.start = self.last = time.monotonic()
        self.tenth = 0

    def advance(self, nbytes: float, tensor_done: bool = False, name: str = "") -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensor_done
        if not self.enabled:
            return
        now = time.monotonic()
        frac = min(self.done_bytes / self.total, 1.0)
        if self.tty and (now - self.last > 0.1 or frac >= 1.0):
            self.last = now
            elapsed = now - self.start
            left = f"{elapsed * (1 - frac) / frac:.0f} s left" if frac > 0.02 else ""
            bar = "#" * int(24 * frac)
            self.stream.write(f"\rconverting [{bar:<24}] {100 * frac:3.0f}%  {self.done_tensors}/{self.tensors} "
                              f"tensors  {self.done_bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB  {left}  "
                              f"{name[-48:]:<48}")
            self.stream.flush()
        elif not self.tty and int(10 * frac) > self.tenth:
            self.tenth = int(10 * frac)
            self.stream.write(f"converting: {100 * frac:.0f}% ({self.done_tensors}/{self.tensors} tensors, "
                              f"{self.done_bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB, "
                              f"{now - self.start:.0f} s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- planning --------------------------------------------------------------------------------------

_probe_cache: dict[tuple, list[tuple[mx.Dtype, int]]] = {}


def _quantized_row_layout(cols: int, spec: QuantSpec, dtype: mx.Dtype) -> list[tuple[mx.Dtype, int]]:
    """(dtype, width) of weight, scales[, biases] for one row, as mx.quantize produces them."""
    key = (cols, spec, dtype)
    if key not in _probe_cache:
        parts = mx.quantize(mx.zeros((1, cols), dtype), spec.group_size, spec.bits, mode=spec.mode)
        _probe_cache[key] = [(p.dtype, p.shape[-1]) for p in parts if p is not None]
    return _probe_cache[key]


def plan_model(sources: list[Source], model_type: str, num_layers: int, *, bits: int | None, group_size: int,
               mode: str, recipe: str, target: mx.Dtype) -> list[Planned]:
    plans = []
    for src in sources:
        out_key = output_name(src.name, model_type)
        if src.packed is not None:
            spec = src.packed
            rows, cols = src.shape
            module = out_key[: -len(".weight")]
            outputs = [Output(f"{module}.weight", mx.uint32, (rows, cols * spec.bits // 32)),
                       Output(f"{module}.scales", target, (rows, cols // spec.group_size)),
                       Output(f"{module}.biases", target, (rows, cols // spec.group_size))]
        else:
            spec = src.requantize or quant_spec(src.name, src.shape, num_layers, bits, group_size, mode, recipe)
            if spec is None:
                outputs = [Output(out_key, target, tuple(src.shape))]
            else:
                module = out_key[: -len(".weight")]
                names = ("weight", "scales", "biases")
                outputs = [Output(f"{module}.{n}", dt, (src.shape[0], width))
                           for n, (dt, width) in zip(names, _quantized_row_layout(src.shape[1], spec, target))]
        plans.append(Planned(src, spec, outputs))
    return plans


def assign_shards(plans: list[Planned], shard_size: int) -> list[list[Planned]]:
    """Consecutive groups of whole source tensors (a module's weight/scales/biases stay together)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plans:
        n = sum(o.nbytes for o in p.outputs)
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# -- writing -----------------------------------------------------------------------------------------

def _produce(p: Planned, r0: int, r1: int, target: mx.Dtype) -> list[mx.array]:
    if p.source.packed is not None:
        w, s, b = p.source.read(r0, r1)
        return [w, s.astype(target), b.astype(target)]
    x = p.source.read(r0, r1).astype(target)
    if p.spec is None:
        return [x]
    return [t for t in mx.quantize(x, p.spec.group_size, p.spec.bits, mode=p.spec.mode) if t is not None]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_shard(path: Path, shard: list[Planned], target: mx.Dtype, progress: Progress) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for p in shard:
        for o in p.outputs:
            o.offset = offset
            header[o.key] = {"dtype": SAFETENSORS_NAMES[o.dtype], "shape": list(o.shape),
                             "data_offsets": [offset, offset + o.nbytes]}
            offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        _stream_shard(path, shard, target, progress, raw, offset)
    except OSError as e:  # pwrite names no file: say which shard the disk refused
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from None


def _stream_shard(path: Path, shard: list[Planned], target: mx.Dtype, progress: Progress, raw: bytes,
                  data_size: int) -> None:
    """Write the header raw, then every tensor of shard into its planned place, a block of rows at a time."""
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(start + data_size)
        fd = f.fileno()
        for p in shard:
            shape = p.source.shape
            rows = shape[0] if shape else 1
            row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, CHUNK_BYTES // (4 * row_elems))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                parts = _produce(p, r0, r1, target)
                mx.eval(parts)
                for o, a in zip(p.outputs, parts, strict=True):
                    if tuple(a.shape) != (r1 - r0, *o.shape[1:]) and o.shape:
                        raise ConvertError(f"{p.source.name}: rows {r0}-{r1} came out as {tuple(a.shape)}, "
                                           f"expected {(r1 - r0, *o.shape[1:])}")
                    per_row = o.nbytes // rows
                    _pwrite_all(fd, memoryview(mx.contiguous(a).view(mx.uint8)).cast("B"),
                                start + o.offset + r0 * per_row)
                del parts
                progress.advance(p.source.nbytes * (r1 - r0) / rows, r1 == rows, p.source.name)
            mx.clear_cache()  # hand the block buffers back now, or MLX's cache keeps one set per tensor shape
        os.fsync(fd)


def write_model(tmp: Path, sources: list[Source], config, raw_config: dict, *, bits: int | None, group_size: int,
                mode: str, recipe: str, target: mx.Dtype, shard_size: int, progress: bool,
                card: dict) -> dict:
    """Plan, shard and stream every tensor into tmp, then write the index, config.json and a model card."""
    plans = plan_model(sources, config.model_type, config.text.num_hidden_layers, bits=bits,
                       group_size=group_size, mode=mode, recipe=recipe, target=target)
    shards = assign_shards(plans, shard_size)
    names = shard_names(len(shards))
    bar = Progress(len(sources), sum(s.nbytes for s in sources), progress)
    try:
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, target, bar)
    finally:
        bar.close()

    weight_map = {o.key: name for name, shard in zip(names, shards) for p in shard for o in p.outputs}
    parameters = sum(math.prod(p.source.shape) for p in plans)
    total = sum(o.nbytes for p in plans for o in p.outputs)
    index = {"metadata": {"total_size": total, "total_parameters": parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    quant = quantization_block(plans, config.model_type)
    raw = published_config(raw_config)
    for key in ("quantization", "quantization_config"):
        raw.pop(key, None)
    if quant:
        raw["quantization"] = quant
        raw["quantization_config"] = quant
    set_dtype(raw, target)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    (tmp / "README.md").write_text(model_card(plans, quant, target, total, parameters, card))
    expected = {o.key: (SAFETENSORS_NAMES[o.dtype], tuple(o.shape), name)
                for name, shard in zip(names, shards) for p in shard for o in p.outputs}
    return {"expected": expected, "parameters": parameters, "files": names}


def quantization_block(plans: list[Planned], model_type: str) -> dict | None:
    """mlx-lm / mlx-vlm's block: the most common spec as the default, every other quantized module listed."""
    specs = {output_name(p.source.name, model_type)[: -len(".weight")]: p.spec for p in plans if p.spec}
    if not specs:
        return None
    counts: dict[QuantSpec, int] = {}
    for s in specs.values():
        counts[s] = counts.get(s, 0) + 1
    default = max(counts, key=counts.get)
    block: dict[str, Any] = {"group_size": default.group_size, "bits": default.bits, "mode": default.mode}
    for module, s in sorted(specs.items()):
        if s != default:
            block[module] = {"group_size": s.group_size, "bits": s.bits, "mode": s.mode}
    return block


def set_dtype(raw: dict, target: mx.Dtype) -> None:
    """The float dtype of the output, where each reader looks for it (mlx-lm: torch_dtype, text_config.dtype)."""
    name = DTYPE_NAMES[target]
    raw["torch_dtype"] = name
    if "dtype" in raw:
        raw["dtype"] = name
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"]["dtype"] = name


def published_config(raw: dict) -> dict:
    """config.json spelled so that transformers, mlx-vlm and mlx-lm all read the same model.

    Gemma 4: Google's published spelling (``global_head_dim`` / ``num_global_key_value_heads``) instead of
    transformers >= 5.2x's ``per_layer_config``, which the MLX tools ignore; ``hidden_size_per_layer_input: 0``
    as published (mlx-lm otherwise assumes E2B's per-layer embeddings); the text vocabulary size at the top
    level (mlx-lm copies its own 262144 default over text_config's). Gemma 3: the rope_theta /
    rope_local_base_freq / rope_scaling / sliding_window_pattern keys of the published configs, which mlx-lm
    reads instead of transformers 5's rope_parameters (without them it silently uses other RoPE bases).
    """
    raw = json.loads(json.dumps(raw))
    if raw.get("model_type") == GEMMA3_TEXT:
        _gemma3_legacy_keys(raw)
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        return raw
    per_layer = text.get("per_layer_config")
    if per_layer:
        types = text.get("layer_types", [])
        full = {str(i) for i, t in enumerate(types) if t == "full_attention"}
        overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
        if set(map(str, per_layer)) == full and len(overrides) == 1:
            o = next(iter(per_layer.values()))
            text["global_head_dim"] = o.get("head_dim", text.get("head_dim"))
            if "num_key_value_heads" in o:
                text["num_global_key_value_heads"] = o["num_key_value_heads"]
            del text["per_layer_config"]
    text.setdefault("hidden_size_per_layer_input", 0)
    text.setdefault("num_kv_shared_layers", 0)
    text.setdefault("use_double_wide_mlp", False)
    if "vocab_size" in text:
        raw["vocab_size"] = text["vocab_size"]
    return raw


def _gemma3_legacy_keys(raw: dict) -> None:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and "sliding_attention" in params:
        full, local = params["full_attention"], params["sliding_attention"]
        raw.setdefault("rope_theta", full.get("rope_theta"))
        raw.setdefault("rope_local_base_freq", local.get("rope_theta"))
        if full.get("rope_type", "default") != "default" and "rope_scaling" not in raw:
            raw["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    types = raw.get("layer_types")
    if types and "sliding_window_pattern" not in raw:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if full:
            k = full[0] + 1
            if types == ["full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(len(types))]:
                raw["sliding_window_pattern"] = k


def model_card(plans: list[Planned], quant: dict | None, target: mx.Dtype, total: int, parameters: int,
               card: dict) -> str:
    kinds: dict[str, int] = {}
    for p in plans:
        label = ("float" if p.spec is None else
                 f"{p.spec.bits}-bit {p.spec.mode} g{p.spec.group_size}" + (" (repacked)" if p.source.packed else ""))
        kinds[label] = kinds.get(label, 0) + 1
    lines = [f"# {card['name']} for MLX", "",
             f"Converted by gemma-mlx from `{card['source']}` ({card['format']}).", "",
             f"- quantization: {card['settings']}",
             f"- tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
             f"- float tensors and scales: {DTYPE_NAMES[target]}",
             f"- size: {total / 1e9:.2f} GB, {8 * total / max(parameters, 1):.2f} bits per weight", ""]
    if card.get("note"):
        lines += [card["note"], ""]
    lines += ["Load it with `gemma_mlx.load(PATH)` or `gemma-mlx chat PATH`; the layout and the `quantization` "
              "block are those of mlx-vlm / mlx-lm, which load it too.", ""]
    return "\n".join(lines)


# -- checking what was written -----------------------------------------------------------------------

def verify_output(tmp: Path, written: dict, out: Path | None = None) -> None:
    """Load tmp as the runtime will, without running the model: the shards the runtime finds (through the index)
    are those written, each tensor is present with the dtype and shape planned, the output's own config.json
    describes exactly these tensors, and the tokenizer, chat template and generation defaults load (named as
    out's files)."""
    from .sidefiles import check_output_side_files

    expected = written["expected"]
    found: dict[str, tuple] = {}
    try:
        shards = sorted(p.name for p in safetensors_files(tmp))
        if shards != sorted(written["files"]):
            raise ConvertError(f"verification failed: the runtime finds the shards {shards}, "
                               f"{sorted(written['files'])} were written")
        for name in written["files"]:
            infos, _ = read_safetensors_header(tmp / name)
            found.update({k: (i.dtype, tuple(i.shape), name) for k, i in infos.items()})
    except (WeightsError, OSError) as e:
        raise ConvertError(f"verification failed: {e}") from None
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} is {found[k]}, planned {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    index = json.loads((tmp / "model.safetensors.index.json").read_text())["weight_map"]
    if index != {k: v[2] for k, v in expected.items()}:
        problems.append("model.safetensors.index.json does not match the shards")
    try:
        config = load_config(tmp)
    except ConfigError as e:
        problems.append(str(e))
    if not problems:
        problems = _model_mismatches(config, {k: v[1] for k, v in expected.items()})
    if problems:
        raise ConvertError("verification failed: " + "; ".join(problems[:5]))
    check_output_side_files(tmp, out or tmp, config)


def _model_mismatches(config, shapes: dict[str, tuple]) -> list[str]:
    from gemma_mlx.model.multimodal import Model

    weights = canonical_weights(shapes, config)
    model = Model(config)  # parameters are lazy: nothing is allocated, even for the 12B
    apply_quantization(model, weights, config)
    want = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    problems = [f"{k} missing" for k in want if k not in weights]
    problems += [f"{k} is not part of the model" for k in weights if k not in want]
    problems += [f"{k} has shape {weights[k]}, the model needs {want[k]}" for k in want
                 if k in weights and tuple(weights[k]) != want[k]]
    return problems


# -- the output directory ------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling_tag(name: str) -> str:
    """The part of out's name its temporary siblings carry: the name itself if short, else a short prefix and a
    hash, so `.TAG.partial-PID-XXXXXXXX` fits the file system's name limit whenever out's own name does."""
    if len(os.fsencode(name)) <= 48:
        return name
    return f"{name[:12]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"


def _siblings(out: Path, kind: str) -> list[tuple[Path, int | None]]:
    """(path, pid of the conversion that made it) of out's temporary siblings of a kind ('partial' or 'old')."""
    prefix = f".{_sibling_tag(out.name)}.{kind}-"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        if path.name.startswith(prefix):
            pid = path.name[len(prefix):].split("-", 1)[0]
            found.append((path, int(pid) if pid.isdigit() else None))
    return found


def recover(out: Path) -> None:
    """Clean up after conversions to out that were killed: their temporary directories are removed, and a
    previous model moved aside for --force but never replaced (killed between two renames) is put back."""
    if not os.path.isdir(out.parent):
        return
    for kind, restore in (("partial", False), ("old", True)):
        for path, pid in _siblings(out, kind):
            if pid is None or _alive(pid):
                continue
            if restore and not os.path.lexists(out):
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def check_output(out: str | Path, force: bool, protect: list[Path] = ()) -> Path:
    """out as an absolute path, once it is clear a conversion may write it: ConvertError naming out otherwise.

    Runs before any work (reading a checkpoint, a download), so a wrong -o fails in a moment: out exists
    without --force or is not replaceable, a parent is a file, a name is longer than the file system takes,
    or the directory to write in is not writable.
    """
    out = Path(out).expanduser().absolute()
    if out.name in ("", ".", ".."):
        raise ConvertError(f"{out} cannot be an output directory; name a new directory, e.g. -o {out}/model")
    recover(out)
    if os.path.lexists(out):
        _check_replaceable(out, list(protect))
        if not force:
            raise ConvertError(f"{out} already exists; pass --force to replace it")
    missing = [out]
    while not os.path.lexists(missing[-1].parent):
        missing.append(missing[-1].parent)
    base = missing[-1].parent
    if not os.path.isdir(base):
        raise ConvertError(f"cannot create {out}: {base} is not a directory")
    try:
        name_max = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for part in missing:
        size = len(os.fsencode(part.name))
        if size > name_max:
            raise ConvertError(f"cannot create {out}: the name {part.name[:24]}... is {size} bytes, more than the "
                               f"{name_max} the file system allows")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot create {out}: {base} is not writable")
    return out


def _make_parents(path: Path) -> list[Path]:
    """Create path and its missing parents (mode from the umask); returns those created, innermost first."""
    created: list[Path] = []
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    try:
        for p in reversed(missing):
            os.mkdir(p)
            created.insert(0, p)
    except OSError:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def _make_temp_dir(out: Path) -> Path:
    """A new empty directory beside out, named after it and this process; its mode follows the umask (so the
    final OUT does too: mkdtemp's 0700 would make a model others on the machine cannot read)."""
    while True:
        tmp = out.with_name(f".{_sibling_tag(out.name)}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _write_failure(out: Path, e: OSError) -> ConvertError:
    """The one-line error for a failed write (disk full, quota, I/O error): what failed, on which file."""
    reason = e.strerror or str(e)
    where = f" ({Path(e.filename).name})" if e.filename else ""
    return ConvertError(f"writing {out} failed: {reason}{where}; {out} is left as it was")


MARKER = ".gemma-mlx-convert.json"  # written into every output: the files a later --force may replace
MARKER_FORMAT = "gemma-mlx convert output"


def write_marker(tmp: Path) -> None:
    """Record in tmp every file the conversion wrote, so that --force later knows what it may delete."""
    files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1, "files": files}, indent=1))


def _marker_files(out: Path) -> set[str] | None:
    """The files out's marker lists, or None if out has no readable marker (it was not written by convert)."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {MARKER}


def _check_replaceable(out: Path, protect: list[Path]) -> None:
    """Refuse (ConvertError naming out) unless out is empty or exactly a directory this converter wrote.

    Replacing deletes out, so only what convert itself produced qualifies: its marker must be there and every
    entry of out must be a plain file the marker lists. A project directory, a Hugging Face checkpoint or a
    converted model someone added files to is never deleted, --force or not.
    """
    if out.is_symlink() or not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory; refusing to replace it")
    for p in protect:
        p = p.resolve()
        if p == out.resolve() or out.resolve() in p.parents:
            raise ConvertError(f"{out} holds the source {p}; refusing to replace it (choose another -o)")
    try:
        entries = list(out.iterdir())
    except OSError as e:
        raise ConvertError(f"{out} cannot be read ({e.strerror}); refusing to replace it") from None
    if not entries:
        return
    listed = _marker_files(out)
    if listed is None:
        raise ConvertError(f"{out} exists and is not a model gemma-mlx convert wrote (no {MARKER}); refusing to "
                           "replace it, even with --force (choose another -o)")
    foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in entries
                     if e.name not in listed or e.is_symlink() or not e.is_file())
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ConvertError(f"{out} holds files gemma-mlx convert did not write ({', '.join(foreign[:3])}{more}); "
                           "refusing to replace it, even with --force (move them away or choose another -o)")


def _commit(tmp: Path, out: Path) -> None:
    """Rename tmp to out (moving an existing out aside first); the caller holds interrupts off around it."""
    if out.exists():
        old = out.with_name(f".{_sibling_tag(out.name)}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_output(out: Path, force: bool, fill: Callable[[Path], dict], start: float,
                  protect: list[Path] = (), on_done: Callable[[ConvertSummary], None] | None = None
                  ) -> ConvertSummary:
    """Run fill(tmp) in a temporary directory beside out, verify what it wrote, then rename it to out.

    Whatever stops it before the rename (a bad tensor, a full disk, Ctrl-C, SIGTERM) removes the temporary
    directory and any parent directory it created, and leaves out as it was. Ctrl-C and SIGTERM are held off
    from the rename until on_done(summary) has returned: on_done is where a caller reports the finished model
    (the CLI prints its line there and ignores interrupts from then on, as they can no longer stop anything).
    An interrupt held off is raised after that, with out complete.
    """
    out = check_output(out, force, list(protect))
    created: list[Path] = []
    tmp = None
    committed = False
    try:
        created = _make_parents(out.parent)
        tmp = _make_temp_dir(out)
        written = fill(tmp)
        write_marker(tmp)
        verify_output(tmp, written, out)
        _fsync_dir(tmp)
        with held_off():
            _commit(tmp, out)
            committed = True
            size = sum((out / f).stat().st_size for f in written["files"])
            summary = ConvertSummary(out, len(written["expected"]), size, written["parameters"],
                                     time.perf_counter() - start)
            if on_done is not None:
                on_done(summary)
    except BaseException as e:
        if committed:  # out is complete: nothing to undo, and no write failed
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(out):
            _remove_dirs(created)
        if isinstance(e, OSError):
            raise _write_failure(out, e) from None
        raise
    return summary
