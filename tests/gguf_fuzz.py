"""Hostile GGUF files for the hardening tests: a byte-level builder and splitter, seeded mutations, hypothesis
headers, and a bounded worker process that converts each case and reports how it ended.

Every case runs in a worker process with an address-space limit (RLIMIT_AS) and a per-case deadline enforced
from outside (a hang in native code is caught too); a worker that dies or hangs is blamed for the case it had
started and replaced. The only acceptable endings are a GemmaMLXError that leaves neither OUT nor a temporary directory, or a
conversion whose model loads and runs. The sources may be GGUF files or checkpoint directories (convert_fuzz.py).
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types
STRING, ARRAY = 8, 9
MEMORY_LIMIT = 6 * 2**30  # address space of a worker: mlx + transformers need ~2 GB of it
CASE_SECONDS = 60.0        # far above any case's real cost (a full tiny conversion takes ~0.1-1 s)


# -- building and splitting files ------------------------------------------------------------------------

def gstr(text: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry: key, value type id, value bytes."""
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str | bytes, dims, type_id: int, offset: int) -> bytes:
    """One tensor-table entry (dims innermost first, as GGUF lists them)."""
    return gstr(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", type_id, offset)


def assemble(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, n_kv: int | None = None,
             n_tensors: int | None = None, alignment: int = 32, pad_to: int = 0) -> bytes:
    """A GGUF file from raw entries; the counts may lie (n_kv / n_tensors)."""
    head = (b"GGUF" + struct.pack("<I", version)
            + struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(infos))
    out = head + b"\0" * (-len(head) % alignment) + data
    return out + b"\0" * max(0, pad_to - len(out))


@dataclass
class Split:
    """A valid GGUF cut into its parts, and where each of its numeric fields sits (for overwrites)."""

    kvs: list[tuple[str, int, bytes]]   # key, value type, value bytes
    infos: list[bytes]
    data: bytes
    header_end: int
    fields: list[tuple[int, int, str]] = field(default_factory=list)  # offset, size, what

    def build(self, **kw) -> bytes:
        """The file again, with the entries as they now are."""
        return assemble([kv(k, t, p) for k, t, p in self.kvs], self.infos, self.data, **kw)

    def replace(self, key: str, vtype: int, payload: bytes) -> bytes:
        """The file with key's value replaced (added when absent)."""
        kvs = [(k, t, p) for k, t, p in self.kvs if k != key] + [(key, vtype, payload)]
        return Split(kvs, self.infos, self.data, self.header_end).build()

    def without(self, key: str) -> bytes:
        """The file without key."""
        return Split([e for e in self.kvs if e[0] != key], self.infos, self.data, self.header_end).build()


def split(raw: bytes) -> Split:
    """Walk a valid (little-endian, 32-byte aligned) GGUF file into its entries and numeric field positions."""
    fields = [(8, 8, "tensor count"), (16, 8, "kv count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos, kvs = 24, []

    def u(fmt: str, at: int) -> int:
        return struct.unpack_from("<" + fmt, raw, at)[0]

    for _ in range(n_kv):
        fields.append((pos, 8, "key length"))
        klen = u("Q", pos)
        key = raw[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        fields.append((pos, 4, f"value type of {key}"))
        vtype = u("I", pos)
        pos += 4
        start = pos
        if vtype in SIZES:
            fields.append((pos, SIZES[vtype], f"value of {key}"))
            pos += SIZES[vtype]
        elif vtype == STRING:
            fields.append((pos, 8, f"string length of {key}"))
            pos += 8 + u("Q", pos)
        else:
            etype, count = u("I", pos), u("Q", pos + 4)
            fields += [(pos, 4, f"element type of {key}"), (pos + 4, 8, f"item count of {key}")]
            pos += 12
            if etype == STRING:
                for i in range(count):
                    if i < 3:
                        fields.append((pos, 8, f"item {i} length of {key}"))
                    pos += 8 + u("Q", pos)
            else:
                for i in range(min(count, 3)):
                    fields.append((pos + i * SIZES[etype], SIZES[etype], f"item {i} of {key}"))
                pos += count * SIZES[etype]
        kvs.append((key, vtype, raw[start:pos]))
    infos = []
    for _ in range(n_tensors):
        start = pos
        fields.append((pos, 8, "tensor name length"))
        pos += 8 + u("Q", pos)
        fields.append((pos, 4, "tensor n_dims"))
        n_dims = u("I", pos)
        fields += [(pos + 4 + 8 * d, 8, f"tensor dim {d}") for d in range(n_dims)]
        pos += 4 + 8 * n_dims
        fields += [(pos, 4, "tensor type"), (pos + 4, 8, "tensor offset")]
        pos += 12
        infos.append(raw[start:pos])
    data_start = pos + (-pos % 32)
    return Split(kvs, infos, raw[data_start:], pos, fields)


# -- seeded mutations ------------------------------------------------------------------------------------

# Values a hostile or damaged field is given: zero, small, sign flips, 2^31 / 2^32 / 2^63 edges, all ones.
HOSTILE = (0, 1, 2, 3, 7, 13, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
           2**63 - 1, 2**63, 2**64 - 1)


def mutate(raw: bytes, parts: Split, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of a valid file, and a description of it."""
    data = bytearray(raw)
    header_pos = lambda: rng.randrange(parts.header_end) if rng.random() < 0.85 else rng.randrange(len(raw))  # noqa: E731
    kind = rng.choice(("flip", "flip", "truncate", "overwrite", "overwrite", "inflate", "splice", "retype"))
    if kind == "flip":
        spots = [header_pos() for _ in range(rng.randint(1, 8))]
        for p in spots:
            data[p] ^= 1 << rng.randrange(8)
        return bytes(data), f"bit flips at {spots}"
    if kind == "truncate":
        n = rng.choice((header_pos(), rng.randrange(len(raw)), rng.choice(parts.fields)[0] + rng.randrange(9)))
        return bytes(data[:n]), f"truncated to {n} bytes"
    offset, size, what = rng.choice(parts.fields)
    old = int.from_bytes(data[offset:offset + size], "little")
    if kind == "overwrite":
        value = rng.choice(HOSTILE + (old + 1, max(old - 1, 0), old * 2, rng.getrandbits(8 * size)))
    elif kind == "inflate":
        counts = [f for f in parts.fields if any(w in f[2] for w in ("count", "length", "dim"))]
        offset, size, what = rng.choice(counts)
        old = int.from_bytes(data[offset:offset + size], "little")
        value = rng.choice((old + 1, old + rng.randint(2, 64), old * 2, old * 1000, old << 31, 2**31, 2**32))
    elif kind == "retype":
        types = [f for f in parts.fields if "type" in f[2]]
        offset, size, what = rng.choice(types)
        value = rng.randrange(64)
    else:  # splice random bytes over a field and around it
        n = rng.randint(1, 16)
        data[offset:offset + n] = bytes(rng.getrandbits(8) for _ in range(n))
        return bytes(data[:len(raw)]), f"{n} random bytes at {what} (byte {offset})"
    data[offset:offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    return bytes(data), f"{kind}: {what} (byte {offset}) {old} -> {value % 2 ** (8 * size)}"


# -- the bounded worker ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    case: str
    ending: str  # "error" (a GemmaMLXError), "converted" (and it loads), "crash" (another exception), "died",
    # "hang", "left behind" (an error that left OUT or a temporary directory), "does not load" (converted)
    detail: str = ""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cases(cases: list[tuple[str, Path]], work: Path, kwargs: dict | None = None) -> list[Outcome]:
    """Convert every (description, file) in a bounded worker process; how each ended, in order."""
    todo = [{"case": name, "path": str(path), "out": str(work / f"out{i}"), "kwargs": kwargs or {}}
            for i, (name, path) in enumerate(cases)]
    results: list[Outcome] = []
    while len(results) < len(todo):
        batch = todo[len(results):]
        job = work / f"job{len(results)}.json"
        job.write_text(json.dumps(batch))
        log = work / f"worker{len(results)}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(job)], stdout=subprocess.PIPE,
                                    stderr=err, preexec_fn=_limit_memory, cwd=str(work))
        got = _collect(proc, batch, results)
        if got is not None:  # the worker died or hung on the case it had started
            tail = log.read_text(errors="replace")[-1500:]
            results.append(Outcome(batch[got]["case"], *_fate(proc), tail))
    return results


def _fate(proc: subprocess.Popen) -> tuple[str]:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        return ("hang",)
    return (f"died (exit {proc.returncode})",)


def _collect(proc: subprocess.Popen, batch: list[dict], results: list[Outcome]) -> int | None:
    """Read the worker's reports into results; None when it finished, else the index of the case it was on."""
    buf, started, done, deadline = b"", -1, 0, time.monotonic() + 120.0  # the first case includes the imports
    fd = proc.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return started if started >= 0 else done
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            if proc.returncode == 0 and started < 0:
                return None
            return started if started >= 0 else done
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"@@start "):
                started = int(line.split()[1])
                deadline = time.monotonic() + CASE_SECONDS
            elif line.startswith(b"@@done "):
                report = json.loads(line[len(b"@@done "):])
                results.append(Outcome(batch[started]["case"], report["ending"], report["detail"]))
                started, done = -1, done + 1


def leftovers(out: Path) -> list[str]:
    """What a failed conversion to out left: out itself, or one of its temporary siblings (.NAME.partial-...)."""
    left = [out.name] if os.path.lexists(out) else []
    return left + sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def load_converted(out: Path) -> None:
    """Load a converted model as a user would (gemma_mlx.load; the raw loader where the source had no tokenizer,
    as a GGUF without a vocabulary) and run two text tokens through it."""
    import mlx.core as mx

    import gemma_mlx
    from gemma_mlx.weights import load_model

    if (out / "tokenizer.json").exists():
        model = gemma_mlx.load(out).model
    else:
        model, _ = load_model(out)
    media = set(model.config.token_ids.values())  # a placeholder without its media is the caller's error
    text = [i for i in range(model.config.text.vocab_size) if i not in media][:2]
    mx.eval(model(mx.array([text])))


def _worker(job: Path) -> None:
    """Convert each case of job (a JSON list), reporting @@start / @@done lines on stdout."""
    import shutil
    import traceback

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from gemma_mlx.convert import convert
    from gemma_mlx.errors import GemmaMLXError

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the reports
    for i, case in enumerate(json.loads(job.read_text())):
        out.write(f"@@start {i}\n")
        out.flush()
        target = Path(case["out"])
        try:
            convert(case["path"], target, progress=False, **case["kwargs"])
        except GemmaMLXError as e:
            report = {"ending": "error", "detail": f"{type(e).__name__}: {e}"}
            left = leftovers(target)
            if left:
                report = {"ending": "left behind", "detail": f"{', '.join(left)} after {report['detail']}"}
        except Exception as e:  # noqa: BLE001 - anything else is the bug this campaign looks for
            report = {"ending": "crash", "detail": "".join(traceback.format_exception(e))[-3000:]}
        else:
            report = {"ending": "converted", "detail": ""}
            try:
                load_converted(target)
            except Exception as e:  # noqa: BLE001 - a conversion that "succeeds" must write a model that loads
                report = {"ending": "does not load", "detail": "".join(traceback.format_exception(e))[-3000:]}
        shutil.rmtree(target, ignore_errors=True)
        out.write("@@done " + json.dumps(report) + "\n")
        out.flush()


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    _worker(Path(sys.argv[1]))
