"""Training data: train.jsonl / valid.jsonl records → Samples (a PreparedPrompt and the tokens the loss reads).

A record is one of three forms:
  {"messages": [...]}                   chat form (OpenAI-style roles, tool calls, tool results, thinking); media
                                        parts {"type": "image"|"audio"|"video", "path": "rel/file"} name files
                                        relative to the data directory; the loss reads the model's turns only
  {"text": "..."}                       plain text; the loss reads all of it
  {"prompt": "...", "completion": "..."} a user turn and the model's answer (raw text when the model has no chat
                                        template); the loss reads the completion only
Chat records are rendered with the checkpoint's own template. Where the model's turns are is read off the
rendered tokens with markers derived from the template itself (what it adds as the generation prompt, and what
closes a model turn), never from hard-coded token ids. Media go through the same prepared-prompt path as inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, TemplateError
from ..processing.prompt import PreparedPrompt

MEDIA_KINDS = ("image", "audio", "video")
ROLES = ("system", "user", "assistant", "model", "tool", "developer")
MAX_LINE_BYTES = 1 << 24  # one JSON record; media live in files, so 16 MB of text is far beyond a real record


class DataError(InputError):
    """A training record that cannot be used: names the file, the line and the problem."""


@dataclass
class Sample:
    """One training sequence: its prepared prompt and which tokens are targets (True: predicted, in the loss)."""

    prompt: PreparedPrompt
    targets: np.ndarray  # (L,) bool; targets[t] means token t is predicted from tokens < t
    source: str = ""  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def target_count(self) -> int:
        return int(self.targets.sum())


@dataclass(frozen=True)
class TurnMarkers:
    """How the template marks the model's turns, read off renderings of a probe conversation.

    opener: the text between a user turn and the model's answer in a rendered conversation; closer: the first
    token after the answer; prompt_extra: what the generation prompt adds after the opener (Gemma 4 without
    thinking opens an empty thought channel), which a trained turn gets too, as prompt, so that training sees
    the model's turn as inference will.
    """

    opener_text: str
    opener: tuple[int, ...]
    closer: int
    prompt_extra_text: str
    prompt_extra: tuple[int, ...]

    @classmethod
    def from_template(cls, gemma, enable_thinking: bool = False) -> TurnMarkers:
        """The markers of gemma's chat template (with thinking on or off)."""
        user = [{"role": "user", "content": "PROBE_USER"}]
        answer = "PROBE_ANSWER"
        plain = gemma.render(user, add_generation_prompt=False, enable_thinking=enable_thinking)
        opened = gemma.render(user, add_generation_prompt=True, enable_thinking=enable_thinking)
        full = gemma.render(user + [{"role": "assistant", "content": answer}], add_generation_prompt=False,
                            enable_thinking=enable_thinking)
        at = full.find(answer)
        if not full.startswith(plain) or at <= len(plain):
            raise TemplateError("the chat template does not render a model turn after the user's, so the model's "
                                "turns cannot be found")
        tok = gemma.tokenizer
        opener_text = full[len(plain):at]
        generation_prompt = opened[len(plain):] if opened.startswith(plain) else ""
        extra = generation_prompt[len(opener_text):] if generation_prompt.startswith(opener_text) else ""
        tail = full[at + len(answer):]
        closer = tok.encode(tail) if tail else []
        if not closer:
            raise TemplateError("the chat template's model turn has no closing marker")
        return cls(opener_text, tuple(tok.encode(opener_text)), closer[0], extra,
                   tuple(tok.encode(extra)) if extra else ())

    def as_at_inference(self, text: str) -> str:
        """Rendered text with each model turn opened as the generation prompt opens it."""
        if not self.prompt_extra_text:
            return text
        parts = text.split(self.opener_text)
        out = [parts[0]]
        first_extra = self.prompt_extra_text[:1]
        for part in parts[1:]:
            # A turn that already starts like the extra (its own thought channel) keeps its own.
            out.append(part if part.startswith(first_extra) else self.prompt_extra_text + part)
        return self.opener_text.join(out)

    def model_turns(self, ids: np.ndarray) -> np.ndarray:
        """(L,) bool: the tokens the model writes in its turns (the closer included, the opener and the
        generation prompt's extra not)."""
        out = np.zeros(len(ids), dtype=bool)
        n, k, i = len(ids), len(self.opener), 0
        opener, extra = np.array(self.opener), np.array(self.prompt_extra, dtype=np.int64)
        while i + k <= n:
            if ids[i] == opener[0] and (ids[i:i + k] == opener).all():
                j = start = i + k
                if len(extra) and (ids[start:start + len(extra)] == extra).all():
                    j = start = start + len(extra)
                while j < n and ids[j] != self.closer:
                    j += 1
                out[start:min(j + 1, n)] = True
                i = j + 1
            else:
                i += 1
        return out


