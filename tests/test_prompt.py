"""Placeholder expansion and mm_token_type_ids against transformers 5.23's Gemma4UnifiedProcessor (brief §6.2-6.3).

The reference processor is built from real parts: the fixture Gemma 4 tokenizer (transformers' GemmaTokenizer with
the media tokens the conversion script declares), the real audio feature extractor, and transformers' Gemma 4 PIL
image processor (same resize rule and soft-token count as the unified one, without torchvision). Its video
processor needs torchvision, so a stand-in returns what the video processor would (soft tokens per frame and
VideoMetadata with fps and frame indices, taken from our VideoFeatures, whose sampling and timestamps
test_processing_video.py checks against transformers); the processor's own ``replace_video_token``,
``get_text_with_replacements``, tokenizer call and ``create_mm_token_type_ids`` do the rest.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import FIXTURES
from gemma_mlx.errors import InputError, MediaError
from gemma_mlx.model.masks import TOKEN_TYPE_AUDIO, TOKEN_TYPE_IMAGE, TOKEN_TYPE_TEXT, TOKEN_TYPE_VIDEO
from gemma_mlx.processing.audio import audio_frames, load_audio
from gemma_mlx.processing.image import preprocess_image
from gemma_mlx.processing.prompt import (
    MediaTokens,
    expand_placeholders,
    prepare_prompt,
    token_type_ids,
)
from gemma_mlx.processing.video import load_video

SHARED = FIXTURES
MEDIA = SHARED / "media"
TOKENIZER_DIR = SHARED / "gemma4-tokenizer"
# The 12B config's media token ids (config.json: image_token_id, audio_token_id, video_token_id, boi_token_id,
# eoi_token_id, boa_token_id, eoa_token_index), keyed as gemma_mlx's config.token_ids is.
CONFIG_IDS = {"image": 258880, "audio": 258881, "video": 258884, "boi": 255999, "eoi": 258882, "boa": 256000,
              "eoa": 258883}
TEXT = ("<bos><|turn>user\nCompare <|image|> with <|image|>, then listen:<|audio|> and <|audio|>\n"
        "Now watch <|video|> and <|video|> please.<turn|>\n<|turn>model\n")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return MediaTokens.from_ids(CONFIG_IDS, tokenizer)


@pytest.fixture(scope="module")
def media():
    images = [Image.open(MEDIA / "chelsea.png"), Image.open(MEDIA / "astronaut.png")]
    speech = load_audio(MEDIA / "speech_16k.wav")
    clip = np.random.RandomState(0).uniform(-0.5, 0.5, 16001).astype(np.float32)
    videos = [load_video(MEDIA / "bigbuckbunny.mp4", num_frames=6),
              load_video(MEDIA / "av_speech.mp4", fps=1.0, include_audio=True)]
    return images, [speech, clip], videos


class _VideoProcessorStandIn:
    """Returns what Gemma4UnifiedVideoProcessor would for our sampled videos (see the module docstring)."""

    def __init__(self):
        self.videos = []

    def __call__(self, videos, **kwargs):
        from transformers.video_utils import VideoMetadata

        return {"num_soft_tokens_per_video": [v.frames[0].num_soft_tokens for v in self.videos],
                "video_metadata": [VideoMetadata(total_num_frames=v.total_frames, fps=v.fps,
                                                 frames_indices=np.array(v.frame_indices)) for v in self.videos]}


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import AutoTokenizer
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor
    from transformers.processing_utils import ProcessorMixin

    extra = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
             "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    hf_tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), extra_special_tokens=extra)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)  # admit the stand-in
    try:
        processor = Gemma4UnifiedProcessor(feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
                                           image_processor=Gemma4ImageProcessorPil(), tokenizer=hf_tokenizer,
                                           video_processor=_VideoProcessorStandIn())
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return processor


def run_reference(processor, text, images, audios, videos):
    """(input_ids, mm_token_type_ids, expanded text, batch features) from the real processor call."""
    processor.video_processor.videos = list(videos)
    kwargs = {}
    if images:
        kwargs["images"] = [list(images)]
    if audios:
        kwargs["audio"] = list(audios)
    if videos:
        kwargs["videos"] = [np.zeros((len(v.frames), 8, 8, 3), np.uint8) for v in videos]
    out = processor(text=[text], add_special_tokens=False, return_text_replacement_offsets=True, **kwargs)
    expanded, last = [], 0
    for r in out["text_replacement_offsets"][0]:
        expanded += [text[last: r["span"][0]], r["replacement"]]
        last = r["span"][1]
    expanded.append(text[last:])
    return np.array(out["input_ids"][0]), np.array(out["mm_token_type_ids"][0]), "".join(expanded), out


def test_media_tokens_come_from_the_tokenizer(tokenizer, tokens):
    assert (tokens.image, tokens.audio, tokens.video) == ("<|image|>", "<|audio|>", "<|video|>")
    assert (tokens.boi, tokens.eoi, tokens.boa, tokens.eoa) == ("<|image>", "<image|>", "<|audio>", "<audio|>")
    config = types.SimpleNamespace(token_ids=CONFIG_IDS)
    assert MediaTokens.from_model(config, tokenizer) == tokens
    with pytest.raises(InputError, match="no token with id 999999"):
        MediaTokens.from_ids({**CONFIG_IDS, "image": 999_999}, tokenizer)


def test_expansion_ids_and_types_equal_the_processor(hf_processor, tokenizer, tokens, media):
    images, audios, videos = media
    ref_ids, ref_types, ref_text, ref = run_reference(hf_processor, TEXT, images, audios, videos)
    features = [preprocess_image(im) for im in images]
    prepared = prepare_prompt(TEXT, tokenizer, tokens, features, audios, videos[:1] + [_without_audio(videos[1])])
    assert prepared.text == ref_text  # string for string
    assert prepared.input_ids.dtype == np.int32 and np.array_equal(prepared.input_ids, ref_ids)  # id for id
    assert np.array_equal(prepared.token_types, ref_types)
    ref_counts = [(ref["image_position_ids"][i, :, 0] >= 0).sum() // 9 for i in range(2)]  # 16-px patches / 3²
    assert [f.num_soft_tokens for f in features] == ref_counts == [260, 256]
    # The audio the model gets is the extractor's, frame for frame.
    for i, frames in enumerate(prepared.media["audio_features"]):
        n = int(ref["input_features_mask"][i].sum())
        assert np.array_equal(frames, ref["input_features"][i, :n])
    assert "00:00 <|image><|video|>" in prepared.text and "<image|> 00:01 <|image>" in prepared.text


def _without_audio(video):
    """The same video without its soundtrack (the reference never adds one)."""
    return type(video)(video.frames, video.timestamps, video.frame_indices, video.fps, video.total_frames)


def test_token_types_mark_only_soft_tokens_and_give_one_block_per_image_and_frame(tokenizer, tokens, media):
    from gemma_mlx.model.masks import span_block_ids

    images, audios, videos = media
    features = [preprocess_image(im, 70) for im in images]
    p = prepare_prompt(TEXT, tokenizer, tokens, features, audios, videos)
    ids, types = p.input_ids, p.token_types
    assert np.array_equal(types == TOKEN_TYPE_IMAGE, ids == CONFIG_IDS["image"])
    assert np.array_equal(types == TOKEN_TYPE_VIDEO, ids == CONFIG_IDS["video"])
    assert np.array_equal(types == TOKEN_TYPE_AUDIO, ids == CONFIG_IDS["audio"])
    for delimiter in ("boi", "eoi", "boa", "eoa"):
        assert (types[ids == CONFIG_IDS[delimiter]] == TOKEN_TYPE_TEXT).all()
    frames = [f for v in videos for f in v.frames]
    assert (types == TOKEN_TYPE_IMAGE).sum() == sum(f.num_soft_tokens for f in features)
    assert (types == TOKEN_TYPE_VIDEO).sum() == sum(f.num_soft_tokens for f in frames) == 6 * 66 + 6 * 64
    # The soundtrack of the second video follows its frames as one more audio span.
    spans = [len(a) for a in p.media["audio_features"]]
    assert spans == [len(audio_frames(a)) for a in audios] + [len(audio_frames(videos[1].audio))]
    assert (types == TOKEN_TYPE_AUDIO).sum() == sum(spans) and (ids == CONFIG_IDS["boa"]).sum() == 3
    # Each image and each video frame is its own bidirectional block (boi/eoi break the runs); audio is none.
    blocks = np.array(span_block_ids(p.spans, 0, len(ids)))
    assert blocks.max() + 1 == len(features) + len(frames)
    assert (blocks[types == TOKEN_TYPE_AUDIO] == -1).all()
    # Media arrays in prompt order, padded to the longest item with (-1, -1) positions.
    assert p.media["pixel_values"].shape == (2, 64, 6912) and p.media["video_position_ids"].shape == (12, 66, 2)
    assert (p.media["image_position_ids"][0, features[0].num_soft_tokens:] == -1).all()
    assert np.array_equal(token_type_ids(ids, tokens.ids), types)
    # The spans say the same, item by item, in prompt order: 2 images, 6 + 6 frames, 3 audio clips.
    kinds = [s.kind for s in p.spans]
    assert kinds == ["image"] * 2 + ["audio"] * 2 + ["video"] * 12 + ["audio"]
    for span in p.spans:
        assert (types[span.start:span.end] == {"image": 1, "video": 2, "audio": 3}[span.kind]).all()
        assert types[span.start - 1] == types[span.end] == TOKEN_TYPE_TEXT
    assert [s.item for s in p.spans if s.kind == "audio"] == [0, 1, 2]
    assert sum(s.end - s.start for s in p.spans) == int((types != TOKEN_TYPE_TEXT).sum())
    # Cache keys: soft tokens carry their item's fingerprint; one frame differs from another.
    frame_prints = [s.fingerprint for s in p.spans if s.kind == "video"]
    assert len(set(frame_prints)) == 12 and all(frame_prints)
    first = p.spans[0]
    assert p.keys[first.start] == (CONFIG_IDS["image"], first.fingerprint) and p.keys[0] == ids[0]
    assert p.spans_within(first.end, p.spans[1].start + 1) == [p.spans[1]]


def test_prepared_prompt_from_ids_checks_items_against_runs():
    from gemma_mlx.processing.prompt import PreparedPrompt

    ids = [2, 5, 7, 7, 7, 6, 5, 7, 7, 6, 3]  # two runs of image placeholder 7
    pixels, positions = np.zeros((2, 3, 6912), np.float32), np.zeros((2, 3, 2), np.int32)
    pixels[1] += 1
    p = PreparedPrompt.from_ids(ids, {"image": 7}, dict(pixel_values=pixels, image_position_ids=positions))
    assert [(s.start, s.end, s.item) for s in p.spans] == [(2, 5, 0), (7, 9, 1)]
    assert p.spans[0].fingerprint != p.spans[1].fingerprint
    with pytest.raises(InputError, match="2 image placeholder run.*1 image input"):
        PreparedPrompt.from_ids(ids, {"image": 7}, dict(pixel_values=pixels[:1], image_position_ids=positions[:1]))
    with pytest.raises(InputError, match="the prompt is empty"):
        PreparedPrompt.from_ids([], {})


def test_long_audio_spans(hf_processor, tokenizer, tokens):
    """A 35 s clip: with splitting off the result is the processor's (one 875-token span); by default it is two
    spans of 750 and 125 tokens, the same audio frames, and the same number of audio tokens."""
    wave = np.tile(load_audio(MEDIA / "speech_16k.wav"), 6)[: 35 * 16000]
    text = "<bos><|turn>user\nTranscribe <|audio|><turn|>\n"
    ref_ids, ref_types, ref_text, _ = run_reference(hf_processor, text, [], [wave], [])
    whole = prepare_prompt(text, tokenizer, tokens, audios=[wave], max_audio_seconds=None)
    assert whole.text == ref_text and np.array_equal(whole.input_ids, ref_ids)
    assert np.array_equal(whole.token_types, ref_types) and (ref_types == TOKEN_TYPE_AUDIO).sum() == 875
    split = prepare_prompt(text, tokenizer, tokens, audios=[wave])
    assert split.text == ref_text.replace("<|audio|>" * 875, "<|audio|>" * 750 + "<audio|><|audio>" + "<|audio|>" * 125)
    assert [len(a) for a in split.media["audio_features"]] == [750, 125]
    assert np.array_equal(np.concatenate(split.media["audio_features"]), audio_frames(wave))
    assert (split.token_types == TOKEN_TYPE_AUDIO).sum() == 875


def test_a_tiny_model_with_small_ids():
    """Ids and strings come from the given mapping and tokenizer: a tiny checkpoint with its own ids (and even its
    own token spellings) works without any change."""
    names = {"image": "<img>", "audio": "<aud>", "video": "<vid>", "boi": "<boi>", "eoi": "<eoi>", "boa": "<boa>",
             "eoa": "<eoa>"}
    vocab = {"[UNK]": 0, "look": 1, "at": 2, "and": 3}
    ids = {key: 10 + i for i, key in enumerate(names)}
    vocab.update({names[k]: v for k, v in ids.items()})
    tiny = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tiny.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tiny.add_special_tokens(list(names.values()))
    tokens = MediaTokens.from_ids(ids, tiny)
    assert tokens.image == "<img>" and tokens.ids["video"] == 12
    image = preprocess_image(np.zeros((48, 96, 3), np.uint8), 70)
    video = load_video(MEDIA / "av_speech.mp4", num_frames=2)
    p = prepare_prompt("look at <img> and <aud> and <vid>", tiny, tokens, [image], [np.zeros(1300, np.float32)],
                       [video])
    n_img, n_vid = image.num_soft_tokens, video.frames[0].num_soft_tokens
    want = [1, 2, 13, *[10] * n_img, 14, 3, 15, 11, 11, 11, 16, 3, 0, 13, *[12] * n_vid, 14, 0, 13, *[12] * n_vid, 14]
    assert p.input_ids.tolist() == want  # "00:00" is unknown to this vocabulary: [UNK]
    assert p.token_types.tolist() == [{10: 1, 12: 2, 11: 3}.get(i, 0) for i in want]


def test_placeholder_and_media_counts_must_match(tokenizer, tokens, media):
    images, audios, videos = media
    image = preprocess_image(images[0], 70)
    cases = [
        ("<|image|><|image|>", dict(images=[image]), r"2 <\|image\|> placeholder\(s\) but 1 image input"),
        ("<|image|>", dict(images=[image, image]), r"1 <\|image\|> placeholder\(s\) but 2 image input"),
        ("no placeholder", dict(images=[image]), r"0 <\|image\|> placeholder\(s\) but 1 image input"),
        ("<|audio|>", {}, r"1 <\|audio\|> placeholder\(s\) but 0 audio input"),
        ("<|video|> <|audio|>", dict(audios=audios[:1]), r"1 <\|video\|> placeholder\(s\) but 0 video input"),
    ]
    for text, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            expand_placeholders(text, tokens, **kwargs)
        with pytest.raises(InputError, match=message):
            prepare_prompt(text, tokenizer, tokens, **kwargs)
    no_audio = MediaTokens.from_ids({k: v for k, v in CONFIG_IDS.items() if k not in ("audio", "boa", "eoa")},
                                    tokenizer)
    with pytest.raises(InputError, match="no audio token id"):
        expand_placeholders("<|audio|>", no_audio, audios=audios[:1])
    with pytest.raises(MediaError, match="no samples"):
        expand_placeholders("<|audio|>", tokens, audios=[np.zeros(0, np.float32)])


def test_a_tokenizer_that_splits_media_tokens_is_refused(tokens):
    vocab = {"[UNK]": 0, "hello": 1}
    plain = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()  # "<|image|>" is not a special token here
    with pytest.raises(InputError, match=r"0 image soft tokens but the image inputs need 64.*map <\|image\|> to one"):
        prepare_prompt("hello <|image|>", plain, tokens, [preprocess_image(np.zeros((96, 96, 3), np.uint8), 70)])
