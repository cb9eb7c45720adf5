"""Low-rank adapters on the model's projections, saved and loaded in PEFT's format.

An adapter directory holds ``adapter_config.json`` (PEFT's LoraConfig fields) and ``adapter_model.safetensors``
with PEFT's names (``base_model.model.<module>.lora_A.weight`` of shape (r, in), ``lora_B.weight`` (out, r)).
Our module names are the Hugging Face checkpoint's, so an adapter trained with transformers + peft runs here and
ours load in peft. The update is y = W x + (alpha / r) · B A x, as PEFT computes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import InputError, WeightsError

TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEDIA_MODULES = ("embed_vision.embedding_projection", "embed_audio.embedding_projection", "patch_dense")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoRASettings:
    """Which projections get adapters, and their shape. layers: indices of text layers (None: all)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    modules: tuple[str, ...] = TEXT_MODULES
    layers: tuple[int, ...] | None = None
    train_media: bool = False  # adapters on the vision and audio projections too

    def check(self, num_layers: int) -> LoRASettings:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= 4096:
            raise InputError(f"rank must be an integer from 1 to 4096, not {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InputError(f"alpha must be a positive number, not {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), not {self.dropout!r}")
        unknown = set(self.modules) - set(TEXT_MODULES)
        if unknown or not self.modules:
            raise InputError(f"unknown LoRA module(s) {sorted(unknown)}; choose from {', '.join(TEXT_MODULES)}")
        if self.layers is not None and any(not 0 <= i < num_layers for i in self.layers):
            raise InputError(f"LoRA layers must be in 0..{num_layers - 1}")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, base_model: str = "") -> dict:
        """adapter_config.json in PEFT's LoraConfig form."""
        targets = list(self.modules) + (list(MEDIA_MODULES) if self.train_media else [])
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
                "layers_to_transform": list(self.layers) if self.layers is not None else None,
                "layers_pattern": "layers" if self.layers is not None else None, "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "inference_mode": True,
                "base_model_name_or_path": base_model, "gemma_mlx": {"settings": asdict(self)}}


class LoRALinear(nn.Module):
    """A frozen (possibly quantized) Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, key=None):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout) if dropout else None
        bound = 1 / math.sqrt(in_dims)  # PEFT's (kaiming-uniform) start for A; B starts at zero
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims), key=key)
        self.lora_b = mx.zeros((out_dims, rank))

    @property
    def in_dims(self) -> int:
        return self.lora_a.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = self.dropout(x) if self.dropout is not None else x
        update = (z.astype(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * update).astype(y.dtype)

    def delta(self) -> mx.array:
        """The update as a weight (out, in): scale · B A."""
        return self.scale * (self.lora_b @ self.lora_a)

    def fused(self) -> nn.Linear:
        """A float nn.Linear with the update merged in (the caller re-quantizes if it wants)."""
        base = self.base
        weight = base.weight
        if isinstance(base, nn.QuantizedLinear):
            weight = mx.dequantize(weight, base.scales, base.get("biases"), base.group_size, base.bits,
                                   mode=base.mode)
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        out.weight = (weight.astype(mx.float32) + self.delta()).astype(weight.dtype)
        if "bias" in base:
            out.bias = base.bias
        return out


@dataclass
class Adapter:
    """The adapters put on a model: module name -> LoRALinear."""

    settings: LoRASettings
    modules: dict[str, LoRALinear] = field(default_factory=dict)

    def weights(self) -> dict[str, mx.array]:
        """PEFT-named adapter weights."""
        out = {}
        for name, m in self.modules.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_a
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_b
        return out

    def save(self, out_dir: str | Path, base_model: str = "") -> Path:
        """Write adapter_config.json and adapter_model.safetensors into out_dir (atomically per file)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (WEIGHTS_FILE + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), self.weights(), metadata={"format": "pt"})
        tmp.replace(out / WEIGHTS_FILE)
        cfg = out / (CONFIG_FILE + ".tmp")
        cfg.write_text(json.dumps(self.settings.peft_config(base_model), indent=2))
        cfg.replace(out / CONFIG_FILE)
        return out

    def load_weights(self, weights: dict[str, mx.array], source: str) -> None:
        """Set the adapters' A and B from PEFT-named weights; every adapter must be present, with its shape."""
        for name, m in self.modules.items():
            for key, attr in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                full = f"{PEFT_PREFIX}{name}.{key}.weight"
                if full not in weights:
                    raise WeightsError(f"{source}: no {full}")
                w = weights[full]
                if w.shape != getattr(m, attr).shape:
                    raise WeightsError(f"{source}: {full} has shape {tuple(w.shape)}, the model needs "
                                       f"{tuple(getattr(m, attr).shape)}")
                setattr(m, attr, w.astype(mx.float32))
        extra = set(weights) - set(self.weights())
        if extra:
            raise WeightsError(f"{source}: adapter weights for modules this model lacks: {sorted(extra)[:3]}")

    def fuse_into(self, model: nn.Module) -> None:
        """Replace each adapted module by its fused float Linear (in place)."""
        for name, m in self.modules.items():
            _set_module(model, name, m.fused())
        self.modules = {}


