"""Audio to raw 640-sample frames at 16 kHz, as Gemma4UnifiedAudioFeatureExtractor does (brief §5).

Decoding: soundfile first (wav, flac, ogg, mp3 on recent libsndfile), then av/FFmpeg for everything else (m4a,
aac, opus, the audio track of an mp4/mkv/webm...). Channels are averaged to mono and the result is resampled to
16 kHz with ``resample`` below — the same steps as transformers' ``load_audio`` (soundfile + mean down-mix +
soxr "HQ"), so the model sees what it sees under transformers. Samples are used raw (no normalisation).

Frames: consecutive 640-sample slices (40 ms, one soft token each), the last one zero-padded: n = ceil(samples/640).

Long audio: Gemma 4 is documented for clips up to 30 s (750 tokens) and the unified processor itself caps
nothing, so longer audio is split into consecutive ≤ 30 s clips (``split_audio``), each its own
``<|audio>…<audio|>`` span, in order (prompt.py). Frame boundaries are unchanged by the split (30 s is a whole
number of frames), so the total token count stays ceil(samples/640).
"""

from __future__ import annotations

import io
import math

import numpy as np

from ..errors import InputError, MediaError
from .media import describe, read_bytes

SAMPLING_RATE = 16_000
SAMPLES_PER_TOKEN = 640
MAX_CLIP_SECONDS = 30.0
# Longer than this could never fit the 262 144-token context (25 tokens per second); refused before decoding
# where the file states its duration, and while decoding otherwise.
MAX_AUDIO_SECONDS = 262_144 * SAMPLES_PER_TOKEN / SAMPLING_RATE

# Resampler design (Kaiser-windowed sinc, linear phase): flat to 91.3% of the lower Nyquist frequency and at
# least 125 dB down from 100% on — soxr's "HQ" specification, which transformers' load_audio and librosa use.
# At 16 kHz that is flat to 7.3 kHz and nothing of what lay above 8 kHz folds back (see the sweep test).
_PASSBAND = 0.913
_STOPBAND_DB = 125.0
_MAX_PHASES = 4096  # odd rate pairs (e.g. 44 101 Hz) use 4096 quantised phases: < 1/8192-sample timing error
_BLOCK_ELEMENTS = 1 << 22  # rows × taps per matrix product: bounds the scratch memory to 16 MB
# The filter table (phases × taps) is at most this many float32 values (16 MB). Taps grow with the input rate
# (≈ 4 500 at 384 kHz), so fast rates get fewer phases: still < 1/1800 of an input sample of timing error there.
_TABLE_ELEMENTS = 1 << 22
_TABLE_ROWS = 256  # phases computed at a time: the float64 intermediates stay near 10 MB

# Sampling rates a file or array may state. Below 1 kHz nothing intelligible survives; above 384 kHz no audio
# hardware records, and the resampler's filter (its length grows with the rate) would only cost time and memory.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000


