"""The real Gemma 4 tokenizer: llama.cpp's 46 reference cases, transformers parity, streaming decode, byte tokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import decoders

from conftest import TOKENIZER
from gemma_mlx.errors import InputError, WeightsError
from gemma_mlx.tokenizer import (
    GEMMA_CHAT_SPECIALS,
    StreamingDetokenizer,
    Tokenizer,
    build_byte_tokenizer,
    write_byte_tokenizer,
)

FIXTURE = TOKENIZER
SEP = "\n__ggml_vocab_test__\n"
# Multi-byte text whose rarer characters fall back to byte tokens (Runic, Tamil, hieroglyphs, ZWJ emoji).
HARD_TEXT = "Grüße 😀 日本語 — ½ ᚠᛇᚻ விருந்து 𓀀𓀁 👩‍👩‍👧‍👦 🇫🇷\n\t end"
MEDIA = {"<|image>": 500, "<image|>": 501, "<|image|>": 502, "<|audio>": 503, "<audio|>": 504, "<|audio|>": 505,
         "<|video|>": 506}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(FIXTURE)


def reference_cases() -> list[tuple[str, list[int]]]:
    # llama.cpp's format: every input followed by a separator line (the file may drop the last one); one line of
    # ids per input. The ids carry no <bos>: llama.cpp tokenizes these with add_special=false.
    inputs = (FIXTURE / "tokenization_cases.inp").read_text(encoding="utf-8")
    inputs = inputs.removesuffix(SEP).removesuffix(SEP.rstrip("\n")).split(SEP)
    outputs = (FIXTURE / "tokenization_cases.out").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inputs, outputs)]


def test_46_reference_cases(tok):
    cases = reference_cases()
    assert ("", []) in cases and any(text.startswith("\n") for text, _ in cases)  # edge cases really are read
    for text, want in cases:
        assert tok.encode(text) == want, repr(text)
        assert tok.decode(want) == text, repr(text)
        assert 2 not in want  # the cases are BOS-free, like our default encode


def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262144)
    for token, token_id in GEMMA_CHAT_SPECIALS.items():
        assert tok.token_to_id(token) == token_id and tok.id_to_token(token_id) == token
    assert tok.token_to_id("<|image|>") == 258880 and tok.token_to_id("<|video|>") == 258884
    assert tok.token_to_id("no such token") is None and tok.id_to_token(10**7) is None
    assert tok.encode("<|turn>user\n") == [105, 2364, 107]  # specials in text map to their ids
    ids = [2, 105, 2364, 107, 9259, 106]
    assert tok.decode(ids) == "<bos><|turn>user\nHello<turn|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello"
    with pytest.raises(InputError, match="262144"):
        tok.decode([5, 262144])  # the Rust decoder would silently drop it


def test_add_special_tokens_uses_the_tokenizer_json_post_processor(tok):
    # Gemma 4's post-processor adds nothing: the chat template writes <bos>.
    for text in ("Hello world", " leading space", HARD_TEXT):
        assert tok.encode(text, add_special_tokens=True) == tok.encode(text)


def test_missing_or_broken_files_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot be read"):
        Tokenizer.from_dir(tmp_path)


def stream(detok, ids) -> list[str]:
    return [detok.add_token(i) for i in ids] + [detok.finalize()]


def test_streaming_holds_split_characters_until_complete(tok):
    ids = tok.encode("ᚠ")
    assert [tok.id_to_token(i) for i in ids] == ["<0xE1>", "<0x9A>", "<0xA0>"]
    assert stream(tok.detokenizer(), ids) == ["", "", "ᚠ", ""]
    pieces = stream(tok.detokenizer(), tok.encode(HARD_TEXT))
    assert "".join(pieces) == HARD_TEXT and not any("\ufffd" in p for p in pieces)


def test_streaming_equals_mlx_lm_spm_detokenizer(tok):
    # The reuse decision: mlx-lm picks SPMStreamingDetokenizer for Gemma's decoder, and it agrees with ours on the
    # real tokenizer. We keep ours because it decodes through the tokenizer's own decoder (no 262k-entry token table
    # per instance, no transformers tokenizer needed) and so stays exact for any decoder (next test).
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    class View:  # the two methods mlx-lm's detokenizer reads from a transformers tokenizer
        def __len__(self):
            return tok.vocab_size

        def convert_ids_to_tokens(self, ids):
            return [tok.id_to_token(i) for i in ids]

    theirs = SPMStreamingDetokenizer(View(), trim_space=False)
    ids = tok.encode("<|turn>model\n" + HARD_TEXT + "<turn|>")
    mine = tok.detokenizer()
    for i in ids:
        theirs.add_token(i)
        assert mine.add_token(i) == theirs.last_segment
    theirs.finalize()
    assert mine.finalize() == theirs.last_segment and mine.text == theirs.text == tok.decode(ids)


def test_streaming_is_exact_for_a_decoder_that_strips_each_call():
    # A decoder with Strip (Llama-style SPM) drops a leading space per decode call: piecewise decoding loses spaces.
    rust = build_byte_tokenizer(MEDIA, 512)
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    t = Tokenizer(rust, {})
    ids = t.encode("say  héllo wörld 😀 ok")
    full = t.decode(ids)
    assert "".join(t.decode([i]) for i in ids) != full
    assert "".join(stream(t.detokenizer(), ids)) == full


def test_streaming_flushes_invalid_bytes_at_the_end(tok):
    ids = tok.encode("ok ᚠ")[:-1]  # cut inside the 3-byte character
    d = StreamingDetokenizer(tok)
    pieces = stream(d, ids)
    assert pieces[-1] == "\ufffd\ufffd" and d.text == "ok \ufffd\ufffd" and d.tokens == ids
    d.reset()
    assert d.text == "" and d.tokens == [] and d.finalize() == ""


def test_byte_tokenizer_keeps_gemma_ids_and_round_trips(tmp_path):
    write_byte_tokenizer(tmp_path, MEDIA, vocab_size=512)
    t = Tokenizer.from_dir(tmp_path)
    assert t.vocab_size == 512 and (t.bos_id, t.eos_id, t.pad_id) == (2, 1, 0)
    for token, token_id in {**GEMMA_CHAT_SPECIALS, **MEDIA}.items():
        assert t.token_to_id(token) == token_id
    byte_ids = [t.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert len(set(byte_ids)) == 256 and not set(byte_ids) & {*GEMMA_CHAT_SPECIALS.values(), *MEDIA.values()}
    text = "<bos><|turn>user\n  Grüße 😀 日本\x00\x7f<|image|><|audio|><|video|> end <turn|>\n"
    ids = t.encode(text)
    assert ids[:2] == [2, 105] and {502, 505, 506} <= set(ids) and max(ids) < 512
    assert t.decode(ids) == text == "".join(stream(t.detokenizer(), ids))
    assert t.decode(t.encode("a▁b")) == "a b"  # "▁" is the space token, as in the real tokenizer


def test_byte_tokenizer_matches_transformers(tmp_path):
    # transformers' GemmaTokenizer rebuilds Gemma's pipeline around tokenizer.json's vocabulary: ids must agree.
    # transformers 5 also ignores add_bos_token in tokenizer_config.json when tokenizer.json exists; so do we.
    from transformers import AutoTokenizer

    write_byte_tokenizer(tmp_path, MEDIA, vocab_size=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    text = "<bos><|turn>system\n<|think|> Hi  there\t😀<|image|><turn|>\n"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf("Hi")["input_ids"] == ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi")
    assert hf.decode(ours.encode(text)) == text


@pytest.mark.parametrize("media, vocab, message", [
    ({"<|image|>": 600}, 512, "outside vocab_size"),
    ({"<|image|>": 105}, 512, "both want id 105"),
    ({"<bos>": 7}, 512, "must keep Gemma's id 2"),
    ({}, 200, "leaves"),
])
def test_byte_tokenizer_rejects_bad_layouts(media, vocab, message):
    with pytest.raises(ValueError, match=message):
        build_byte_tokenizer(media, vocab)
