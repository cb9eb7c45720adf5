"""Media preprocessing for Gemma 4 unified: images, audio and video to model inputs, and prompt expansion.

Pure numpy/PIL/av code mirroring transformers' Gemma4Unified image processor, audio feature extractor, video
processor and processor (brief §4.1, §5, §6). See each module's docstring for the choices made.
"""

from .audio import (
    MAX_CLIP_SECONDS,
    SAMPLES_PER_TOKEN,
    SAMPLING_RATE,
    audio_frames,
    batch_audio_frames,
    load_audio,
    num_audio_tokens,
    resample,
    split_audio,
)
from .image import (
    SUPPORTED_SOFT_TOKENS,
    ImageFeatures,
    aspect_ratio_preserving_size,
    load_image,
    num_image_tokens,
    pad_image_features,
    preprocess_image,
)
from .prompt import MediaTokens, PreparedPrompt, expand_placeholders, prepare_prompt, token_type_ids
from .video import VideoFeatures, load_video, sample_frame_indices, timestamp

__all__ = [
    "MAX_CLIP_SECONDS", "SAMPLES_PER_TOKEN", "SAMPLING_RATE", "SUPPORTED_SOFT_TOKENS", "ImageFeatures",
    "MediaTokens", "PreparedPrompt", "VideoFeatures", "aspect_ratio_preserving_size", "audio_frames",
    "batch_audio_frames", "expand_placeholders", "load_audio", "load_image", "load_video", "num_audio_tokens",
    "num_image_tokens", "pad_image_features", "prepare_prompt", "preprocess_image", "resample",
    "sample_frame_indices", "split_audio", "timestamp", "token_type_ids",
]
