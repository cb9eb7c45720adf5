"""The checkpoint's tokenizer (tokenizer.json through the Rust `tokenizers` library) and streaming decode.

The Gemma 4 chat template writes ``<bos>`` itself, so ``encode`` adds no special tokens unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .errors import WeightsError

# Gemma's chat specials all have ids below 107 in the real vocabulary; tiny models keep them there.
GEMMA_CHAT_SPECIALS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50,
    "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101,
    "<|turn>": 105, "<turn|>": 106,
}


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer.json; ids of special tokens by name."""

    def __init__(self, rust: _RustTokenizer, config: dict | None = None):
        self._tok = rust
        self.config = config or {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer in path (tokenizer.json + optional tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise WeightsError(f"{path} has no tokenizer.json (copy it from the original checkpoint)")
        try:
            rust = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a generic Exception for malformed files
            raise WeightsError(f"{file} cannot be read: {e}") from None
        cfg_file = path / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        return cls(rust, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text (no <bos> unless add_special_tokens)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def special_token(self, name: str, default: str) -> str:
        """The string of a named special token (bos_token, eos_token, ...) from tokenizer_config.json."""
        value = self.config.get(name, default)
        return value.get("content", default) if isinstance(value, dict) else value

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Byte-fallback tokens can split one character over several ids; decoding the pending ids until the text no
    longer ends in U+FFFD emits each character exactly once. Gemma's decoder (Replace ▁, ByteFallback, Fuse)
    strips nothing, so decoding piece by piece concatenates to the full decode (tested). mlx-lm's detokenizers
    need its transformers-based TokenizerWrapper; this one works on the Rust tokenizer directly.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._pending: list[int] = []
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.tokens.append(int(token_id))
        self._pending.append(int(token_id))
        decoded = self.tokenizer.decode(self._pending)
        if decoded.endswith("\ufffd"):
            return ""
        self._pending = []
        self.text += decoded
        return decoded

    def finalize(self) -> str:
        """Flush whatever is pending (a truly invalid byte sequence becomes U+FFFD)."""
        piece = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        self.text += piece
        return piece


def write_byte_tokenizer(out_dir: str | Path, media_tokens: dict[str, int], vocab_size: int) -> Path:
    """Write a byte-level tokenizer.json for tiny random models: Gemma's chat specials at their real ids,
    the multimodal specials at the ids the model config gives, and one token per byte so any text round-trips."""
    specials = dict(GEMMA_CHAT_SPECIALS)
    specials.update(media_tokens)
    taken = set(specials.values())
    free = [i for i in range(vocab_size) if i not in taken]
    if len(free) < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 256 ids for the byte tokens")
    vocab = {}
    for i, byte_id in zip(range(256), free):
        vocab[f"<0x{i:02X}>"] = byte_id
    for i in free[256:]:
        vocab[f"<unused{i}>"] = i
    vocab.update(specials)
    # A BPE with no merges and byte fallback: every character falls back to its UTF-8 bytes.
    tok = _RustTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(specials))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "tokenizer_class": "GemmaTokenizer", "padding_side": "left",
    }, indent=2))
    return out
