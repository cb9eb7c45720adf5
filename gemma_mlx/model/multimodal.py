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
from . import masks
from .text import TextModel
from .vision import VisionEmbedder, make_audio_projector, make_vision_projector

ArrayLike = mx.array | np.ndarray


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

    def embed_inputs(self, input_ids, *, pixel_values=None, image_position_ids=None,
                     audio_features=None, audio_mask=None,
                     video_pixel_values=None, video_position_ids=None) -> mx.array:
        """Input embeddings (B, L, hidden) with placeholder rows replaced by the media soft tokens."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        cfg = self.config
        media: list[tuple[str, int | None, object]] = []
        if pixel_values is not None:
            media.append(("image", cfg.image_token_id, lambda: self.embed_images(pixel_values, image_position_ids)))
        if video_pixel_values is not None:
            media.append(("video", cfg.video_token_id,
                          lambda: self.embed_images(video_pixel_values, video_position_ids)))
        if audio_features is not None:
            media.append(("audio", cfg.audio_token_id, lambda: self.embed_audio(audio_features, audio_mask)))
        h = self.embed_tokens(ids)
        given = {name for name, _, _ in media}
        for name, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id),
                               ("audio", cfg.audio_token_id)):
            if token_id is not None and name not in given and (ids == token_id).any():
                raise InputError(f"the prompt has {(ids == token_id).sum()} {name} placeholder tokens "
                                 f"but no {name} input was given")
        if not media:
            return h
        B, L, H = h.shape
        flat = h.reshape(B * L, H)
        for name, token_id, embed in media:
            if token_id is None:
                raise InputError(f"this checkpoint's config has no {name} token id, so it cannot take {name}")
            slots = np.flatnonzero(ids.reshape(-1) == token_id)
            feats = embed()
            if feats.shape[0] != len(slots):
                raise InputError(f"{name}: the prompt has {len(slots)} placeholder tokens but the {name} inputs "
                                 f"give {feats.shape[0]} soft tokens")
            flat[mx.array(slots)] = feats.astype(flat.dtype)
        return flat.reshape(B, L, H)

    def embed_tokens(self, input_ids) -> mx.array:
        """Scaled token embeddings, placeholder ids looked up as the pad id (their rows await media)."""
        ids = np.asarray(input_ids)
        cfg = self.config
        placeholder_ids = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id) if t is not None]
        if placeholder_ids:
            ids = np.where(np.isin(ids, placeholder_ids), cfg.text.pad_token_id, ids)
        return self.language_model.embed(mx.array(ids))

    def token_types(self, input_ids) -> np.ndarray:
        """mm_token_type_ids derived from the placeholder ids: 1 image, 2 video, 3 audio, 0 text."""
        ids = np.asarray(input_ids)
        types = np.zeros(ids.shape, dtype=np.int32)
        for token_id, kind in ((self.config.image_token_id, masks.TOKEN_TYPE_IMAGE),
                               (self.config.video_token_id, masks.TOKEN_TYPE_VIDEO),
                               (self.config.audio_token_id, masks.TOKEN_TYPE_AUDIO)):
            if token_id is not None:
                types[ids == token_id] = kind
        return types

    # -- decoder ----------------------------------------------------------------------------------

    def vision_blocks(self, token_types) -> mx.array | None:
        """(L,) block ids for one row of token types, or None when bidirectional vision does not apply."""
        if not self.config.bidirectional_vision or token_types is None:
            return None
        types = np.asarray(token_types)
        if types.ndim == 2:
            if types.shape[0] > 1 and not (types == types[:1]).all():
                raise InputError("rows of a batch with different image/video layouts are not supported")
            types = types[0]
        if not np.isin(types, (masks.TOKEN_TYPE_IMAGE, masks.TOKEN_TYPE_VIDEO)).any():
            return None
        return masks.vision_block_ids(mx.array(types))

    def hidden_states(self, h: mx.array, *, cache=None, token_types=None, offset: int | None = None,
                      vision_mask: str | None = None) -> mx.array:
        """Final-norm hidden states for input embeddings h (B, L, hidden) continuing the cache."""
        if offset is None:
            from ..cache import cache_offset
            offset = cache_offset(cache)
        return self.language_model(h, cache=cache, offset=offset, blocks=self.vision_blocks(token_types),
                                   vision_mask=vision_mask or self.vision_mask)

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
        ids = input_ids if isinstance(input_ids, (mx.array, np.ndarray)) else np.asarray(input_ids)
        h = self.embed_inputs(ids, **media)
        types = mm_token_type_ids if mm_token_type_ids is not None else self.token_types(ids)
        hidden = self.hidden_states(h, cache=cache, token_types=types, vision_mask=vision_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    @property
    def layer_types(self) -> Sequence[str]:
        return [spec.layer_type for spec in self.config.text.layers]
