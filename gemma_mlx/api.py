"""The Python API: a loaded model with its tokenizer, chat template and generation defaults; text in, text out."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


from .cache import PromptCache
from .errors import InputError, TemplateError
from .generation import GenerationStats, RunOptions, SamplingOptions, stream_tokens
from .prefill import DEFAULT_PREFILL_CHUNK
from .processing.audio import load_audio
from .processing.image import preprocess_image
from .processing.prompt import MediaTokens, PreparedPrompt, prepare_prompt
from .processing.video import load_video
from .template import ChatTemplate
from .tokenizer import Tokenizer
from .tools import ParsedResponse, ToolCall, ToolCallError, split_response
from .weights import load_model

SAMPLING_KEYS = tuple(f.name for f in fields(SamplingOptions) if f.name not in ("eos_ids", "suppress_ids"))


class Piece(str):
    """A streamed piece of a model turn. It is the text itself; ``kind`` is "answer", "thinking" or "tool_call"."""

    kind: str

    def __new__(cls, text: str, kind: str = "answer"):
        piece = super().__new__(cls, text)
        piece.kind = kind
        return piece

    def __repr__(self) -> str:
        return f"Piece({str.__repr__(self)}, kind={self.kind!r})"


@dataclass
class Result:
    """A finished model turn: its raw text (special tokens written out), its parts, why it stopped, and stats."""

    text: str
    tokens: list[int]
    parsed: ParsedResponse
    finish_reason: str  # "stop" (EOS), "stop_string", "length" (max_tokens), "context", "interrupted"
    stats: GenerationStats

    @property
    def content(self) -> str:
        """The answer, without thought text or tool calls."""
        return self.parsed.content

    @property
    def thinking(self) -> str | None:
        """The thought text (None when the model did not think)."""
        return self.parsed.thinking

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls that parsed."""
        return self.parsed.tool_calls

    @property
    def tool_errors(self) -> list[ToolCallError]:
        """Text that opened a tool call but did not parse, raw text kept."""
        return self.parsed.errors

    def as_dict(self) -> dict:
        """The result as plain JSON data."""
        return {"text": self.text, "content": self.content, "thinking": self.thinking,
                "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in self.tool_calls],
                "tool_errors": [{"raw": e.raw, "reason": e.reason} for e in self.tool_errors],
                "finish_reason": self.finish_reason, "tokens": self.tokens, "stats": self.stats.as_dict()}


@dataclass
class Attachments:
    """Preprocessed media of one message, with where each came from (a path, or None for bytes/arrays/images)."""

    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    sources: dict = field(default_factory=lambda: {"image": [], "audio": [], "video": []})

    def __bool__(self) -> bool:
        return bool(self.images or self.audios or self.videos)

    def extend(self, other: Attachments) -> None:
        self.images += other.images
        self.audios += other.audios
        self.videos += other.videos
        for kind in self.sources:
            self.sources[kind] += other.sources[kind]


def user_message(text: str, media: Attachments) -> dict:
    """A user message whose media parts (rendered as placeholders by the template) precede its text."""
    parts = []
    for kind in ("image", "video", "audio"):
        for src in media.sources[kind]:
            parts.append({"type": kind, "path": src} if src is not None else {"type": kind})
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}


def _source_path(src) -> str | None:
    return str(Path(src).expanduser().resolve()) if isinstance(src, (str, os.PathLike)) else None


