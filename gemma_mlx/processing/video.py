"""Video to timestamped frames, as Gemma4UnifiedVideoProcessor does (brief §6.1), plus its soundtrack on request.

Sampling (transformers' ``default_sample_indices_fn``): ``num_frames`` (default 32) uniformly,
index_i = floor(i · total / num_frames); or ``fps`` frames per second, i.e. num = max(1, int(total / video_fps ·
fps)) spread the same way. The two are mutually exclusive. Each frame goes through the image pipeline at 70 soft
tokens (the video budget) and is stamped ``MM:SS`` from frame_index / video_fps (24 when the file does not say).

Where we differ from the reference, on purpose (each is recorded in ``VideoFeatures.notes``):

- A clip with fewer frames than requested gives **all** its frames (the reference raises an error; a 1-second
  clip is still a valid question to ask about).
- ``fps`` sampling is capped at ``max_frames`` (60: one frame a second for a minute); a longer video gets
  max_frames frames spread over its whole length, so the prompt size stays bounded.
- ``include_audio=True`` also decodes the soundtrack as a 16 kHz clip (the reference ignores it); prompt.py
  places it right after the frames as ``<|audio>…<audio|>`` span(s). A video without a soundtrack just has none.

Only the sampled frames are converted to RGB, each straight to tiles: memory stays at one picture.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import InputError, MediaError
from .audio import decode_audio
from .image import MAX_IMAGE_PIXELS, ImageFeatures, check_budget, image_features
from .media import describe, read_bytes

DEFAULT_NUM_FRAMES = 32
VIDEO_SOFT_TOKENS = 70
FALLBACK_FPS = 24.0  # what transformers assumes when a video's frame rate is unknown
MAX_FPS_FRAMES = 60
# More frames than this (70 soft tokens each) could never fit the 262 144-token context: refused up front.
MAX_VIDEO_FRAMES = 262_144 // VIDEO_SOFT_TOKENS


@dataclass
class VideoFeatures:
    """A preprocessed video: one ImageFeatures per sampled frame, their timestamps and indices, optional audio."""

    frames: list[ImageFeatures]
    timestamps: list[str]  # "MM:SS" per frame, as written into the prompt
    frame_indices: list[int]  # index of each sampled frame in the decoded stream
    fps: float  # the frame rate the timestamps were computed with
    total_frames: int = 0  # frames in the video
    audio: np.ndarray | None = field(default=None, repr=False)  # 16 kHz soundtrack (include_audio=True)
    notes: list[str] = field(default_factory=list)  # where the result departs from the reference processor

    @property
    def num_soft_tokens(self) -> int:
        """Soft tokens of all frames together (timestamps and delimiters not counted)."""
        return sum(f.num_soft_tokens for f in self.frames)

    @property
    def pixel_values(self) -> np.ndarray:
        """(frames, N, D) float32: every frame has the same size, so the frames stack."""
        return np.stack([f.pixel_values for f in self.frames])

    @property
    def position_ids(self) -> np.ndarray:
        """(frames, N, 2) int32 (x, y) tile positions."""
        return np.stack([f.position_ids for f in self.frames])


def timestamp(seconds: float) -> str:
    """``MM:SS`` as the reference writes it (minutes are not wrapped into hours)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def sample_frame_indices(total: int, num_frames: int | None = None, fps: float | None = None,
                         video_fps: float | None = None, max_frames: int = MAX_FPS_FRAMES
                         ) -> tuple[list[int], list[str]]:
    """(frame indices to keep, notes): num_frames uniformly, or fps frames per second (capped at max_frames)."""
    notes: list[str] = []
    if num_frames is not None and fps is not None:
        raise InputError("pass num_frames or fps, not both (they are mutually exclusive)")
    if total < 1:
        raise MediaError("the video has no frames")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or \
            not 1 <= max_frames <= MAX_VIDEO_FRAMES:
        raise InputError(f"max_frames must be an integer in 1..{MAX_VIDEO_FRAMES}, got {max_frames!r}")
    if fps is not None:
        if isinstance(fps, bool) or not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number, got {fps!r}")
        if not video_fps:
            video_fps = FALLBACK_FPS
            notes.append(f"the video does not state its frame rate; assumed {FALLBACK_FPS:g} fps")
        n = max(1, int(total / video_fps * fps))
        if n > max_frames:
            notes.append(f"{fps:g} fps would take {n} frames; took {max_frames} spread over the whole video")
            n = max_frames
    else:
        n = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
        if n > MAX_VIDEO_FRAMES:
            raise InputError(f"num_frames={n} is more frames than the context could hold "
                             f"(at most {MAX_VIDEO_FRAMES} of {VIDEO_SOFT_TOKENS} soft tokens each)")
    if n > total:
        noun = "frame" if total == 1 else "frames"
        notes.append(f"the video has only {total} {noun}, fewer than the {n} asked for; all {total} are used")
        return list(range(total)), notes
    return [i * total // n for i in range(n)], notes


def load_video(src, num_frames: int | None = None, fps: float | None = None,
               max_soft_tokens: int = VIDEO_SOFT_TOKENS, include_audio: bool = False, patch_size: int = 16,
               pooling_kernel_size: int = 3, *, max_frames: int = MAX_FPS_FRAMES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> VideoFeatures:
    """VideoFeatures of a video file (path, bytes or file object): sampled frames as tiles, timestamps, audio."""
    check_budget(max_soft_tokens)
    if num_frames is not None and fps is not None:
        raise InputError("pass num_frames or fps, not both (they are mutually exclusive)")
    name = describe(src)
    data = read_bytes(src)
    total, video_fps, has_audio = _probe(data, name, max_pixels)
    notes: list[str] = []
    if video_fps is None:
        notes.append(f"the video does not state its frame rate; timestamps assume {FALLBACK_FPS:g} fps")
    rate = video_fps or FALLBACK_FPS
    first_size: list[tuple[int, int]] = []

    def features(picture: Image.Image) -> ImageFeatures:
        # Tiles right away, so at most one full-resolution picture is alive at a time (a 4K frame is 25 MB).
        if not first_size:
            first_size.append(picture.size)
        elif picture.size != first_size[0]:  # a mid-stream resolution change: one frame size, as the reference
            picture = picture.resize(first_size[0], Image.Resampling.BICUBIC)
        return image_features(picture, max_soft_tokens, patch_size, pooling_kernel_size, video_frame=True)

    indices, sample_notes = sample_frame_indices(total, num_frames, fps, rate, max_frames)
    tiles, decoded = _decode_frames(data, name, set(indices), features, max_pixels)
    if len(tiles) < len(indices):
        # The container over-stated its frame count: sample again over the frames that really decode.
        notes.append(f"the file states {total} frames but {decoded} decode; sampled over {decoded}")
        total = decoded
        indices, sample_notes = sample_frame_indices(total, num_frames, fps, rate, max_frames)
        tiles, _ = _decode_frames(data, name, set(indices), features, max_pixels)
    notes += sample_notes
    frames = [tiles[i] for i in indices]
    audio = None
    if include_audio:
        if has_audio:
            audio = decode_audio(data, f"{name} (soundtrack)")
        else:
            notes.append("the video has no soundtrack")
    return VideoFeatures(frames, [timestamp(i / rate) for i in indices], indices, rate, total, audio, notes)


def _probe(data: bytes, name: str, max_pixels: int) -> tuple[int, float | None, bool]:
    """(frame count, frame rate or None, has an audio track) without decoding pictures."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: has no video track (not a video file?)")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise MediaError(f"{name}: frames of {width}×{height} are more than the {max_pixels} pixels allowed")
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else None
            total = int(stream.frames or 0)
            has_audio = bool(container.streams.audio)
            if total <= 0:  # not in the header (e.g. webm, some mkv): count the stream's packets
                total = sum(1 for p in container.demux(stream) if p.size)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{name}: cannot decode video: not a supported video file, or corrupt ({e})") from None
    if total <= 0:
        raise MediaError(f"{name}: video has no frames")
    return total, video_fps, has_audio


def _decode_frames(data: bytes, name: str, wanted: set[int], convert, max_pixels: int = MAX_IMAGE_PIXELS
                   ) -> tuple[dict[int, ImageFeatures], int]:
    """({index: convert(RGB picture)} for the wanted frame indices, number of frames decoded)."""
    import av

    out: dict[int, ImageFeatures] = {}
    last = max(wanted)
    count = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:  # the header may not say, or a later frame grows
                    raise MediaError(f"{name}: frame {count} is {frame.width}×{frame.height}, more than the "
                                     f"{max_pixels} pixels allowed")
                if count in wanted:
                    out[count] = convert(frame.to_image())  # RGB (FFmpeg's YUV -> RGB, as transformers' reader)
                count += 1
                if count > last:
                    break
    except MediaError:
        raise
    except Exception as e:
        if not out:
            raise MediaError(f"{name}: cannot decode video: corrupt or unsupported ({e})") from None
        # A damaged tail: keep what decoded; the caller re-samples over the frames that exist.
    return out, count
