"""Video to frames like Gemma4UnifiedVideoProcessor (brief §6.1), plus its soundtrack on request.

By default 32 frames uniformly sampled (index floor(i·total/32)); or one every 1/fps seconds (up to
max_frames). Each frame goes through the image pipeline at 70 soft tokens and is stamped MM:SS from its
index over the stream's frame rate (24 when unknown, as the reference). A clip shorter than the requested
count yields all its frames instead of an error (the reference refuses; a tool should not).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from ..errors import MediaError
from .audio import load_audio
from .image import ImageFeatures, preprocess_image
from .media import describe, open_binary

DEFAULT_NUM_FRAMES = 32
VIDEO_SOFT_TOKENS = 70
FALLBACK_FPS = 24.0


@dataclass
class VideoFeatures:
    frames: list[ImageFeatures]
    timestamps: list[str]
    frame_indices: list[int]
    fps: float
    audio: np.ndarray | None = field(default=None, repr=False)


def sample_indices(total: int, num_frames: int | None, fps: float | None, video_fps: float,
                   max_frames: int = 60) -> list[int]:
    """Frame indices to keep: num_frames uniformly, or one per 1/fps seconds (at most max_frames)."""
    if num_frames is not None and fps is not None:
        raise MediaError("pass num_frames or fps, not both")
    if fps is not None:
        if fps <= 0:
            raise MediaError(f"fps must be positive, got {fps}")
        step = video_fps / fps
        return [int(i * step) for i in range(min(max_frames, int(total / step) or 1))]
    n = num_frames or DEFAULT_NUM_FRAMES
    if total <= n:
        return list(range(total))
    return [int(i * total / n) for i in range(n)]


def timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def load_video(src, num_frames: int | None = None, fps: float | None = None, max_soft_tokens: int = VIDEO_SOFT_TOKENS,
               include_audio: bool = False, patch_size: int = 16, pooling_kernel_size: int = 3) -> VideoFeatures:
    """VideoFeatures of a video file: sampled frames as patches, their timestamps, optionally its audio."""
    import av

    name = describe(src)
    data = open_binary(src).read()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: has no video track")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate) if stream.average_rate else FALLBACK_FPS
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{name}: cannot decode video ({e})") from None
    if not decoded:
        raise MediaError(f"{name}: video has no frames")
    indices = sample_indices(len(decoded), num_frames, fps, video_fps)
    frames = [preprocess_image(decoded[i], max_soft_tokens, patch_size, pooling_kernel_size) for i in indices]
    audio = None
    if include_audio:
        try:
            audio = load_audio(data)
        except MediaError:
            audio = None  # a silent video simply has no soundtrack to add
    return VideoFeatures(frames, [timestamp(i / video_fps) for i in indices], indices, video_fps, audio)
