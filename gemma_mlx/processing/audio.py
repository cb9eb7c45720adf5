"""Audio to raw 640-sample frames at 16 kHz, as Gemma4UnifiedAudioFeatureExtractor does (brief §5).

Anything soundfile or av can read is decoded, down-mixed to mono and resampled with av's (libswresample)
anti-aliased resampler. Frames are consecutive 640-sample slices, the last one zero-padded. Gemma 4 is
documented for clips up to 30 s (750 tokens); longer audio is split into ≤ 30 s clips, each its own
``<|audio>…<audio|>`` span in order (``split_clips``).
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import MediaError
from .media import describe, open_binary

SAMPLING_RATE = 16_000
SAMPLES_PER_TOKEN = 640
MAX_CLIP_SECONDS = 30


def resample(wave: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 wave resampled from rate to target with av's anti-aliased resampler."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if rate == target or wave.size == 0:
        return wave
    import av

    frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _decode_with_av(f, name: str) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(f) as container:
            streams = container.streams.audio
            if not streams:
                raise MediaError(f"{name}: has no audio track")
            stream = streams[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLING_RATE)
            chunks = []
            for frame in container.decode(stream):
                chunks += [x.to_ndarray().reshape(-1) for x in resampler.resample(frame)]
            chunks += [x.to_ndarray().reshape(-1) for x in resampler.resample(None)]
    except MediaError:
        raise
    except Exception as e:  # av raises many error types (InvalidDataError, ValueError, ...)
        raise MediaError(f"{name}: cannot decode audio ({e})") from None
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), SAMPLING_RATE


def load_audio(src, sampling_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a path, bytes, file object, or an array (with its sampling_rate)."""
    name = describe(src)
    if isinstance(src, np.ndarray):
        if sampling_rate is None:
            raise MediaError("an audio array needs its sampling_rate")
        wave = src.astype(np.float32)
        if wave.ndim == 2:  # (samples, channels) as soundfile returns, or (channels, samples)
            wave = wave.mean(axis=1) if wave.shape[0] >= wave.shape[1] else wave.mean(axis=0)
        out = resample(wave, sampling_rate)
    else:
        import soundfile as sf

        f = open_binary(src)
        data = f.read()
        try:
            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            out = resample(wave.mean(axis=1), rate)
        except (sf.LibsndfileError, RuntimeError, TypeError):
            out, _ = _decode_with_av(io.BytesIO(data), name)  # mp3/m4a/mp4 and others soundfile lacks
    if out.size == 0:
        raise MediaError(f"{name}: audio has no samples")
    if not np.isfinite(out).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    return out


def audio_frames(wave: np.ndarray, samples_per_token: int = SAMPLES_PER_TOKEN) -> np.ndarray:
    """(ceil(n / 640), 640) float32 frames, the last zero-padded."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = -(-wave.size // samples_per_token)
    frames = np.zeros(n * samples_per_token, np.float32)
    frames[: wave.size] = wave
    return frames.reshape(n, samples_per_token)


def split_clips(wave: np.ndarray, max_seconds: float = MAX_CLIP_SECONDS) -> list[np.ndarray]:
    """Consecutive clips of at most max_seconds (the documented limit per audio span)."""
    step = int(max_seconds * SAMPLING_RATE)
    return [wave[i: i + step] for i in range(0, max(len(wave), 1), step)]
