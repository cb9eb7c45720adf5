"""Model configuration: the one place that reads config.json.

Accepts Gemma 4 unified checkpoints as Google published them (``global_head_dim`` /
``num_global_key_value_heads``) and as transformers >= 5.2x saves them (``per_layer_config``), and Gemma 3 text
checkpoints (``gemma3_text``, old ``rope_scaling`` style or new ``rope_parameters`` style). Every size and
token id comes from the file: a missing required field is an error naming it, never a default borrowed from
another Gemma size (mlx-lm's E2B defaults build layers the 12B does not have).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

GEMMA4_UNIFIED = "gemma4_unified"
GEMMA3_TEXT = "gemma3_text"
SUPPORTED_MODEL_TYPES = (GEMMA4_UNIFIED, GEMMA3_TEXT)
LAYER_TYPES = ("sliding_attention", "full_attention")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type: default, linear-scaled, or Gemma 4's proportional partial RoPE."""

    kind: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (head_dim // 2,) float32, zero for the dims that pass through unrotated."""
        if self.kind in ("default", "linear"):
            exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
            inv = 1.0 / (self.theta**exponents)
            return (inv / self.factor).astype(np.float32)
        if self.kind == "proportional":
            # Frequencies use the FULL head dim as denominator; only the first `angles` pairs rotate.
            angles = int(self.partial_rotary_factor * head_dim // 2)
            exponents = np.arange(0, 2 * angles, 2, dtype=np.float32) / head_dim
            rotated = 1.0 / (self.theta**exponents) / self.factor
            return np.concatenate([rotated, np.zeros(head_dim // 2 - angles)]).astype(np.float32)
        raise ConfigError(f"unsupported rope_type {self.kind!r} (supported: default, linear, proportional)")


@dataclass(frozen=True)
class LayerSpec:
    """What differs between decoder layers: attention type, head geometry, RoPE and KV sharing."""

    layer_type: str
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool
    rope: RopeSpec
    kv_source: int | None = None  # a KV-sharing layer reads the K/V of this earlier layer
    intermediate_size: int = 0

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == "sliding_attention"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    sliding_window: int
    rms_norm_eps: float
    layers: tuple[LayerSpec, ...]
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    pad_token_id: int
    # Family switches: Gemma 4 scales norms by w, attends with scale 1, has v-norm and layer scalars;
    # Gemma 3 scales norms by (1 + w), attends with query_pre_attn_scalar^-1/2, and has neither.
    norm_offset: float = 0.0
    attention_scale: float = 1.0
    use_v_norm: bool = True
    use_layer_scalar: bool = True

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    pooling_kernel_size: int
    mm_embed_dim: int
    mm_posemb_size: int
    output_proj_dims: int
    rms_norm_eps: float
    num_soft_tokens: int = 280

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int
    rms_norm_eps: float

    @property
    def samples_per_token(self) -> int:
        return self.audio_embed_dim


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    token_ids: dict[str, int] = field(default_factory=dict)
    bidirectional_vision: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def image_token_id(self) -> int | None:
        return self.token_ids.get("image")

    @property
    def audio_token_id(self) -> int | None:
        return self.token_ids.get("audio")

    @property
    def video_token_id(self) -> int | None:
        return self.token_ids.get("video")


# Multimodal token ids: our name -> config.json key.
TOKEN_ID_KEYS = {
    "image": "image_token_id",
    "audio": "audio_token_id",
    "video": "video_token_id",
    "boi": "boi_token_id",
    "eoi": "eoi_token_id",
    "boa": "boa_token_id",
    "eoa": "eoa_token_index",
}


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: required field {where}{key} is missing")
    return d[key]


def _positive_int(d: dict, key: str, where: str) -> int:
    value = _require(d, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: {where}{key} must be a positive integer, got {value!r}")
    return value


def _rope_specs(text: dict, model_type: str, where: str) -> dict[str, RopeSpec]:
    params = text.get("rope_parameters")
    if isinstance(params, dict) and all(t in params for t in LAYER_TYPES):
        specs = {}
        for layer_type in LAYER_TYPES:
            p = params[layer_type]
            specs[layer_type] = RopeSpec(
                kind=p.get("rope_type", "default"),
                theta=float(_require(p, "rope_theta", f"{where}rope_parameters.{layer_type}.")),
                partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
                factor=float(p.get("factor", 1.0)),
            )
        return specs
    if model_type == GEMMA3_TEXT:
        # Published Gemma 3 configs: rope_theta (global), rope_local_base_freq (sliding), rope_scaling (global).
        scaling = text.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return {
            "full_attention": RopeSpec(kind, float(text.get("rope_theta", 1_000_000.0)),
                                       factor=float(scaling.get("factor", 1.0))),
            "sliding_attention": RopeSpec("default", float(text.get("rope_local_base_freq", 10_000.0))),
        }
    raise ConfigError(f"config.json: {where}rope_parameters must give 'sliding_attention' and 'full_attention'")


def _layer_types(text: dict, where: str) -> list[str]:
    n = _positive_int(text, "num_hidden_layers", where)
    types = text.get("layer_types")
    if types is None:
        pattern = text.get("sliding_window_pattern") or text.get("_sliding_window_pattern")
        if pattern is None:
            raise ConfigError(f"config.json: {where}layer_types is missing (and no sliding_window_pattern)")
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"config.json: {where}layer_types has {len(types)} entries but num_hidden_layers is {n}")
    for t in types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"config.json: {where}layer_types contains unknown type {t!r}")
    return list(types)


def _kv_sources(layer_types: list[str], num_shared: int, where: str) -> list[int | None]:
    """For each layer, the earlier layer whose K/V it reuses (transformers' kv_sharing_modes), or None."""
    n = len(layer_types)
    if num_shared == 0:
        return [None] * n
    if not 0 < num_shared < n:
        raise ConfigError(f"config.json: {where}num_kv_shared_layers={num_shared} must be in [0, {n})")
    first_shared = n - num_shared
    producers = {}
    for i in range(first_shared):
        producers[layer_types[i]] = i  # the last non-shared layer of each type stores for the consumers
    sources: list[int | None] = [None] * first_shared
    for i in range(first_shared, n):
        if layer_types[i] not in producers:
            raise ConfigError(
                f"config.json: layer {i} ({layer_types[i]}) shares KV but no earlier layer of that type computes it"
            )
        sources.append(producers[layer_types[i]])
    return sources


def parse_text_config(text: dict, model_type: str, where: str = "text_config.") -> TextConfig:
    """TextConfig from the text part of config.json (the text_config dict, or the whole file for gemma3_text)."""
    hidden = _positive_int(text, "hidden_size", where)
    heads = _positive_int(text, "num_attention_heads", where)
    intermediate = _positive_int(text, "intermediate_size", where)
    vocab = _positive_int(text, "vocab_size", where)
    head_dim = _positive_int(text, "head_dim", where)
    kv_heads = _positive_int(text, "num_key_value_heads", where)
    window = _positive_int(text, "sliding_window", where)
    activation = text.get("hidden_activation", text.get("hidden_act", "gelu_pytorch_tanh"))
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"config.json: {where}hidden_activation {activation!r} is not supported")
    types = _layer_types(text, where)
    ropes = _rope_specs(text, model_type, where)
    gemma4 = model_type == GEMMA4_UNIFIED
    k_eq_v = bool(text.get("attention_k_eq_v", False)) if gemma4 else False
    if text.get("attention_bias"):
        raise ConfigError(f"config.json: {where}attention_bias=true is not supported by Gemma")
    if gemma4 and text.get("hidden_size_per_layer_input"):
        raise ConfigError(f"config.json: {where}hidden_size_per_layer_input (per-layer embeddings) is not supported")
    if gemma4 and text.get("enable_moe_block"):
        raise ConfigError(f"config.json: {where}enable_moe_block is not supported")

    overrides: dict[int, dict] = {}
    if gemma4:
        per_layer = text.get("per_layer_config")
        if per_layer is not None:
            overrides = {int(k): v for k, v in per_layer.items()}
        else:
            # Published form: global_* keys describe every full-attention layer.
            g_dim = text.get("global_head_dim")
            g_kv = text.get("num_global_key_value_heads")
            for i, t in enumerate(types):
                if t == "full_attention":
                    o = {}
                    if g_dim is not None:
                        o["head_dim"] = g_dim
                    if g_kv is not None and k_eq_v:
                        o["num_key_value_heads"] = g_kv
                    overrides[i] = o
        for i in overrides:
            if not 0 <= i < len(types):
                raise ConfigError(f"config.json: {where}per_layer_config names layer {i}, outside 0..{len(types) - 1}")

    num_shared = int(text.get("num_kv_shared_layers", 0) or 0)
    sources = _kv_sources(types, num_shared, where)
    double_wide = bool(text.get("use_double_wide_mlp", False))
    layers = []
    for i, t in enumerate(types):
        o = overrides.get(i, {})
        d = int(o.get("head_dim", head_dim))
        kv = int(o.get("num_key_value_heads", kv_heads))
        if heads % kv:
            raise ConfigError(f"config.json: layer {i}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv}")
        if d % 2:
            raise ConfigError(f"config.json: layer {i}: head_dim {d} must be even for RoPE")
        shared = sources[i] is not None
        layers.append(LayerSpec(
            layer_type=t, head_dim=d, num_kv_heads=kv, k_eq_v=k_eq_v and t == "full_attention",
            rope=ropes[t], kv_source=sources[i],
            intermediate_size=intermediate * (2 if double_wide and shared else 1),
        ))
    for i, layer in enumerate(layers):
        if layer.kv_source is not None:
            src = layers[layer.kv_source]
            if (src.head_dim, src.num_kv_heads) != (layer.head_dim, layer.num_kv_heads):
                raise ConfigError(f"config.json: layer {i} shares KV with layer {layer.kv_source} of another shape")

    softcap = text.get("final_logit_softcapping")
    if not gemma4 and text.get("attn_logit_softcapping"):
        raise ConfigError(f"config.json: {where}attn_logit_softcapping is not supported")
    if gemma4:
        family = dict(norm_offset=0.0, attention_scale=1.0, use_v_norm=True, use_layer_scalar=True)
    else:
        scalar = float(_require(text, "query_pre_attn_scalar", where))
        family = dict(norm_offset=1.0, attention_scale=scalar**-0.5, use_v_norm=False, use_layer_scalar=False)
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, sliding_window=window,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), layers=tuple(layers),
        final_logit_softcapping=float(softcap) if softcap else None,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        pad_token_id=int(text.get("pad_token_id", 0) if text.get("pad_token_id") is not None else 0),
        **family,
    )


def parse_config(cfg: dict) -> ModelConfig:
    """ModelConfig from a config.json dict; raises ConfigError naming the first bad or missing field."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = " (text-only Gemma 3 checkpoints: model_type gemma3_text)" if model_type == "gemma3" else ""
        raise ConfigError(f"config.json: unsupported model_type {model_type!r}; gemma-mlx runs "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}{hint}")
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if model_type == GEMMA3_TEXT:
        text = parse_text_config(cfg, model_type, where="")
        eos = cfg.get("eos_token_id", 1)
        return ModelConfig(model_type=model_type, text=text, eos_token_ids=_as_tuple(eos),
                           bos_token_id=cfg.get("bos_token_id"), quantization=quant, raw=cfg)

    text_dict = _require(cfg, "text_config", "")
    text = parse_text_config(text_dict, model_type)
    vision = None
    if cfg.get("vision_config") is not None:
        v = cfg["vision_config"]
        vision = VisionConfig(
            patch_size=_positive_int(v, "patch_size", "vision_config."),
            pooling_kernel_size=_positive_int(v, "pooling_kernel_size", "vision_config."),
            mm_embed_dim=_positive_int(v, "mm_embed_dim", "vision_config."),
            mm_posemb_size=_positive_int(v, "mm_posemb_size", "vision_config."),
            output_proj_dims=int(v.get("output_proj_dims", text.hidden_size)),
            rms_norm_eps=float(v.get("rms_norm_eps", 1e-6)),
            num_soft_tokens=int(v.get("num_soft_tokens", 280)),
        )
    audio = None
    if cfg.get("audio_config") is not None:
        a = cfg["audio_config"]
        audio = AudioConfig(
            audio_embed_dim=_positive_int(a, "audio_embed_dim", "audio_config."),
            rms_norm_eps=float(a.get("rms_norm_eps", 1e-6)),
        )
    token_ids = {}
    for name, key in TOKEN_ID_KEYS.items():
        needed = (name in ("image", "video", "boi", "eoi") and vision is not None) or (
            name in ("audio", "boa", "eoa") and audio is not None)
        value = cfg.get(key)
        if value is None:
            if needed:
                raise ConfigError(f"config.json: required field {key} is missing")
            continue
        if not 0 <= int(value) < text.vocab_size:
            raise ConfigError(f"config.json: {key}={value} is outside the vocabulary (size {text.vocab_size})")
        token_ids[name] = int(value)
    bidir = text_dict.get("use_bidirectional_attention")
    if bidir == "all":
        raise ConfigError("config.json: use_bidirectional_attention='all' (encoder-style Gemma) is not supported")
    eos = cfg.get("eos_token_id", text_dict.get("eos_token_id", 1))
    return ModelConfig(
        model_type=model_type, text=text, vision=vision, audio=audio, token_ids=token_ids,
        bidirectional_vision=bidir == "vision", eos_token_ids=_as_tuple(eos),
        bos_token_id=text_dict.get("bos_token_id", cfg.get("bos_token_id")), quantization=quant, raw=cfg,
    )


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def load_config(model_dir: str | Path) -> ModelConfig:
    """ModelConfig read from ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}: not a Hugging Face or MLX model directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return parse_config(cfg)


