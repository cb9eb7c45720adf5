"""Placeholder expansion: a rendered prompt plus preprocessed media -> token ids, token types, media arrays.

The chat template writes each attachment as a bare placeholder (``<|image|>``, ``<|audio|>``, ``<|video|>``).
Exactly as Gemma4UnifiedProcessor does (``replace_*_token`` + ``get_text_with_replacements``), placeholders are
consumed in order of appearance per modality and become:

- image:  ``<|image>`` + N × ``<|image|>`` + ``<image|>``               (N = the image's soft tokens)
- audio:  ``<|audio>`` + n × ``<|audio|>`` + ``<audio|>``               (n = ceil(samples / 640))
- video:  its frames joined by one space, each ``"MM:SS <|image>" + N × "<|video|>" + "<image|>"``

Two additions, both off the reference's path unless used: audio longer than 30 s becomes one span per ≤ 30 s
clip, back to back (``max_audio_seconds``; None keeps one span); a video loaded with its soundtrack is followed
by that soundtrack's audio span(s). ``mm_token_type_ids`` mark only the soft-token ids (image 1, video 2,
audio 3); delimiters and timestamps are text (0).

Token strings and ids come from the checkpoint (config ids, tokenizer strings): a tiny test model's small ids
work the same as the 12B's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, MediaError
from ..model.masks import TOKEN_TYPE_AUDIO, TOKEN_TYPE_IMAGE, TOKEN_TYPE_TEXT, TOKEN_TYPE_VIDEO
from .audio import MAX_CLIP_SECONDS, audio_frames, num_audio_tokens, split_audio
from .image import ImageFeatures, pad_image_features
from .video import VideoFeatures

# Gemma 4's names for the media tokens. Only used for a modality whose id the checkpoint lacks, so that a
# placeholder of that modality is still recognised (and refused clearly) instead of passing as text.
GEMMA4_TOKEN_NAMES = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>", "boi": "<|image>",
                      "eoi": "<image|>", "boa": "<|audio>", "eoa": "<audio|>"}
_KIND_TYPES = {"image": TOKEN_TYPE_IMAGE, "video": TOKEN_TYPE_VIDEO, "audio": TOKEN_TYPE_AUDIO}


@dataclass(frozen=True)
class MediaTokens:
    """The media token strings of a checkpoint and the ids of its soft (placeholder) tokens."""

    image: str
    audio: str
    video: str
    boi: str
    eoi: str
    boa: str
    eoa: str
    ids: Mapping[str, int] = field(default_factory=dict)  # "image"/"audio"/"video" (+ delimiters) -> token id

    @classmethod
    def from_ids(cls, ids: Mapping[str, int], tokenizer) -> MediaTokens:
        """MediaTokens whose strings are the tokenizer's tokens for the given ids (keys as in GEMMA4_TOKEN_NAMES)."""
        strings = {}
        for key, default in GEMMA4_TOKEN_NAMES.items():
            if key not in ids:
                strings[key] = default
                continue
            token = tokenizer.id_to_token(int(ids[key]))
            if token is None:
                raise InputError(f"the tokenizer has no token with id {ids[key]} (the config's {key} token)")
            strings[key] = token
        return cls(**strings, ids={k: int(v) for k, v in ids.items()})

    @classmethod
    def from_model(cls, config, tokenizer) -> MediaTokens:
        """MediaTokens of a loaded model: ids from its config (``config.token_ids``), strings from its tokenizer."""
        return cls.from_ids(config.token_ids, tokenizer)

    def placeholder(self, kind: str) -> str:
        return {"image": self.image, "audio": self.audio, "video": self.video}[kind]


@dataclass
class PreparedPrompt:
    """A prompt ready for the model."""

    input_ids: np.ndarray  # (L,) int32
    token_types: np.ndarray  # (L,) int32 mm_token_type_ids: 0 text, 1 image, 2 video, 3 audio
    media: dict  # keyword arguments for Model.embed_inputs / Model.__call__
    text: str = ""  # the expanded prompt text


def image_span(features: ImageFeatures, tokens: MediaTokens) -> str:
    """The text one image becomes: boi + N image tokens + eoi."""
    return f"{tokens.boi}{tokens.image * features.num_soft_tokens}{tokens.eoi}"


def audio_span(num_frames: int, tokens: MediaTokens) -> str:
    """The text one audio clip of num_frames frames becomes: boa + n audio tokens + eoa."""
    return f"{tokens.boa}{tokens.audio * num_frames}{tokens.eoa}"


