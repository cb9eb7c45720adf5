"""Typed errors: each names the problem and, where it can, what to do about it.

The CLI prints these without a traceback; anything else is a bug.
"""


class GemmaMLXError(Exception):
    """Base class of every error gemma-mlx raises on purpose."""


class ConfigError(GemmaMLXError):
    """config.json is missing, of an unsupported model type, or inconsistent."""


class WeightsError(GemmaMLXError):
    """A checkpoint file is missing, truncated, or holds a missing/misshapen tensor."""


class InputError(GemmaMLXError):
    """A prompt or request the model cannot take as given."""


class ContextLengthError(InputError):
    """The prompt (plus the requested generation) does not fit the allowed context."""


class MediaError(InputError):
    """An image, audio or video input that is unreadable, empty, or unsupported."""


class ConvertError(GemmaMLXError):
    """A conversion that cannot proceed; the output directory is left untouched."""


class TemplateError(GemmaMLXError):
    """The chat template failed to render the given messages."""
