"""The whole model: token embeddings with image, audio and video soft tokens merged in, then the decoder.

Placeholder rows (image / audio / video token ids) are looked up as the pad id and then *replaced* (not
added) by the media embeddings, in order of appearance per modality. Media embeddings are not scaled by
√hidden. Gemma 3 text checkpoints use the same class with no media front ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig
from ..errors import InputError
from ..processing.prompt import media_items, media_spans, token_type_ids
from . import masks
from .text import TextModel
from .vision import VisionEmbedder, make_audio_projector, make_vision_projector

ArrayLike = mx.array | np.ndarray
MEDIA_KEYS = {"pixel_values", "image_position_ids", "audio_features", "audio_mask", "video_pixel_values",
              "video_position_ids"}


class _Inner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.language_model = TextModel(cfg.text)
        if cfg.vision is not None:
            self.vision_embedder = VisionEmbedder(cfg.vision)
            self.embed_vision = make_vision_projector(cfg.vision, cfg.text.hidden_size)
        if cfg.audio is not None:
            self.embed_audio = make_audio_projector(cfg.audio, cfg.text.hidden_size)


def _flatten_patches(pixel_values, position_ids) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Concatenate per-image patches, dropping padding patches (position (-1, -1)); also per-image counts."""
    if isinstance(pixel_values, (list, tuple)):
        pixels = [np.asarray(p, dtype=np.float32).reshape(-1, np.asarray(p).shape[-1]) for p in pixel_values]
        positions = [np.asarray(p).reshape(-1, 2) for p in position_ids]
    else:
        pv = np.asarray(pixel_values, dtype=np.float32)
        pi = np.asarray(position_ids)
        if pv.ndim == 2:
            pv, pi = pv[None], pi[None]
        pixels, positions = list(pv), list(pi)
    if len(pixels) != len(positions):
        raise InputError(f"{len(pixels)} images/frames but {len(positions)} position arrays")
    out_px, out_pos, counts = [], [], []
    for px, pos in zip(pixels, positions):
        if px.shape[0] != pos.shape[0]:
            raise InputError(f"an image has {px.shape[0]} patches but {pos.shape[0]} positions")
        keep = ~np.all(pos == -1, axis=-1)
        out_px.append(px[keep])
        out_pos.append(pos[keep].astype(np.int32))
        counts.append(int(keep.sum()))
    return np.concatenate(out_px), np.concatenate(out_pos), counts


def _flatten_audio(features, mask) -> np.ndarray:
    """Concatenate per-clip frames, dropping padding frames (mask False)."""
    if isinstance(features, (list, tuple)):
        return np.concatenate([np.asarray(f, dtype=np.float32).reshape(-1, np.asarray(f).shape[-1])
                               for f in features])
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 2:
        f = f[None]
    if mask is None:
        return f.reshape(-1, f.shape[-1])
    return f[np.asarray(mask, dtype=bool)]


