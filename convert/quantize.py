"""Which tensors get quantized, at what precision, and what they are called in the output.

Output names follow the layout mlx-vlm writes for gemma4_unified (``language_model.model.*``,
``vision_embedder.*``, ``embed_vision.*``, ``embed_audio.*``; Gemma 3 text keeps mlx-lm's ``model.*``), so
mlx-vlm, mlx-lm and gemma-mlx all load the result, and per-module overrides in the ``quantization`` block use
the same names. The recipes and the default were chosen from KL measurements (bench/quant_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_mlx.config import GEMMA3_TEXT
from gemma_mlx.errors import ConvertError

TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "model.language_model.embed_tokens.weight"
# The encoder-free front ends: 0.4% of the 12B's parameters, and every image/audio token passes through them.
MULTIMODAL_LINEARS = ("model.vision_embedder.patch_dense.weight", "model.embed_vision.embedding_projection.weight",
                      "model.embed_audio.embedding_projection.weight")

DEFAULT_RECIPE = "mixed_4_6"
RECIPES = {
    "uniform": "every decoder Linear and the tied embedding / LM head at --bits",
    "embed6": "as uniform, with the tied embedding / LM head at 6 bits",
    "embed8": "as uniform, with the tied embedding / LM head at 8 bits",
    "vdown6": "as uniform, with v_proj and down_proj at 6 bits in the first and last eighth of the layers and "
              "every third layer between (llama.cpp Q4_K_M's choice of layers)",
    "mixed_4_6": "vdown6 and embed6 together",
    "all": "as uniform, with the vision and audio projections quantized too",
}
# What every recipe keeps in --dtype: norms, layer scalars, biases, the vision position table (none of them is a
# Linear or an Embedding, so no MLX loader could quantize them), and, except under 'all', the vision/audio
# projections.
MODE_RULES = {"affine": None, "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"


def output_name(name: str, model_type: str) -> str:
    """The output (mlx-vlm / mlx-lm layout) name of a tensor given its canonical (Hugging Face on-disk) name."""
    if name.startswith("model.language_model."):
        rest = name[len("model.language_model."):]
        return ("model." + rest) if model_type == GEMMA3_TEXT else "language_model.model." + rest
    if name.startswith("model."):
        return name[len("model."):]
    return name


def check_mode(bits: int, group_size: int, mode: str) -> None:
    if mode not in MODE_RULES:
        raise ConvertError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODE_RULES)}")
    rule = MODE_RULES[mode]
    if rule is not None and (bits, group_size) != rule:
        raise ConvertError(f"mode {mode} needs bits={rule[0]} and group size {rule[1]}")
    if rule is None and (bits not in AFFINE_BITS or group_size not in GROUP_SIZES):
        raise ConvertError("affine quantization takes bits 2, 3, 4, 5, 6 or 8 and group size 32, 64 or 128 "
                           f"(got bits={bits}, group size {group_size})")


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[3]) if len(parts) > 3 and parts[2] == "layers" and parts[3].isdigit() else None


def _q4_k_m_layer(i: int, n: int) -> bool:
    eighth = max(n // 8, 1)
    return i < eighth or i >= n - eighth or (i - eighth) % 3 == 2


def quant_spec(name: str, shape, num_layers: int, bits: int | None, group_size: int, mode: str,
               recipe: str) -> QuantSpec | None:
    """How to quantize the tensor called name (canonical), or None to keep it in float."""
    if not bits or len(shape) != 2 or not name.endswith(".weight"):
        return None
    module = name.rsplit(".", 2)[-2]
    is_text_linear = name.startswith("model.language_model.layers.") and module in TEXT_LINEARS
    is_embedding = name == EMBEDDING
    if not (is_text_linear or is_embedding or (name in MULTIMODAL_LINEARS and recipe == "all")):
        return None
    if shape[-1] % group_size:
        return None  # cannot be grouped (none of the 12B's matrices): stays in float
    spec_bits = bits
    if mode == "affine":
        if is_embedding and recipe in ("embed6", "mixed_4_6"):
            spec_bits = max(bits, 6)
        elif is_embedding and recipe == "embed8":
            spec_bits = 8
        elif recipe in ("vdown6", "mixed_4_6") and module in ("v_proj", "down_proj"):
            i = _layer_index(name)
            if i is not None and _q4_k_m_layer(i, num_layers):
                spec_bits = max(bits, 6)
    return QuantSpec(spec_bits, group_size, mode)
