"""Hostile Hugging Face checkpoints for the convert fuzz (test_convert_fuzz.py): a valid tiny checkpoint in two
shards with every side file, and seeded mutations of one of its files each.

A case is a copy of the base (unchanged files hard-linked) with one file damaged: a JSON leaf of config.json,
the index, tokenizer.json, tokenizer_config.json or generation_config.json given a hostile value or removed,
raw bytes of any JSON file, of the chat template or of a safetensors header flipped, spliced or cut, or a file
swapped for a directory, a FIFO, a dangling link, an empty file, or deleted. The cases are converted by
gguf_fuzz.run_cases' bounded worker, which also loads every model that converts.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

from gguf_fuzz import HOSTILE

JSON_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
TEMPLATE = "chat_template.jinja"
# Replacement values for a JSON leaf: hostile integers and their negatives, odd floats, wrong types, deep data.
ODD_VALUES = (None, True, False, "", "abc", "\udcff", 0.5, -0.0, 1e308, float("nan"), float("inf"), [], {}, [1, 2],
              {"a": 1}, "../x", "/etc/passwd", "model.safetensors", 10**30)
TEMPLATE_PIECES = ("{% if %}", "{{", "}}", "{% for x in range(10**9) %}x{% endfor %}", "{{ 'a' * 10**9 }}",
                   "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{{ raise_exception('no') }}",
                   "{% endfor %}", "\x00", "{{ messages[0]['content'] | tojson }}", "{% set x = 1 / 0 %}")


def write_base(path: Path) -> Path:
    """The valid checkpoint every case mutates: the demo model (byte tokenizer, real template, generation
    config), its weights split into two shards with an index, and a tokenizer_config.json with special tokens."""
    import mlx.core as mx

    from gemma_mlx.tiny import write_demo_model

    src = write_demo_model(path)
    weights = mx.load(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for shard, keys in zip(SHARDS, halves):
        mx.save_safetensors(str(src / shard), {k: weights[k] for k in keys}, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return src


def _leaves(value, path=()):
    """Every (path, value) in a JSON value, containers included (so whole objects are replaced too)."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):  # tokenizer.json lists thousands of merges: a sample suffices
            yield from _leaves(v, (*path, i))


def _set(root, path, value, delete=False):
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return root


def _json_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    doc = json.loads(raw)
    leaves = list(_leaves(doc))
    path, old = rng.choice(leaves)
    ints = list(HOSTILE) + [-h for h in HOSTILE[1:8]]
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.6:
        value = rng.choice(ints + [old + 1, old - 1, old * 2])
    elif rng.random() < 0.15:
        value = 1
        for _ in range(rng.choice((3, 40, 100))):  # 100: past the readers' depth limit
            value = [value]
    else:
        value = rng.choice(ODD_VALUES + tuple(ints[:6]))
    if path and rng.random() < 0.2:
        doc = _set(doc, path, None, delete=True)
        what = f"removed {list(path)}"
    else:
        doc = _set(doc, path, value)
        what = f"{list(path)}: {str(old)[:40]!r} -> {str(value)[:40]!r}"
    return json.dumps(doc).encode("utf-8", "surrogatepass"), what


def _byte_mutation(raw: bytes, rng: random.Random, region: int | None = None) -> tuple[bytes, str]:
    data = bytearray(raw)
    end = min(region or len(raw), len(raw))
    kind = rng.choice(("flip", "flip", "splice", "truncate", "invalid utf-8", "insert"))
    if kind == "flip":
        spots = [rng.randrange(end) for _ in range(rng.randint(1, 8))]
        for p in spots:
            data[p] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flips at {spots[:4]}"
    if kind == "splice":
        at, n = rng.randrange(end), rng.randint(1, 16)
        data[at:at + n] = bytes(rng.getrandbits(8) for _ in range(n))
        return bytes(data[: len(raw)]), f"{n} random bytes at {at}"
    if kind == "truncate":
        n = rng.randrange(end)
        return bytes(data[:n]), f"cut to {n} bytes"
    if kind == "invalid utf-8":
        at = rng.randrange(end)
        data[at:at] = rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"))
        return bytes(data), f"invalid UTF-8 at {at}"
    at = rng.randrange(end)
    piece = rng.choice(('{"a": ', "[" * 300, '"', "}", "1e99999", "-", "\\u0000")).encode()
    data[at:at] = piece
    return bytes(data), f"inserted {piece[:12]!r} at {at}"


def _header_mutation(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A safetensors file with its header damaged: the length word, or bytes of the JSON header."""
    (n,) = struct.unpack_from("<Q", raw)
    if rng.random() < 0.25:
        value = rng.choice(HOSTILE + (n + 1, n - 1, n * 2, len(raw), len(raw) - 7))
        return struct.pack("<Q", value % 2**64) + raw[8:], f"header length {n} -> {value}"
    header = raw[8:8 + n]
    if rng.random() < 0.5:
        new, what = _json_mutation(header, rng)
        new += b" " * (-len(new) % 8)
        return struct.pack("<Q", len(new)) + new + raw[8 + n:], f"header {what}"
    damaged, what = _byte_mutation(raw, rng, region=8 + n)
    return damaged, f"header {what}"


def _swap_kind(path: Path, rng: random.Random) -> str:
    kind = rng.choice(("directory", "fifo", "dangling link", "empty", "deleted"))
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling link":
        path.symlink_to(path.with_name("nowhere"))
    elif kind == "empty":
        path.write_bytes(b"")
    return kind


def make_case(base: Path, case: Path, rng: random.Random) -> str:
    """Copy base to case (hard links) with one file damaged; returns what was done."""
    case.mkdir()
    for f in base.iterdir():
        os.link(f, case / f.name)
    name = rng.choice(JSON_FILES + JSON_FILES + SHARDS + (TEMPLATE,))
    target = case / name
    if rng.random() < 0.08:
        return f"{name} {_swap_kind(target, rng)}"
    raw = target.read_bytes()
    if name in SHARDS:
        data, what = _header_mutation(raw, rng)
    elif name in JSON_FILES and rng.random() < 0.7:
        data, what = _json_mutation(raw, rng)
    elif name == TEMPLATE and rng.random() < 0.6:
        at = rng.randrange(len(raw))
        piece = rng.choice(TEMPLATE_PIECES).encode()
        data, what = raw[:at] + piece + raw[at:], f"inserted {piece[:30]!r} at {at}"
    else:
        data, what = _byte_mutation(raw, rng)
    target.unlink()  # a new file: the hard-linked base stays as it was
    target.write_bytes(data)
    return f"{name} {what}"


def campaign(base: Path, work: Path, count: int, seed: int) -> list[tuple[str, Path]]:
    """count seeded cases of base under work, as (description, checkpoint directory)."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        case = work / f"case{i}"
        cases.append((f"#{i}: {make_case(base, case, rng)}", case))
    return cases
