"""The side files a converted model carries (tokenizer, chat template, generation and processor configs), loaded
with the runtime's own loaders.

A conversion that copies a corrupt tokenizer.json or generation_config.json "succeeds" and writes a model that
does not load. So a Hugging Face source whose side files do not load is refused before anything is written, and
every output (the files a GGUF's metadata made included) is loaded again before its final rename, the way
gemma_mlx.load does: config, tokenizer, media tokens, chat template, generation defaults.
"""

from __future__ import annotations

from pathlib import Path

from gemma_mlx.errors import ConvertError, GemmaMLXError, WeightsError
from gemma_mlx.jsonfile import read_json_object, regular_file

# Files copied next to the weights: tokenizer, chat template, generation and processor configs.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                 "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# Those that must hold a JSON object (transformers and mlx-vlm read the processor configs; gemma-mlx does not).
JSON_OBJECT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                     "generation_config.json", "processor_config.json", "preprocessor_config.json",
                     "video_preprocessor_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def present_side_files(path: Path) -> list[str]:
    """The side files in path, each a regular file (links followed); a WeightsError for one that is there but
    is not (a directory, a FIFO, a dangling link), which copying would silently skip or block on."""
    return [name for name in SIDECAR_FILES if regular_file(path / name, WeightsError, name) is not None]


def load_side_files(path: Path, config) -> None:
    """Load path's side files as the runtime does; the loader's GemmaMLXError (naming the file) if one fails.

    A missing tokenizer or template is no failure here (a weights-only checkpoint converts; gemma_mlx.load then
    needs a tokenizer.json added), but one that is present must load, and so must the generation defaults.
    """
    from gemma_mlx.generation import SamplingOptions
    from gemma_mlx.processing.prompt import MediaTokens
    from gemma_mlx.template import ChatTemplate
    from gemma_mlx.tokenizer import Tokenizer

    present = set(present_side_files(path))
    for name in JSON_OBJECT_FILES:
        if name in present:
            read_json_object(path / name)
    if "tokenizer.json" in present:
        tokenizer = Tokenizer.from_dir(path)
        if config.token_ids:
            MediaTokens.from_model(config, tokenizer)
    if present & set(TEMPLATE_FILES) or "chat_template" in read_json_object(path / "tokenizer_config.json",
                                                                            missing={}):
        ChatTemplate.from_dir(path)
    SamplingOptions.from_dir(path, config)


def check_source_side_files(src: Path, config) -> None:
    """Refuse (ConvertError naming the file) a source whose side files the converted model could not load."""
    try:
        load_side_files(src, config)
    except GemmaMLXError as e:
        raise ConvertError(f"{e}; the converted model would carry it and not load (fix or remove the file)") from None


def check_output_side_files(tmp: Path, out: Path, config) -> None:
    """Load the side files written into tmp (to become out) as the runtime will; ConvertError naming out's file."""
    try:
        load_side_files(tmp, config)
    except GemmaMLXError as e:
        raise ConvertError("verification failed: the converted model would not load: "
                           + str(e).replace(str(tmp), str(out))) from None
