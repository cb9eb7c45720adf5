"""Video sampling, timestamps and frames against transformers 5.23 and the real fixture videos (brief §6.1, trap 17).

transformers' video *processor* needs torchvision (unavailable here), but everything it decides with is
reachable: ``default_sample_indices_fn`` and ``VideoMetadata`` (video_utils), its own PyAV reader
``read_video_pyav``, the processor's ``replace_video_token`` (the MM:SS string), and the pure torch
patch functions of video_processing_gemma4_unified.py (compiled from source, as in the image tests).
"""

from __future__ import annotations

import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES
from gemma_mlx.errors import InputError, MediaError
from gemma_mlx.processing.audio import load_audio
from gemma_mlx.processing.image import image_features
from gemma_mlx.processing.prompt import MediaTokens, video_span
from gemma_mlx.processing.video import (
    DEFAULT_NUM_FRAMES,
    FALLBACK_FPS,
    MAX_VIDEO_FRAMES,
    load_video,
    sample_frame_indices,
    timestamp,
)
from test_processing_image import reference_functions

MEDIA = FIXTURES / "media"
BUNNY = MEDIA / "bigbuckbunny.mp4"  # 1280×720, 25 fps, 132 frames, 5.28 s, 48 kHz 5.1 AAC
TOKENS = MediaTokens(image="<|image|>", audio="<|audio|>", video="<|video|>", boi="<|image>", eoi="<image|>",
                     boa="<|audio>", eoa="<audio|>", ids={"image": 258880, "audio": 258881, "video": 258884})


@pytest.fixture(scope="module")
def bunny():
    return load_video(BUNNY, include_audio=True)


def reference_video_string(metadata, num_soft_tokens: int) -> str:
    """The prompt text transformers' own Gemma4UnifiedProcessor.replace_video_token writes for one video."""
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    fake = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    inputs = {"num_soft_tokens_per_video": [num_soft_tokens], "video_metadata": [metadata]}
    return Gemma4UnifiedProcessor.replace_video_token(fake, inputs, 0)


