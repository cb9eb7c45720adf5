"""gemma-mlx: a native MLX runtime for Gemma 4 12B (gemma4_unified): text, images, audio and video.

    import gemma_mlx
    gemma = gemma_mlx.load("google/gemma-4-12B-it")      # a hub id, a local HF checkpoint or an MLX directory
    print(gemma.generate("Hello!").content)               # or gemma_mlx.generate(gemma, "Hello!")
    for event in gemma_mlx.stream_generate(gemma, "Tell me a story"):
        print(event, end="")                              # event.kind: "answer", "thinking", "tool_call", "done"
    results = gemma_mlx.batch_generate(gemma, ["Hi", "Name a colour"])   # many prompts in one batch
    chat = gemma_mlx.Chat(gemma, system="Be brief.")      # history, thinking, tools, attachments, save/load
    logits = gemma(input_ids, pixel_values=..., image_position_ids=...)   # the raw forward
"""

from importlib import import_module

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

# Imported on first use: `import gemma_mlx.<anything>` (the CLI's entry point first of all) stays light and starts
# no thread before the entry point has set up Ctrl-C handling (see __main__.py).
_LAZY = {"Gemma": "api", "Event": "events", "Result": "events", "generate": "api", "load": "api",
         "stream_generate": "api", "batch_generate": "api", "Chat": "chat", "Engine": "engine"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Chat", "ConfigError", "ContextLengthError", "ConvertError", "Event", "Gemma", "GemmaMLXError", "InputError",
    "MediaError", "Result", "TemplateError", "WeightsError", "Engine", "batch_generate", "generate", "load",
    "stream_generate",
]