def check_sample_rate(rate, what: str = "sampling rate") -> int:
    """The rate as an int; MediaError naming `what` unless it is a whole number of Hz in the supported range."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise MediaError(f"{what} must be a number of Hz, got {rate!r}")
    if not math.isfinite(rate) or rate != int(rate):
        raise MediaError(f"{what} must be a whole number of Hz, got {rate!r}")
    rate = int(rate)
    if rate <= 0:
        raise MediaError(f"{what} must be positive, got {rate} Hz")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"{what} {rate} Hz is outside the supported {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    return rate


def resample(wave: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """The mono float32 wave resampled from orig_rate to target_rate: ceil(n · target / orig) samples."""
    wave = np.ascontiguousarray(np.asarray(wave, dtype=np.float32).reshape(-1))
    orig_rate = check_sample_rate(orig_rate, "input sampling rate")
    target_rate = check_sample_rate(target_rate, "target sampling rate")
    if orig_rate == target_rate or wave.size == 0:
        return wave.copy()
    g = math.gcd(orig_rate, target_rate)
    up, down = target_rate // g, orig_rate // g
    table, half = _filter_table(orig_rate, target_rate, up)
    phases = table.shape[0]
    n_out = -(-wave.size * up // down)
    padded = np.concatenate([np.zeros(half, np.float32), wave, np.zeros(half + 2, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)  # window i holds x[i-half .. i+half-1]
    out = np.empty(n_out, np.float32)
    block = max(1, _BLOCK_ELEMENTS // (2 * half))
    # Output m sits at input time m·down/up = base + frac. Outputs m0, m0+up, m0+2·up... share frac (one filter
    # phase) and their bases advance by `down`, so each group is one strided matrix-vector product.
    for m0 in range(min(up, n_out)):
        base, rem = divmod(m0 * down, up)
        phase = rem
        if phases != up:
            phase = round(rem * phases / up)
            if phase == phases:
                base, phase = base + 1, 0
        rows = windows[base + 1:: down]  # taps x[base-half+1 .. base+half]
        count = len(range(m0, n_out, up))
        for s in range(0, count, block):
            e = min(count, s + block)
            out[m0 + s * up: m0 + e * up: up] = np.ascontiguousarray(rows[s:e]) @ table[phase]
    return out


def _filter_table(orig_rate: int, target_rate: int, up: int) -> tuple[np.ndarray, int]:
    """(weights (phases, 2·half) float32, half): the windowed-sinc taps for each fractional input offset."""
    nyquist = min(orig_rate, target_rate) / 2
    cutoff = (1 + _PASSBAND) / 2 * nyquist / orig_rate  # -6 dB point, cycles per input sample
    transition = (1 - _PASSBAND) * nyquist / orig_rate
    # Kaiser's estimates: length for the attenuation over the transition width, and the window's beta.
    length = (_STOPBAND_DB - 7.95) / (2.285 * 2 * math.pi * transition)
    half = int(math.ceil(length / 2)) + 1
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    phases = max(1, min(up, _MAX_PHASES, _TABLE_ELEMENTS // (2 * half)))
    table = np.empty((phases, 2 * half), np.float32)
    for start in range(0, phases, _TABLE_ROWS):
        rows = np.arange(start, min(phases, start + _TABLE_ROWS))
        offset = rows[:, None] / phases + (half - 1) - np.arange(2 * half)[None, :]  # t_out - t_in
        window = np.i0(beta * np.sqrt(np.clip(1 - (offset / half) ** 2, 0, None))) / np.i0(beta)
        taps = 2 * cutoff * np.sinc(2 * cutoff * offset) * window
        table[rows] = taps / taps.sum(axis=1, keepdims=True)  # unit DC gain in every phase
    return table, half


# -- loading ---------------------------------------------------------------------------------------------------


def load_audio(src, sampling_rate: int | None = None, *, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 samples at target_rate (16 kHz) from a path, bytes, file object, or an array with its rate.

    ``src`` may be a file (anything soundfile or av decodes), an array (1-D, or 2-D with channels on the short
    axis) together with ``sampling_rate`` — its rate, never guessed — or an ``(array, rate)`` tuple. Files carry
    their own rate, so ``sampling_rate`` is refused with a file (it is not the output rate).
    """
    if isinstance(src, tuple) and len(src) == 2 and not isinstance(src[0], (str, bytes)):
        src, sampling_rate = src
    if not isinstance(src, (np.ndarray, list)):
        if sampling_rate is not None:
            raise InputError("sampling_rate describes an audio array; a file carries its own rate "
                             f"(the output is always {target_rate} Hz)")
        return decode_audio(read_bytes(src), describe(src), target_rate)
    if sampling_rate is None:
        raise MediaError("an audio array needs its sampling_rate (pass load_audio(array, rate))")
    rate = check_sample_rate(sampling_rate, "sampling_rate")
    wave = _mono_from_array(np.asarray(src))
    if wave.size > MAX_AUDIO_SECONDS * rate:
        raise MediaError(f"{wave.size / rate:.0f} s of audio is more than the context could hold; cut it first")
    return _checked(wave, rate, "audio array", target_rate)


