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

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

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
_TYPE_KINDS = {v: k for k, v in _KIND_TYPES.items()}


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


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's soft tokens sit in a prompt: positions [start, end), item ``item`` of its kind."""

    kind: str  # "image", "video" (one frame) or "audio" (one clip)
    start: int
    end: int
    item: int  # index among the model inputs of its kind (images, video frames, audio clips), in prompt order
    fingerprint: str = ""  # of the item's data: the same placeholder ids with other media behind never match

    @property
    def bidirectional(self) -> bool:
        """Whether the span's tokens attend to each other both ways (an image or a video frame, not audio)."""
        return self.kind != "audio"


def media_items(media: Mapping) -> dict[str, list[dict]]:
    """The model media inputs (Model.embed_inputs keywords) split per item: {kind: [that item's keywords]}."""
    def paired(key, other, names):
        first, second = media.get(key), media.get(other)
        first = [] if first is None else list(first)
        second = [] if second is None else list(second)
        if len(first) != len(second) and (names[1] != "mask" or second):
            raise InputError(f"{len(first)} {key} item(s) but {len(second)} {other} item(s)")
        return [dict(zip(names, pair)) for pair in zip(first, second)] if second else [{names[0]: f} for f in first]

    return {"image": paired("pixel_values", "image_position_ids", ("pixel_values", "position_ids")),
            "video": paired("video_pixel_values", "video_position_ids", ("pixel_values", "position_ids")),
            "audio": paired("audio_features", "audio_mask", ("features", "mask"))}


def _fingerprint(item: dict) -> str:
    digest = hashlib.sha1()
    for value in item.values():
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def media_spans(token_types, media: Mapping | None = None, *, fingerprints: bool = True, checked: bool = True,
                offset: int = 0) -> tuple[MediaSpan, ...]:
    """The media spans of token types (L,) or (B, L) (flat positions from offset), checked against the media.

    Each maximal run of one media type is one item (delimiters separate images, frames and clips), counted per
    kind in order. With fingerprints, each span carries a hash of its item's data; with checked, the number of
    runs of each kind must equal the number of items given. The one place that finds where media sits.
    """
    types = np.asarray(token_types)
    rows = types.reshape(1, -1) if types.ndim < 2 else types.reshape(-1, types.shape[-1])
    items = media_items(media or {})
    spans, count = [], dict.fromkeys(_KIND_TYPES, 0)
    for r, row in enumerate(rows):
        edges = np.flatnonzero(np.diff(row, prepend=TOKEN_TYPE_TEXT, append=TOKEN_TYPE_TEXT))
        for start, end in zip(edges[:-1].tolist(), edges[1:].tolist()):
            value = int(row[start])
            if value == TOKEN_TYPE_TEXT:
                continue
            if value not in _TYPE_KINDS:
                raise InputError(f"token type {value} at position {start} is none of 0 text, 1 image, 2 video, "
                                 f"3 audio")
            kind = _TYPE_KINDS[value]
            i = count[kind]
            count[kind] += 1
            fp = _fingerprint(items[kind][i]) if fingerprints and i < len(items[kind]) else ""
            first = offset + r * row.size
            spans.append(MediaSpan(kind, first + start, first + end, i, fp))
    for kind, n in count.items():
        if checked and n != len(items[kind]):
            raise InputError(f"the prompt has {n} {kind} placeholder run(s) but {len(items[kind])} {kind} "
                             f"input(s) were given; each {'video frame' if kind == 'video' else kind} is one run "
                             f"of placeholder tokens")
    return tuple(spans)


@dataclass
class PreparedPrompt:
    """A prompt ready for the model: what every later stage (prefill, masks, cache reuse) reads.

    ``spans`` say where each media item sits; nothing downstream works that out again from the ids or types.
    """

    input_ids: np.ndarray  # (L,) int32
    token_types: np.ndarray  # (L,) int32 mm_token_type_ids: 0 text, 1 image, 2 video, 3 audio
    spans: tuple[MediaSpan, ...]  # in prompt order
    media: dict  # keyword arguments for Model.embed_inputs / Model.__call__, items in span order per kind
    text: str = ""  # the expanded prompt text

    @classmethod
    def from_ids(cls, input_ids, placeholder_ids: Mapping[str, int], media: Mapping | None = None,
                 text: str = "") -> PreparedPrompt:
        """The prepared prompt of token ids whose media placeholders (ids by kind) are filled from media."""
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        if not len(ids):
            raise InputError("the prompt is empty")
        types = token_type_ids(ids, placeholder_ids)
        media = dict(media or {})
        return cls(ids, types, media_spans(types, media), media, text)

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def keys(self) -> list:
        """Cache keys: token ids, each media soft token paired with its item's fingerprint."""
        keys: list = self.input_ids.tolist()
        for span in self.spans:
            keys[span.start:span.end] = [(t, span.fingerprint) for t in keys[span.start:span.end]]
        return keys

    def spans_within(self, start: int, end: int) -> list[MediaSpan]:
        """The spans with at least one token in positions [start, end)."""
        return [s for s in self.spans if s.start < end and s.end > start]


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


def token_type_ids(input_ids, placeholder_ids: Mapping[str, int]) -> np.ndarray:
    """mm_token_type_ids (same shape, int32): 1 image, 2 video, 3 audio soft tokens; 0 for everything else.

    placeholder_ids: the soft-token id of each kind present ("image", "video", "audio"; other keys ignored), e.g.
    a checkpoint's ``config.token_ids`` or ``MediaTokens.ids``. The one place token types are made.
    """
    ids = np.asarray(input_ids)
    types = np.full(ids.shape, TOKEN_TYPE_TEXT, np.int32)
    for kind, value in _KIND_TYPES.items():
        if placeholder_ids.get(kind) is not None:
            types[ids == placeholder_ids[kind]] = value
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
    """The PreparedPrompt (token ids, token types, media spans and inputs, cache keys) of a rendered prompt."""
    images, audios, videos = list(images), list(audios), list(videos)
    expanded, clips = expand_placeholders(text, tokens, images, audios, videos, max_audio_seconds=max_audio_seconds)
    ids = np.array(_encode(tokenizer, expanded), dtype=np.int32)
    types = token_type_ids(ids, tokens.ids)
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
    return PreparedPrompt.from_ids(ids, tokens.ids, media, expanded)
