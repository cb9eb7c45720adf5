"""GGUF hardening: every count, length, dimension, offset and type id of a GGUF is checked against the file
before anything is allocated, corrupt metadata gives a ConvertError naming the file and the field, `-q N` of a
GGUF is honoured and the model card says what was written, and a fuzz campaign (seeded mutations of valid files,
hypothesis-built headers) ends every case in a GemmaMLXError or a good conversion, in bounded time and memory."""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_fuzz import (  # noqa: E402
    ARRAY, STRING, assemble, gstr, kv, mutate, run_cases, split, tensor_info,
)

from gemma_mlx.convert import convert  # noqa: E402
from gemma_mlx.errors import ConvertError  # noqa: E402

ARCH = kv("general.architecture", STRING, gstr("gemma4"))
F32, Q4_0 = 0, 2


@pytest.fixture(scope="module")
def bases(tiny_gemma4, tmp_path_factory):
    """Valid tiny gemma4 GGUF files as llama.cpp writes them: all F32, and the QAT layout (Q4_0, F16 embedding)."""
    from test_convert_gguf import write_gemma4_gguf

    hf, _ = tiny_gemma4
    work = tmp_path_factory.mktemp("bases")
    T = gguf.GGMLQuantizationType
    return {"f32": write_gemma4_gguf(work / "f32.gguf", hf),
            "q4_0": write_gemma4_gguf(work / "q4_0.gguf", hf, lambda name, v: T.F16 if name == "token_embd.weight"
                                      else T.Q4_0)}


def _refused(path: Path, match: str, tmp_path: Path, **kw) -> str:
    with pytest.raises(ConvertError, match=match) as e:
        convert(path, tmp_path / "o", progress=False, **kw)
    assert not (tmp_path / "o").exists()
    return str(e.value)


# -- the file: hand-built headers -----------------------------------------------------------------------

def _tensor(name="token_embd.weight", dims=(8,), type_id=F32, offset=0) -> bytes:
    return tensor_info(name, dims, type_id, offset)


