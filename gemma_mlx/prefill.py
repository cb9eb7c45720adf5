"""Chunked prefill: feed a prompt through the model in pieces that never split a vision block, embedding each
piece only when it runs.

A vision block (one image, or one video frame) attends bidirectionally within itself, so all of its tokens
must be in the same forward call: chunk boundaries that would fall inside a block move to the block's end.
Each chunk's embeddings are made just before its forward, so the prompt's embeddings are never held whole
(a 256K-token prompt's would be 2-4 GB), and each media item is embedded when the chunk holding it runs.
"""

from __future__ import annotations

import mlx.core as mx

from .processing.prompt import PreparedPrompt, media_items

DEFAULT_PREFILL_CHUNK = 512


def plan_chunks(spans, start: int, end: int, chunk_size: int = DEFAULT_PREFILL_CHUNK) -> list[tuple[int, int]]:
    """[(start, end)] covering positions start..end in pieces of about chunk_size, each vision span kept whole.

    spans: the prompt's media spans (PreparedPrompt.spans); start must not fall inside a vision span.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    # A boundary at i (between positions i-1 and i) may not separate two tokens of the same vision span.
    blocks = [(s.start, s.end) for s in spans if s.bidirectional and s.end > start and s.start < end]
    if any(a < start for a, _ in blocks):
        raise ValueError(f"a chunk cannot start at {start}, inside a vision block")
    chunks = []
    while start < end:
        stop = min(start + chunk_size, end)
        stop = next((b for a, b in blocks if a < stop < b), stop)
        chunks.append((start, stop))
        start = stop
    return chunks


def prefill(model, prompt: PreparedPrompt, cache, start: int = 0, end: int | None = None,
            chunk_size: int = DEFAULT_PREFILL_CHUNK, on_chunk=None) -> mx.array:
    """Run prompt positions start..end into the cache chunk by chunk; return the last position's hidden state.

    The cache must hold exactly positions 0..start. on_chunk(done, total) is called after each chunk.
    """
    end = len(prompt) if end is None else end
    items = media_items(prompt.media)
    memo: dict = {}  # an audio clip split across chunks is embedded once
    hidden = None
    for s, e in plan_chunks(prompt.spans, start, end, chunk_size):
        h = model.embed_range(prompt.input_ids, prompt.spans, items, s, e, memo)[None]
        hidden = model.hidden_states(h, cache=cache, spans=prompt.spans, offset=s)
        mx.eval([c.state for c in cache if c is not None])
        if on_chunk is not None:
            on_chunk(e, end)
    return hidden[:, -1:, :]
