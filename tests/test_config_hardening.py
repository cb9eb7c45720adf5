"""Hostile config / checkpoint input (issue #11): every case is a typed GemmaMLXError naming the file or field."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest

from gemma_mlx.config import parse_config
from gemma_mlx.errors import ConfigError, GemmaMLXError, InputError, WeightsError
from gemma_mlx.tiny import gemma4_config, write_demo_model
from gemma_mlx.weights import load_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "m")


@pytest.fixture()
def ckpt(base, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(base, dst)
    return dst


@pytest.mark.parametrize("key, value", [("image_token_id", 512), ("audio_token_id", 600), ("boi_token_id", -1),
                                        ("eos_token_id", [1, 100000]), ("video_token_id", "abc")])
def test_config_token_ids_are_checked_against_the_vocabulary(key, value):
    cfg = gemma4_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=f"config.json: {key}"):
        parse_config(cfg)


@pytest.mark.parametrize("field, value", [("suppress_tokens", [10**7]), ("eos_token_id", 512),
                                          ("pad_token_id", -1), ("bos_token_id", 100000)])
def test_generation_config_token_ids_are_checked(ckpt, field, value):
    from gemma_mlx import load

    g = json.loads((ckpt / "generation_config.json").read_text())
    g[field] = value
    (ckpt / "generation_config.json").write_text(json.dumps(g))
    with pytest.raises(ConfigError, match=rf"generation_config.json: {field}.*{abs(value if isinstance(value, int) else value[0])}"):
        load(ckpt)


@pytest.mark.parametrize("mutate", [
    lambda t: t.update(num_hidden_layers=True), lambda t: t.update(hidden_size="64"),
    lambda t: t.update(hidden_size=2**31), lambda t: t.update(num_attention_heads=0),
    lambda t: t.update(num_key_value_heads=0), lambda t: t.update(sliding_window=2**20),
    lambda t: t.update(sliding_window=2**31), lambda t: t.update(num_hidden_layers=100_000),
    lambda t: t["rope_parameters"]["full_attention"].update(partial_rotary_factor=1e9),
    lambda t: t.update(layer_types=["sliding_attention"] * 2), lambda t: t.update(layer_types=["x"] * 6),
    lambda t: t["per_layer_config"]["5"].update(num_key_value_heads=0),
    lambda t: t.update(per_layer_config={"abc": {}}), lambda t: t.update(tie_word_embeddings="yes"),
])
def test_config_fields_are_type_and_range_checked(mutate):
    cfg = gemma4_config()
    mutate(cfg["text_config"])
    with pytest.raises(ConfigError, match="config.json: "):
        parse_config(cfg)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "model.safetensors.index.json"])
@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"a": "\xff\xfe"}', b"[1, 2]"])
def test_side_files_deep_nested_non_utf8_or_wrong_type(ckpt, name, content):
    from gemma_mlx import load

    (ckpt / name).write_bytes(content)
    with pytest.raises(GemmaMLXError, match=name.replace(".", r"\.")):
        load(ckpt)


def test_shard_fifo_directory_dangling_link_and_foreign_index_entries(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(tmp_path / "real.safetensors")
    os.mkfifo(ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match="not a regular file"):
        load_model(ckpt)
    os.unlink(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(WeightsError, match="directory"):
        load_model(ckpt)
    (ckpt / "model.safetensors").rmdir()
    os.symlink(tmp_path / "gone", ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match="dangling"):
        load_model(ckpt)
    os.unlink(ckpt / "model.safetensors")
    os.symlink(tmp_path / "real.safetensors", ckpt / "model.safetensors")  # hub-cache style link: valid
    load_model(ckpt)
    (tmp_path / "foreign").write_bytes(b"x" * 12345)
    for bad in ("../foreign", str(tmp_path / "foreign")):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": bad}}))
        with pytest.raises(WeightsError, match="not a plain file name") as e:
            load_model(ckpt)
        assert "12345" not in str(e.value)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(WeightsError, match="weight_map"):
        load_model(ckpt)


def test_safetensors_header_list_and_overlap(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for replacement in ([1, 2], 7):
        raw = json.dumps(replacement).encode().ljust(n)
        path.write_bytes(data[:8] + raw + data[8 + n:])
        with pytest.raises(WeightsError, match="corrupt safetensors header"):
            load_model(ckpt)
    names = sorted(k for k in header if k != "__metadata__")
    a, b = header[names[0]], header[names[1]]
    size = a["data_offsets"][1] - a["data_offsets"][0]
    if b["data_offsets"][1] - b["data_offsets"][0] == size:
        b["data_offsets"] = list(a["data_offsets"])
        raw = json.dumps(header).encode().ljust(n)
        if len(raw) == n:
            path.write_bytes(data[:8] + raw + data[8 + n:])
            with pytest.raises(WeightsError, match="overlap"):
                load_model(ckpt)


def test_float16_is_refused_with_the_reason(ckpt):
    with pytest.raises(InputError, match="65504.*bfloat16"):
        load_model(ckpt, dtype="float16")


def test_float16_overflow_measured_on_the_tiny_model(ckpt):
    """Why float16 is refused: a residual stream past 65504 becomes NaN logits in float16 only."""
    import mlx.core as mx
    import numpy as np

    w = mx.load(str(ckpt / "model.safetensors"))
    big = {k: (v * 10000 if "post_feedforward_layernorm" in k else v) for k, v in w.items()}
    mx.save_safetensors(str(ckpt / "model.safetensors"), big)
    ids = mx.array([[2, 105, 9, 400, 33, 41, 17, 8, 300, 55, 12, 6]])
    model, _ = load_model(ckpt, dtype="float32")
    assert np.isfinite(np.array(model(ids))).all()
    model.set_dtype(mx.float16)
    assert np.isnan(np.array(model(ids).astype(mx.float32))).all()


def test_token_ids_outside_the_vocabulary_are_refused_before_the_embedding_lookup(tmp_path):
    """A tokenizer whose ids go past the model's table (or ids given by hand) read outside it: a segfault
    before this check; now an InputError naming the id."""
    import numpy as np

    import gemma_mlx
    from gemma_mlx.errors import InputError
    from gemma_mlx.tiny import write_demo_model

    g = gemma_mlx.load(write_demo_model(tmp_path / "tiny"))
    vocab = g.config.text.vocab_size
    for bad in (vocab, 70000, -1):
        with pytest.raises(InputError, match=f"token id {bad} is outside"):
            g(np.array([[2, 105, bad]]))