def write_video(path: Path, frames: int, fps: int = 10, size=(128, 96), options=None) -> Path:
    """A small real mp4 (mpeg4) whose frames are the astronaut photo sliding sideways."""
    import av

    base = np.asarray(Image.open(MEDIA / "astronaut.png").convert("RGB").resize(size))
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(base, 4 * i, axis=1)), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_sampling_equals_transformers_default_sample_indices_fn():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (1, 5, 31, 32, 33, 100, 132, 250, 1001, 7200):
        for video_fps in (24.0, 25.0, 29.97, 60.0):
            meta = VideoMetadata(total_num_frames=total, fps=video_fps)
            for num_frames in (1, 2, 7, 16, 32, 64):
                ours, notes = sample_frame_indices(total, num_frames, None, video_fps)
                if num_frames <= total:
                    assert ours == default_sample_indices_fn(meta, num_frames=num_frames).tolist() and not notes
                else:  # the reference refuses; we keep every frame and say so
                    with pytest.raises(ValueError):
                        default_sample_indices_fn(meta, num_frames=num_frames)
                    assert ours == list(range(total)) and "only" in notes[0]
            for fps in (0.5, 1, 2.5):
                want = default_sample_indices_fn(meta, fps=fps).tolist()
                ours, notes = sample_frame_indices(total, None, fps, video_fps, max_frames=MAX_VIDEO_FRAMES)
                assert ours == want, (total, video_fps, fps)
    assert sample_frame_indices(132, None, None, 25.0)[0] == [i * 132 // 32 for i in range(32)]  # default 32
    assert DEFAULT_NUM_FRAMES == 32


def test_fps_cap_and_argument_errors():
    # 1 fps on a 10-minute 25 fps video would be 600 frames: capped at 60, spread over the whole video.
    indices, notes = sample_frame_indices(15000, None, 1.0, 25.0)
    assert indices == [i * 15000 // 60 for i in range(60)] and indices[-1] == 14750 and "took 60" in notes[0]
    assert sample_frame_indices(1500, None, 1.0, 25.0)[0] == [25 * i for i in range(60)]  # 60 s: uncapped
    assert len(sample_frame_indices(15000, None, 1.0, 25.0, max_frames=120)[0]) == 120
    indices, notes = sample_frame_indices(100, None, 1.0, None)  # unknown frame rate: 24 fps assumed
    assert indices == [i * 100 // 4 for i in range(4)] and "24" in notes[0]
    with pytest.raises(InputError, match="not both"):
        sample_frame_indices(100, 8, 1.0, 25.0)
    with pytest.raises(InputError, match="not both"):
        load_video(BUNNY, num_frames=8, fps=1.0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="num_frames"):
            sample_frame_indices(100, bad, None, 25.0)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="fps"):
            sample_frame_indices(100, None, bad, 25.0)
    with pytest.raises(InputError, match="one of"):
        load_video(BUNNY, max_soft_tokens=100)


def test_timestamps_and_prompt_string_equal_the_processor():
    from transformers.video_utils import VideoMetadata

    assert [timestamp(s) for s in (0, 0.99, 59.99, 60, 61.5, 3599, 6000)] == \
        ["00:00", "00:00", "00:59", "01:00", "01:01", "59:59", "100:00"]
    for total, fps, num in ((132, 25.0, 32), (9000, 29.97, 32), (100, None, 8), (250000, 24.0, 16)):
        indices, _ = sample_frame_indices(total, num, None, fps)
        meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=np.array(indices))
        rate = fps or FALLBACK_FPS  # the processor assumes 24 fps when the metadata has none
        frame = image_features(Image.new("RGB", (96, 48)), 70)
        fake = types.SimpleNamespace(frames=[frame] * len(indices), timestamps=[timestamp(i / rate) for i in indices])
        assert video_span(fake, TOKENS) == reference_video_string(meta, frame.num_soft_tokens), (total, fps)


def test_bigbuckbunny_equals_transformers_pyav_reader(bunny):
    """transformers' own PyAV reader + default sampler on the real clip: same indices, same fps, the very same
    decoded frames (so our tiles of them are bit-identical), the same prompt string."""
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    frames, meta = read_video_pyav(str(BUNNY), partial(default_sample_indices_fn, num_frames=32))
    assert bunny.frame_indices == meta.frames_indices.tolist() == [i * 132 // 32 for i in range(32)]
    assert bunny.fps == meta.fps == 25.0 and bunny.total_frames == meta.total_num_frames == 132
    assert bunny.timestamps[:5] == ["00:00"] * 5 and bunny.timestamps[-1] == "00:05"
    assert bunny.timestamps == [timestamp(i / 25) for i in bunny.frame_indices]
    assert len(bunny.frames) == 32 and not bunny.notes
    assert {f.size for f in bunny.frames} == {(288, 528)} and {f.num_soft_tokens for f in bunny.frames} == {66}
    assert bunny.pixel_values.shape == (32, 66, 6912) and bunny.position_ids.shape == (32, 66, 2)
    assert bunny.num_soft_tokens == 32 * 66
    for k in (0, 13, 31):
        ref = image_features(Image.fromarray(frames[k]), 70, video_frame=True)
        assert np.array_equal(bunny.frames[k].pixel_values, ref.pixel_values)
        assert np.array_equal(bunny.frames[k].position_ids, ref.position_ids)
    assert video_span(bunny, TOKENS) == reference_video_string(meta, 66)


def test_frame_tiles_equal_the_video_processor_functions(bunny):
    """The video processor's own steps on frames already at their target size (so no resize on either side):
    normalise with std 255 (its fused rescale, a float32 divide), convert_video_to_patches, patches_merge,
    pad_to_max_patches. Bit-identical, padding included. Then the whole path with torch's uint8 antialiased
    bicubic resize (what torchvision runs on CPU) stays within 2/255 of ours, as for images."""
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    hf = reference_functions("video_processing_gemma4_unified.py",
                             {"convert_video_to_patches", "patches_merge", "pad_to_max_patches"})
    frames, _ = read_video_pyav(str(BUNNY), partial(default_sample_indices_fn, num_frames=4))
    resized = np.stack([np.asarray(Image.fromarray(f).resize((528, 288), Image.Resampling.BICUBIC)) for f in frames])

    def reference(video_uint8: np.ndarray):
        video = torch.from_numpy(video_uint8).permute(0, 3, 1, 2).contiguous()
        if video.shape[-2:] != (288, 528):
            video = torch.nn.functional.interpolate(video, size=(288, 528), mode="bicubic", antialias=True,
                                                    align_corners=False)
        video = (video.to(torch.float32) - 0.0) / 255.0
        patches = hf.convert_video_to_patches(video, 16)
        grid = torch.meshgrid(torch.arange(528 // 16), torch.arange(288 // 16), indexing="xy")
        positions = torch.stack(grid, dim=-1).reshape(patches.shape[1], 2)[None].repeat(len(video), 1, 1)
        merged, merged_pos = hf.patches_merge(patches, positions, patches.shape[1] // 9)
        return hf.pad_to_max_patches(merged, merged_pos, 70)

    ref_px, ref_pos = reference(resized)
    ours = [image_features(Image.fromarray(f), 70, video_frame=True) for f in resized]
    assert all(f.size == (288, 528) for f in ours)
    px = np.zeros((4, 70, 6912), np.float32)
    pos = np.full((4, 70, 2), -1, np.int32)
    for i, f in enumerate(ours):
        px[i, :66], pos[i, :66] = f.pixel_values, f.position_ids
    assert np.array_equal(px, ref_px.numpy()) and np.array_equal(pos, ref_pos.numpy())

    full_px, _ = reference(frames)  # original 1280×720 frames through torch's resize
    sampled = load_video(BUNNY, num_frames=4)
    diff = np.abs(sampled.pixel_values - full_px.numpy()[:, :66]) * 255
    assert diff.max() <= 2 + 1e-3 and diff.mean() <= 0.2, (diff.max(), diff.mean())


def test_fps_sampling_on_real_videos():
    video = load_video(BUNNY, fps=1.0)  # int(132 / 25 · 1) = 5 frames spread over the clip
    assert video.frame_indices == [0, 26, 52, 79, 105]
    assert video.timestamps == ["00:00", "00:01", "00:02", "00:03", "00:04"] and video.audio is None
    speech = load_video(MEDIA / "av_speech.mp4", fps=2.0, include_audio=True)  # 256², 24 fps, 156 frames
    assert speech.fps == 24.0 and speech.total_frames == 156
    assert speech.frame_indices == [i * 156 // 13 for i in range(13)]
    assert {f.size for f in speech.frames} == {(384, 384)} and speech.frames[0].num_soft_tokens == 64
    # The soundtrack: the same clip load_audio gives, i.e. the fixture speech at 16 kHz.
    assert np.array_equal(speech.audio, load_audio(MEDIA / "av_speech.mp4"))
    wav = load_audio(MEDIA / "speech_16k.wav")
    assert np.corrcoef(wav, speech.audio[: len(wav)])[0, 1] > 0.99


def test_bunny_soundtrack(bunny):
    assert bunny.audio is not None and abs(len(bunny.audio) / 16000 - 5.28) < 0.05
    assert np.array_equal(bunny.audio, load_audio(BUNNY))


def test_short_and_odd_clips(tmp_path):
    short = load_video(write_video(tmp_path / "short.mp4", 5))  # 5 frames at 10 fps, 32 asked for by default
    assert short.frame_indices == [0, 1, 2, 3, 4] and short.fps == 10.0 and short.total_frames == 5
    assert short.timestamps == ["00:00"] * 5
    assert short.notes == ["the video has only 5 frames, fewer than the 32 asked for; all 5 are used"]
    assert {f.size for f in short.frames} == {(336, 432)}  # 96×128 at 70 tokens: 7×9 tiles
    silent = load_video(tmp_path / "short.mp4", num_frames=2, include_audio=True)
    assert silent.audio is None and "no soundtrack" in silent.notes[-1] and silent.frame_indices == [0, 2]
    # A container that does not state its frame count (Matroska): frames are counted from the packets.
    mkv = load_video(write_video(tmp_path / "clip.mkv", 12), num_frames=4)
    assert mkv.frame_indices == [0, 3, 6, 9] and mkv.total_frames == 12 and not mkv.notes
    # An mp4 whose header (moov first) promises 40 frames but whose data is cut: re-sampled over what decodes.
    data = write_video(tmp_path / "fast.mp4", 40, options={"movflags": "faststart"}).read_bytes()
    assert load_video(data, num_frames=8).frame_indices == [5 * i for i in range(8)]
    cut = load_video(data[: int(len(data) * 0.8)], num_frames=8)
    decoded = cut.total_frames
    assert 8 <= decoded < 40 and cut.frame_indices == [i * decoded // 8 for i in range(8)]
    assert f"states 40 frames but {decoded} decode" in cut.notes[0]
    # A still image is a one-frame video.
    still = load_video(MEDIA / "chelsea.png")
    assert still.frame_indices == [0] and still.frames[0].size == (288, 480) and "only 1 frame," in still.notes[0]


def test_bad_videos(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    (tmp_path / "cut.mp4").write_bytes(BUNNY.read_bytes()[:300_000])  # moov at the end: nothing decodable
    (tmp_path / "notes.txt").write_text("hello")
    cases = {"empty.mp4": "empty", "junk.mp4": "cannot decode video", "cut.mp4": "cannot decode video",
             "missing.mp4": "no such file", "notes.txt": "cannot decode video|no video track"}
    for name, message in cases.items():
        with pytest.raises(MediaError, match=message) as err:
            load_video(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(MediaError, match="no video track"):
        load_video(MEDIA / "speech_16k.flac")
    with pytest.raises(MediaError, match="more than the 1000 pixels allowed"):
        load_video(MEDIA / "av_speech.mp4", max_pixels=1000)
