"""Placeholder expansion: a rendered prompt plus preprocessed media -> token ids, token types, media arrays.

Each ``<|image|>`` becomes ``<|image>`` + N×``<|image|>`` + ``<image|>``; each ``<|audio|>`` becomes
``<|audio>`` + n×``<|audio|>`` + ``<audio|>`` (one span per ≤ 30 s clip); each ``<|video|>`` becomes its frames
joined by spaces, ``"MM:SS <|image>" + N×"<|video|>" + "<image|>"`` (then the soundtrack's audio spans when
requested). Placeholders are consumed in order per modality, as Gemma4UnifiedProcessor does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..model.masks import TOKEN_TYPE_AUDIO, TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO
from .audio import audio_frames, split_clips
from .image import ImageFeatures, pad_features
from .video import VideoFeatures


@dataclass(frozen=True)
class MediaTokens:
    """The special-token strings and ids of a checkpoint (tiny test models use small ids)."""

    image: str
    audio: str
    video: str
    boi: str
    eoi: str
    boa: str
    eoa: str
    ids: dict = field(default_factory=dict)  # image/audio/video soft-token ids

    @classmethod
    def from_model(cls, config, tokenizer) -> MediaTokens:
        """Token strings looked up by the ids the model config gives."""
        t = config.token_ids

        def name(key, default):
            return tokenizer.id_to_token(t[key]) if key in t else default

        return cls(image=name("image", "<|image|>"), audio=name("audio", "<|audio|>"),
                   video=name("video", "<|video|>"), boi=name("boi", "<|image>"), eoi=name("eoi", "<image|>"),
                   boa=name("boa", "<|audio>"), eoa=name("eoa", "<audio|>"),
                   ids={k: t[k] for k in ("image", "audio", "video") if k in t})


@dataclass
class PreparedPrompt:
    input_ids: np.ndarray  # (L,) int32
    token_types: np.ndarray  # (L,) int32: 0 text, 1 image, 2 video, 3 audio
    media: dict  # keyword arguments for Model.embed_inputs


def expand_placeholders(text: str, tokens: MediaTokens, images=(), audios=(), videos=()
                        ) -> tuple[str, list[np.ndarray]]:
    """(prompt text with every media placeholder expanded, the audio clips in order of appearance)."""
    images, audios, videos = list(images), list(audios), list(videos)
    counts = {tokens.image: 0, tokens.audio: 0, tokens.video: 0}
    pattern = re.compile("|".join(re.escape(p) for p in counts))
    clips: list[np.ndarray] = []

    def audio_span(wave) -> str:
        parts = split_clips(wave)
        clips.extend(parts)
        return "".join(f"{tokens.boa}{tokens.audio * len(audio_frames(c))}{tokens.eoa}" for c in parts)

    def replace(m):
        kind = m.group()
        i = counts[kind]
        counts[kind] += 1
        if kind == tokens.image:
            if i >= len(images):
                return kind
            return f"{tokens.boi}{tokens.image * images[i].num_soft_tokens}{tokens.eoi}"
        if kind == tokens.audio:
            return audio_span(audios[i]) if i < len(audios) else kind
        if i >= len(videos):
            return kind
        v = videos[i]
        frames = " ".join(f"{t} {tokens.boi}{tokens.video * f.num_soft_tokens}{tokens.eoi}"
                          for t, f in zip(v.timestamps, v.frames))
        return frames + (audio_span(v.audio) if v.audio is not None else "")

    out = pattern.sub(replace, text)
    for kind, given in ((tokens.image, len(images)), (tokens.audio, len(audios)), (tokens.video, len(videos))):
        if counts[kind] != given:
            raise InputError(f"the prompt has {counts[kind]} {kind} placeholder(s) but {given} "
                             f"{'image' if kind == tokens.image else 'audio' if kind == tokens.audio else 'video'}"
                             f" input(s) were given")
    return out, clips


def prepare_prompt(text: str, tokenizer, tokens: MediaTokens, images: list[ImageFeatures] = (),
                   audios: list[np.ndarray] = (), videos: list[VideoFeatures] = ()) -> PreparedPrompt:
    """Token ids, token types and model media inputs for a rendered prompt with placeholders."""
    expanded, clips = expand_placeholders(text, tokens, images, audios, videos)
    ids = np.array(tokenizer.encode(expanded), dtype=np.int32)
    types = np.zeros_like(ids)
    for key, kind in (("image", TOKEN_TYPE_IMAGE), ("video", TOKEN_TYPE_VIDEO), ("audio", TOKEN_TYPE_AUDIO)):
        if key in tokens.ids:
            types[ids == tokens.ids[key]] = kind
    media: dict = {}
    if images:
        media["pixel_values"], media["image_position_ids"] = pad_features(list(images))
    if clips:
        media["audio_features"] = [audio_frames(c) for c in clips]
    frames = [f for v in videos for f in v.frames]
    if frames:
        media["video_pixel_values"], media["video_position_ids"] = pad_features(frames)
    return PreparedPrompt(ids, types, media)
