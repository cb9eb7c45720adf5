"""The assistant drafter (gemma4_unified_assistant) against transformers 5.23.0, float32, within 1e-4.

transformers 5.23 cannot run the pair as shipped (../shared/docs/gemma4-unified.md §7.3): (i) the assistant's
text config has num_kv_shared_layers == num_hidden_layers, and ``kv_sharing_modes`` raises for an empty producer
set, so the assistant cannot even be built; (ii) a target with num_kv_shared_layers = 0 marks no layer "store",
so ``return_shared_kv_states`` returns {} and the drafter would read no K/V. ``patched_kv_sharing`` fixes both
the way the code intends: every assistant layer "reuse"s, and the target's last layer of each type "store"s.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.cache import make_cache
from gemma_mlx.config import ConfigError, parse_assistant_config
from gemma_mlx.model.assistant import TARGET_FULL, TARGET_SLIDING, attach, draft_tokens, load_assistant, target_kv
from gemma_mlx.prefill import prefill
from gemma_mlx.processing.prompt import PreparedPrompt
from gemma_mlx.weights import load_model
from hf_tiny import TOKENS, VOCAB, build_gemma4, randomise

TOL = 1e-4
SLIDING, FULL = "sliding_attention", "full_attention"
ASSISTANT_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                      num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                      layer_types=[SLIDING, SLIDING, SLIDING, FULL], initializer_range=0.1)


@contextlib.contextmanager
def patched_kv_sharing():
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.__dict__["kv_sharing_modes"]

    def modes(self):
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        if shared == n:  # (i) the assistant: every layer reads the target's K/V
            return ["reuse"] * n
        out = original.fget(self)
        if shared == 0:  # (ii) the target: the last layer of each type keeps its K/V for the drafter
            for t in set(self.layer_types):
                out[max(i for i, x in enumerate(self.layer_types) if x == t)] = "store"
        return out

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = original


def build_assistant(path, seed=0, **text):
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    torch.manual_seed(seed)
    cfg = Gemma4UnifiedAssistantConfig(text_config=Gemma4UnifiedTextConfig(**{**ASSISTANT_TEXT, **text}),
                                       backbone_hidden_size=64)
    model = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    randomise(model, seed)
    with torch.no_grad():  # HF initialises the projections small; make them matter
        for p in (model.pre_projection.weight, model.post_projection.weight):
            p.copy_(0.2 * torch.randn(p.shape))
    model.save_pretrained(path)
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with patched_kv_sharing():
        tpath, apath = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("assistant")
        hf_target = build_gemma4(tpath, seed=3)
        hf_assistant = build_assistant(apath, seed=4)
        target, _ = load_model(tpath, dtype="float32")
        assistant, _ = load_assistant(apath, dtype="float32")
        yield hf_target, hf_assistant, target, assistant


def hf_round(hf_target, hf_assistant, ids, steps, **media):
    """transformers: prefill, then a chained draft round from the target's greedy next token."""
    with torch.no_grad():
        mm = np.zeros(len(ids), np.int64)
        mm[np.asarray(ids) == TOKENS["image_token_id"]] = 1
        out = hf_target(input_ids=torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True,
                        use_cache=True, mm_token_type_ids=torch.tensor(mm[None]),
                        **{k: torch.as_tensor(v) for k, v in media.items()})
        kv = out.shared_kv_states
        assert set(kv) == {SLIDING, FULL}, "the patch must make the target return its K/V"
        token = int(out.logits[0, -1].argmax())
        hidden, p = out.hidden_states[-1][:, -1:], len(ids)
        rows = []
        for _ in range(steps):
            emb = hf_target.get_input_embeddings()(torch.tensor([[token]]))
            a = hf_assistant(inputs_embeds=torch.cat([emb, hidden], -1), position_ids=torch.tensor([[p]]),
                             shared_kv_states=kv)
            rows.append((a.logits[0, -1].numpy(), a.last_hidden_state[0, -1].numpy()))
            token, hidden = int(a.logits[0, -1].argmax()), a.last_hidden_state
        return int(out.logits[0, -1].argmax()), rows


def our_round(target, assistant, ids, steps, vision_mask="all", **media):
    attachment = attach(target.config, assistant.config)
    target.vision_mask = vision_mask
    try:
        caches = make_cache(target.config.text)
        prompt = PreparedPrompt.from_ids(ids, target.config.token_ids, media)
        hidden = prefill(target, prompt, caches)
    finally:
        target.vision_mask = "sliding"
    token = int(mx.argmax(target.logits(hidden)[0, -1]).item())
    kv = target_kv(caches, attachment)
    state, rows, t = hidden[:, -1:], [], token
    for _ in range(steps):
        logits, state = assistant.step(target.language_model.embed(mx.array([[t]])), state, len(ids), kv)
        rows.append((np.array(logits[0, -1]), np.array(state[0, -1])))
        t = int(mx.argmax(logits[0, -1]).item())
    return token, rows, caches, attachment, hidden