def video_span(video: VideoFeatures, tokens: MediaTokens) -> str:
    """The text one video's frames become: ``"MM:SS " + boi + N video tokens + eoi`` per frame, space-joined."""
    return " ".join(f"{t} {tokens.boi}{tokens.video * f.num_soft_tokens}{tokens.eoi}"
                    for t, f in zip(video.timestamps, video.frames))


def expand_placeholders(text: str, tokens: MediaTokens, images=(), audios=(), videos=(), *,
                        max_audio_seconds: float | None = MAX_CLIP_SECONDS) -> tuple[str, list[np.ndarray]]:
    """(text with every placeholder expanded, the 16 kHz audio clips in the order their spans appear)."""
    items = {"image": list(images), "audio": list(audios), "video": list(videos)}
    kinds = {tokens.image: "image", tokens.audio: "audio", tokens.video: "video"}
    pattern = re.compile("|".join(re.escape(p) for p in sorted(kinds, key=len, reverse=True)))
    found = {"image": 0, "audio": 0, "video": 0}
    for m in pattern.finditer(text):
        found[kinds[m.group()]] += 1
    for kind in ("image", "audio", "video"):
        given = len(items[kind])
        if found[kind] != given:
            raise InputError(f"the prompt has {found[kind]} {tokens.placeholder(kind)} placeholder(s) but "
                             f"{given} {kind} input(s) were given; each {kind} needs one placeholder")
        if given and kind not in tokens.ids:
            raise InputError(f"this checkpoint has no {kind} token id, so it cannot take {kind} input")
    for v in items["video"]:
        if v.audio is not None and "audio" not in tokens.ids:
            raise InputError("this checkpoint has no audio token id, so it cannot take a video's soundtrack")

    clips: list[np.ndarray] = []
    used = {"image": 0, "audio": 0, "video": 0}

    def audio_spans(wave) -> str:
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise MediaError("an audio input has no samples")
        parts = split_audio(wave, max_audio_seconds)
        clips.extend(parts)
        return "".join(audio_span(num_audio_tokens(len(p)), tokens) for p in parts)

    def replace(m: re.Match) -> str:
        kind = kinds[m.group()]
        item = items[kind][used[kind]]
        used[kind] += 1
        if kind == "image":
            return image_span(item, tokens)
        if kind == "audio":
            return audio_spans(item)
        return video_span(item, tokens) + (audio_spans(item.audio) if item.audio is not None else "")

    return pattern.sub(replace, text), clips


def token_type_ids(input_ids, tokens: MediaTokens) -> np.ndarray:
    """mm_token_type_ids (same shape, int32): 1 image, 2 video, 3 audio soft tokens; 0 for everything else."""
    ids = np.asarray(input_ids)
    types = np.full(ids.shape, TOKEN_TYPE_TEXT, np.int32)
    for kind, value in _KIND_TYPES.items():
        if kind in tokens.ids:
            types[ids == tokens.ids[kind]] = value
    return types


def _encode(tokenizer, text: str) -> list[int]:
    try:
        enc = tokenizer.encode(text, add_special_tokens=False)  # the template already wrote <bos>
    except TypeError:
        enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))


def prepare_prompt(text: str, tokenizer, tokens: MediaTokens, images: list[ImageFeatures] = (),
                   audios: list[np.ndarray] = (), videos: list[VideoFeatures] = (), *,
                   max_audio_seconds: float | None = MAX_CLIP_SECONDS) -> PreparedPrompt:
    """PreparedPrompt (token ids, token types, model media inputs) of a rendered prompt with placeholders."""
    images, audios, videos = list(images), list(audios), list(videos)
    expanded, clips = expand_placeholders(text, tokens, images, audios, videos, max_audio_seconds=max_audio_seconds)
    ids = np.array(_encode(tokenizer, expanded), dtype=np.int32)
    types = token_type_ids(ids, tokens)
    frames = [f for v in videos for f in v.frames]
    expected = {"image": sum(f.num_soft_tokens for f in images), "video": sum(f.num_soft_tokens for f in frames),
                "audio": sum(num_audio_tokens(len(c)) for c in clips)}
    for kind, n in expected.items():
        got = int((types == _KIND_TYPES[kind]).sum())
        if got != n:  # e.g. a tokenizer that does not treat the media tokens as single special tokens
            raise InputError(f"the tokenized prompt has {got} {kind} soft tokens but the {kind} inputs need {n}; "
                             f"does the tokenizer map {tokens.placeholder(kind)} to one id?")
    media: dict = {}
    if images:
        media["pixel_values"], media["image_position_ids"] = pad_image_features(images)
    if frames:
        media["video_pixel_values"], media["video_position_ids"] = pad_image_features(frames)
    if clips:
        media["audio_features"] = [audio_frames(c) for c in clips]
    return PreparedPrompt(ids, types, media, expanded)
