"""Chunked prefill: feed a long prompt through the model in pieces that never split a vision block.

A vision block (one image, or one video frame) attends bidirectionally within itself, so all of its tokens
must be in the same forward call: chunk boundaries that would fall inside a block move to the block's end.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .model import masks

DEFAULT_PREFILL_CHUNK = 512


def plan_chunks(token_types, chunk_size: int = DEFAULT_PREFILL_CHUNK) -> list[tuple[int, int]]:
    """[(start, end)] covering the sequence in pieces of about chunk_size, each vision block kept whole."""
    types = np.asarray(token_types)
    if types.ndim == 2:
        types = types[0]
    n = len(types)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    vision = np.isin(types, (masks.TOKEN_TYPE_IMAGE, masks.TOKEN_TYPE_VIDEO))
    # A boundary at i (between token i-1 and i) may not separate two tokens of the same vision run.
    inside_block = np.zeros(n + 1, dtype=bool)
    inside_block[1:n] = vision[1:] & vision[:-1]
    chunks, start = [], 0
    while start < n:
        end = min(start + chunk_size, n)
        while inside_block[end]:
            end += 1
        chunks.append((start, end))
        start = end
    return chunks


def prefill(model, embeddings: mx.array, token_types, cache, chunk_size: int = DEFAULT_PREFILL_CHUNK,
            on_chunk=None) -> mx.array:
    """Run the prompt embeddings (B, L, H) into the cache chunk by chunk; return the last position's hidden state."""
    types = np.asarray(token_types)
    hidden = None
    for start, end in plan_chunks(types, chunk_size):
        hidden = model.hidden_states(embeddings[:, start:end], cache=cache, token_types=types[..., start:end])
        mx.eval([c.state for c in cache if c is not None])
        if on_chunk is not None:
            on_chunk(end, types.shape[-1])
    return hidden[:, -1:, :]