HEADERS = {
    # The campaign's case: 761 bytes whose metadata claims an array of 2^31 strings.
    "array of 2^31 strings": (assemble([ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**31))],
                                       [], pad_to=761), r"tokenizer.ggml.tokens.* 2147483648 STRING items"),
    "array of 2^31 u32": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", 4, 2**31))], [], pad_to=761),
                          r"'x' claims an array of 2147483648 UINT32 items, more than the 16777216 allowed"),
    "array of 10^6 u32": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", 4, 10**6))], [], pad_to=761),
                          r"'x' claims an array of 1000000 UINT32 items, more than the file can hold"),
    "array of 2^60 u8": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", 0, 2**60))], []),
                         r"more than the 16777216 allowed"),
    "tensor count 2^40": (assemble([ARCH], [], n_tensors=2**40), r"claims 1099511627776 tensors"),
    "kv count 2^64-1": (assemble([ARCH], [], n_kv=2**64 - 1), r"claims 18446744073709551615 metadata keys"),
    "kv count one too many": (assemble([ARCH], [], n_kv=2, pad_to=64), r"value type of .* needs 4 bytes|metadata key"),
    "key length 2^62": (assemble([struct.pack("<Q", 2**62)], [], n_kv=1, pad_to=64),
                        r"metadata key claims 4611686018427387904 bytes"),
    "key not UTF-8": (assemble([kv(b"\xff\xfe", 4, b"\0\0\0\0")], []), r"metadata key is not UTF-8"),
    "empty key": (assemble([kv(b"", 4, b"\0\0\0\0")], []), r"metadata key '' is empty"),
    "repeated key": (assemble([ARCH, ARCH], []), r"'general.architecture' is repeated"),
    "value type 13": (assemble([ARCH, kv("x", 13, b"\0" * 8)], []), r"'x' has unknown value type id 13"),
    "array of arrays": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1))], [], pad_to=64),
                        r"'x' is an array of arrays"),
    "array element type 77": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", 77, 1))], [], pad_to=64),
                              r"array of unknown value type id 77"),
    "string past the end": (assemble([ARCH, kv("x", STRING, struct.pack("<Q", 500) + b"ab")], []),
                            r"string value of x needs 500 bytes"),
    "string not UTF-8": (assemble([ARCH, kv("x", STRING, gstr(b"\xc3\x28"))], []), r"string value of x is not UTF-8"),
    "string item not UTF-8": (assemble([ARCH, kv("x", ARRAY, struct.pack("<IQ", STRING, 1) + gstr(b"\xed\xa0\x80"))],
                                       []), r"item 0 of x is not UTF-8"),
    "value cut short": (assemble([ARCH, kv("x", 10, b"\1")], [], alignment=1), r"value of x needs 8 bytes"),
    "0 dimensions": (assemble([ARCH], [_tensor(dims=())], b"\0" * 32), r"token_embd.weight has 0 dimensions"),
    "5 dimensions": (assemble([ARCH], [_tensor(dims=(1, 1, 1, 1, 1))], b"\0" * 32), r"has 5 dimensions"),
    "dimension 0": (assemble([ARCH], [_tensor(dims=(8, 0))], b"\0" * 32), r"dimensions \[8, 0\]"),
    "dimension 2^63": (assemble([ARCH], [_tensor(dims=(2**63,))], b"\0" * 32), r"each must be 1 to 2\^40"),
    "4 x 2^40 elements": (assemble([ARCH], [_tensor(dims=(2**40,) * 4)], b"\0" * 32), r"does not lie inside the file"),
    "type id 99": (assemble([ARCH], [_tensor(type_id=99)], b"\0" * 32), r"token_embd.weight has unknown type id 99"),
    "removed type id 4 (Q4_2)": (assemble([ARCH], [_tensor(type_id=4)], b"\0" * 32), r"unknown type id 4"),
    "row not whole blocks": (assemble([ARCH], [_tensor(dims=(33,), type_id=Q4_0)], b"\0" * 64),
                             r"rows of 33 values, not a multiple of its 32-value blocks"),
    "misaligned offset": (assemble([ARCH], [_tensor(offset=4)], b"\0" * 64), r"does not lie on the alignment of 32"),
    "data past the end": (assemble([ARCH], [_tensor(dims=(64,))], b"\0" * 32), r"does not lie inside the file"),
    "offset 2^63": (assemble([ARCH], [_tensor(offset=2**63)], b"\0" * 32), r"does not lie inside the file"),
    "overlapping tensors": (assemble([ARCH], [_tensor(dims=(16,)), _tensor("output_norm.weight", (16,), F32, 32)],
                                     b"\0" * 128), r"token_embd.weight and output_norm.weight overlap"),
    "tensor listed twice": (assemble([ARCH], [_tensor(), _tensor(offset=32)], b"\0" * 64), r"listed twice"),
    "tensor name of 64 bytes": (assemble([ARCH], [_tensor(name="t" * 64)], b"\0" * 32), r"claims 64 bytes \(at most 63"),
    "alignment 0": (assemble([ARCH, kv("general.alignment", 4, struct.pack("<I", 0))], []),
                    r"general.alignment must be a UINT32 power of two, got 0"),
    "alignment 48": (assemble([ARCH, kv("general.alignment", 4, struct.pack("<I", 48))], []), r"got 48"),
    "alignment a string": (assemble([ARCH, kv("general.alignment", STRING, gstr("32"))], []), r"got '32'"),
    "alignment 2^31": (assemble([ARCH, kv("general.alignment", 4, struct.pack("<I", 2**31))], [_tensor()],
                                b"\0" * 32), r"does not lie inside the file"),
    "version 1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), r"GGUF version 1 is not supported"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), r"a big-endian GGUF \(version 3\)"),
    "not GGUF": (b"GGML" + b"\0" * 40, r"not a GGUF file \(it starts with b'GGML'"),
    "20 bytes": (b"GGUF" + b"\3" + b"\0" * 15, r"shorter than a GGUF header"),
    "empty": (b"", r"0 bytes, shorter than a GGUF header"),
}


