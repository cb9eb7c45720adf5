"""gemma-mlx: a native MLX runtime for Gemma 4 12B (gemma4_unified): text, images, audio and video.

    import gemma_mlx
    gemma = gemma_mlx.load("google/gemma-4-12B-it")      # a hub id, a local HF checkpoint or an MLX directory
    print(gemma.generate("Hello!").content)               # or gemma_mlx.generate(gemma, "Hello!")
    for piece in gemma_mlx.stream_generate(gemma, "Tell me a story"):
        print(piece, end="")                              # piece.kind: "answer", "thinking" or "tool_call"
    chat = gemma_mlx.Chat(gemma, system="Be brief.")      # history, thinking, tools, attachments, save/load
    logits = gemma(input_ids, pixel_values=..., image_position_ids=...)   # the raw forward
"""

from .api import Gemma, Piece, Result, generate, load, stream_generate
from .chat import Chat
from .errors import (
    ConfigError,
    ContextLengthError,
    ConvertError,
    GemmaMLXError,
    InputError,
    MediaError,
    TemplateError,
    WeightsError,
)

__all__ = [
    "Chat", "ConfigError", "ContextLengthError", "ConvertError", "Gemma", "GemmaMLXError", "InputError",
    "MediaError", "Piece", "Result", "TemplateError", "WeightsError", "generate", "load", "stream_generate",
]
