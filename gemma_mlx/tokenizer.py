"""A checkpoint's tokenizer (tokenizer.json through the Rust `tokenizers` library) and UTF-8-safe streaming decode.

The Gemma 4 chat template writes ``<bos>`` itself, so ``encode`` adds no special tokens unless asked. When asked,
tokenizer.json's post-processor decides (for Gemma 4 it adds nothing). ``add_bos_token``/``add_eos_token`` in
tokenizer_config.json are ignored, as transformers 5 ignores them whenever a tokenizer.json exists.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from .errors import InputError, WeightsError
from .jsonfile import read_json_object, regular_file

# Gemma's chat specials at their ids in the real 262 144-token vocabulary; tiny models keep them there.
GEMMA_CHAT_SPECIALS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50,
    "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101,
    "<|turn>": 105, "<turn|>": 106,
}

# Gemma's tokenizer.json is 32 MB; a file 30 times that is not a tokenizer.
MAX_TOKENIZER_BYTES = 1 << 30

# Private-use characters (plane 15) that keep message content plain text through the chat template: a special-token
# string in content gets TEXT_MARK after its first character (so nothing downstream, template, placeholder
# expansion or the tokenizer's own split, reads it as a token), and a mark character that content itself holds
# is kept as TEXT_ESCAPE + it. Tokenizer.encode reads segments holding marks as plain text.
TEXT_MARK, TEXT_ESCAPE = "\U000F0000", "\U000F0001"
_MARKS = re.compile(f"{TEXT_ESCAPE}(.)|{TEXT_MARK}", re.S)
_MARK_CHARS = re.compile(f"[{TEXT_MARK}{TEXT_ESCAPE}]")


def strip_marks(text: str) -> str:
    """text without the content marks of Tokenizer.protect (the text the model reads)."""
    return _MARKS.sub(lambda m: m.group(1) or "", text) if _MARK_CHARS.search(text) else text


# transformers' named special-token attributes (the variables a chat template sees besides extra_special_tokens).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# GemmaTokenizer's constructor defaults, which transformers applies when tokenizer_config.json leaves them out.
_GEMMA_DEFAULTS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "mask_token": "<mask>"}


def special_tokens_map(config: dict) -> dict[str, str]:
    """Named special-token strings of a tokenizer_config.json, as transformers' ``special_tokens_map`` gives them."""
    out = dict(_GEMMA_DEFAULTS) if str(config.get("tokenizer_class", "Gemma")).startswith("Gemma") else {}
    named = {name: config[name] for name in SPECIAL_TOKEN_NAMES if name in config}
    if isinstance(config.get("extra_special_tokens"), dict):  # model-specific names (image_token, ...)
        named.update(config["extra_special_tokens"])
    for name, value in named.items():
        value = value.get("content") if isinstance(value, dict) else value  # a serialised AddedToken
        if isinstance(value, str):
            out[name] = value
        else:  # an explicit null removes a default
            out.pop(name, None)
    return out


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise InputError(f"text to tokenize must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise InputError(f"the text is not valid Unicode: {bad!r} at character {e.start} is a lone surrogate "
                         "(invalid UTF-8 read with surrogateescape, or a broken string)") from None


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer.json; special tokens by name and id."""

    def __init__(self, rust: _RustTokenizer, config: dict | None = None):
        self._tok = rust
        self.config = config or {}
        self.special_tokens = special_tokens_map(self.config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer in path (tokenizer.json plus an optional tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        info = regular_file(file, WeightsError, "tokenizer.json")  # a FIFO would block the Rust reader forever
        if info is None:
            raise WeightsError(f"{path} has no tokenizer.json (copy it from the original checkpoint)")
        if info.st_size > MAX_TOKENIZER_BYTES:
            raise WeightsError(f"{file}: {info.st_size} bytes is too large for a tokenizer (limit "
                               f"{MAX_TOKENIZER_BYTES})")
        try:
            rust = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for malformed files
            raise WeightsError(f"{file} cannot be read as a tokenizer: {e}") from None
        config = read_json_object(path / "tokenizer_config.json", missing={})
        return cls(rust, config)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    def special_token(self, name: str, default: str) -> str:
        """The string of a named special token (bos_token, eos_token, ...), or default if the config has none."""
        return self.special_tokens.get(name, default)

    @cached_property
    def _added(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.content}

    @cached_property
    def _added_pattern(self) -> re.Pattern | None:
        # Longest first: at a position the longest token wins, as in the Rust library's leftmost-longest split.
        tokens = sorted(self._added, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    @cached_property
    def _text_tok(self) -> _RustTokenizer:
        # The same pipeline without its added tokens: every string is read as text, nothing as a control token.
        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = []
        return _RustTokenizer.from_str(json.dumps(spec))

    def protect(self, text: str) -> str:
        """text with every special-token string in it marked as plain text (see TEXT_MARK); encode reads the
        marked text as the characters it spells, and strip_marks gives the text back."""
        if _MARK_CHARS.search(text):
            text = _MARK_CHARS.sub(lambda m: TEXT_ESCAPE + m.group(), text)
        pattern = self._added_pattern
        # Marking one token can leave an overlapping one (tokens "ab", "bc" in "abc"): repeat until none is left.
        while pattern is not None and pattern.search(text):
            text = pattern.sub(lambda m: m.group()[0] + TEXT_MARK + m.group()[1:], text)
        return text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of text read as plain text: special-token strings in it are spelled out, never control tokens."""
        _check_text(text)
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; special-token strings in text map to their ids, except those marked by protect,
        which are read as text; no <bos> is added by default."""
        _check_text(text)
        if not _MARK_CHARS.search(text):
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._encode_marked(text, add_special_tokens).ids

    def _encode_marked(self, text: str, add_special_tokens: bool):
        # The Rust library's own order: split at the added tokens, then read each piece between them through the
        # normalizer, pre-tokenizer and model; a piece holding marks is read, unmarked, as plain text.
        from tokenizers import Encoding

        pieces, tokens, pos = [], [], 0
        for m in self._added_pattern.finditer(text) if self._added_pattern else ():
            pieces.append(text[pos:m.start()])
            tokens.append(m.group())
            pos = m.end()
        pieces.append(text[pos:])
        read = self._text_tok.encode_batch([strip_marks(p) for p in pieces], add_special_tokens=False)
        specials = self._tok.encode_batch(tokens, add_special_tokens=False) if tokens else []
        parts = [read[0]]
        for special, piece in zip(specials, read[1:]):
            parts += [special, piece]
        return self._tok.post_process(Encoding.merge(parts, growing_offsets=True),
                                      add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (special tokens written out unless skip_special_tokens)."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            # The Rust decoder silently drops unknown ids; a model whose vocabulary outgrows its tokenizer must not.
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise InputError(f"token id {bad} is outside the tokenizer's vocabulary of {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None if out of range."""
        return self._tok.id_to_token(int(token_id))

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer over this tokenizer."""
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    It re-decodes a short window (the last emitted piece plus the pending ids) with the tokenizer's own decoder and
    emits what the pending ids add, once that no longer ends in U+FFFD. Decoding through the real decoder keeps it
    exact for any tokenizer.json; the window makes it right even for decoders that strip a leading space per call.
    mlx-lm's SPMStreamingDetokenizer gives the same pieces on Gemma's tokenizer (tested), but it needs a
    transformers tokenizer, builds a 262 144-entry token table (0.2 s) per instance, and fits only SPM decoders.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the window: the ids of the last emitted piece
        self._read = 0    # ids before this are emitted

    def _new_text(self, force: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read])
        now = decode(self.tokens[self._prefix:])
        if not force and (now.endswith("\ufffd") or len(now) <= len(before)):
            return ""
        if now.startswith(before):
            piece = now[len(before):]
        else:  # bytes that only decode with the pending ids (never on valid UTF-8): decode the pending ids alone
            piece = decode(self.tokens[self._read:])
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece

    def add_token(self, token_id: int) -> str:
        """Add one id; return the newly completed text (empty while a character is incomplete)."""
        self.tokens.append(int(token_id))
        return self._new_text(force=False)

    def finalize(self) -> str:
        """Flush whatever is pending (an invalid byte sequence becomes U+FFFD)."""
        return self._new_text(force=True) if self._read < len(self.tokens) else ""


def build_byte_tokenizer(special_tokens: dict[str, int], vocab_size: int) -> _RustTokenizer:
    """A byte-level tokenizer for tiny models: Gemma's chat specials at their real ids, special_tokens (the
    multimodal ones) at the given ids, "▁" for a space and one token per byte, so any text round-trips (except a
    literal "▁", which decodes as a space exactly as with the real tokenizer); the remaining ids are ``<unusedN>``."""
    specials = dict(GEMMA_CHAT_SPECIALS)
    for token, token_id in special_tokens.items():
        if token in specials and specials[token] != token_id:
            raise ValueError(f"{token} must keep Gemma's id {specials[token]}, not {token_id}")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{token} id {token_id} is outside vocab_size {vocab_size}")
        specials[token] = token_id
    by_id = {}
    for token, token_id in specials.items():
        if by_id.setdefault(token_id, token) != token:
            raise ValueError(f"{token} and {by_id[token_id]} both want id {token_id}")
    free = [i for i in range(vocab_size) if i not in by_id]
    if len(free) < 257:
        raise ValueError(f"vocab_size {vocab_size} leaves {len(free)} ids for the 257 byte and space tokens")
    # Gemma's own pipeline (space -> "▁", split after spaces, byte fallback), so transformers' GemmaTokenizer, which
    # rebuilds exactly that around tokenizer.json's vocabulary, gives the same ids. No merges: a space is the "▁"
    # token and every other character falls back to its UTF-8 bytes.
    vocab = {"▁": free[0]}
    vocab.update({f"<0x{b:02X}>": i for b, i in zip(range(256), free[1:])})
    vocab.update({f"<unused{i}>": i for i in free[257:]})
    vocab.update(specials)
    tok = _RustTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(sorted(specials, key=specials.get))
    return tok


def write_byte_tokenizer(out_dir: str | Path, media_tokens: dict[str, int], vocab_size: int) -> Path:
    """Directory holding a byte tokenizer (see build_byte_tokenizer) as tokenizer.json + tokenizer_config.json."""
    tok = build_byte_tokenizer(media_tokens, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "padding_side": "left",
    }, indent=2))
    return out