def test_damaged_headers_are_refused_at_once_naming_file_and_field(tmp_path):
    """Each damaged header, converted in a worker with a 6 GB address-space limit: a ConvertError naming the
    file and the field (the 2^31-item array included: no allocation for it is ever attempted)."""
    cases = []
    for i, (name, (raw, _)) in enumerate(HEADERS.items()):
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(raw)
        cases.append((name, path))
    assert len(HEADERS["array of 2^31 strings"][0]) == 761
    outcomes = run_cases(cases, tmp_path)
    wrong = [(name, got.ending, got.detail) for (name, (_, match)), (_, path), got in
             zip(HEADERS.items(), cases, outcomes, strict=True)
             if got.ending != "error" or not got.detail.startswith(f"ConvertError: {path}: ")
             or not re.search(match, got.detail)]
    assert not wrong, "\n".join(map(str, wrong))


def test_a_fifo_or_directory_is_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.gguf")
    _refused(tmp_path / "pipe.gguf", "not a regular file", tmp_path)
    (tmp_path / "dir.gguf").mkdir()
    _refused(tmp_path / "dir.gguf", "not a regular file", tmp_path)


# -- metadata: typed and range-checked ------------------------------------------------------------------

U32, I32, F32V, U64, BOOL = 4, 5, 6, 10, 7


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


METADATA = {
    "block count 2^40": ("gemma4.block_count", U64, struct.pack("<Q", 2**40), r"gemma4.block_count is 1099511627776, "
                         r"outside 1 \.\.\. 1024"),
    "block count a string": ("gemma4.block_count", STRING, gstr("6"), r"block_count must be an integer, not STRING"),
    "head count 0": ("gemma4.attention.head_count", U32, _u32(0), r"head_count is 0, outside"),
    "head_count_kv per layer of strings": ("gemma4.attention.head_count_kv", ARRAY,
                                           struct.pack("<IQ", STRING, 1) + gstr("2"),
                                           r"head_count_kv must be an array of integers, not ARRAY of STRING"),
    "head_count_kv for 3 layers": ("gemma4.attention.head_count_kv", ARRAY, struct.pack("<IQ3I", U32, 3, 2, 2, 1),
                                   r"head_count_kv has 3 entries for 6 layers"),
    "sliding pattern too short": ("gemma4.attention.sliding_window_pattern", ARRAY,
                                  struct.pack("<IQ", BOOL, 2) + b"\1\0", r"has 2 entries for 6 layers"),
    "sliding pattern of ints": ("gemma4.attention.sliding_window_pattern", ARRAY, struct.pack("<IQ", U32, 0),
                                r"sliding_window_pattern"),
    "sliding window 2^31": ("gemma4.attention.sliding_window", U32, _u32(2**31), r"sliding_window is 2147483648"),
    "NaN epsilon": ("gemma4.attention.layer_norm_rms_epsilon", F32V, struct.pack("<f", float("nan")),
                    r"layer_norm_rms_epsilon is nan"),
    "negative RoPE base": ("gemma4.rope.freq_base", F32V, struct.pack("<f", -1.0), r"freq_base is -1.0, outside"),
    "eos id past the vocabulary": ("tokenizer.ggml.eos_token_id", U32, _u32(10**7),
                                   r"eos_token_id is 10000000, outside 0 \.\.\. 511"),
    "negative pad id": ("tokenizer.ggml.padding_token_id", I32, struct.pack("<i", -1), r"padding_token_id is -1"),
    "suppressed id past the vocabulary": ("tokenizer.ggml.suppress_tokens", ARRAY, struct.pack("<IQi", I32, 1, 10**7),
                                          r"suppress_tokens holds 10000000, outside 0 \.\.\. 511"),
    "tokens as numbers": ("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", U32, 512) + b"\0" * 2048,
                          r"tokenizer.ggml.tokens must be an array of strings, not ARRAY of UINT32"),
    "architecture a number": ("general.architecture", U32, _u32(4), r"general.architecture must be a string"),
    "chat template a number": ("tokenizer.chat_template", U32, _u32(4), r"chat_template must be a string"),
    "tokenizer model unknown": ("tokenizer.ggml.model", STRING, gstr("klingon"), r"does not make a tokenizer"),
}


