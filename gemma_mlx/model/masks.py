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
    """Boolean visibility (L, S) for queries at ``q_pos`` (L,) over keys at ``k_pos`` (S,); k_pos < 0 is empty.

    allowed = valid(k) AND (k <= q OR same_block) AND (k > q - W OR (same_block AND block_overrides_window))
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    valid = k >= 0
    visible = k <= q
    in_window = (k > q - window) if window is not None else mx.ones_like(valid)
    if q_block is not None and k_block is not None:
        same = (q_block[:, None] == k_block[None, :]) & (q_block[:, None] >= 0)
        visible = visible | same
        if block_overrides_window:
            in_window = in_window | same
    return valid & visible & in_window


def key_blocks(k_pos: mx.array, q_start: int, q_block: mx.array | None) -> mx.array | None:
    """Block id of each cached key: keys written in this step (position >= q_start) share the queries' ids.

    Prefill never splits a vision block across steps, so keys from earlier steps can never be in a query's
    block and get -1.
    """
    if q_block is None:
        return None
    rel = k_pos - q_start
    fresh = rel >= 0
    idx = mx.clip(rel, 0, q_block.shape[0] - 1)
    return mx.where(fresh, mx.take(q_block, idx), -1).astype(mx.int32)
