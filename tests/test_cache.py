"""The cache classes' own rollback: trim within max_trim(), snapshot/restore across a ring wrap, and PromptCache's
loops over them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import FullCache, PromptCache, RingCache


def kv(first: int, n: int) -> tuple[mx.array, mx.array]:
    """Keys/values (1, 1, n, 2) whose entries are their own positions first.. (so slots show what they hold)."""
    x = mx.array(np.arange(first, first + n, dtype=np.float32).reshape(1, 1, n, 1).repeat(2, axis=3))
    return x, x + 1000


def held(ring: RingCache) -> dict[int, float]:
    """Position -> key value of every occupied ring slot."""
    keys = np.array(ring.keys[0, 0, :, 0])
    return {int(p): float(keys[s]) for s, p in enumerate(ring.positions) if p >= 0}


def test_ring_trims_after_wrapping_and_the_rewritten_slots_hold_the_new_tokens():
    ring = RingCache(window=4, extra=3)  # 6 slots
    for p in range(20):
        ring.update(*kv(p, 1))
    assert ring.max_trim() == 3  # keeps a full window (3 past positions) behind
    assert ring.trim(5) == 3 and ring.offset == 17
    assert held(ring) == {p: float(p) for p in range(14, 17)}
    ring.update(*kv(100, 2))  # positions 17, 18 now hold new tokens
    assert held(ring)[17] == 100.0 and held(ring)[18] == 101.0 and held(ring)[16] == 16.0


def test_snapshot_restore_goes_back_past_what_trim_reaches():
    ring, full = RingCache(window=4, extra=2), FullCache(step=8)
    for c in (ring, full):
        c.update(*kv(0, 5))
    snaps = ring.snapshot(), full.snapshot()
    before = held(ring)
    for p in range(5, 30):
        ring.update(*kv(p, 1))
        full.update(*kv(p, 1))
    assert ring.max_trim() == 2 < 25
    ring.restore(snaps[0])
    full.restore(snaps[1])
    assert ring.offset == full.offset == 5 and held(ring) == before
    assert np.array(full.update(*kv(5, 1))[0][0, 0, :, 0]).tolist() == list(range(6))
    ring.update(*kv(50, 1))
    assert held(ring)[5] == 50.0
    ring.restore(snaps[0])  # a snapshot serves more than once: writes after a restore never reach it
    assert held(ring) == before


def test_prompt_cache_trims_and_restores_every_layer():
    cache = PromptCache([RingCache(window=4, extra=2), None, FullCache(step=8)])
    for c in (cache.caches[0], cache.caches[2]):
        c.update(*kv(0, 10))
    assert cache.offset == 10 and cache.max_trim() == 2
    snap = cache.snapshot()
    with pytest.raises(ValueError, match="cannot roll back 3 tokens"):
        cache.trim(3)
    assert cache.trim(2) == 2 and cache.offset == 8 and cache.caches[2].offset == 8
    cache.restore(snap)
    assert cache.offset == 10 and cache.caches[0].max_trim() == 2


def test_rewind_never_resumes_inside_a_media_span():
    from gemma_mlx.processing.prompt import MediaSpan

    cache = PromptCache([FullCache(step=8)])
    cache.caches[0].update(*kv(0, 6))
    keys = [1, 2, (7, "a"), (7, "a"), (7, "a"), 3, 4]
    cache.keys = keys[:6]  # e.g. a prefill interrupted after position 5
    assert cache.rewind(keys, [MediaSpan("image", 2, 5, 0, "a")]) == 6  # past the span: all reused
    cache.keys = keys[:4]  # keys behind the caches (an interrupt between the two): reconciled to 4 first
    assert cache.rewind(keys, [MediaSpan("audio", 2, 5, 0, "a")]) == 2  # inside it: back to its start
    assert cache.offset == 2 and cache.keys == keys[:2]
