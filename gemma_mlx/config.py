"""Model configuration: the one place that reads config.json.

Accepts Gemma 4 unified checkpoints as Google published them (``global_head_dim`` /
``num_global_key_value_heads``) and as transformers >= 5.2x saves them (``per_layer_config``), and Gemma 3 text
checkpoints (``gemma3_text``, old ``rope_scaling`` style or new ``rope_parameters`` style). Every size and
token id comes from the file: a missing required field is an error naming it, never a default borrowed from
another Gemma size (mlx-lm's E2B defaults build layers the 12B does not have).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .jsonfile import read_json, regular_file

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

    KINDS = ("default", "linear", "proportional")

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


# Bounds a real checkpoint sits far inside (the 12B: vocab 262 144, hidden 3840, 48 layers, 16 heads of up to 512
# dims, window 1024, 262 144 positions). What lies outside cannot be a real model, and some of it costs memory
# before any weight is read (the sliding window sizes every ring cache), so it is refused by name.
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 16          # hidden_size, mm_embed_dim, output_proj_dims
MAX_INTERMEDIATE = 1 << 18
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_SLIDING_WINDOW = 1 << 15
MAX_POSITIONS = 1 << 22
MAX_ROPE_THETA = 1e12
MAX_ROPE_FACTOR = 1e4
MAX_SOFTCAP = 1e4
MAX_EOS_IDS = 64
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (16, 32, 64, 128)

_REQUIRED = object()


def _show(value: Any) -> str:
    """A value as an error message quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(d: dict, key: str, where: str, default: Any, file: str = "config.json") -> Any:
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{file}: required field {where}{key} is missing")
        return default
    return value


def _require(d: dict, key: str, where: str) -> Any:
    return _get(d, key, where, _REQUIRED)


def _int(d: dict, key: str, where: str, lo: int, hi: int, default: Any = _REQUIRED, file: str = "config.json") -> Any:
    """d[key] as an int in [lo, hi] (bools and strings refused), or default when absent or null."""
    value = _get(d, key, where, default, file)
    if value is default and default is not _REQUIRED:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{file}: {where}{key} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{file}: {where}{key}={_show(value)} is outside [{lo}, {hi}]")
    return value


def _positive_int(d: dict, key: str, where: str, hi: int = MAX_WIDTH) -> int:
    return _int(d, key, where, 1, hi)


def _float(d: dict, key: str, where: str, lo: float, hi: float, default: Any = _REQUIRED,
           lo_inclusive: bool = False, file: str = "config.json") -> Any:
    """d[key] as a finite float in (lo, hi] ([lo, hi] if lo_inclusive), or default when absent or null."""
    value = _get(d, key, where, default, file)
    if value is default and default is not _REQUIRED:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{file}: {where}{key} must be a number, got {_show(value)}")
    value = float(value)
    low_ok = value >= lo if lo_inclusive else value > lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        interval = f"{'[' if lo_inclusive else '('}{lo:g}, {hi:g}]"
        raise ConfigError(f"{file}: {where}{key}={_show(value)} is outside {interval}")
    return value


def _bool(d: dict, key: str, where: str, default: bool, file: str = "config.json") -> bool:
    value = _get(d, key, where, default, file)
    if not isinstance(value, bool):
        raise ConfigError(f"{file}: {where}{key} must be true or false, got {_show(value)}")
    return value


def _choice(d: dict, key: str, where: str, choices: tuple, default: Any, what: str = "") -> Any:
    value = _get(d, key, where, default)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"config.json: {where}{key} {_show(value)} is not supported{what} "
                          f"(supported: {', '.join(map(str, choices))})")
    return value


def _object(d: dict, key: str, where: str, default: Any = None) -> Any:
    """d[key] if it is a JSON object, default when absent or null."""
    value = _get(d, key, where, default)
    if value is not default and not isinstance(value, dict):
        raise ConfigError(f"config.json: {where}{key} must be a JSON object, got {_show(value)}")
    return value


