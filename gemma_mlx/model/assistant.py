"""Gemma 4's assistant drafter (``gemma4_unified_assistant``, multi-token prediction), in MLX.

The drafter has no K/V of its own. Each draft step takes the target's scaled embedding of the last token and a
hidden state (the target's final post-norm state for the first step of a round, then its own projected state),
projects their concatenation down to its width, and runs its layers with queries only: sliding layers attend
over the K/V of the target's last sliding layer that computes K/V, full layers over the target's last full one.
Logits come from its own tied embedding table (no softcap); ``post_projection`` maps the state back to the
target's width for the next step. All queries of a round sit at one position p (the last token's), and the keys
they read are the target's, at positions < p.

Module and parameter names mirror the Hugging Face checkpoint, so it loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import AssistantConfig, ModelConfig, TextConfig
from ..errors import ConfigError
from . import masks
from .text import DecoderLayer, RMSNorm, Step, TextModel

# kv_source markers of the drafter's layers: "read the target's K/V of this layer type" (never a layer index).
TARGET_SLIDING, TARGET_FULL = -1, -2
_SOURCE_OF_TYPE = {"sliding_attention": TARGET_SLIDING, "full_attention": TARGET_FULL}


@dataclass(frozen=True)
class Attachment:
    """Which target layers' K/V the drafter reads: one per layer type (the last of that type computing K/V)."""

    sliding_layer: int
    full_layer: int

    def sources(self) -> dict[int, int]:
        """Drafter kv_source marker -> target layer index."""
        return {TARGET_SLIDING: self.sliding_layer, TARGET_FULL: self.full_layer}


def attach(target: ModelConfig | TextConfig, assistant: AssistantConfig) -> Attachment:
    """The target layers the drafter reads, after checking the pair fits; ConfigError names what does not."""
    text = target.text if isinstance(target, ModelConfig) else target
    draft = assistant.text
    if draft.vocab_size != text.vocab_size:
        raise ConfigError(f"the assistant's vocabulary ({draft.vocab_size}) differs from the target's "
                          f"({text.vocab_size}); it drafts for another model")
    if assistant.backbone_hidden_size != text.hidden_size:
        raise ConfigError(f"the assistant was trained on a target of hidden size {assistant.backbone_hidden_size}, "
                          f"this target's is {text.hidden_size}")
    last: dict[str, int] = {}
    for i, spec in enumerate(text.layers):
        if spec.kv_source is None:
            last[spec.layer_type] = i
    for i, spec in enumerate(draft.layers):
        if spec.layer_type not in last:
            raise ConfigError(f"assistant layer {i} ({spec.layer_type}) needs target K/V of that type; "
                              f"the target has no {spec.layer_type} layer")
        src = text.layers[last[spec.layer_type]]
        if (src.head_dim, src.num_kv_heads) != (spec.head_dim, spec.num_kv_heads):
            raise ConfigError(
                f"assistant layer {i} ({spec.layer_type}) expects K/V of head_dim {spec.head_dim} with "
                f"{spec.num_kv_heads} heads; target layer {last[spec.layer_type]} has head_dim {src.head_dim} "
                f"with {src.num_kv_heads}")
        if draft.num_attention_heads % src.num_kv_heads:
            raise ConfigError(f"assistant layer {i}: {draft.num_attention_heads} query heads do not divide over "
                              f"the target's {src.num_kv_heads} K/V heads")
    return Attachment(sliding_layer=last.get("sliding_attention", -1), full_layer=last.get("full_attention", -1))


