"""Prefill embeds chunk by chunk: no forward ever sees more than one chunk's embeddings, each media item is
embedded once, when the chunk holding it runs, and the logits equal the whole-prompt embedding's (the raw
forward) through every cache path: fresh, chunked past the window, resumed after a trim, from a checkpoint,
and resumed inside an audio clip after an interrupted prefill."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import PromptCache, make_cache
from gemma_mlx.prefill import prefill
from gemma_mlx.processing.prompt import PreparedPrompt
from gemma_mlx.weights import load_model
from hf_tiny import TOKENS

BOI, EOI, IMG, VID = TOKENS["boi_token_id"], TOKENS["eoi_token_id"], TOKENS["image_token_id"], TOKENS["video_token_id"]
BOA, EOA, AUD = TOKENS["boa_token_id"], TOKENS["eoa_token_index"], TOKENS["audio_token_id"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_gemma4):
    _, path = tiny_gemma4
    m, _ = load_model(path, dtype="float32")
    return m


def grid(rng, n_images, rows=2, cols=3):
    """(pixels (n, 6, 6912), positions (n, 6, 2)) of n random 2x3 tile grids."""
    px = rng.rand(n_images, rows * cols, 48 * 48 * 3).astype(np.float32)
    pos = np.array([[(c, r) for r in range(rows) for c in range(cols)]] * n_images)
    return px, pos


def media_prompt(model, seed=0) -> PreparedPrompt:
    """Text, an image, an 11-frame audio clip, two video frames, more text: 60 positions."""
    rng = np.random.RandomState(seed)
    text = lambda n: [int(i) for i in rng.randint(5, 400, n)]  # noqa: E731
    px, pos = grid(rng, 1)
    vpx, vpos = grid(rng, 2)
    audio = rng.uniform(-1, 1, (11, 640)).astype(np.float32)
    ids = ([2] + text(6) + [BOI] + [IMG] * 6 + [EOI] + text(3) + [BOA] + [AUD] * 11 + [EOA] + text(4)
           + [BOI] + [VID] * 6 + [EOI] + text(1) + [BOI] + [VID] * 6 + [EOI] + text(11))
    media = dict(pixel_values=px, image_position_ids=pos, video_pixel_values=vpx, video_position_ids=vpos,
                 audio_features=[audio])
    return PreparedPrompt.from_ids(ids, model.config.token_ids, media)


def whole_logits(model, p: PreparedPrompt) -> np.ndarray:
    """Logits of every position from the raw forward, which embeds the whole prompt at once."""
    return np.array(model(p.input_ids[None], **p.media)[0])


def last_logits(model, hidden) -> np.ndarray:
    return np.array(model.logits(hidden)[0, -1])


class Calls:
    """Records every embedding the model makes: token rows per call and which media item, in order."""

    def __init__(self, model, monkeypatch):
        self.events = []
        embed_tokens, embed_item, hidden_states = model.embed_tokens, model.embed_item, model.hidden_states
        monkeypatch.setattr(model, "embed_tokens", lambda ids: self.log(("tokens", len(ids)), embed_tokens(ids)))
        monkeypatch.setattr(model, "embed_item",
                            lambda kind, item: self.log(("item", kind), embed_item(kind, item)))
        monkeypatch.setattr(model, "hidden_states",
                            lambda h, **kw: self.log(("forward", h.shape[1]), hidden_states(h, **kw)))

    def log(self, event, value):
        self.events.append(event)
        return value

    def of(self, name):
        return [e[1] for e in self.events if e[0] == name]


def test_a_long_text_prompt_is_embedded_one_chunk_at_a_time(model, monkeypatch):
    ids = np.random.RandomState(1).randint(5, 400, 300).tolist()
    p = PreparedPrompt.from_ids(ids, model.config.token_ids)
    calls = Calls(model, monkeypatch)
    cache = make_cache(model.config.text, ring_extra=4)
    got = last_logits(model, prefill(model, p, cache, chunk_size=32))
    assert max(calls.of("tokens")) == 32 and sum(calls.of("tokens")) == 300  # never L x H at once
    assert calls.of("forward") == [32] * 9 + [12]
    # Each chunk's embeddings come just before its forward: tokens, forward, tokens, forward, ...
    assert [e[0] for e in calls.events] == ["tokens", "forward"] * 10
    monkeypatch.undo()
    np.testing.assert_allclose(got, whole_logits(model, p)[-1], atol=TOL)


def test_each_media_item_is_embedded_once_when_its_chunk_runs(model, monkeypatch):
    p = media_prompt(model)
    calls = Calls(model, monkeypatch)
    prefill(model, p, make_cache(model.config.text, ring_extra=3), chunk_size=8)
    items = [(i, e[1]) for i, e in enumerate(calls.events) if e[0] == "item"]
    assert [kind for _, kind in items] == ["image", "audio", "video", "video"]  # the audio clip spans 2 chunks
    forwards = [i for i, e in enumerate(calls.events) if e[0] == "forward"]
    # The image (positions 8..14) is embedded for the second chunk, after the first chunk's forward.
    assert forwards[0] < items[0][0] < forwards[1]
    assert all(n <= 8 + 6 for n in calls.of("forward"))  # at most a chunk plus a vision block


@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_prefill_logits_equal_the_whole_prompt_embedding_through_every_cache_path(model, chunk):
    p = media_prompt(model, seed=2)
    ref = whole_logits(model, p)
    # Fresh caches, a ring of 8 - 1 + 3 slots that wraps many times.
    fresh = last_logits(model, prefill(model, p, make_cache(model.config.text, ring_extra=3), chunk_size=chunk))
    np.testing.assert_allclose(fresh, ref[-1], atol=TOL)
    # Through a PromptCache: a first prompt that ends inside the audio clip (its first 4 frames), then the whole
    # one: the image is reused, the clip (another fingerprint) is not.
    audio = next(s for s in p.spans if s.kind == "audio")
    cut = audio.start + 4
    head_media = {k: v for k, v in p.media.items() if k.startswith(("pixel", "image"))}
    head = PreparedPrompt.from_ids(p.input_ids[:cut], model.config.token_ids,
                                   dict(head_media, audio_features=[p.media["audio_features"][0][:4]]))
    cache = PromptCache(make_cache(model.config.text, ring_extra=64))
    prefill(model, head, cache.caches, chunk_size=chunk)
    cache.keys = head.keys
    start = cache.rewind(p.keys, p.spans)
    assert start == audio.start
    resumed = last_logits(model, prefill(model, p, cache.caches, start, chunk_size=chunk))
    np.testing.assert_allclose(resumed, ref[-1], atol=TOL)
    # From a checkpoint snapshot taken before the video, restored after running past it.
    video = next(s for s in p.spans if s.kind == "video")
    cache = PromptCache(make_cache(model.config.text, ring_extra=3))
    prefill(model, p, cache.caches, 0, video.start - 1, chunk_size=chunk)
    snap = cache.snapshot()
    prefill(model, p, cache.caches, video.start - 1, len(p), chunk_size=chunk)
    cache.restore(snap)
    again = last_logits(model, prefill(model, p, cache.caches, video.start - 1, chunk_size=chunk))
    np.testing.assert_allclose(again, ref[-1], atol=TOL)


def test_a_prefill_split_inside_an_audio_clip_embeds_the_clip_once_and_matches(model, monkeypatch):
    p = media_prompt(model, seed=3)
    audio = next(s for s in p.spans if s.kind == "audio")
    cache = make_cache(model.config.text)
    calls = Calls(model, monkeypatch)
    prefill(model, p, cache, 0, audio.start + 5, chunk_size=4)  # stops inside the clip...
    hidden = prefill(model, p, cache, audio.start + 5, chunk_size=4)  # ...and goes on from there
    monkeypatch.undo()
    assert calls.of("item").count("audio") == 2  # once per prefill call: its rows are sliced, not re-derived
    np.testing.assert_allclose(last_logits(model, hidden), whole_logits(model, p)[-1], atol=TOL)
    mx.eval(hidden)