def _token_id(value: Any, field_name: str, vocab_size: int, file: str = "config.json") -> int:
    """value as a token id of the vocabulary, or a ConfigError naming file, field and value."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{file}: {field_name} must be an integer token id, got {_show(value)}")
    if not 0 <= value < vocab_size:
        raise ConfigError(f"{file}: {field_name}={value} is outside the vocabulary (size {vocab_size})")
    return value


def token_ids(value: Any, field_name: str, vocab_size: int, file: str = "config.json") -> tuple[int, ...]:
    """A token id or list of ids (as EOS and suppress_tokens are written) checked against the vocabulary."""
    if value is None:
        return ()
    if isinstance(value, list):
        if len(value) > vocab_size:
            raise ConfigError(f"{file}: {field_name} lists {len(value)} ids for a vocabulary of {vocab_size}")
        return tuple(_token_id(v, f"{field_name}[{i}]", vocab_size, file) for i, v in enumerate(value))
    return (_token_id(value, field_name, vocab_size, file),)


def _rope_spec(p: Any, where: str, default_theta: float | None = None) -> RopeSpec:
    if not isinstance(p, dict):
        raise ConfigError(f"config.json: {where[:-1]} must be a JSON object, got {_show(p)}")
    theta = _float(p, "rope_theta", where, 0.0, MAX_ROPE_THETA,
                   _REQUIRED if default_theta is None else default_theta)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in RopeSpec.KINDS:
        raise ConfigError(f"config.json: {where}rope_type {_show(kind)} is not supported "
                          f"(supported: {', '.join(RopeSpec.KINDS)})")
    return RopeSpec(kind=kind, theta=theta,
                    partial_rotary_factor=_float(p, "partial_rotary_factor", where, 0.0, 1.0, 1.0),
                    factor=_float(p, "factor", where, 0.0, MAX_ROPE_FACTOR, 1.0))


def _rope_specs(text: dict, model_type: str, where: str) -> dict[str, RopeSpec]:
    params = _object(text, "rope_parameters", where)
    if isinstance(params, dict) and all(t in params for t in LAYER_TYPES):
        return {t: _rope_spec(params[t], f"{where}rope_parameters.{t}.") for t in LAYER_TYPES}
    if model_type == GEMMA3_TEXT:
        # Published Gemma 3 configs: rope_theta (global), rope_local_base_freq (sliding), rope_scaling (global).
        scaling = dict(_object(text, "rope_scaling", where, {}))
        scaling["rope_theta"] = _float(text, "rope_theta", where, 0.0, MAX_ROPE_THETA, 1_000_000.0)
        local = _float(text, "rope_local_base_freq", where, 0.0, MAX_ROPE_THETA, 10_000.0)
        full = _rope_spec(scaling, f"{where}rope_scaling.")
        return {"full_attention": RopeSpec(full.kind, full.theta, factor=full.factor),
                "sliding_attention": RopeSpec("default", local)}
    raise ConfigError(f"config.json: {where}rope_parameters must give 'sliding_attention' and 'full_attention'")


def _layer_types(text: dict, where: str) -> list[str]:
    n = _positive_int(text, "num_hidden_layers", where, MAX_LAYERS)
    types = text.get("layer_types")
    if types is None:
        pattern = text.get("sliding_window_pattern")
        key = "sliding_window_pattern" if pattern is not None else "_sliding_window_pattern"
        if text.get(key) is None:
            raise ConfigError(f"config.json: {where}layer_types is missing (and no sliding_window_pattern)")
        pattern = _int(text, key, where, 1, MAX_LAYERS)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list):
        raise ConfigError(f"config.json: {where}layer_types must be a list, got {_show(types)}")
    if len(types) != n:
        raise ConfigError(f"config.json: {where}layer_types has {len(types)} entries but num_hidden_layers is {n}")
    for t in types:
        if not isinstance(t, str) or t not in LAYER_TYPES:
            raise ConfigError(f"config.json: {where}layer_types contains unknown type {_show(t)}")
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


def _layer_overrides(text: dict, types: list[str], k_eq_v: bool, where: str) -> dict[int, dict]:
    """Per-layer head_dim / num_key_value_heads, from per_layer_config or the published global_* keys."""
    overrides: dict[int, dict] = {}
    per_layer = _object(text, "per_layer_config", where)
    if per_layer is not None:
        for key, value in per_layer.items():
            try:
                i = int(key)
            except ValueError:
                raise ConfigError(f"config.json: {where}per_layer_config key {_show(key)} is not a layer "
                                  "number") from None
            if not 0 <= i < len(types):
                raise ConfigError(f"config.json: {where}per_layer_config names layer {i}, outside "
                                  f"0..{len(types) - 1}")
            here = f"{where}per_layer_config.{key}."
            if not isinstance(value, dict):
                raise ConfigError(f"config.json: {here[:-1]} must be a JSON object, got {_show(value)}")
            overrides[i] = {k: _int(value, k, here, 1, hi, None) for k, hi in
                            (("head_dim", MAX_HEAD_DIM), ("num_key_value_heads", MAX_HEADS))}
        return overrides
    # Published form: global_* keys describe every full-attention layer.
    g_dim = _int(text, "global_head_dim", where, 1, MAX_HEAD_DIM, None)
    g_kv = _int(text, "num_global_key_value_heads", where, 1, MAX_HEADS, None)
    for i, t in enumerate(types):
        if t == "full_attention":
            overrides[i] = {"head_dim": g_dim, "num_key_value_heads": g_kv if k_eq_v else None}
    return overrides


def parse_text_config(text: dict, model_type: str, where: str = "text_config.") -> TextConfig:
    """TextConfig from the text part of config.json (the text_config dict, or the whole file for gemma3_text)."""
    hidden = _positive_int(text, "hidden_size", where)
    heads = _positive_int(text, "num_attention_heads", where, MAX_HEADS)
    intermediate = _positive_int(text, "intermediate_size", where, MAX_INTERMEDIATE)
    vocab = _positive_int(text, "vocab_size", where, MAX_VOCAB)
    head_dim = _positive_int(text, "head_dim", where, MAX_HEAD_DIM)
    kv_heads = _positive_int(text, "num_key_value_heads", where, MAX_HEADS)
    window = _positive_int(text, "sliding_window", where, MAX_SLIDING_WINDOW)
    positions = _int(text, "max_position_embeddings", where, 1, MAX_POSITIONS, 131072)
    activation = text.get("hidden_activation", text.get("hidden_act", "gelu_pytorch_tanh"))
    if not isinstance(activation, str) or activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"config.json: {where}hidden_activation {_show(activation)} is not supported")
    types = _layer_types(text, where)
    ropes = _rope_specs(text, model_type, where)
    gemma4 = model_type == GEMMA4_UNIFIED
    k_eq_v = _bool(text, "attention_k_eq_v", where, False) and gemma4
    if _bool(text, "attention_bias", where, False):
        raise ConfigError(f"config.json: {where}attention_bias=true is not supported by Gemma")
    if gemma4 and _int(text, "hidden_size_per_layer_input", where, 0, MAX_WIDTH, 0):
        raise ConfigError(f"config.json: {where}hidden_size_per_layer_input (per-layer embeddings) is not supported")
    if gemma4 and _bool(text, "enable_moe_block", where, False):
        raise ConfigError(f"config.json: {where}enable_moe_block is not supported")

    overrides = _layer_overrides(text, types, k_eq_v, where) if gemma4 else {}
    num_shared = _int(text, "num_kv_shared_layers", where, 0, MAX_LAYERS, 0)
    sources = _kv_sources(types, num_shared, where)
    double_wide = _bool(text, "use_double_wide_mlp", where, False)
    layers = []
    for i, t in enumerate(types):
        o = overrides.get(i, {})
        d = o.get("head_dim") or head_dim
        kv = o.get("num_key_value_heads") or kv_heads
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

    # 0 or null means no softcapping, as in transformers.
    softcap = _float(text, "final_logit_softcapping", where, 0.0, MAX_SOFTCAP, None, lo_inclusive=True) or None
    if not gemma4 and _float(text, "attn_logit_softcapping", where, 0.0, MAX_SOFTCAP, None, lo_inclusive=True):
        raise ConfigError(f"config.json: {where}attn_logit_softcapping is not supported")
    if gemma4:
        family = dict(norm_offset=0.0, attention_scale=1.0, use_v_norm=True, use_layer_scalar=True)
    else:
        scalar = _float(text, "query_pre_attn_scalar", where, 0.0, 1e6)
        family = dict(norm_offset=1.0, attention_scale=scalar**-0.5, use_v_norm=False, use_layer_scalar=False)
    pad = _get(text, "pad_token_id", where, 0)
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, sliding_window=window,
        rms_norm_eps=_float(text, "rms_norm_eps", where, 0.0, 1.0, 1e-6), layers=tuple(layers),
        final_logit_softcapping=softcap,
        tie_word_embeddings=_bool(text, "tie_word_embeddings", where, True),
        max_position_embeddings=positions,
        pad_token_id=_token_id(pad, f"{where}pad_token_id", vocab),
        **family,
    )


def _quantization(cfg: dict) -> dict | None:
    """The quantization block (MLX's ``quantization``, else ``quantization_config``), its values checked."""
    key = "quantization" if cfg.get("quantization") is not None else "quantization_config"
    quant = _object(cfg, key, "")
    if not quant:
        return quant or None
    specs = [(key, quant)] + [(f"{key}.{path}", v) for path, v in quant.items() if isinstance(v, dict)]
    for where, spec in specs:
        for name, allowed in (("group_size", QUANT_GROUP_SIZES), ("bits", QUANT_BITS)):
            value = _int(spec, name, f"{where}.", 1, 1 << 16, None)
            if value is not None and value not in allowed:
                raise ConfigError(f"config.json: {where}.{name}={value} is not one of {', '.join(map(str, allowed))}")
        if spec.get("mode") is not None:
            _choice(spec, "mode", f"{where}.", QUANT_MODES, None)
    return quant


def _eos_ids(cfg: dict, text: dict, where: str, vocab: int) -> tuple[int, ...]:
    """EOS ids of the file (top level first, as transformers reads them), every spelling present checked."""
    inner = token_ids(text.get("eos_token_id", 1), f"{where}eos_token_id", vocab)
    eos = token_ids(cfg["eos_token_id"], "eos_token_id", vocab) if "eos_token_id" in cfg else inner
    if len(eos) > MAX_EOS_IDS:
        raise ConfigError(f"config.json: eos_token_id lists {len(eos)} ids (at most {MAX_EOS_IDS})")
    return eos


def _bos_id(cfg: dict, text: dict, where: str, vocab: int) -> int | None:
    """The BOS id (text_config's first, as transformers reads it); every spelling present is checked."""
    found = [_token_id(d[k], name, vocab) for d, k, name in ((text, "bos_token_id", f"{where}bos_token_id"),
                                                            (cfg, "bos_token_id", "bos_token_id"))
             if d is not None and d.get(k) is not None]
    return found[0] if found else None


def parse_config(cfg: dict) -> ModelConfig:
    """ModelConfig from a config.json dict; raises ConfigError naming the first bad or missing field."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        hint = " (text-only Gemma 3 checkpoints: model_type gemma3_text)" if model_type == "gemma3" else ""
        raise ConfigError(f"config.json: unsupported model_type {_show(model_type)}; gemma-mlx runs "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}{hint}")
    quant = _quantization(cfg)
    if model_type == GEMMA3_TEXT:
        text = parse_text_config(cfg, model_type, where="")
        vocab = text.vocab_size
        return ModelConfig(model_type=model_type, text=text, eos_token_ids=_eos_ids(cfg, {}, "", vocab),
                           bos_token_id=_bos_id(cfg, None, "", vocab), quantization=quant, raw=cfg)

    text_dict = _require(cfg, "text_config", "")
    if not isinstance(text_dict, dict):
        raise ConfigError(f"config.json: text_config must be a JSON object, got {_show(text_dict)}")
    text = parse_text_config(text_dict, model_type)
    vocab = text.vocab_size
    vision = None
    v = _object(cfg, "vision_config", "")
    if v is not None:
        w = "vision_config."
        vision = VisionConfig(
            patch_size=_positive_int(v, "patch_size", w, 64),
            pooling_kernel_size=_positive_int(v, "pooling_kernel_size", w, 16),
            mm_embed_dim=_positive_int(v, "mm_embed_dim", w),
            mm_posemb_size=_positive_int(v, "mm_posemb_size", w, 1 << 16),
            output_proj_dims=_int(v, "output_proj_dims", w, 1, MAX_WIDTH, text.hidden_size),
            rms_norm_eps=_float(v, "rms_norm_eps", w, 0.0, 1.0, 1e-6),
            num_soft_tokens=_int(v, "num_soft_tokens", w, 1, 1 << 16, 280),
        )
    audio = None
    a = _object(cfg, "audio_config", "")
    if a is not None:
        audio = AudioConfig(
            audio_embed_dim=_positive_int(a, "audio_embed_dim", "audio_config.", 1 << 14),
            rms_norm_eps=_float(a, "rms_norm_eps", "audio_config.", 0.0, 1.0, 1e-6),
        )
    ids = {}
    for name, key in TOKEN_ID_KEYS.items():
        needed = (name in ("image", "video", "boi", "eoi") and vision is not None) or (
            name in ("audio", "boa", "eoa") and audio is not None)
        value = cfg.get(key)
        if value is None:
            if needed:
                raise ConfigError(f"config.json: required field {key} is missing")
            continue
        ids[name] = _token_id(value, key, vocab)
    if cfg.get("pad_token_id") is not None:
        _token_id(cfg["pad_token_id"], "pad_token_id", vocab)
    bidir = text_dict.get("use_bidirectional_attention")
    if bidir not in (None, False, "vision", "all", True):
        raise ConfigError(f"config.json: text_config.use_bidirectional_attention {_show(bidir)} is not supported "
                          "(null or 'vision')")
    if bidir in ("all", True):
        raise ConfigError("config.json: use_bidirectional_attention='all' (encoder-style Gemma) is not supported")
    return ModelConfig(
        model_type=model_type, text=text, vision=vision, audio=audio, token_ids=ids,
        bidirectional_vision=bidir == "vision", eos_token_ids=_eos_ids(cfg, text_dict, "text_config.", vocab),
        bos_token_id=_bos_id(cfg, text_dict, "text_config.", vocab), quantization=quant, raw=cfg,
    )


GENERATION_CONFIG = "generation_config.json"
MAX_STOP_STRINGS = 64


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults of generation_config.json, every value type-, range- and vocabulary-checked."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    eos_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()


def parse_generation_config(g: dict, vocab_size: int = MAX_VOCAB, file: str = GENERATION_CONFIG) -> GenerationDefaults:
    """GenerationDefaults of a generation_config.json dict; a ConfigError names the first bad field and value."""
    if not isinstance(g, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        token_ids(g.get(key), key, vocab_size, file)
    eos = token_ids(g.get("eos_token_id"), "eos_token_id", vocab_size, file)
    if len(eos) > MAX_EOS_IDS:
        raise ConfigError(f"{file}: eos_token_id lists {len(eos)} ids (at most {MAX_EOS_IDS})")
    suppress = token_ids(g.get("suppress_tokens"), "suppress_tokens", vocab_size, file)
    stop = g.get("stop_strings") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{file}: stop_strings must be a non-empty string or a list of at most "
                          f"{MAX_STOP_STRINGS} of them, got {_show(g.get('stop_strings'))}")
    kw = dict(file=file)
    penalty = _float(g, "repetition_penalty", "", 0.0, 100.0, None, **kw)
    return GenerationDefaults(
        do_sample=_bool(g, "do_sample", "", False, **kw),
        temperature=_float(g, "temperature", "", 0.0, 100.0, 1.0, lo_inclusive=True, **kw),
        # 0 / null turn top_k, top_p and min_p off, as in transformers.
        top_k=0 if "top_k" in g and g["top_k"] is None else _int(g, "top_k", "", 0, vocab_size, 50, **kw),
        top_p=_float(g, "top_p", "", 0.0, 1.0, 1.0, lo_inclusive=True, **kw) or 1.0,
        min_p=_float(g, "min_p", "", 0.0, 1.0, 0.0, lo_inclusive=True, **kw),
        repetition_penalty=None if penalty in (None, 1.0) else penalty,
        eos_ids=eos, suppress_ids=suppress, stop=tuple(stop),
    )


def _read_config_json(model_dir: str | Path):
    """The parsed ``model_dir/config.json`` (through the one safe JSON reader)."""
    path = Path(model_dir) / "config.json"
    if regular_file(path, what="config.json") is None:
        raise ConfigError(f"no config.json in {model_dir}: not a Hugging Face or MLX model directory")
    return read_json(path)


def load_config(model_dir: str | Path) -> ModelConfig:
    """ModelConfig read from ``model_dir/config.json``."""
    return parse_config(_read_config_json(model_dir))


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
    return parse_assistant_config(_read_config_json(model_dir))
