"""The Python API: a loaded model with its tokenizer, chat template and generation defaults; text in, text out."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


from .cache import PromptCache
from .engine import Engine
from .errors import InputError, TemplateError
from .events import Event, Result, TextStream, final_result
from .generation import GenerationStats, RunOptions, SamplingOptions, stream_tokens
from .prefill import DEFAULT_PREFILL_CHUNK
from .processing.audio import load_audio
from .processing.image import preprocess_image
from .processing.prompt import MediaTokens, PreparedPrompt, prepare_prompt
from .processing.video import load_video
from .template import ChatTemplate
from .tokenizer import Tokenizer, strip_marks
from .weights import load_model

PROMPT_KEYS = ("prompt", "images", "audios", "videos", "system", "tools", "enable_thinking",
               "allow_special_in_content")  # what batch_generate reads from a dict prompt besides sampling
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingOptions) if f.name not in ("eos_ids", "suppress_ids"))


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
               add_generation_prompt: bool = True, allow_special_in_content: bool = False) -> str:
        """The prompt text of a conversation in the checkpoint's chat template.

        Special-token strings in the messages, tools and documents (``<|turn>``, ``<|tool_call>``, ``<bos>``,
        ``<|image|>``...) are marked as plain text (tokenizer.TEXT_MARK; ``tokenizer.strip_marks`` removes the
        marks), so content cannot forge turns, thoughts, calls or media; allow_special_in_content=True renders
        them as the reference does, as control tokens.
        """
        if self.template is None:
            raise self._template_error
        return self.template.render(messages, tools=tools, enable_thinking=enable_thinking,
                                    add_generation_prompt=add_generation_prompt,
                                    escape=None if allow_special_in_content else self.tokenizer.protect)

    def encode(self, text: str, media: Attachments | None = None, *,
               allow_special_in_content: bool = False) -> PreparedPrompt:
        """The PreparedPrompt (ids, token types, media spans and inputs, cache keys) of a rendered prompt.

        Text that render marked as content is read as plain text; allow_special_in_content=True drops the marks
        first, so every special-token string in text is a control token.
        """
        if allow_special_in_content:
            text = strip_marks(text)
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
                    cache: PromptCache | None = None, run: RunOptions = RunOptions()) -> Iterator[Event]:
        """Events of the reply to a rendered prompt: its text pieces, then the final event with the Result."""
        yield from self.stream_prepared(self.encode(text, media), opts=opts, cache=cache, run=run)

    def stream_prepared(self, prompt: PreparedPrompt, *, opts: SamplingOptions, cache: PromptCache | None = None,
                        run: RunOptions = RunOptions()) -> Iterator[Event]:
        """Events of the reply to a prepared prompt (see prepare), generated alone (the engine batches)."""
        stats = GenerationStats()
        stream = TextStream(self.tokenizer, opts.stop, opts.eos_ids)
        for token in stream_tokens(self.model, prompt, opts, cache=cache, run=run, stats=stats):
            yield from stream.add(token)
            if stream.stopped:
                stats.finish_reason = "stop_string"
                break
        yield from stream.finish()
        yield stream.final_event(stats.finish_reason, stats)

    def prepare(self, prompt: str | list[dict], *, images=(), audios=(), videos=(), system: str | None = None,
                tools: list | None = None, enable_thinking: bool = False,
                allow_special_in_content: bool = False) -> PreparedPrompt:
        """The PreparedPrompt of a prompt (a user message, or a whole message list) with its media: what
        stream_prepared and the engine (Engine.submit) take. Arguments as for stream."""
        media = self.load_media(images, audios, videos)
        messages = [user_message(prompt, media)] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        text = self.render(messages, tools=tools, enable_thinking=enable_thinking,
                           allow_special_in_content=allow_special_in_content)
        return self.encode(text, media)

    def engine(self, **kwargs) -> Engine:
        """A batch engine over this model whose handles also give text Events (keywords: see Engine)."""
        return Engine(self.model, tokenizer=self.tokenizer, **kwargs)

    def stream(self, prompt: str | list[dict], *, images=(), audios=(), videos=(), system: str | None = None,
               tools: list | None = None, enable_thinking: bool = False, cache: PromptCache | None = None,
               max_context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               should_stop: Callable[[], bool] | None = None, allow_special_in_content: bool = False,
               **sampling) -> Iterator[Event]:
        """Events of the reply to a prompt (a user message, or a whole message list): text, then the Result.

        images/audios/videos (paths, bytes, PIL images, arrays; (array, rate) for audio) are attached to the user
        message, or fill the media parts of a message list in order. sampling: temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, seed, max_tokens, stop, greedy (defaults: generation_config.json).
        Message text is read as plain text unless allow_special_in_content (see render).
        """
        opts = self.options(**sampling)
        prepared = self.prepare(prompt, images=images, audios=audios, videos=videos, system=system, tools=tools,
                                enable_thinking=enable_thinking, allow_special_in_content=allow_special_in_content)
        run = RunOptions(prefill_chunk=prefill_chunk, max_context=max_context, should_stop=should_stop)
        yield from self.stream_prepared(prepared, opts=opts, cache=cache, run=run)

    def generate(self, prompt: str | list[dict], **kwargs) -> Result:
        """The finished reply to a prompt (keywords as for stream)."""
        return final_result(self.stream(prompt, **kwargs))

    def batch_generate(self, prompts: list, *, max_batch: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                       max_context: int | None = None, **sampling) -> list[Result]:
        """One Result per prompt, generated together by the engine (each equal to its solo generate when greedy).

        A prompt is a string, a message list, or a dict with "prompt" and any of images, audios, videos, system,
        tools, enable_thinking and sampling options of its own (these override the shared ``sampling``).
        """
        if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__iter__"):
            raise InputError("batch_generate takes a list of prompts")
        requests = []
        for i, item in enumerate(prompts):
            spec = dict(item) if isinstance(item, dict) else {"prompt": item}
            if "prompt" not in spec:
                raise InputError(f"prompt {i}: a dict prompt needs the key 'prompt'")
            unknown = set(spec) - set(PROMPT_KEYS) - set(SAMPLING_KEYS) - {"greedy"}
            if unknown:
                raise InputError(f"prompt {i}: unknown key(s) {sorted(unknown)}")
            own = {k: spec.pop(k) for k in list(spec) if k not in PROMPT_KEYS}
            opts = self.options(**{**sampling, **own})
            requests.append((self.prepare(spec.pop("prompt"), **spec), opts))
        engine = self.engine(max_batch=max_batch, prefill_chunk=prefill_chunk, max_context=max_context)
        handles = [engine.submit(prepared, opts) for prepared, opts in requests]
        return [final_result(h.events()) for h in handles]


def load(model: str | os.PathLike, *, dtype=None, revision: str | None = None,
         vision_mask: str | None = None, adapter: str | os.PathLike | None = None) -> Gemma:
    """A Gemma from a hub repo id, a local Hugging Face checkpoint or a converted MLX directory; adapter: a
    LoRA adapter directory (ours or PEFT's) put on it."""
    net, model_dir = load_model(model, dtype=dtype, revision=revision, vision_mask=vision_mask)
    if adapter is not None:
        from .finetune.lora import load_adapter

        load_adapter(net, adapter)
    return Gemma(net, model_dir)


def generate(model: Gemma | str | os.PathLike, prompt: str | list[dict], **kwargs) -> Result:
    """The finished reply of model (a Gemma, or anything load takes) to prompt; keywords as for Gemma.stream."""
    g = model if isinstance(model, Gemma) else load(model)
    return g.generate(prompt, **kwargs)


def batch_generate(model: Gemma | str | os.PathLike, prompts: list, **kwargs) -> list[Result]:
    """One Result per prompt, generated together in batches (see Gemma.batch_generate)."""
    g = model if isinstance(model, Gemma) else load(model)
    return g.batch_generate(prompts, **kwargs)


def stream_generate(model: Gemma | str | os.PathLike, prompt: str | list[dict], **kwargs) -> Iterator[Event]:
    """Events of the reply as it is generated (``event.kind`` tells thinking and tool calls apart; the last
    event, ``event.done``, carries the Result); keywords as for Gemma.stream."""
    g = model if isinstance(model, Gemma) else load(model)
    yield from g.stream(prompt, **kwargs)