def decode_audio(data: bytes, name: str, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 samples at target_rate of an encoded file's bytes; errors name the file as `name`."""
    wave, rate = _decode(data, name)
    return _checked(wave, rate, name, target_rate)


def _checked(wave: np.ndarray, rate: int, name: str, target_rate: int) -> np.ndarray:
    if wave.size == 0:
        raise MediaError(f"{name}: audio has no samples")
    if not np.isfinite(wave).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    return resample(wave, rate, target_rate)


def _mono_from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int16:
        a = a / 32768.0
    elif a.dtype == np.int32:
        a = a / 2147483648.0
    elif a.dtype == np.uint8:
        a = (a.astype(np.float64) - 128.0) / 128.0
    elif not np.issubdtype(a.dtype, np.floating):
        raise MediaError(f"unsupported audio array dtype {a.dtype} (use float, int16, int32 or uint8 samples)")
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise MediaError(f"an audio array must be 1-D or 2-D (samples × channels), got shape {a.shape}")
    channel_axis = 0 if a.shape[0] < a.shape[1] else 1  # soundfile gives (samples, channels), torch (channels, n)
    if a.shape[channel_axis] > 64:
        raise MediaError(f"cannot tell samples from channels in an audio array of shape {a.shape}")
    return a.mean(axis=channel_axis)


def _decode(data: bytes, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            check_sample_rate(f.samplerate, f"{name}: sampling rate")  # before the filter is sized from it
            if f.frames / f.samplerate > MAX_AUDIO_SECONDS:
                raise MediaError(f"{name}: {f.frames / f.samplerate:.0f} s of audio is more than the context "
                                 "could hold; cut it first")
            rate = f.samplerate
            # Read in blocks, down-mixed as they come: memory follows the samples really there, never the
            # frame count a header claims, and stays mono.
            chunks, total, block = [], 0, max(1, _BLOCK_ELEMENTS // max(1, f.channels))
            while True:
                part = f.read(block, dtype="float32", always_2d=True)
                if not len(part):
                    break
                chunks.append(part.mean(axis=1))
                total += len(part)
                if total > MAX_AUDIO_SECONDS * rate:
                    raise MediaError(f"{name}: more audio than the context could hold; cut it first")
            return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), rate
    except MediaError:
        raise
    except Exception:  # libsndfile cannot read it (m4a, aac, mp4...): let FFmpeg try
        pass
    return _decode_with_av(data, name)


_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_channels(frame) -> np.ndarray:
    """(channels, samples) float32 of one decoded av AudioFrame, whatever its sample format."""
    arr = frame.to_ndarray()
    fmt = frame.format.name.rstrip("p")
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    if fmt in _INT_SCALE:
        return (arr / _INT_SCALE[fmt]).astype(np.float32)
    if fmt == "u8":
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    return arr.astype(np.float32)


def _decode_with_av(data: bytes, name: str) -> tuple[np.ndarray, int]:
    import av

    chunks, rate = [], None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise MediaError(f"{name}: has no audio track (not an audio file, or a silent video)")
            stream = container.streams.audio[0]
            if container.duration is not None and container.duration / 1e6 > MAX_AUDIO_SECONDS:
                raise MediaError(f"{name}: {container.duration / 1e6:.0f} s of audio is more than the context "
                                 "could hold; cut it first")
            total = 0
            for frame in container.decode(stream):
                if rate is None:
                    rate = check_sample_rate(frame.sample_rate, f"{name}: sampling rate")
                elif frame.sample_rate != rate:
                    raise MediaError(f"{name}: the sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
                chunks.append(_frame_channels(frame).mean(axis=0))  # down-mix as it decodes: memory stays mono
                total += chunks[-1].size
                if total > MAX_AUDIO_SECONDS * rate:
                    raise MediaError(f"{name}: more audio than the context could hold; cut it first")
    except MediaError:
        raise
    except Exception as e:  # av raises many types (InvalidDataError, ValueError, OSError...)
        raise MediaError(f"{name}: cannot decode audio: not a supported audio file, or corrupt ({e})") from None
    if rate is None:
        raise MediaError(f"{name}: audio has no samples")
    return np.concatenate(chunks), rate


# -- frames ----------------------------------------------------------------------------------------------------


def num_audio_tokens(num_samples: int, samples_per_token: int = SAMPLES_PER_TOKEN) -> int:
    """Soft tokens of a 16 kHz clip: ceil(samples / 640)."""
    return -(-int(num_samples) // samples_per_token)


def audio_frames(wave: np.ndarray, samples_per_token: int = SAMPLES_PER_TOKEN) -> np.ndarray:
    """(ceil(n / 640), 640) float32 frames of a 16 kHz mono wave, the last zero-padded."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = num_audio_tokens(wave.size, samples_per_token)
    frames = np.zeros(n * samples_per_token, np.float32)
    frames[: wave.size] = wave
    return frames.reshape(n, samples_per_token)


def batch_audio_frames(waves, samples_per_token: int = SAMPLES_PER_TOKEN) -> tuple[np.ndarray, np.ndarray]:
    """(features (B, T, 640) float32, mask (B, T) bool): the feature extractor's padded batch layout."""
    frames = [audio_frames(w, samples_per_token) for w in waves]
    if not frames:
        raise InputError("batch_audio_frames needs at least one clip")
    longest = max(len(f) for f in frames)
    features = np.zeros((len(frames), longest, samples_per_token), np.float32)
    mask = np.zeros((len(frames), longest), bool)
    for i, f in enumerate(frames):
        features[i, : len(f)] = f
        mask[i, : len(f)] = True
    return features, mask


def split_audio(wave: np.ndarray, max_seconds: float | None = MAX_CLIP_SECONDS, sampling_rate: int = SAMPLING_RATE,
                samples_per_token: int = SAMPLES_PER_TOKEN) -> list[np.ndarray]:
    """Consecutive clips of at most max_seconds (whole frames each, so only the last clip has padding)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if max_seconds is None:
        return [wave]
    step = int(max_seconds * sampling_rate) // samples_per_token * samples_per_token
    if step <= 0:
        raise InputError(f"max_seconds={max_seconds} is shorter than one {samples_per_token}-sample frame")
    return [wave[i: i + step] for i in range(0, max(wave.size, 1), step)]