@pytest.mark.parametrize("case", list(METADATA))
def test_bad_metadata_values_name_the_key(bases, tmp_path, case):
    key, vtype, payload, match = METADATA[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(split(bases["f32"].read_bytes()).replace(key, vtype, payload))
    message = _refused(path, match, tmp_path)
    assert str(path) in message


def test_gemma3_sliding_period_0_and_missing_keys(bases, tmp_path):
    """A Gemma 3 period of 0 was a ZeroDivisionError; a missing required key is named."""
    parts = split(bases["f32"].read_bytes())
    parts.kvs = [(k.replace("gemma4.", "gemma3."), t, p) for k, t, p in parts.kvs
                 if k != "gemma4.attention.sliding_window_pattern"]
    parts.kvs = [(k, t, gstr("gemma3") if k == "general.architecture" else p) for k, t, p in parts.kvs]
    (tmp_path / "g3.gguf").write_bytes(parts.replace("gemma3.attention.sliding_window_pattern", U32, _u32(0)))
    _refused(tmp_path / "g3.gguf", r"sliding_window_pattern is 0, outside 1", tmp_path)
    (tmp_path / "nokey.gguf").write_bytes(split(bases["f32"].read_bytes()).without("gemma4.embedding_length"))
    _refused(tmp_path / "nokey.gguf", r"nokey.gguf: GGUF metadata lacks gemma4.embedding_length", tmp_path)


def _retyped(raw: bytes, name: bytes, type_id: int) -> bytes:
    parts = split(raw)
    i = next(i for i, info in enumerate(parts.infos) if name + struct.pack("<I", 1) in info)
    info = bytearray(parts.infos[i])
    struct.pack_into("<I", info, len(info) - 12, type_id)  # entry: name, n_dims, dims, type, offset
    parts.infos[i] = bytes(info)
    return parts.build()


def test_bad_tensor_tables(bases, tmp_path):
    """A 1-D block-quantized tensor (blocks are read a row at a time: it used to be misread) and a rope_freqs
    that is not F32 are refused by name."""
    raw = bases["q4_0"].read_bytes()
    (tmp_path / "q8norm.gguf").write_bytes(_retyped(raw, b"blk.0.attn_norm.weight", 8))  # 64 F32 as Q8_0
    _refused(tmp_path / "q8norm.gguf", r"blk.0.attn_norm.weight is a 1-D Q8_0 tensor; only matrices", tmp_path)
    (tmp_path / "rope.gguf").write_bytes(_retyped(raw, b"rope_freqs.weight", 1))  # 16 F32 read as F16
    _refused(tmp_path / "rope.gguf", r"rope_freqs.weight is not the proportional-RoPE pattern \(F32", tmp_path)


# -- -q of a GGUF ---------------------------------------------------------------------------------------

def _weights(out: Path) -> dict:
    found = {}
    for f in out.glob("*.safetensors"):
        found.update(mx.load(str(f)))
    return found


def test_q_bits_of_a_gguf_is_honoured_and_the_card_says_what_was_written(bases, tmp_path):
    """-q auto keeps the Q4_0 blocks (repacked); -q 8 re-quantizes every matrix to 8 bits, so its bytes differ
    and config and card say 8-bit; -q 4 --group-size 32 is exactly the blocks' own spec, so they are repacked
    bit for bit (the same tensors as auto's)."""
    src = bases["q4_0"]
    convert(src, tmp_path / "auto", dtype="float32", progress=False)
    convert(src, tmp_path / "q8", bits=8, dtype="float32", progress=False)
    convert(src, tmp_path / "q4g32", bits=4, group_size=32, recipe="uniform", dtype="float32", progress=False)
    auto_cfg = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization"]
    q8_cfg = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]
    assert (auto_cfg["bits"], auto_cfg["group_size"]) == (4, 32)
    assert q8_cfg == {"group_size": 64, "bits": 8, "mode": "affine"}  # the embedding (F16) too: max(8, 6)
    a, q8, q4 = _weights(tmp_path / "auto"), _weights(tmp_path / "q8"), _weights(tmp_path / "q4g32")
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert a[key].dtype == mx.uint32 and a[key].shape[-1] * 32 // 4 == q8[key].shape[-1] * 32 // 8
    assert np.array_equal(np.array(a[key]), np.array(q4[key]))
    # The 8-bit weights hold the Q4_0 values: within one 8-bit step of gguf's own dequantization.
    reader = gguf.GGUFReader(str(src))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    want = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(64, 64)
    module = key[: -len(".weight")]
    got = np.array(mx.dequantize(q8[key], q8[f"{module}.scales"], q8[f"{module}.biases"], 64, 8))
    groups = want.reshape(-1, 64)
    step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / 255
    assert (np.abs(got.reshape(-1, 64) - groups) <= step * (1 + 1e-5)).all()
    auto_card = (tmp_path / "auto" / "README.md").read_text()
    q8_card = (tmp_path / "q8" / "README.md").read_text()
    assert "auto: the GGUF's quantized blocks kept" in auto_card
    assert "Q4_0 -> 4-bit affine g32 (repacked exactly)" in auto_card and "8-bit" not in auto_card
    assert "8-bit affine, group 64, recipe mixed_4_6: every matrix re-quantized" in q8_card
    assert "Q4_0 -> 8-bit affine g64" in q8_card and "F16 -> 8-bit affine g64" in q8_card
    assert "repacked" not in q8_card.split("tensors by GGUF type:")[1].split("\n")[0]