class _DraftText(nn.Module):
    """The drafter's decoder: Gemma 4 layers whose attention reads the target's K/V (no k/v projections)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # its LM head only (tied)
        specs = [replace(s, kv_source=_SOURCE_OF_TYPE[s.layer_type]) for s in cfg.layers]
        self.layers = [DecoderLayer(cfg, spec) for spec in specs]
        for layer in self.layers:
            # transformers masks the drafter's sliding layers bidirectionally with |Δ| <= window, counted from the
            # newest key (p - 1): keys p-1-W .. p-1, W + 1 of them. The shared rule keeps k > q - window with
            # q = p, so that is window W + 2.
            layer.self_attn.window = cfg.sliding_window + 2
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)
        self._inv_freq = {
            (spec.layer_type, spec.head_dim): mx.array(spec.rope.inv_freq(spec.head_dim)) for spec in cfg.layers
        }

    rope_tables = TextModel.rope_tables  # the same tables the target computes, from this stack's inv_freq


class Assistant(nn.Module):
    """The drafter: ``step`` maps (target embedding of a token, hidden state) to (logits, next hidden state)."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        H, backbone = config.text.hidden_size, config.backbone_hidden_size
        self.model = _DraftText(config.text)
        self.pre_projection = nn.Linear(2 * backbone, H, bias=False)
        self.post_projection = nn.Linear(H, backbone, bias=False)

    def step(self, token_embedding: mx.array, hidden: mx.array, position: int,
             target_kv: dict[int, tuple[mx.array, mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
        """(logits (B, 1, V) float, next hidden (B, 1, backbone)) for one draft step at ``position``.

        token_embedding is the target's scaled embedding of the token at ``position`` (B, 1, backbone); hidden
        the state that predicted it; target_kv maps TARGET_SLIDING / TARGET_FULL to (keys, values, k_pos) as the
        target's caches hold them (k_pos < 0 marks an empty slot; only keys at positions < position are read).
        """
        x = self.pre_projection(mx.concatenate([token_embedding, hidden], axis=-1))
        B = x.shape[0]
        positions = mx.full((B, 1), position, dtype=mx.int32)
        step = Step(positions=positions, offsets=(position,) * B, blocks=None,
                    vision_mask=masks.VISION_BIDIRECTIONAL_SLIDING,
                    rope=self.model.rope_tables(positions, x.dtype))
        shared = {k: _before(kv, position) for k, kv in target_kv.items()}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, step, None, shared, i)
        x = self.model.norm(x)
        logits = self.model.embed_tokens.as_linear(x)
        return logits, self.post_projection(x)


def _before(kv: tuple[mx.array, mx.array, mx.array], position: int) -> tuple[mx.array, mx.array, mx.array]:
    """The same K/V with every slot at or after position marked empty (the drafter reads the past only)."""
    keys, values, k_pos = kv
    return keys, values, mx.where(k_pos < position, k_pos, -1)


def target_kv(caches, attachment: Attachment) -> dict[int, tuple[mx.array, mx.array, mx.array]]:
    """What the drafter reads from the target's caches: (keys, values, positions) of the attached layers."""
    return {marker: caches[layer].view() for marker, layer in attachment.sources().items()}


def draft_tokens(assistant: Assistant, target, caches, attachment: Attachment, last_token: int,
                 hidden: mx.array, position: int, k: int) -> list[int]:
    """k greedy draft tokens after last_token (at position), chained from the target's hidden state (B=1)."""
    kv = target_kv(caches, attachment)
    embed = target.language_model.embed
    token, out = mx.array([[last_token]]), []
    for _ in range(k):
        logits, hidden = assistant.step(embed(token), hidden, position, kv)
        token = mx.argmax(logits[:, -1:, :], axis=-1)
        out.append(token)
    mx.eval(out)
    return [int(t.item()) for t in out]


def load_assistant(model, *, dtype=None, revision: str | None = None) -> tuple[Assistant, Path]:
    """(Assistant, its directory) for a local or hub ``gemma4_unified_assistant`` checkpoint (HF or converted)."""
    from ..config import load_assistant_config
    from ..weights import (apply_quantization, canonical_weights, load_raw_weights, load_weights_into,
                           parse_dtype, resolve_model_path)

    model_dir = resolve_model_path(model, revision)
    config = load_assistant_config(model_dir)
    # The converter's JAX-side final norm is written by some exports and read by no forward (§7.2).
    weights = {k: v for k, v in canonical_weights(load_raw_weights(model_dir), config).items()
               if not k.startswith("model.final_norm.")}
    net = Assistant(config)
    apply_quantization(net, weights, config)
    load_weights_into(net, weights, parse_dtype(dtype))
    mx.eval(net.parameters())
    net.eval()
    return net, model_dir