def assert_rounds_close(ours_rows, ref_rows):
    assert len(ours_rows) == len(ref_rows)
    for i, ((lo, ho), (lr, hr)) in enumerate(zip(ours_rows, ref_rows)):
        assert np.abs(lr).max() > 0.05, "a meaningful signal, not a near-zero drafter"
        assert np.abs(lo - lr).max() <= TOL, f"step {i}: max |Δlogit| = {np.abs(lo - lr).max():.3g}"
        assert np.abs(ho - hr).max() <= TOL, f"step {i}: max |Δhidden| = {np.abs(ho - hr).max():.3g}"


def test_first_and_chained_steps_short_prompt(pair):
    hf_t, hf_a, target, assistant = pair
    ids = [int(i) for i in np.random.RandomState(0).randint(5, 400, size=6)]  # inside the window of 8
    ref_token, ref = hf_round(hf_t, hf_a, ids, steps=4)
    token, rows, *_ = our_round(target, assistant, ids, steps=4)
    assert token == ref_token
    assert_rounds_close(rows, ref)


def test_chained_steps_past_the_window(pair):
    hf_t, hf_a, target, assistant = pair
    ids = [int(i) for i in np.random.RandomState(1).randint(5, 400, size=30)]  # window 8: the ring has wrapped
    ref_token, ref = hf_round(hf_t, hf_a, ids, steps=5)
    token, rows, *_ = our_round(target, assistant, ids, steps=5)
    assert token == ref_token
    assert_rounds_close(rows, ref)


def test_after_a_prefill_with_an_image(pair):
    hf_t, hf_a, target, assistant = pair
    rng = np.random.RandomState(2)
    n, patch = 6, 48 * 48 * 3
    px = rng.rand(1, n, patch).astype(np.float32)
    pos = np.array([[(c, r) for r in range(2) for c in range(3)]], np.int64)
    ids = ([int(i) for i in rng.randint(5, 400, size=4)] + [TOKENS["boi_token_id"]]
           + [TOKENS["image_token_id"]] * n + [TOKENS["eoi_token_id"]] + [int(i) for i in rng.randint(5, 400, 9)])
    ref_token, ref = hf_round(hf_t, hf_a, ids, steps=3, pixel_values=px, image_position_ids=pos)
    token, rows, *_ = our_round(target, assistant, ids, steps=3, pixel_values=px, image_position_ids=pos)
    assert token == ref_token
    assert_rounds_close(rows, ref)


def test_draft_tokens_are_the_chained_argmax(pair):
    _, _, target, assistant = pair
    ids = [int(i) for i in np.random.RandomState(3).randint(5, 400, size=20)]
    token, rows, caches, attachment, hidden = our_round(target, assistant, ids, steps=4)
    drafted = draft_tokens(assistant, target, caches, attachment, token, hidden[:, -1:], len(ids), k=4)
    assert drafted == [int(np.argmax(logits)) for logits, _ in rows]


def test_attachment_reads_the_last_layer_of_each_type(pair):
    _, _, target, assistant = pair
    a = attach(target.config, assistant.config)
    types = [s.layer_type for s in target.config.text.layers]
    assert a.sources() == {TARGET_SLIDING: max(i for i, t in enumerate(types) if t == SLIDING),
                           TARGET_FULL: max(i for i, t in enumerate(types) if t == FULL)}


def assistant_json(base: dict, **over) -> dict:
    """A copy of a saved assistant config.json with fields replaced (text= replaces text_config fields)."""
    import copy

    cfg = copy.deepcopy(base)
    cfg["text_config"].update(over.pop("text", {}))
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over, message", [
    (dict(model_type="gemma4_unified"), "not a Gemma 4 assistant"),
    (dict(use_ordered_embeddings=True), "use_ordered_embeddings"),
    (dict(text={"num_kv_shared_layers": 2}), "num_kv_shared_layers"),
    (dict(backbone_hidden_size=0), "backbone_hidden_size"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
])
def test_assistant_config_errors_name_the_field(pair, over, message):
    base = pair[3].config.raw
    with pytest.raises(ConfigError, match=message):
        parse_assistant_config(assistant_json(base, **over))


@pytest.mark.parametrize("text, message", [
    ({"vocab_size": 600}, "vocabulary"),
    ({"head_dim": 8}, "head_dim"),
])
def test_pair_check(pair, text, message):
    _, _, target, assistant = pair
    cfg = parse_assistant_config(assistant_json(assistant.config.raw, text=text))
    with pytest.raises(ConfigError, match=message):
        attach(target.config, cfg)


def test_pair_check_backbone_width(pair):
    _, _, target, assistant = pair
    with pytest.raises(ConfigError, match="hidden size"):
        attach(target.config, parse_assistant_config(assistant_json(assistant.config.raw, backbone_hidden_size=128)))