class _TextStream:
    """Generated tokens in, Pieces out: thought, tool-call and answer text apart, structural tokens hidden, and
    text that could be the start of a stop string held back until it is known not to be one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], hidden_ids):
        self.tokenizer = tokenizer
        self.detok = tokenizer.detokenizer()
        switches = {"<|channel>": "thinking", "<channel|>": "answer", "<|tool_call>": "tool_call",
                    "<tool_call|>": "answer"}
        self.switch = {tokenizer.token_to_id(t): kind for t, kind in switches.items()
                       if tokenizer.token_to_id(t) is not None}
        self.hidden = set(hidden_ids)  # EOS ids: they end the turn, they are not text to show
        self.stop = stop
        self.kind = "answer"
        self.header = ""  # the "thought\n" label after <|channel> names the channel; it is not thought text
        self.text = ""  # everything, special tokens written out
        self.pending: list[tuple[str, str, int]] = []  # (kind, visible text, its offset in self.text)
        self.cut: int | None = None  # where a stop string starts, once one has appeared
        self.searched = 0  # stop strings were looked for in text before this offset

    def _visible(self, s: str) -> None:
        if self.kind == "thinking" and self.header:
            k = len(os.path.commonprefix([s, self.header]))
            if k == len(s) or k == len(self.header):
                self.header = self.header[k:]
                self.text, s = self.text + s[:k], s[k:]
            else:
                self.header = ""
        if s:
            self.pending.append((self.kind, s, len(self.text)))
            self.text += s

    def add(self, token: int) -> list[Piece]:
        """Pieces that can be shown now that token has been generated."""
        s = self.detok.add_token(token)
        if token in self.switch or token in self.hidden:
            special = self.tokenizer.id_to_token(token) or ""
            if s.endswith(special):  # text completed by this token (a held-back byte sequence) comes first
                self._visible(s[: len(s) - len(special)])
                self.text += special
            else:
                self._visible(s)
            if token in self.switch:
                self.kind = self.switch[token]
                self.header = "thought\n" if self.kind == "thinking" else ""
        else:
            self._visible(s)
        return self._flush()

    def finish(self) -> list[Piece]:
        """The last Pieces, once generation has ended."""
        self._visible(self.detok.finalize())
        return self._flush(final=True)

    def _flush(self, final: bool = False) -> list[Piece]:
        if self.stop and self.cut is None:
            found = [i for i in (self.text.find(s, self.searched) for s in self.stop) if i >= 0]
            if found:
                self.cut = min(found)
            self.searched = max(0, len(self.text) - max(map(len, self.stop)) + 1)
        limit = self.cut if self.cut is not None else len(self.text) - (0 if final else self._held())
        out: list[Piece] = []
        while self.pending and self.pending[0][2] < limit:
            kind, s, at = self.pending.pop(0)
            if at + len(s) > limit:
                self.pending.insert(0, (kind, s[limit - at:], limit))
                s = s[: limit - at]
            if out and out[-1].kind == kind:
                out[-1] = Piece(out[-1] + s, kind)
            else:
                out.append(Piece(s, kind))
        return out

    def _held(self) -> int:
        # The longest end of the text that a stop string begins with.
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]


class Gemma:
    """A loaded model: ``gemma(input_ids, **media)`` gives logits; ``generate`` and ``stream`` give text."""

    def __init__(self, model, model_dir: str | Path):
        self.model = model
        self.config = model.config
        self.model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        try:
            self.template = ChatTemplate.from_dir(model_dir)
        except TemplateError as e:  # the raw forward and token-level generation need no template
            self.template, self._template_error = None, e
        self.defaults = SamplingOptions.from_dir(model_dir, self.config)
        self.media_tokens = MediaTokens.from_model(self.config, self.tokenizer) if self.config.token_ids else None

    def __call__(self, input_ids, **kwargs):
        """Logits (B, L, vocab) for token ids (B, L) with optional media and cache (see Model.__call__)."""
        return self.model(input_ids, **kwargs)

    def __repr__(self) -> str:
        t = self.config.text
        return (f"Gemma({self.config.model_type}, {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
                f"from {self.model_dir})")

    # -- prompts --------------------------------------------------------------------------------------

    def load_media(self, images=(), audios=(), videos=(), *, max_soft_tokens: int | None = None,
                   video_fps: float | None = None, video_frames: int | None = None,
                   video_audio: bool = False) -> Attachments:
        """Preprocessed attachments from paths, bytes, PIL images or arrays ((array, sampling_rate) for audio)."""
        v = self.config.vision
        if (images or videos) and v is None:
            raise InputError("this model has no vision input; images and videos cannot be attached")
        if audios and self.config.audio is None:
            raise InputError("this model has no audio input; audio cannot be attached")
        budget = max_soft_tokens or (v.num_soft_tokens if v else 280)
        out = Attachments()
        for src in images:
            out.images.append(preprocess_image(src, budget, v.patch_size, v.pooling_kernel_size))
            out.sources["image"].append(_source_path(src))
        for src in audios:
            out.audios.append(load_audio(*src) if isinstance(src, tuple) else load_audio(src))
            out.sources["audio"].append(_source_path(src))
        for src in videos:
            out.videos.append(load_video(src, num_frames=video_frames, fps=video_fps, include_audio=video_audio,
                                         patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size))
            out.sources["video"].append(_source_path(src))
        return out

    def render(self, messages: list[dict], *, tools=None, enable_thinking: bool = False,
               add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation in the checkpoint's chat template."""
        if self.template is None:
            raise self._template_error
        return self.template.render(messages, tools=tools, enable_thinking=enable_thinking,
                                    add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, media: Attachments | None = None) -> PreparedPrompt:
        """The PreparedPrompt (ids, token types, media spans and inputs, cache keys) of a rendered prompt."""
        media = media or Attachments()
        if self.media_tokens is None:
            if media:
                raise InputError("this model takes text only")
            return PreparedPrompt.from_ids(self.tokenizer.encode(text), {}, text=text)
        return prepare_prompt(text, self.tokenizer, self.media_tokens, media.images, media.audios, media.videos)

    def new_cache(self, max_context: int | None = None) -> PromptCache:
        """An empty prompt cache: pass it to successive calls so each prefills only what differs."""
        return PromptCache.new(self.model, max_context=max_context)

    # -- generation -----------------------------------------------------------------------------------

    def options(self, **overrides) -> SamplingOptions:
        """The checkpoint's sampling defaults with the given fields replaced (None keeps a default)."""
        unknown = set(overrides) - set(SAMPLING_KEYS) - {"greedy"}
        if unknown:
            raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {', '.join(SAMPLING_KEYS)}, greedy")
        given = {k: v for k, v in overrides.items() if v is not None and k != "greedy"}
        if "stop" in given:
            given["stop"] = (given["stop"],) if isinstance(given["stop"], str) else tuple(given["stop"])
        opts = replace(self.defaults, **given)
        return (opts.greedy() if overrides.get("greedy") else opts).check()

    def stream_text(self, text: str, media: Attachments | None = None, *, opts: SamplingOptions,
                    cache: PromptCache | None = None, max_context: int | None = None,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK, checkpoint_at: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Piece | Result]:
        """Stream Pieces of the reply to a rendered prompt, then one final Result."""
        prompt = self.encode(text, media)
        stats = GenerationStats()
        stream = _TextStream(self.tokenizer, opts.stop, opts.eos_ids)
        tokens = []
        run = RunOptions(prefill_chunk=prefill_chunk, max_context=max_context, checkpoint_at=checkpoint_at,
                         should_stop=should_stop)
        for token in stream_tokens(self.model, prompt, opts, cache=cache, run=run, stats=stats):
            tokens.append(token)
            yield from stream.add(token)
            if stream.stopped:
                stats.finish_reason = "stop_string"
                break
        yield from stream.finish()
        text = stream.final_text()
        yield Result(text, tokens, split_response(text), stats.finish_reason, stats)

    def stream(self, prompt: str | list[dict], *, images=(), audios=(), videos=(), system: str | None = None,
               tools: list | None = None, enable_thinking: bool = False, cache: PromptCache | None = None,
               max_context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               should_stop: Callable[[], bool] | None = None, **sampling) -> Iterator[Piece | Result]:
        """Stream Pieces of the reply to a prompt (a user message, or a whole message list), then its Result.

        images/audios/videos (paths, bytes, PIL images, arrays; (array, rate) for audio) are attached to the user
        message, or fill the media parts of a message list in order. sampling: temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, seed, max_tokens, stop, greedy (defaults: generation_config.json).
        """
        opts = self.options(**sampling)
        media = self.load_media(images, audios, videos)
        if isinstance(prompt, str):
            messages = [user_message(prompt, media)]
        else:
            messages = list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        text = self.render(messages, tools=tools, enable_thinking=enable_thinking)
        yield from self.stream_text(text, media, opts=opts, cache=cache, max_context=max_context,
                                    prefill_chunk=prefill_chunk, should_stop=should_stop)

    def generate(self, prompt: str | list[dict], **kwargs) -> Result:
        """The finished reply to a prompt (keywords as for stream)."""
        return _last(self.stream(prompt, **kwargs))


def _last(stream) -> Result:
    result = None
    for item in stream:
        result = item
    return result


def load(model: str | os.PathLike, *, dtype=None, revision: str | None = None,
         vision_mask: str | None = None) -> Gemma:
    """A Gemma from a hub repo id, a local Hugging Face checkpoint or a converted MLX directory."""
    net, model_dir = load_model(model, dtype=dtype, revision=revision, vision_mask=vision_mask)
    return Gemma(net, model_dir)


def generate(model: Gemma | str | os.PathLike, prompt: str | list[dict], **kwargs) -> Result:
    """The finished reply of model (a Gemma, or anything load takes) to prompt; keywords as for Gemma.stream."""
    g = model if isinstance(model, Gemma) else load(model)
    return g.generate(prompt, **kwargs)


def stream_generate(model: Gemma | str | os.PathLike, prompt: str | list[dict], **kwargs) -> Iterator[Piece]:
    """Pieces of the reply as they are generated (str; ``piece.kind`` tells thinking and tool calls apart)."""
    g = model if isinstance(model, Gemma) else load(model)
    for item in g.stream(prompt, **kwargs):
        if isinstance(item, Piece):
            yield item
