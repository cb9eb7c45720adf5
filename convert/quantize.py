"""Which tensors get quantized, at what precision, and what they are called in the output.

Output names follow the layout mlx-vlm writes for gemma4_unified (``language_model.model.*``,
``vision_embedder.*``, ``embed_vision.*``, ``embed_audio.*``; Gemma 3 text keeps ``model.*``), so mlx-vlm,
mlx-lm and gemma-mlx all load the result, and per-module overrides in the ``quantization`` block use the same
names.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_mlx.config import GEMMA3_TEXT
from gemma_mlx.errors import ConvertError

# Linear layers of the decoder and the tied embedding / LM head.
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "model.language_model.embed_tokens.weight"
# The encoder-free front ends: 0.4% of the 12B's parameters, and every image/audio token passes through them.
MULTIMODAL_LINEARS = ("model.vision_embedder.patch_dense.weight", "model.embed_vision.embedding_projection.weight",
                      "model.embed_audio.embedding_projection.weight")

# The default is the one the KL measurements pick (bench/results/quant_policy.md, README).
DEFAULT_RECIPE = "mixed_4_6"
RECIPES = {
    "mixed_4_6": "every decoder Linear and the tied embedding at --bits, except v_proj and down_proj at 6 bits in "
                 "the first and last eighth of the layers and every third layer between, and the embedding at "
                 "6 bits (llama.cpp Q4_K_M's idea); norms, scalars, biases, the position table and the "
                 "vision/audio projections kept in --dtype",
    "uniform": "every decoder Linear and the tied embedding at --bits; the rest kept in --dtype",
    "embed8": "as uniform, with the tied embedding / LM head at 8 bits",
    "all": "as uniform, with the vision and audio projections quantized too",
}
MODE_RULES = {"affine": None, "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str


def output_name(name: str, model_type: str = "gemma4_unified") -> str:
    """The output (mlx-vlm layout) name of a tensor given its canonical (Hugging Face on-disk) name."""
    if name.startswith("model.language_model."):
        rest = name[len("model.language_model."):]
        return ("model." + rest) if model_type == GEMMA3_TEXT else "language_model.model." + rest
    if name.startswith("model."):
        return name[len("model."):]
    return name


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[3]) if len(parts) > 3 and parts[2] == "layers" and parts[3].isdigit() else None


def _higher_precision_layer(i: int, n: int) -> bool:
    eighth = max(n // 8, 1)
    return i < eighth or i >= n - eighth or (i - eighth) % 3 == 2


def check_mode(bits: int, group_size: int, mode: str) -> None:
    if mode not in MODE_RULES:
        raise ConvertError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODE_RULES)}")
    rule = MODE_RULES[mode]
    if rule is not None and (bits, group_size) != rule:
        raise ConvertError(f"mode {mode} needs bits={rule[0]} and group size {rule[1]}")
    if rule is None and (bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128)):
        raise ConvertError(f"affine quantization takes bits 2-6 or 8 and group size 32, 64 or 128")


def quant_spec(name: str, shape, config, bits: int | None, group_size: int, mode: str,
               recipe: str) -> QuantSpec | None:
    """How to quantize the tensor called name (canonical), or None to keep it in float."""
    if not bits or len(shape) != 2 or not name.endswith(".weight"):
        return None
    module = name.rsplit(".", 2)[-2]
    is_text_linear = name.startswith("model.language_model.layers.") and module in TEXT_LINEARS
    is_embedding = name == EMBEDDING
    is_multimodal = name in MULTIMODAL_LINEARS
    if not (is_text_linear or is_embedding or (is_multimodal and recipe == "all")):
        return None
    spec_bits = bits
    if recipe == "embed8" and is_embedding:
        spec_bits = 8
    elif recipe == "mixed_4_6" and mode == "affine" and bits < 6:
        if is_embedding:
            spec_bits = 6
        elif module in ("v_proj", "down_proj"):
            i = _layer_index(name)
            if i is not None and _higher_precision_layer(i, config.text.num_hidden_layers):
                spec_bits = 6
    spec_mode = mode if spec_bits == bits else "affine"
    if shape[-1] % group_size:
        return None  # cannot be grouped: stays in float (none of the 12B's matrices)
    return QuantSpec(spec_bits, group_size, spec_mode)