def test_q_8_of_a_q8_0_gguf_with_group_32_repacks_and_q_4_requantizes(tiny_gemma4, tmp_path):
    from test_convert_gguf import write_gemma4_gguf

    hf, _ = tiny_gemma4
    src = write_gemma4_gguf(tmp_path / "q8.gguf", hf, lambda name, v: gguf.GGMLQuantizationType.Q8_0)
    convert(src, tmp_path / "q4", bits=4, recipe="uniform", progress=False)
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"] == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    assert "Q8_0 -> 4-bit affine g64" in (tmp_path / "q4" / "README.md").read_text()
    convert(src, tmp_path / "q8", bits=8, group_size=32, recipe="uniform", progress=False)
    assert "Q8_0 -> 8-bit affine g32 (repacked exactly)" in (tmp_path / "q8" / "README.md").read_text()


def test_cli_q_choices_reach_the_converter(bases, tmp_path):
    from click.testing import CliRunner

    from gemma_mlx.convert.command import convert_command

    runner = CliRunner()
    for bits in ("auto", "8", "none"):
        r = runner.invoke(convert_command, [str(bases["q4_0"]), "-o", str(tmp_path / bits), "-q", bits, "--quiet"])
        assert r.exit_code == 0, r.output
    block = lambda d: json.loads((tmp_path / d / "config.json").read_text()).get("quantization")  # noqa: E731
    assert block("auto")["bits"] == 4 and block("8")["bits"] == 8 and block("none") is None


# -- fuzz ------------------------------------------------------------------------------------------------

def _campaign(bases: dict, tmp_path: Path, n: int, seed: int) -> list:
    rng = random.Random(seed)
    raws = {k: p.read_bytes() for k, p in bases.items()}
    parts = {k: split(raw) for k, raw in raws.items()}
    cases = []
    for i in range(n):
        base = rng.choice(sorted(raws))
        data, what = mutate(raws[base], parts[base], rng)
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(data)
        cases.append((f"{base} #{i}: {what}", path))
    return run_cases(cases, tmp_path)


def _only_clean_endings(outcomes) -> None:
    bad = [o for o in outcomes if o.ending not in ("error", "converted")]
    assert not bad, "\n\n".join(f"{o.case}: {o.ending}\n{o.detail}" for o in bad[:5])
    errors = [o for o in outcomes if o.ending == "error"]
    assert all(o.detail.split(":")[0].endswith("Error") for o in errors)


def test_seeded_mutations_end_in_a_clear_error_or_a_good_model(bases, tmp_path):
    """Bit flips, truncations, huge / negative / inflated counts and type swaps of valid files."""
    outcomes = _campaign(bases, tmp_path, 150, seed=11)
    _only_clean_endings(outcomes)
    assert sum(o.ending == "error" for o in outcomes) > 75  # most mutations of a header are caught


