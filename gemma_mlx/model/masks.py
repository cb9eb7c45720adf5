"""The one attention-mask rule of the model, written over absolute positions.

Every attention path (the dense reference, the blocked reference, the Metal and CUDA kernels) decides
visibility from the same four facts about a (query, key) pair: their absolute positions, the layer's
sliding window, and the vision block each token belongs to. Caches report the absolute position of every
slot they return (-1 for an empty slot), so the rule does not care whether keys sit in a ring buffer.

Vision blocks (gemma4-unified brief §3): image and video soft tokens attend bidirectionally inside their own
block (one block per image, one per video frame); audio never does. Two readings exist in transformers:

- ``VISION_BIDIRECTIONAL_SLIDING`` (reading A, our default): blocks are bidirectional on sliding layers only
  and the window still applies; full layers stay causal. This is the documented Gemma 4 intent (and vLLM's).
- ``VISION_BIDIRECTIONAL_ALL`` (reading B): blocks are bidirectional on every layer and override the window.
  This is what transformers' plain ``model(...)`` forward computes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

VISION_BIDIRECTIONAL_SLIDING = "sliding"
VISION_BIDIRECTIONAL_ALL = "all"
VISION_MASK_MODES = (VISION_BIDIRECTIONAL_SLIDING, VISION_BIDIRECTIONAL_ALL)

# mm_token_type_ids values (transformers processing_utils): 0 text, 1 image, 2 video, 3 audio.
TOKEN_TYPE_TEXT, TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO, TOKEN_TYPE_AUDIO = 0, 1, 2, 3


def span_block_ids(spans, start: int, length: int) -> mx.array | None:
    """Block id (length,) int32 of positions start..start+length-1: the index of the bidirectional media span
    (an image or a video frame) holding the position, -1 elsewhere; None when no such span overlaps.

    spans: objects with ``start``, ``end`` (absolute positions) and ``bidirectional`` (PreparedPrompt.spans).
    """
    blocks = np.full(length, -1, dtype=np.int32)
    found = False
    for i, span in enumerate(s for s in spans if s.bidirectional):
        a, b = max(span.start, start), min(span.end, start + length)
        if a < b:
            blocks[a - start:b - start] = i
            found = True
    return mx.array(blocks) if found else None


def layer_attention_options(
    layer_type: str, sliding_window: int, vision_mask: str, has_blocks: bool
) -> tuple[int | None, bool, bool]:
    """(window, use_blocks, block_overrides_window) for one layer under the chosen vision-mask reading."""
    if vision_mask not in VISION_MASK_MODES:
        raise ValueError(f"vision_mask must be one of {VISION_MASK_MODES}, got {vision_mask!r}")
    sliding = layer_type == "sliding_attention"
    window = sliding_window if sliding else None
    if not has_blocks:
        return window, False, False
    if vision_mask == VISION_BIDIRECTIONAL_SLIDING:
        return window, sliding, False
    return window, True, True


def allowed(
    q_pos: mx.array,
    k_pos: mx.array,
    *,
    window: int | None = None,
    q_block: mx.array | None = None,
    k_block: mx.array | None = None,
    block_overrides_window: bool = False,
) -> mx.array:
    """Boolean visibility (L, S), or (B, L, S) when any input is per row; k_pos < 0 is an empty slot.

    q_pos and q_block are (L,) or (B, L), k_pos and k_block (S,) or (B, S): a 1-D array is shared by every row of
    a batch, a 2-D one gives each row (sequence) its own positions. All-1-D inputs give (L, S) as always.

    allowed = valid(k) AND (k <= q OR same_block) AND (k > q - W OR (same_block AND block_overrides_window))
    """
    # [..., :, None] / [..., None, :] put queries on the second-to-last and keys on the last axis whatever the
    # rank, so the same expressions broadcast a shared (L,)/(S,) against per-row (B, L)/(B, S) arrays.
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    valid = k >= 0
    visible = k <= q
    in_window = (k > q - window) if window is not None else mx.ones_like(valid)
    if q_block is not None and k_block is not None:
        qb = q_block[..., :, None]
        same = (qb == k_block[..., None, :]) & (qb >= 0)
        visible = visible | same
        if block_overrides_window:
            in_window = in_window | same
    return valid & visible & in_window


def key_blocks(k_pos: mx.array, q_start: int | mx.array, q_block: mx.array | None) -> mx.array | None:
    """Block id of each cached key (S,) or (B, S): keys written in this step share the queries' ids, others get -1.

    A key is written in this step when its position is >= q_start, the position of the step's first query;
    q_block[..., i] is the block of the query at q_start + i. Per row (sequences at different positions): k_pos
    (B, S), q_start a (B,) array and/or q_block (B, L); shared 1-D inputs with an int q_start give (S,) as always.
    Prefill never splits a vision block across steps, so keys from earlier steps can never be in a query's
    block.
    """
    if q_block is None:
        return None
    start = q_start[:, None] if isinstance(q_start, mx.array) and q_start.ndim == 1 else q_start
    rel = k_pos - start
    fresh = rel >= 0
    idx = mx.clip(rel, 0, q_block.shape[-1] - 1)
    if q_block.ndim == 1:
        ids = mx.take(q_block, idx)
    else:
        idx = mx.broadcast_to(idx, (q_block.shape[0], idx.shape[-1]))
        ids = mx.take_along_axis(q_block, idx, axis=-1)
    return mx.where(fresh, ids, -1).astype(mx.int32)