class DatasetReader:
    """Reads a data directory's records into Samples for one model."""

    def __init__(self, gemma, data_dir: str | Path, *, max_seq_length: int | None = None):
        self.gemma = gemma
        self.data_dir = Path(data_dir).expanduser().resolve()
        if not self.data_dir.is_dir():
            raise DataError(f"{data_dir}: no such data directory")
        self.max_seq_length = max_seq_length
        self._markers: dict[bool, TurnMarkers] = {}

    def markers(self, enable_thinking: bool) -> TurnMarkers:
        if enable_thinking not in self._markers:
            self._markers[enable_thinking] = TurnMarkers.from_template(self.gemma, enable_thinking)
        return self._markers[enable_thinking]

    def split(self, name: str, *, required: bool = True) -> list[Sample]:
        """The Samples of <data_dir>/<name>.jsonl (empty when not required and absent)."""
        path = self.data_dir / f"{name}.jsonl"
        if not path.is_file():
            if required:
                raise DataError(f"{path}: not found (a data directory holds train.jsonl and optionally "
                                f"valid.jsonl)")
            return []
        samples = []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{path.name}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{where}: a record of {len(raw)} bytes is too long")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    raise DataError(f"{where}: not a JSON record ({str(e)[:80]})") from None
                try:
                    samples.append(self.sample(record, where))
                except DataError:
                    raise
                except (InputError, TemplateError) as e:
                    raise DataError(f"{where}: {e}") from None
        if required and not samples:
            raise DataError(f"{path}: no records")
        return samples

    def sample(self, record, where: str = "") -> Sample:
        """The Sample of one record."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record is a JSON object, not {type(record).__name__}")
        forms = [k for k in ("messages", "text", "prompt") if k in record]
        if len(forms) != 1:
            raise DataError(f"{where}: a record has exactly one of 'messages', 'text' or 'prompt' + 'completion'")
        g = self.gemma
        if "text" in record:
            text = _string(record["text"], "text", where)
            ids = g.tokenizer.encode(text)
            ids = ids if ids[:1] == self._bos() else self._bos() + ids
            prompt = PreparedPrompt.from_ids(ids, g.config.token_ids, text=text)
            targets = np.ones(len(prompt), dtype=bool)
            targets[0] = False
        elif "prompt" in record:
            question = _string(record["prompt"], "prompt", where)
            answer = _string(record.get("completion"), "completion", where)
            if g.template is None:  # a base model: plain text, the loss on the completion's tokens
                head = self._bos() + g.tokenizer.encode(question)
                ids = head + g.tokenizer.encode(answer)
                prompt = PreparedPrompt.from_ids(ids, g.config.token_ids, text=question + answer)
                targets = np.zeros(len(ids), dtype=bool)
                targets[len(head):] = True
            else:
                return self._chat([{"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}], {}, where)
        else:
            return self._chat(record["messages"], record, where)
        return self._checked(Sample(prompt, targets, where))

    def _bos(self) -> list[int]:
        bos = self.gemma.tokenizer.bos_id
        return [] if bos is None else [bos]

    def _chat(self, messages, record: dict, where: str) -> Sample:
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' is a non-empty list of messages")
        media = {kind: [] for kind in MEDIA_KINDS}
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: message {i} needs a role, one of {', '.join(ROLES)}")
            m = dict(m, role="assistant" if m["role"] == "model" else m["role"])
            if isinstance(m.get("content"), list):
                parts = []
                for part in m["content"]:
                    if not isinstance(part, dict):
                        raise DataError(f"{where}: message {i} has a content part that is not an object")
                    if part.get("type") in MEDIA_KINDS:
                        media[part["type"]].append(self._media_path(part, where, i))
                        parts.append({"type": part["type"]})
                    else:
                        parts.append(part)
                m["content"] = parts
            clean.append(m)
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(f"{where}: a chat record needs at least one assistant message to learn from")
        g = self.gemma
        if g.template is None:
            raise DataError(f"{where}: this model has no chat template; use 'text' or 'prompt'/'completion' records")
        tools = record.get("tools")
        thinking = record.get("enable_thinking", False)
        if not isinstance(thinking, bool):
            raise DataError(f"{where}: 'enable_thinking' must be true or false")
        try:
            markers = self.markers(thinking)
            attachments = g.load_media(media["image"], media["audio"], media["video"])
            text = g.render(clean, tools=tools, add_generation_prompt=False, enable_thinking=thinking)
            prompt = g.encode(markers.as_at_inference(text), attachments)
        except (InputError, TemplateError) as e:
            raise DataError(f"{where}: {e}") from None
        return self._checked(Sample(prompt, markers.model_turns(prompt.input_ids), where))

    def _media_path(self, part: dict, where: str, i: int) -> Path:
        name = part.get("path")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: message {i} has a {part['type']} part without a 'path'")
        path = (self.data_dir / name).resolve()
        if not path.is_relative_to(self.data_dir):
            raise DataError(f"{where}: {name} is outside the data directory")
        if not path.is_file():
            raise DataError(f"{where}: {name} not found in {self.data_dir}")
        return path

    def _checked(self, sample: Sample) -> Sample:
        if self.max_seq_length is not None and len(sample) > self.max_seq_length:
            if any(s.start < self.max_seq_length < s.end for s in sample.prompt.spans):
                raise DataError(f"{sample.source}: {len(sample)} tokens, over --max-seq-length "
                                f"{self.max_seq_length}, and cutting it would split a media item")
            sample = truncate(sample, self.max_seq_length)
        if not sample.target_count:
            raise DataError(f"{sample.source}: no tokens to learn from (after truncation to "
                            f"{self.max_seq_length} tokens)" if self.max_seq_length else
                            f"{sample.source}: no tokens to learn from")
        return sample


def truncate(sample: Sample, length: int) -> Sample:
    """The first `length` tokens of a sample (media spans that end inside are kept whole by the caller)."""
    p = sample.prompt
    keep = {k: v for k, v in p.media.items()}
    prompt = PreparedPrompt(p.input_ids[:length], p.token_types[:length],
                            tuple(s for s in p.spans if s.end <= length), keep, p.text)
    return Sample(prompt, sample.targets[:length], sample.source)


def _string(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty string")
    return value
