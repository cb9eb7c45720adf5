"""The Python API: a loaded model with its tokenizer and template, and text-in/text-out generation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import InputError
from .generate import GenerationStats, PromptCache, SamplingOptions, stream_tokens
from .model import masks
from .processing.audio import load_audio
from .processing.image import preprocess_image
from .processing.prompt import MediaTokens, prepare_prompt
from .processing.video import load_video
from .template import ChatTemplate
from .tokenizer import Tokenizer
from .tools import ParsedResponse, split_response
from .weights import load_model

MEDIA_KINDS = ("image", "audio", "video")


@dataclass
class Piece:
    """A streamed piece of a model turn: kind is "thinking" or "answer"."""

    text: str
    kind: str = "answer"


@dataclass
class Result:
    """A finished model turn: the raw text, its parts, why it stopped, and stats."""

    text: str
    tokens: list[int]
    parsed: ParsedResponse
    finish_reason: str
    stats: GenerationStats

    @property
    def content(self) -> str:
        return self.parsed.content

    @property
    def thinking(self) -> str | None:
        return self.parsed.thinking

    @property
    def tool_calls(self):
        return self.parsed.tool_calls


@dataclass
class Attachments:
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    videos: list = field(default_factory=list)


def user_message(text: str, media: Attachments) -> dict:
    """A user message whose media parts (rendered as placeholders by the template) precede its text."""
    parts = ([{"type": "image"} for _ in media.images] + [{"type": "video"} for _ in media.videos]
             + [{"type": "audio"} for _ in media.audios])
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}


def _fingerprint(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Gemma:
    """A loaded model: ``gemma(input_ids, **media)`` gives logits; ``generate``/``stream`` give text."""

    def __init__(self, model, model_dir: Path):
        self.model = model
        self.config = model.config
        self.model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        special = {name: self.tokenizer.special_token(name, default) for name, default in
                   (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"), ("unk_token", "<unk>"))}
        self.template = ChatTemplate.from_dir(model_dir, special_tokens=special)
        self.defaults = SamplingOptions.from_dir(model_dir, self.config)
        self.media_tokens = MediaTokens.from_model(self.config, self.tokenizer) if self.config.token_ids else None
        self._channel = (self.tokenizer.token_to_id("<|channel>"), self.tokenizer.token_to_id("<channel|>"))

    def __call__(self, input_ids, **kwargs):
        """Logits for token ids (B, L) with optional media and cache (see Model.__call__)."""
        return self.model(input_ids, **kwargs)

    # -- prompts --------------------------------------------------------------------------------------

    def load_media(self, images=(), audios=(), videos=(), *, max_soft_tokens: int | None = None,
                   video_fps: float | None = None, video_frames: int | None = None,
                   video_audio: bool = False) -> Attachments:
        """Preprocessed attachments from paths, bytes, PIL images or arrays ((array, rate) for audio)."""
        v = self.config.vision
        if (images or videos) and v is None:
            raise InputError("this model has no vision input; images and videos cannot be attached")
        if audios and self.config.audio is None:
            raise InputError("this model has no audio input; audio cannot be attached")
        budget = max_soft_tokens or (v.num_soft_tokens if v else 280)
        out = Attachments()
        for src in images:
            out.images.append(preprocess_image(src, budget, v.patch_size, v.pooling_kernel_size))
        for src in audios:
            out.audios.append(load_audio(*src) if isinstance(src, tuple) else load_audio(src))
        for src in videos:
            out.videos.append(load_video(src, num_frames=video_frames, fps=video_fps, include_audio=video_audio,
                                         patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size))
        return out

    def render(self, messages: list[dict], *, tools=None, enable_thinking: bool = False,
               add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation in the checkpoint's chat template."""
        return self.template.render(messages, tools=tools, enable_thinking=enable_thinking,
                                    add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, media: Attachments | None = None):
        """(token ids, token types, model media inputs, reuse keys) of a rendered prompt with placeholders."""
        media = media or Attachments()
        if self.media_tokens is None:
            if media.images or media.audios or media.videos:
                raise InputError("this model takes text only")
            ids = np.array(self.tokenizer.encode(text), dtype=np.int32)
            return ids, np.zeros_like(ids), {}, ids.tolist()
        prompt = prepare_prompt(text, self.tokenizer, self.media_tokens, media.images, media.audios, media.videos)
        return prompt.input_ids, prompt.token_types, prompt.media, self._token_keys(prompt)

    @staticmethod
    def _token_keys(prompt) -> list:
        """Token ids, each media soft token tagged with a fingerprint of the item (image, frame, clip) it is from."""
        m = prompt.media
        prints = {
            masks.TOKEN_TYPE_IMAGE: [_fingerprint(p) for p in m.get("pixel_values", [])],
            masks.TOKEN_TYPE_VIDEO: [_fingerprint(p) for p in m.get("video_pixel_values", [])],
            masks.TOKEN_TYPE_AUDIO: [_fingerprint(a) for a in m.get("audio_features", [])],
        }
        keys, run = [], {k: -1 for k in prints}
        types = prompt.token_types.tolist()
        for i, (tok, kind) in enumerate(zip(prompt.input_ids.tolist(), types)):
            if kind == 0:
                keys.append(tok)
                continue
            if i == 0 or types[i - 1] != kind:  # each image, frame and clip is one contiguous run
                run[kind] += 1
            keys.append((tok, prints[kind][run[kind]]))
        return keys

    # -- generation -----------------------------------------------------------------------------------

    def options(self, **overrides) -> SamplingOptions:
        """Sampling options: the checkpoint's defaults with the given fields replaced (None keeps the default)."""
        opts = replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None and k != "greedy"})
        if overrides.get("stop") is not None:
            opts = replace(opts, stop=tuple(overrides["stop"]))
        return opts.greedy() if overrides.get("greedy") else opts

    def stream_text(self, text: str, media: Attachments | None = None, *, opts: SamplingOptions,
                    cache: PromptCache | None = None, max_context: int | None = None, prefill_chunk: int = 512,
                    checkpoint_at: int | None = None) -> Iterator[Piece | Result]:
        """Stream Pieces (thought and answer text apart) for a rendered prompt, then one final Result."""
        ids, types, model_media, keys = self.encode(text, media)
        stats = GenerationStats()
        detok = self.tokenizer.detokenizer()
        open_id, close_id = self._channel
        in_thought, tokens, out, finish = False, [], "", "length"
        for tok in stream_tokens(self.model, ids, opts=opts, cache=cache, media=model_media, token_types=types,
                                 token_keys=keys, prefill_chunk=prefill_chunk, max_context=max_context,
                                 stats=stats, checkpoint_at=checkpoint_at):
            tokens.append(tok)
            piece = detok.add_token(tok)
            out += piece
            if tok in opts.eos_ids:
                finish = "stop"
                break
            if opts.stop and any(s in out for s in opts.stop):
                out, finish = out[: min(out.index(s) for s in opts.stop if s in out)], "stop_string"
                break
            if tok == open_id:
                in_thought = True
            elif tok == close_id:
                in_thought = False
            elif piece:
                yield Piece(piece, "thinking" if in_thought else "answer")
        out += detok.finalize()
        yield Result(out, tokens, split_response(out), finish, stats)

    def stream(self, prompt: str | list[dict], *, images=(), audios=(), videos=(), tools=None,
               enable_thinking: bool = False, cache: PromptCache | None = None, max_context: int | None = None,
               **sampling) -> Iterator[Piece | Result]:
        """Stream a reply to a user prompt (or a message list), media attached to the user turn."""
        media = self.load_media(images, audios, videos)
        messages = [user_message(prompt, media)] if isinstance(prompt, str) else list(prompt)
        text = self.render(messages, tools=tools, enable_thinking=enable_thinking)
        yield from self.stream_text(text, media, opts=self.options(**sampling), cache=cache, max_context=max_context)

    def generate(self, prompt: str | list[dict], **kwargs) -> Result:
        """The finished reply to a prompt (see stream for the arguments)."""
        result = None
        for item in self.stream(prompt, **kwargs):
            if isinstance(item, Result):
                result = item
        return result


def load(model: str | os.PathLike, *, dtype=None, revision: str | None = None,
         vision_mask: str | None = None) -> Gemma:
    """A Gemma for a hub repo id, a local Hugging Face checkpoint or a converted MLX directory."""
    net, model_dir = load_model(model, dtype=dtype, revision=revision, vision_mask=vision_mask)
    return Gemma(net, model_dir)


def generate(model: Gemma | str, prompt: str | list[dict], **kwargs) -> Result:
    """The finished reply of model (a Gemma or anything load accepts) to prompt."""
    g = model if isinstance(model, Gemma) else load(model)
    return g.generate(prompt, **kwargs)


def stream_generate(model: Gemma | str, prompt: str | list[dict], **kwargs) -> Iterator[str]:
    """Text pieces of the reply as they are generated (thinking text excluded)."""
    g = model if isinstance(model, Gemma) else load(model)
    for item in g.stream(prompt, **kwargs):
        if isinstance(item, Piece) and item.kind == "answer":
            yield item.text