@pytest.mark.slow
def test_seeded_mutation_campaign(bases, tmp_path):
    _only_clean_endings(_campaign(bases, tmp_path, 4000, seed=2026))


# -- hypothesis-built headers ----------------------------------------------------------------------------

def _header_strategy(parts):
    """Headers of a valid file's tensors and data with hypothesis-chosen metadata values, types and counts."""
    st = pytest.importorskip("hypothesis.strategies")
    sizes = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
    edge = st.sampled_from((0, 1, 2, 6, 64, 511, 512, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1))
    anyint = st.one_of(edge, st.integers(0, 2**64 - 1))

    def scalar(vtype):
        if vtype in sizes:
            fmt = sizes[vtype]
            bits = struct.calcsize(fmt) * 8
            return anyint.map(lambda v: struct.pack(fmt.upper(), v % 2**bits))
        if vtype in (6, 12):
            return st.floats(allow_nan=True, allow_infinity=True, width=32 if vtype == 6 else 64).map(
                lambda v: struct.pack("<f" if vtype == 6 else "<d", v))
        if vtype == 7:
            return st.integers(0, 255).map(lambda v: bytes([v]))
        return st.one_of(st.text(max_size=12).map(gstr), st.binary(max_size=12).map(gstr))

    def array():
        def body(etype):
            items = st.lists(scalar(etype), max_size=8)
            return st.tuples(items, st.one_of(st.none(), anyint)).map(
                lambda t: struct.pack("<IQ", etype, len(t[0]) if t[1] is None else t[1]) + b"".join(t[0]))
        return st.sampled_from((0, 4, 5, 6, 7, 8, 9, 10, 13, 2**32 - 1)).flatmap(body)

    value = st.integers(0, 14).flatmap(lambda t: st.tuples(st.just(t), array() if t == ARRAY else scalar(t)))
    keys = [k for k, _, _ in parts.kvs]
    edits = st.dictionaries(st.sampled_from(keys), st.one_of(st.none(), value), max_size=6)
    extra = st.lists(st.tuples(st.sampled_from(keys + ["general.alignment", "x"]), value), max_size=2)
    counts = st.tuples(st.one_of(st.none(), anyint), st.one_of(st.none(), anyint), st.sampled_from((2, 3, 3, 1)))

    def build(args):
        edit, added, (n_kv, n_tensors, version) = args
        kvs = [kv(k, *edit[k]) if edit.get(k) else kv(k, t, p) for k, t, p in parts.kvs
               if not (k in edit and edit[k] is None)]
        kvs += [kv(k, *v) for k, v in added]
        return assemble(kvs, parts.infos, parts.data, version=version, n_kv=n_kv, n_tensors=n_tensors)

    return st.tuples(edits, extra, counts).map(build)


def _hypothesis_cases(bases, tmp_path: Path, n: int) -> list:
    hypothesis = pytest.importorskip("hypothesis")
    raws = {k: p.read_bytes() for k, p in bases.items()}
    cases = []

    @hypothesis.settings(max_examples=n, database=None, derandomize=True, deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st_base=hypothesis.strategies.sampled_from(sorted(raws)), data=hypothesis.strategies.data())
    def collect(st_base, data):
        raw = data.draw(_header_strategy(split(raws[st_base])))
        path = tmp_path / f"h{len(cases)}.gguf"
        path.write_bytes(raw)
        cases.append((f"{st_base} hypothesis #{len(cases)}", path))

    collect()
    return run_cases(cases, tmp_path)


def test_hypothesis_headers_end_in_a_clear_error_or_a_good_model(bases, tmp_path):
    """Metadata values, types and counts chosen by hypothesis over the valid files' keys; each case converted in
    the bounded worker."""
    _only_clean_endings(_hypothesis_cases(bases, tmp_path, 120))


@pytest.mark.slow
def test_hypothesis_header_campaign(bases, tmp_path):
    _only_clean_endings(_hypothesis_cases(bases, tmp_path, 3000))
