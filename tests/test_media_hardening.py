"""Hostile media: absurd sample rates, decompression bombs, oversized videos, and a seeded mutation fuzz of the
real fixture files (WAV header fields, PNG/JPEG bytes, video container bytes).

Every case runs in a worker subprocess with an address-space limit (RLIMIT_AS) and a wall-clock timeout, so a
case that would blow up fails the test instead of the machine. The only acceptable outcomes are a result or a
GemmaMLXError; anything else (another exception, a crash, running out of the limits) fails.

Run this file as a script (``python tests/test_media_hardening.py KIND SEED COUNT``) to fuzz by hand.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script, the worker imports its neighbours as the tests do
from bounded import run_campaign, worker_loop  # noqa: E402
from conftest import MEDIA  # noqa: E402

MEMORY_LIMIT = 3 << 30  # bytes of address space per worker: a few-KB file must never need more


def _wav_bytes(rate: int = 16000, samples: int = 2000, channels: int = 1) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((samples, channels), np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _with_rate(wav: bytes, rate: int) -> bytes:
    """The canonical 44-byte-header WAV with its sample rate (and byte rate) fields overwritten."""
    b = bytearray(wav)
    struct.pack_into("<I", b, 24, rate & 0xFFFFFFFF)
    struct.pack_into("<I", b, 28, (rate * 2) & 0xFFFFFFFF)
    return bytes(b)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRC) claiming width × height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------- regression tests


@pytest.mark.parametrize("rate", [1_000_003, 999, 384_001, 2**31 - 1])
def test_absurd_wav_sample_rates_are_refused_fast(rate):
    from gemma_mlx.errors import MediaError
    from gemma_mlx.processing.audio import load_audio

    with pytest.raises(MediaError, match="<4044 bytes>") as e:
        load_audio(_with_rate(_wav_bytes(), rate))
    if rate < 2**31:  # libsndfile reads these headers: the message names the rate itself
        assert str(rate) in str(e.value) and "1000..384000 Hz" in str(e.value)


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -float("inf"), -16000, 0, True, False, 16000.5,
                                  "16000", 10**12, np.float64("nan"), 500])
def test_bad_rates_through_the_api(rate):
    from gemma_mlx.errors import MediaError
    from gemma_mlx.processing.audio import load_audio, resample

    with pytest.raises(MediaError, match="sampling_rate"):
        load_audio(np.zeros(100, np.float32), rate)
    with pytest.raises(MediaError, match="input sampling rate"):
        resample(np.zeros(100, np.float32), rate)
    with pytest.raises(MediaError, match="target sampling rate"):
        resample(np.zeros(100, np.float32), 16000, rate)


def test_whole_and_numpy_rates_are_accepted():
    from gemma_mlx.processing.audio import load_audio

    for rate in (16000, 16000.0, np.int32(16000), np.float32(16000)):
        assert load_audio(np.zeros(640, np.float32), rate).shape == (640,)
    assert load_audio(np.zeros(1000, np.float32), 1000).shape == (16000,)
    assert load_audio(np.zeros(384, np.float32), 384000).shape == (16,)


def test_the_resampler_filter_table_is_bounded():
    """The 1 MHz WAV used to build a 3.8 GB filter table; now phases × taps stays under the 4 M-value budget at
    every allowed rate, and the quality of the fast rates holds (a 1 kHz tone survives, DC gain 1)."""
    from gemma_mlx.processing import audio

    for rate in (audio.MAX_SAMPLE_RATE, audio.MAX_SAMPLE_RATE - 1, 352_801, 44_101, audio.MIN_SAMPLE_RATE + 1):
        up = 16000 // np.gcd(rate, 16000)
        table, half = audio._filter_table(rate, 16000, up)
        assert table.size <= audio._TABLE_ELEMENTS and table.dtype == np.float32
        assert np.allclose(table.sum(axis=1), 1, atol=1e-4)
    rate = audio.MAX_SAMPLE_RATE - 1
    t = np.arange(rate // 4) / rate
    y = audio.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), rate)
    want = np.sin(2 * np.pi * 1000 * np.arange(y.size) / 16000)
    inner = slice(400, y.size - 400)
    assert np.sqrt(np.mean((y[inner] - want[inner]) ** 2)) < 1e-3


def test_a_wav_whose_header_overstates_its_frames_reads_what_is_there():
    from gemma_mlx.processing.audio import load_audio

    b = bytearray(_wav_bytes(samples=3200))
    struct.pack_into("<I", b, 40, 0x7FFFFFF0)  # data chunk "size": 2 GB
    struct.pack_into("<I", b, 4, 0x7FFFFFF8)
    out = load_audio(bytes(b))
    assert out.shape == (3200,)


def test_image_bombs_are_refused_before_decoding():
    from PIL import Image

    from gemma_mlx.errors import MediaError
    from gemma_mlx.processing.image import load_image

    for w, h in ((100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (20_000, 10_000)):
        with pytest.raises(MediaError, match=r"<\d+ bytes>: .*decompression bomb"):
            load_image(_png_claiming(w, h))
    lazy = Image.open(io.BytesIO(_png_claiming(5_000, 4_000)))  # a PIL object that was never decoded
    with pytest.raises(MediaError, match="5000×4000 = 20000000 pixels, more than the 1000000 allowed"):
        load_image(lazy, max_pixels=10**6)
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(_png_claiming(16, 16), max_pixels=255)


def test_video_frame_counts_and_sizes_are_bounded(tmp_path):
    from gemma_mlx.errors import InputError, MediaError
    from gemma_mlx.processing.video import MAX_VIDEO_FRAMES, load_video, sample_frame_indices

    with pytest.raises(InputError, match="more frames than the context"):
        sample_frame_indices(2**31, num_frames=10**9)
    with pytest.raises(InputError, match="max_frames"):
        sample_frame_indices(100, fps=1.0, video_fps=25.0, max_frames=10**9)
    with pytest.raises(InputError, match="fps must be"):
        sample_frame_indices(100, fps=True)
    assert len(sample_frame_indices(2**31, num_frames=MAX_VIDEO_FRAMES)[0]) == MAX_VIDEO_FRAMES
    video = _tiny_video()
    with pytest.raises(MediaError, match=r"<\d+ bytes>.*pixels allowed"):
        load_video(video, num_frames=2, max_pixels=64 * 48 - 1)
    assert len(load_video(video, num_frames=2).frames) == 2


# ------------------------------------------------------------------------------------------------- fuzz


def _tiny_video(frames: int = 6, size=(64, 48)) -> bytes:
    """A small real mp4 (mpeg4 + AAC soundtrack) from the astronaut photo, made in memory."""
    import av
    from PIL import Image

    base = np.asarray(Image.open(MEDIA / "astronaut.png").convert("RGB").resize(size))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1).copy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """The valid files each kind of case mutates, cut from the fixtures so that one case takes milliseconds."""
    import soundfile as sf
    from PIL import Image

    speech, rate = sf.read(MEDIA / "speech_22k.wav", dtype="int16")
    wav = io.BytesIO()
    sf.write(wav, speech[: rate // 4], rate, format="WAV", subtype="PCM_16")
    photo = Image.open(MEDIA / "chelsea.png").convert("RGB").resize((40, 30))
    png, jpeg = io.BytesIO(), io.BytesIO()
    photo.save(png, "PNG")
    photo.save(jpeg, "JPEG", quality=80)
    return {"wav": wav.getvalue(), "png": png.getvalue(), "jpeg": jpeg.getvalue(), "video": _tiny_video(),
            "flac": (MEDIA / "speech_16k.flac").read_bytes()[:6000]}


# WAV header fields (offset, struct format) of the canonical 44-byte header, and values worth trying in them.
_WAV_FIELDS = [(4, "<I"), (16, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H"),
               (40, "<I")]
_EXTREMES = [0, 1, 2, 3, 7, 8, 255, 256, 999, 1000, 8000, 65535, 384_000, 384_001, 1_000_003, 2**31 - 1, 2**31,
             2**32 - 1]


def _flip_bytes(rng: random.Random, data: bytearray, count: int) -> None:
    for _ in range(count):
        data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])


def mutate(kind: str, seed: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of a valid file: header fields set to extremes, bytes flipped, cut or repeated."""
    data = bytearray(seed)
    move = rng.random()
    if kind == "wav" and move < 0.6:
        for _ in range(rng.randint(1, 3)):
            offset, fmt = rng.choice(_WAV_FIELDS)
            limit = 2 ** (8 * struct.calcsize(fmt))
            struct.pack_into(fmt, data, offset, rng.choice(_EXTREMES + [rng.randrange(limit)]) % limit)
    elif kind == "png" and move < 0.4:  # absurd sizes with a valid CRC, so PIL believes them
        w, h = rng.choice(_EXTREMES) or 1, rng.choice(_EXTREMES) or 1
        ihdr = struct.pack(">II", w % 2**32, h % 2**32) + bytes(data[24:29])
        data[8:33] = _png_chunk(b"IHDR", ihdr)
    elif move < 0.75:
        header = {"wav": 44, "png": 64, "jpeg": 600, "video": 2000, "flac": 200}[kind]
        _flip_bytes(rng, data, rng.randint(1, 4))  # anywhere
        for _ in range(rng.randint(0, 4)):  # and where the structure is: the header
            data[rng.randrange(min(header, len(data)))] = rng.randrange(256)
    elif move < 0.9:
        data = data[: rng.randrange(1, len(data))]
    else:
        i, j = sorted(rng.randrange(len(data)) for _ in range(2))
        data = data[:j] + data[i:j] * rng.randint(1, 20) + data[j:]
    return bytes(data)


def _load(kind: str, data: bytes):
    from gemma_mlx.processing import load_audio, load_video, preprocess_image

    if kind in ("wav", "flac"):
        return load_audio(data)
    if kind in ("png", "jpeg"):
        return preprocess_image(data, 70)
    return load_video(data, num_frames=3, include_audio=True)


def worker(kind: str, first_seed: int, count: int) -> None:
    """Runs cases first_seed.. of `kind` under the memory limit, reporting each on stdout (bounded.worker_loop)."""
    seed = _seeds()[kind]
    worker_loop(lambda s: _load(kind, mutate(kind, seed, random.Random(f"{kind}-{s}"))), first_seed, count,
                MEMORY_LIMIT)


CASES = {"wav": 120, "flac": 30, "png": 80, "jpeg": 60, "video": 30}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_fuzz_media_only_raises_gemma_mlx_errors(kind):
    assert run_campaign(__file__, kind, 0, CASES[kind]) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_fuzz_media_long_campaign(kind):
    assert run_campaign(__file__, kind, 10_000, CASES[kind] * 25) == []


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