class Model(nn.Module):
    """Gemma 4 unified (or Gemma 3 text): ``model(input_ids, ...)`` returns logits (B, L, vocab)."""

    def __init__(self, config: ModelConfig, vision_mask: str = masks.VISION_BIDIRECTIONAL_SLIDING):
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if vision_mask not in masks.VISION_MASK_MODES:
            raise ValueError(f"vision_mask must be one of {masks.VISION_MASK_MODES}")
        self.vision_mask = vision_mask

    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    # -- media front ends -------------------------------------------------------------------------

    def embed_images(self, pixel_values, position_ids) -> mx.array:
        """Soft-token embeddings (N, hidden) of all non-padding patches of the given images or frames."""
        if not hasattr(self.model, "vision_embedder"):
            raise InputError("this checkpoint has no vision embedder, so it cannot take images or video")
        patches, positions, _ = _flatten_patches(pixel_values, position_ids)
        h = self.model.vision_embedder(mx.array(patches), mx.array(positions))
        return self.model.embed_vision(h)

    def embed_audio(self, features, mask=None) -> mx.array:
        """Soft-token embeddings (N, hidden) of all non-padding 640-sample audio frames."""
        if not hasattr(self.model, "embed_audio"):
            raise InputError("this checkpoint has no audio embedder, so it cannot take audio")
        return self.model.embed_audio(mx.array(_flatten_audio(features, mask)))

    def embed_item(self, kind: str, item: dict) -> mx.array:
        """Soft-token embeddings (N, hidden) of one media item (media_items' form): an image, frame or clip."""
        if kind == "audio":
            mask = item.get("mask")
            return self.embed_audio([item["features"] if mask is None
                                     else np.asarray(item["features"])[np.asarray(mask, dtype=bool)]])
        return self.embed_images([item["pixel_values"]], [item["position_ids"]])

    def embed_range(self, input_ids, spans, items: dict, start: int, end: int, memo: dict | None = None
                    ) -> mx.array:
        """Embeddings (end - start, hidden) of positions start..end of flat token ids, media rows filled in.

        Only the items whose spans overlap the range are embedded. A span that runs on past ``end`` keeps its
        item's embeddings in memo for the next range, so an item split across ranges is embedded once.
        """
        memo = {} if memo is None else memo
        h = self.embed_tokens(np.asarray(input_ids)[start:end])
        for span in spans:
            a, b = max(span.start, start), min(span.end, end)
            if a >= b:
                continue
            key = (span.kind, span.item)
            feats = memo.pop(key) if key in memo else self.embed_item(span.kind, items[span.kind][span.item])
            if feats.shape[0] != span.end - span.start:
                raise InputError(f"{span.kind} {span.item}: the prompt has {span.end - span.start} placeholder "
                                 f"tokens for it but the input gives {feats.shape[0]} soft tokens")
            h[a - start:b - start] = feats[a - span.start:b - span.start].astype(h.dtype)
            if span.end > end:
                memo[key] = feats
        return h

    def embed_inputs(self, input_ids, **media) -> mx.array:
        """Input embeddings (B, L, hidden) with placeholder rows replaced by the media soft tokens.

        media: pixel_values, image_position_ids, audio_features, audio_mask, video_pixel_values,
        video_position_ids (see __call__); items fill the placeholder runs in order, row after row.
        """
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        B, L = ids.shape
        unknown = set(media) - MEDIA_KEYS
        if unknown:
            raise TypeError(f"unknown media input(s) {sorted(unknown)}; known: {', '.join(sorted(MEDIA_KEYS))}")
        media = {k: v for k, v in media.items() if v is not None}
        for kind, key in (("image", "pixel_values"), ("video", "video_pixel_values"), ("audio", "audio_features")):
            if key in media and self.config.token_ids.get(kind) is None:
                raise InputError(f"this checkpoint's config has no {kind} token id, so it cannot take {kind}")
        spans = media_spans(self.token_types(ids), media, fingerprints=False)
        flat = ids.reshape(-1)
        return self.embed_range(flat, spans, media_items(media), 0, len(flat)).reshape(B, L, -1)

    def embed_tokens(self, input_ids) -> mx.array:
        """Scaled token embeddings, placeholder ids looked up as the pad id (their rows await media)."""
        ids = np.asarray(input_ids)
        cfg = self.config
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
            # An id past the table would read outside it (a segfault in the gather): a tokenizer whose ids go
            # beyond the model's vocabulary, or ids given by hand.
            bad = int(ids.max()) if ids.max() >= cfg.text.vocab_size else int(ids.min())
            raise InputError(f"token id {bad} is outside the model's vocabulary (0..{cfg.text.vocab_size - 1})")
        placeholder_ids = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id) if t is not None]
        if placeholder_ids:
            ids = np.where(np.isin(ids, placeholder_ids), cfg.text.pad_token_id, ids)
        return self.language_model.embed(mx.array(ids))

    def token_types(self, input_ids) -> np.ndarray:
        """mm_token_type_ids derived from the placeholder ids: 1 image, 2 video, 3 audio, 0 text."""
        return token_type_ids(input_ids, self.config.token_ids)

    # -- decoder ----------------------------------------------------------------------------------

    def vision_blocks(self, spans, start: int, length: int) -> mx.array | None:
        """(length,) block ids of positions start.. from the prompt's media spans, or None when none applies."""
        if not self.config.bidirectional_vision or not spans:
            return None
        return masks.span_block_ids(spans, start, length)

    def hidden_states(self, h: mx.array, *, cache=None, spans=(), offset: int | None = None,
                      vision_mask: str | None = None, checkpoint: bool = False) -> mx.array:
        """Final-norm hidden states for input embeddings h (B, L, hidden) continuing the cache.

        spans: the prompt's media spans in absolute positions (PreparedPrompt.spans); its image and video
        spans are the bidirectional vision blocks.
        """
        if offset is None:
            from ..cache import cache_offset
            offset = cache_offset(cache)
        return self.language_model(h, cache=cache, offset=offset,
                                   blocks=self.vision_blocks(spans, offset, h.shape[1]),
                                   vision_mask=vision_mask or self.vision_mask, checkpoint=checkpoint)

    def logits(self, hidden: mx.array) -> mx.array:
        """Soft-capped vocabulary logits for final hidden states."""
        return self.language_model.logits(hidden, head=getattr(self, "lm_head", None))

    def __call__(self, input_ids, *, cache=None, mm_token_type_ids=None, vision_mask: str | None = None,
                 logits_to_keep: int | None = None, return_hidden: bool = False, **media) -> mx.array:
        """Logits (B, L or logits_to_keep, vocab) for token ids (B, L) with optional media and cache.

        media: pixel_values (N, P, 6912) or a list of (P_i, 6912), image_position_ids (x, y; -1 padding),
        audio_features (N, T, 640) or a list of (T_i, 640) with optional audio_mask, video_pixel_values and
        video_position_ids (frames, like images). mm_token_type_ids default to what the ids imply.
        """
        from ..cache import cache_offset

        ids = np.asarray(input_ids)
        h = self.embed_inputs(ids, **media)
        types = np.asarray(mm_token_type_ids) if mm_token_type_ids is not None else self.token_types(ids)
        types = types.reshape(1, -1) if types.ndim < 2 else types
        if types.shape[0] > 1 and not (types == types[:1]).all():
            raise InputError("rows of a batch with different image/video layouts are not supported")
        offset = cache_offset(cache)
        spans = media_spans(types[0], fingerprints=False, checked=False, offset=offset)
        hidden = self.hidden_states(h, cache=cache, spans=spans, offset=offset, vision_mask=vision_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    @property
    def layer_types(self) -> Sequence[str]:
        return [spec.layer_type for spec in self.config.text.layers]