def _targets(model: nn.Module, settings: LoRASettings) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if ".language_model." in f".{name}" and leaf in settings.modules:
            layer = _LAYER.search(name)
            if settings.layers is None or (layer and int(layer.group(1)) in settings.layers):
                names.append(name)
        elif settings.train_media and any(name.endswith(m) for m in MEDIA_MODULES):
            names.append(name)
    return sorted(names)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent = model
    *path, leaf = name.split(".")
    for part in path:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    if isinstance(parent, list):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def apply_lora(model: nn.Module, settings: LoRASettings, *, seed: int = 0) -> Adapter:
    """Freeze model and put adapters on the projections settings choose (A drawn from seed); return them."""
    settings.check(model.config.text.num_hidden_layers)
    key = mx.random.key(seed)
    model.freeze()
    adapter = Adapter(settings)
    for name in _targets(model, settings):
        base = dict(model.named_modules())[name]
        key, sub = mx.random.split(key)
        lora = LoRALinear(base, settings.rank, settings.scale, settings.dropout, key=sub)
        lora.base.freeze()
        _set_module(model, name, lora)
        adapter.modules[name] = lora
    if not adapter.modules:
        raise InputError("no module of this model matches the LoRA settings")
    return adapter


def settings_from_peft(config: dict, source: str) -> LoRASettings:
    """LoRASettings from a PEFT adapter_config.json (ours or one written by peft)."""
    ours = (config.get("gemma_mlx") or {}).get("settings")
    if ours:
        layers = ours.get("layers")
        return LoRASettings(rank=ours["rank"], alpha=ours["alpha"], dropout=ours.get("dropout", 0.0),
                            modules=tuple(ours["modules"]), layers=tuple(layers) if layers is not None else None,
                            train_media=bool(ours.get("train_media")))
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightsError(f"{source}: a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise WeightsError(f"{source}: {flag} adapters are not supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise WeightsError(f"{source}: target_modules as a regular expression is not supported; list the modules")
    text = tuple(t for t in targets if t in TEXT_MODULES)
    media = any(t in MEDIA_MODULES or t == "embedding_projection" for t in targets)
    layers = config.get("layers_to_transform")
    layers = (layers,) if isinstance(layers, int) else layers
    try:
        return LoRASettings(rank=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                            dropout=0.0, modules=text or TEXT_MODULES,
                            layers=tuple(layers) if layers is not None else None, train_media=media)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: not a LoRA adapter config ({e})") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Adapter:
    """Put the adapter saved in adapter_dir (ours or PEFT's) on model; return it."""
    from ..jsonfile import read_json_object

    d = Path(adapter_dir).expanduser()
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{adapter_dir}: not an adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json_object(d / CONFIG_FILE, error=WeightsError)
    settings = settings_from_peft(config, str(d / CONFIG_FILE))
    try:
        weights = mx.load(str(d / WEIGHTS_FILE))
    except Exception as e:  # mlx raises bare RuntimeError/ValueError for unreadable files
        raise WeightsError(f"{d / WEIGHTS_FILE}: cannot be read ({e})") from None
    weights = {_peft_name(k): v for k, v in weights.items()}
    adapter = apply_lora(model, settings)
    adapter.load_weights(weights, str(d / WEIGHTS_FILE))
    return adapter


def _peft_name(key: str) -> str:
    # peft keeps the adapter name in memory ("lora_A.default.weight") but saves without it.
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