def embed_scale(hidden_size: int) -> float:
    """The √hidden factor applied to token embeddings (not to vision/audio embeddings)."""
    return math.sqrt(hidden_size)


# -- the assistant drafter (gemma4_unified_assistant) ------------------------------------------------

GEMMA4_ASSISTANT = "gemma4_unified_assistant"


@dataclass(frozen=True)
class AssistantConfig:
    """Gemma 4's MTP drafter: a small decoder with no K/V of its own, reading the target's last hidden state."""

    text: TextConfig
    backbone_hidden_size: int  # the target's hidden size: its embeddings and hidden states come in at this width
    quantization: dict[str, Any] | None = None
    model_type: str = GEMMA4_ASSISTANT
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def parse_assistant_config(cfg: dict) -> AssistantConfig:
    """AssistantConfig from an assistant's config.json dict; ConfigError names the first bad or missing field."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    if cfg.get("model_type") != GEMMA4_ASSISTANT:
        raise ConfigError(f"config.json: model_type {cfg.get('model_type')!r} is not a Gemma 4 assistant "
                          f"({GEMMA4_ASSISTANT}); pass the drafter checkpoint, e.g. google/gemma-4-12B-it-assistant")
    if cfg.get("use_ordered_embeddings"):
        raise ConfigError("config.json: use_ordered_embeddings=true (the centroid-masked head) is not supported")
    if cfg.get("tie_word_embeddings") is False:
        raise ConfigError("config.json: tie_word_embeddings=false is not supported for the assistant "
                          "(its logits come from its own tied embedding table)")
    text_dict = dict(_require(cfg, "text_config", ""))
    n = _positive_int(text_dict, "num_hidden_layers", "text_config.")
    shared = text_dict.get("num_kv_shared_layers") or n
    if shared != n:
        raise ConfigError(f"config.json: text_config.num_kv_shared_layers={shared}: every assistant layer reads "
                          f"the target's K/V, so it must equal num_hidden_layers ({n})")
    # Parsed as a plain Gemma 4 stack; the K/V sources are the target's layers, fixed when the pair is attached.
    text_dict["num_kv_shared_layers"] = 0
    text = parse_text_config(text_dict, GEMMA4_UNIFIED)
    backbone = _positive_int(cfg, "backbone_hidden_size", "")
    return AssistantConfig(text=text, backbone_hidden_size=backbone,
                           quantization=cfg.get("quantization") or cfg.get("quantization_config"), raw=cfg)


def load_assistant_config(model_dir: str | Path) -> AssistantConfig:
    """AssistantConfig read from ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}: not a Hugging Face or MLX model directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return parse_assistant_config(cfg)
