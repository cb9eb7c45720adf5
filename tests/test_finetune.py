"""Fine-tuning on the tiny demo model: data and loss masks from the template, overfitting a text, an image and an
audio record until greedy generation gives the trained answers, QLoRA on a 4-bit base, gradient checkpointing,
fully masked samples, seeded resume, adapters through the API and the CLI."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import gemma_mlx
from gemma_mlx.finetune.data import DataError, DatasetReader, Sample
from gemma_mlx.finetune.lora import LoRASettings, apply_lora, load_adapter
from gemma_mlx.finetune.train import Trainer, TrainSettings, batch_loss
from gemma_mlx.tiny import write_demo_model

ANSWERS = {"who are you?": "a tiny model", "what is in the picture?": "a cat", "what is said?": "speech"}


def records(media_dir):
    shutil.copy(media_dir / "chelsea.png", media_dir.parent / "data" / "cat.png")
    shutil.copy(media_dir / "speech_16k.flac", media_dir.parent / "data" / "talk.flac")
    return [
        {"messages": [{"role": "user", "content": "who are you?"},
                      {"role": "assistant", "content": ANSWERS["who are you?"]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                                   {"type": "text", "text": "what is in the picture?"}]},
                      {"role": "assistant", "content": ANSWERS["what is in the picture?"]}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "path": "talk.flac"},
                                                   {"type": "text", "text": "what is said?"}]},
                      {"role": "model", "content": ANSWERS["what is said?"]}]},
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("ft") / "tiny")


@pytest.fixture
def data_dir(tmp_path, fixtures_dir):
    media = tmp_path / "media"
    shutil.copytree(fixtures_dir / "media", media, ignore=shutil.ignore_patterns("*.mp4"))
    (tmp_path / "data").mkdir()
    recs = records(media)
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "data" / "valid.jsonl").write_text(json.dumps(recs[0]) + "\n")
    return tmp_path / "data"


def fresh(model_dir):
    g = gemma_mlx.load(model_dir)
    # The random tiny model's final norm and small tied embeddings cap every logit near 6, so no adapter could
    # make an answer certain; a larger final norm (frozen, as in real checkpoints) lifts that cap.
    g.model.language_model.norm.weight = g.model.language_model.norm.weight * 6
    return g


def test_targets_are_the_model_turns_and_the_prompt_is_what_inference_sees(model_dir, data_dir):
    g = gemma_mlx.load(model_dir)
    samples = DatasetReader(g, data_dir).split("train")
    for sample, answer in zip(samples, ANSWERS.values()):
        ids = sample.prompt.input_ids
        assert g.tokenizer.decode(ids[sample.targets].tolist()) == answer + "<turn|>"
    first = samples[0]
    start = int(np.argmax(first.targets))
    inference = g.prepare("who are you?").input_ids  # the prompt generate would feed, generation prompt included
    assert ids is not None and first.prompt.input_ids[:start].tolist() == inference.tolist()
    assert [s.kind for s in samples[1].prompt.spans] == ["image"] and samples[2].prompt.spans[0].kind == "audio"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not a JSON record"),
    ('[1, 2]', "a record is a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "needs a role"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "path": "../x.png"}]}, '
     '{"role": "assistant", "content": "a"}]}', "outside the data directory"),
    ('{"messages": [{"role": "user", "content": [{"type": "audio", "path": "gone.wav"}]}, '
     '{"role": "assistant", "content": "a"}]}', "gone.wav not found"),
    ('{"text": ""}', "'text' must be a non-empty string"),
    ('{"prompt": "q"}', "'completion' must be a non-empty string"),
    ('{"text": "a", "prompt": "b"}', "exactly one of"),
])
def test_bad_records_name_the_file_and_line(model_dir, tmp_path, line, problem):
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=problem) as e:
        DatasetReader(gemma_mlx.load(model_dir), tmp_path).split("train")
    assert str(e.value).startswith("train.jsonl:2:")


def test_text_and_prompt_completion_records(model_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "plain words"}) + "\n"
                                          + json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    g = gemma_mlx.load(model_dir)
    text, pc = DatasetReader(g, tmp_path).split("train")
    assert text.targets[1:].all() and not text.targets[0]
    assert g.tokenizer.decode(pc.prompt.input_ids[pc.targets].tolist()) == "4<turn|>"


def test_overfit_text_image_audio_then_greedy_gives_the_trained_answers(model_dir, data_dir):
    g = fresh(model_dir)
    reader = DatasetReader(g, data_dir)
    adapter = apply_lora(g.model, LoRASettings(rank=8, alpha=16), seed=0)
    trainer = Trainer(g.model, adapter, reader.split("train"), TrainSettings(
        iters=40, learning_rate=3e-3, batch_size=3, steps_per_eval=40, steps_per_save=1000),
        valid=reader.split("valid"))
    losses = trainer.run()
    assert losses[-1] < 0.05 < losses[0]
    assert trainer.validation_loss() < 0.05
    image, audio = data_dir / "cat.png", data_dir / "talk.flac"
    assert g.generate("who are you?", greedy=True, max_tokens=20).content == "a tiny model"
    assert g.generate("what is in the picture?", images=[image], greedy=True, max_tokens=20).content == "a cat"
    assert g.generate("what is said?", audios=[audio], greedy=True, max_tokens=20).content == "speech"


def _grads(model, samples, checkpoint=False):
    def loss(m):
        total, count = batch_loss(m, samples, checkpoint=checkpoint)
        return total / max(count, 1)
    value, grads = nn.value_and_grad(model, loss)(model)
    return value.item(), dict(tree_flatten(grads))


def test_gradient_checkpointing_gives_the_same_gradients(model_dir, data_dir):
    g = fresh(model_dir)
    samples = DatasetReader(g, data_dir).split("train")
    adapter = apply_lora(g.model, LoRASettings(rank=4, alpha=8), seed=1)
    for m in adapter.modules.values():
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(2)) * 0.1
    plain_loss, plain = _grads(g.model, samples)
    ck_loss, ck = _grads(g.model, samples, checkpoint=True)
    assert abs(plain_loss - ck_loss) < 1e-6
    for k in plain:
        assert np.allclose(np.array(plain[k]), np.array(ck[k]), rtol=1e-5, atol=1e-7), k


def test_a_sample_with_no_targets_adds_exactly_zero(model_dir, data_dir):
    g = fresh(model_dir)
    real = DatasetReader(g, data_dir).split("train")[0]
    masked = Sample(real.prompt, np.zeros(len(real), bool), "masked")
    apply_lora(g.model, LoRASettings(rank=4), seed=0)
    alone_loss, alone = _grads(g.model, [masked])
    assert alone_loss == 0.0 and all(np.isfinite(np.array(v)).all() and not np.array(v).any() for v in alone.values())
    _, mixed = _grads(g.model, [masked, real])
    _, single = _grads(g.model, [real])
    for k in single:
        assert np.isfinite(np.array(mixed[k])).all()
        assert np.allclose(np.array(mixed[k]), np.array(single[k]), atol=1e-7), k


def test_resume_follows_the_uninterrupted_loss_curve(model_dir, data_dir, tmp_path):
    settings = TrainSettings(iters=6, learning_rate=3e-3, batch_size=2, steps_per_eval=100, steps_per_save=3,
                             seed=4)
    lora = LoRASettings(rank=4, alpha=8, dropout=0.1)

    g = fresh(model_dir)
    train = DatasetReader(g, data_dir).split("train")[:2] + [Sample(*_text_sample(g))]
    whole = Trainer(g.model, apply_lora(g.model, lora, seed=4), train, settings).run()

    g = fresh(model_dir)
    first = Trainer(g.model, apply_lora(g.model, lora, seed=4), train, settings, out_dir=tmp_path / "ckpt")
    for _ in range(3):  # stopped after step 3 (as Ctrl-C does: the checkpoint is written on the way out)
        first.step()
    first.save()
    g = fresh(model_dir)
    second = Trainer(g.model, load_adapter(g.model, tmp_path / "ckpt"), train, settings, out_dir=tmp_path / "ckpt")
    assert second.resume() == 3
    resumed = second.run()
    assert np.allclose(resumed, whole, rtol=1e-5), (resumed, whole)


def _text_sample(g):
    from gemma_mlx.processing.prompt import PreparedPrompt

    ids = g.tokenizer.encode("<bos>some plain text to learn")
    return PreparedPrompt.from_ids(ids, g.config.token_ids), np.arange(len(ids)) > 0, "text"


def test_qlora_on_a_4bit_base_trains_and_leaves_the_base_alone(model_dir, data_dir):
    g = fresh(model_dir)
    nn.quantize(g.model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                and m.weight.shape[-1] % 32 == 0 and "language_model" in p)
    before = {k: np.array(v) for k, v in tree_flatten(g.model.parameters()) if "lora" not in k}
    samples = DatasetReader(g, data_dir).split("train")[:1]
    adapter = apply_lora(g.model, LoRASettings(rank=8, alpha=16), seed=0)
    assert any(isinstance(m.base, nn.QuantizedLinear) for m in adapter.modules.values())
    losses = Trainer(g.model, adapter, samples, TrainSettings(iters=15, learning_rate=3e-3,
                                                              steps_per_eval=100, steps_per_save=100)).run()
    assert losses[-1] < 0.5 * losses[0]
    after = {k.replace(".base.", "."): np.array(v) for k, v in tree_flatten(g.model.parameters()) if "lora" not in k}
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_adapter_saved_loads_through_the_api_with_the_same_logits(model_dir, data_dir, tmp_path):
    g = gemma_mlx.load(model_dir)
    adapter = apply_lora(g.model, LoRASettings(rank=4, alpha=8, layers=(0, 5)), seed=3)
    for m in adapter.modules.values():
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(9))
    adapter.save(tmp_path / "adapter")
    ids = g.prepare("hello").input_ids[None]
    loaded = gemma_mlx.load(model_dir, adapter=tmp_path / "adapter")
    base = gemma_mlx.load(model_dir)
    assert np.allclose(np.array(loaded(ids)), np.array(g(ids)), atol=1e-5)
    assert not np.allclose(np.array(base(ids)), np.array(g(ids)), atol=1e-3)


def test_cli_trains_refuses_to_overwrite_resumes_and_generates(model_dir, data_dir, tmp_path):
    from gemma_mlx.cli import cli

    out = tmp_path / "adapter"
    runner = CliRunner()
    args = ["lora", str(model_dir), "--data", str(data_dir), "-o", str(out), "--rank", "4", "--lr", "1e-3",
            "--save-every", "2"]
    r = runner.invoke(cli, args + ["--iters", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    r = runner.invoke(cli, args + ["--iters", "3"])
    assert r.exit_code == 2 and "already holds an adapter" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, args + ["--iters", "3", "--resume"])
    assert r.exit_code == 0 and "step 2 of 3" in r.output, r.output
    r = runner.invoke(cli, ["generate", str(model_dir), "--adapter", str(out), "-p", "hi", "-n", "3", "--greedy"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["generate", str(model_dir), "--adapter", str(tmp_path), "-p", "hi"])
    assert r.exit_code == 2 and "not an adapter directory" in r.output


def _random_adapter(g, tmp_path, seed=9, **kw):
    adapter = apply_lora(g.model, LoRASettings(rank=4, alpha=8, **kw), seed=seed)
    for m in adapter.modules.values():
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(seed)) * 0.5
    return adapter.save(tmp_path / "adapter")


def test_fused_float_model_has_the_adapter_models_logits(model_dir, tmp_path):
    from gemma_mlx.finetune.fuse import fuse

    adapter_dir = _random_adapter(gemma_mlx.load(model_dir), tmp_path, train_media=True)
    adapted = gemma_mlx.load(model_dir, adapter=adapter_dir)
    fuse(model_dir, adapter_dir, tmp_path / "fused", bits=None, progress=False)
    fused = gemma_mlx.load(tmp_path / "fused")
    ids = adapted.prepare("hello there").input_ids[None]
    assert np.abs(np.array(fused(ids)) - np.array(adapted(ids))).max() < 1e-4
    assert fused.generate("hi", greedy=True, max_tokens=8).tokens == adapted.generate("hi", greedy=True,
                                                                                    max_tokens=8).tokens


def test_fusing_into_a_4bit_base_keeps_its_blocks_and_requantizes_the_adapted(model_dir, tmp_path):
    from safetensors.numpy import load_file

    from gemma_mlx.convert import convert
    from gemma_mlx.convert.quantize import output_name
    from gemma_mlx.finetune.fuse import fuse

    convert(model_dir, tmp_path / "q4", bits=4, group_size=32, progress=False)
    g = gemma_mlx.load(tmp_path / "q4")
    adapter = apply_lora(g.model, LoRASettings(rank=4, alpha=8, layers=(1,)), seed=2)
    for m in adapter.modules.values():
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(3)) * 0.02
    adapter.save(tmp_path / "adapter")
    fuse(tmp_path / "q4", tmp_path / "adapter", tmp_path / "fused", progress=False)

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    before, after = tensors(tmp_path / "q4"), tensors(tmp_path / "fused")
    assert before.keys() == after.keys()
    changed = {k.rsplit(".", 1)[0] for k in before if not np.array_equal(before[k], after[k])}
    on_disk = {n: output_name(f"{n}.weight", g.config.model_type)[: -len(".weight")] for n in adapter.modules}
    assert changed == set(on_disk.values())
    for name, m in adapter.modules.items():  # each adapted matrix: its base dequantized, plus B A, re-quantized
        base, name = m.base, on_disk[name]
        merged = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits) + m.delta()
        w, scales, biases = mx.quantize(merged, base.group_size, base.bits)
        assert np.array_equal(after[f"{name}.weight"], np.array(w)), name
        assert np.allclose(after[f"{name}.scales"], np.array(scales)), name
    fused = gemma_mlx.load(tmp_path / "fused")  # loads as a converted model (the converter checked it too)
    assert np.isfinite(np.array(fused(g.prepare("hello there").input_ids[None]))).all()


def test_cli_fuse_refuses_an_existing_out_and_a_bad_adapter(model_dir, tmp_path):
    from gemma_mlx.cli import cli

    adapter_dir = _random_adapter(gemma_mlx.load(model_dir), tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["fuse", str(model_dir), "--adapter", str(adapter_dir), "-o", str(tmp_path / "f"),
                            "--quiet", "-q", "none"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["fuse", str(model_dir), "--adapter", str(adapter_dir), "-o", str(tmp_path / "f")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = runner.invoke(cli, ["fuse", str(model_dir), "--adapter", str(tmp_path / "f"), "-o", str(tmp_path / "g")])
    assert r.exit_code == 2 and "not an adapter directory" in r.output and not (tmp_path / "g").exists()
