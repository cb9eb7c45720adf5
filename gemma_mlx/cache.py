"""KV caches: one object per attention layer, owned by the generation loop.

Both kinds report the absolute position of every key slot they return (-1 for an empty slot), which is all
the mask rule (model/masks.py) needs; so a sliding layer can attend straight over its ring buffer in whatever
order the ring holds it.

- ``FullCache`` (full-attention layers) keeps every position in a buffer preallocated in large steps, so
  appending a token writes in place instead of copying the cache.
- ``RingCache`` (sliding layers) keeps the last ``window - 1 + extra`` positions. ``window - 1`` is what the
  next query needs; ``extra`` is room for a chunk to be written in place, and for rolling back up to ``extra``
  tokens even after the ring has wrapped (edits, retries, speculative decoding).

Both kinds roll back with ``trim(n)`` (up to ``max_trim()``) and go back further with ``snapshot()`` /
``restore(snap)``. ``PromptCache`` holds one cache per layer plus the keys of the tokens they hold, so that a
later prompt reuses the longest common prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .errors import InputError

DEFAULT_FULL_STEP = 4096
DEFAULT_RING_EXTRA = 256


def _copy(x: mx.array | None) -> mx.array | None:
    return None if x is None else mx.array(x)


class _KVBuffers:
    """What both cache kinds share: key/value buffers and how many positions they have seen."""

    keys: mx.array | None = None
    values: mx.array | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class FullCache(_KVBuffers):
    """Every key/value of a full-attention layer, in a buffer that grows ``step`` positions at a time."""

    def __init__(self, step: int = DEFAULT_FULL_STEP, max_size: int | None = None):
        self.step = step
        self.max_size = max_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def reset(self) -> None:
        """Forget everything (the buffer is kept for reuse)."""
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        target = -(-needed // self.step) * self.step
        if self.max_size is not None:
            if needed > self.max_size:
                raise InputError(f"context of {needed} tokens exceeds this cache's max_size {self.max_size}")
            target = min(max(target, needed), self.max_size)
        B, H, _, D = k.shape
        new_k = mx.zeros((B, H, target, D), dtype=k.dtype)
        new_v = mx.zeros((B, H, target, v.shape[3]), dtype=v.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Append k, v (B, H, L, D); return all keys, values so far and their positions."""
        L = k.shape[2]
        end = self.offset + L
        if end > self.capacity:
            self._grow(k, v, end)
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], mx.arange(end, dtype=mx.int32)

    def view(self) -> tuple[mx.array, mx.array, mx.array]:
        """The keys, values and positions held, without writing (what a drafter reading this layer sees)."""
        end = self.offset
        return self.keys[..., :end, :], self.values[..., :end, :], mx.arange(end, dtype=mx.int32)

    def max_trim(self) -> int:
        """How many of the newest positions can be forgotten: all of them."""
        return self.offset

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most max_trim()); return how many were forgotten."""
        n = max(0, min(n, self.max_trim()))
        self.offset -= n
        return n

    def snapshot(self) -> int:
        """A restorable state: the offset alone, since this cache only ever appends past it."""
        return self.offset

    def restore(self, snap: int) -> None:
        """Go back to a snapshot taken earlier on this cache."""
        self.offset = snap


class RingCache(_KVBuffers):
    """The last ``window - 1 + extra`` keys/values of a sliding-window layer; position p lives in slot p % size."""

    def __init__(self, window: int, extra: int = DEFAULT_RING_EXTRA):
        if window < 1 or extra < 1:
            raise ValueError("RingCache needs window >= 1 and extra >= 1")
        self.window = window
        self.extra = extra
        self.size = window - 1 + extra
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.positions = np.full(self.size, -1, dtype=np.int32)
        self.offset = 0

    def reset(self) -> None:
        """Forget everything."""
        self.offset = 0
        self.positions[:] = -1

    def _write(self, k: mx.array, v: mx.array, first_pos: int) -> None:
        """Write consecutive positions first_pos.. into their slots (at most two contiguous pieces)."""
        L = k.shape[2]
        start = first_pos % self.size
        head = min(L, self.size - start)
        self.keys[..., start : start + head, :] = k[..., :head, :]
        self.values[..., start : start + head, :] = v[..., :head, :]
        if head < L:
            self.keys[..., : L - head, :] = k[..., head:, :]
            self.values[..., : L - head, :] = v[..., head:, :]
        slots = (np.arange(first_pos, first_pos + L) % self.size)
        self.positions[slots] = np.arange(first_pos, first_pos + L, dtype=np.int32)

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Add k, v (B, H, L, D) at the next positions; return keys, values and positions to attend over."""
        L = k.shape[2]
        if self.keys is None:
            B, H, _, D = k.shape
            self.keys = mx.zeros((B, H, self.size, D), dtype=k.dtype)
            self.values = mx.zeros((B, H, self.size, v.shape[3]), dtype=v.dtype)
        start = self.offset
        if L <= self.extra:
            # The oldest L slots hold positions no query of this chunk can see: overwrite them in place.
            self._write(k, v, start)
            self.offset += L
            return self.keys, self.values, mx.array(self.positions)
        # A chunk longer than the spare room: attend over the window's past plus the whole chunk, then keep
        # the newest `size` positions in the ring.
        past = np.arange(max(0, start - (self.window - 1)), start, dtype=np.int32)
        slots = mx.array(past % self.size)
        keys = mx.concatenate([self.keys[..., slots, :], k], axis=2) if len(past) else k
        values = mx.concatenate([self.values[..., slots, :], v], axis=2) if len(past) else v
        positions = np.concatenate([past, np.arange(start, start + L, dtype=np.int32)])
        keep = min(L, self.size)
        self._write(k[..., L - keep :, :], v[..., L - keep :, :], start + L - keep)
        self.offset += L
        return keys, values, mx.array(positions)

    def view(self) -> tuple[mx.array, mx.array, mx.array]:
        """The whole ring, in ring order, with each slot's position (-1 empty), without writing."""
        return self.keys, self.values, mx.array(self.positions)

    def max_trim(self) -> int:
        """How many of the newest positions can be forgotten while still leaving a full window behind."""
        if self.offset <= self.size:
            return self.offset
        return self.size - (self.window - 1)

    def trim(self, n: int) -> int:
        """Forget the last n positions (at most max_trim()); return how many were forgotten."""
        n = max(0, min(n, self.max_trim()))
        self.offset -= n
        self.positions[self.positions >= self.offset] = -1
        return n

    def snapshot(self) -> tuple:
        """A restorable state: offset, buffers and slot positions.

        ``mx.array(x)`` is a new array object over the same data: in-place writes to the ring (which rebind the
        ring's array object) then copy on write instead of changing what the snapshot holds.
        """
        return self.offset, _copy(self.keys), _copy(self.values), self.positions.copy()

    def restore(self, snap: tuple) -> None:
        """Go back to a snapshot taken earlier on this cache."""
        offset, keys, values, positions = snap
        self.offset, self.keys, self.values, self.positions = offset, _copy(keys), _copy(values), positions.copy()


LayerCache = FullCache | RingCache


def make_cache(text_config, *, max_size: int | None = None, ring_extra: int = DEFAULT_RING_EXTRA,
               full_step: int = DEFAULT_FULL_STEP) -> list[LayerCache | None]:
    """One cache per decoder layer (None for layers that reuse another layer's K/V)."""
    caches: list[LayerCache | None] = []
    for spec in text_config.layers:
        if spec.kv_source is not None:
            caches.append(None)
        elif spec.is_sliding:
            caches.append(RingCache(text_config.sliding_window, ring_extra))
        else:
            caches.append(FullCache(full_step, max_size))
    return caches


def cache_offset(caches: list[LayerCache | None] | None) -> int:
    """Number of positions the caches hold (0 without caches)."""
    if not caches:
        return 0
    return next(c.offset for c in caches if c is not None)


def max_trim(caches: list[LayerCache | None]) -> int:
    """How many of the newest positions every cache can forget."""
    return min(c.max_trim() for c in caches if c is not None)


def trim_caches(caches: list[LayerCache | None], n: int) -> int:
    """Forget the last n positions in every cache, or raise if some cache cannot go back that far."""
    if n > max_trim(caches):
        raise ValueError(f"cannot roll back {n} tokens: the caches keep only {max_trim(caches)}")
    for c in caches:
        if c is not None:
            c.trim(n)
    return n


def snapshot_caches(caches: list[LayerCache | None]) -> list:
    """Each cache's snapshot (None for layers without a cache)."""
    return [None if c is None else c.snapshot() for c in caches]


def restore_caches(caches: list[LayerCache | None], snap: list) -> None:
    """Put every cache back to a snapshot_caches taken earlier on these same caches."""
    for c, s in zip(caches, snap):
        if c is not None:
            c.restore(s)


@dataclass
class PromptCache:
    """KV caches plus the keys of the tokens they hold, so that a later prompt reuses their common prefix.

    A key is a token id, or for a media soft token (id, fingerprint of its image, frame or clip): the same
    placeholder id with a different picture behind it must not count as a match.
    """

    caches: list
    keys: list = field(default_factory=list)
    # (position, snapshot) where the next prompt is expected to part from this one. Chat templates re-render a
    # finished model turn differently from the generation prompt it was produced after (the Gemma 4 template
    # drops the empty thought channel and any thinking), so the next turn must roll back to the start of that
    # turn. Once the sliding ring has wrapped it cannot roll back that far; restoring the snapshot can.
    checkpoint: tuple[int, list] | None = None

    @classmethod
    def new(cls, model, *, max_context: int | None = None) -> PromptCache:
        """Empty caches for model (full-attention buffers capped at max_context when given)."""
        return cls(make_cache(model.config.text, max_size=max_context))

    def reset(self) -> None:
        """Forget everything the caches hold."""
        self._reset_caches()
        self.keys, self.checkpoint = [], None

    def _reset_caches(self) -> None:
        for c in self.caches:
            if c is not None:
                c.reset()

    @property
    def offset(self) -> int:
        """Number of positions the caches hold."""
        return cache_offset(self.caches)

    def max_trim(self) -> int:
        """How many of the newest positions every cache can forget."""
        return max_trim(self.caches)

    def trim(self, n: int) -> int:
        """Forget the last n positions in every cache, or raise if some cache cannot go back that far."""
        return trim_caches(self.caches, n)

    def snapshot(self) -> list:
        """A restorable copy of every cache's state."""
        return snapshot_caches(self.caches)

    def restore(self, snap: list) -> None:
        """Put every cache back to a snapshot taken earlier on these caches."""
        restore_caches(self.caches, snap)

    def _reconcile(self) -> None:
        # Keys are claimed before the caches are written (prefill) or just after (decode), so an interrupted
        # generation can leave them a little apart: keep only what both agree on.
        offsets = {c.offset for c in self.caches if c is not None}
        if len(offsets) != 1:  # an interrupt between layers: nothing can be trusted
            self.reset()
            return
        offset = offsets.pop()
        if offset > len(self.keys):
            if offset - len(self.keys) > self.max_trim():
                self.reset()
                return
            self.trim(offset - len(self.keys))
        del self.keys[offset:]

    def rewind(self, keys: list, spans=()) -> int:
        """Roll the caches back to the longest prefix of keys they can reuse; return its length.

        spans: the prompt's media spans (PreparedPrompt.spans); the prefix never ends inside one, since a vision
        block attends both ways and must run whole.
        """
        self._reconcile()
        n = 0
        for a, b in zip(self.keys, keys):
            if a != b:
                break
            n += 1
        n = min(n, len(keys) - 1)  # the last prompt token must run to give the next token's logits
        for span in spans:
            if span.start < n < span.end:
                n = span.start
        if len(self.keys) - n <= self.max_trim():
            self.trim(len(self.keys) - n)
        elif self.checkpoint is not None and self.checkpoint[0] <= n:
            n = self.checkpoint[0]
            self.restore(self.checkpoint[1])
        else:
            n = 0
            self._reset_caches()
        del self.keys[n:]
        if self.checkpoint is not None and self.checkpoint[0] > n:
            self.checkpoint = None
        return n


# -- Batched caches: many sequences' caches as rows of one buffer --------------------------------------------
#
# A decode step of the engine runs every running sequence in one forward: layer i of row b reads and writes
# row b of the layer's batched buffers, each row at its own offset. Offsets live on the host (numpy), are
# replaced rather than mutated, and every write and every reported key position is derived from them, so the
# ring and full caches of a row can never disagree on where it is. Rows join (from a sequence's own caches,
# after its prefill) and leave between steps; only then are buffers copied.


def _scatter_rows(buf: mx.array, rows_slots: np.ndarray, new: mx.array) -> mx.array:
    """buf (B, H, S, D) with new (B, H, L, D) written at slots rows_slots (B, L) of each row, in place."""
    B, H, S, D = buf.shape
    L = new.shape[2]
    flat = buf.reshape(B * H, S, D)
    heads = mx.arange(B * H)[:, None]
    slots = mx.array(np.repeat(rows_slots, H, axis=0).astype(np.int32))
    flat[heads, slots] = new.reshape(B * H, L, D)
    return flat.reshape(B, H, S, D)


def _pad_to(x: mx.array, size: int) -> mx.array:
    """x (B, H, S, D) padded with zeros along S to size."""
    if x.shape[2] >= size:
        return x[:, :, :size]
    pad = mx.zeros(x.shape[:2] + (size - x.shape[2], x.shape[3]), dtype=x.dtype)
    return mx.concatenate([x, pad], axis=2)


class _BatchKVBuffers:
    """What both batched cache kinds share: row-stacked key/value buffers and each row's offset (host side)."""

    keys: mx.array | None = None
    values: mx.array | None = None
    offset: np.ndarray = np.zeros(0, dtype=np.int64)  # per row; replaced, never written in place

    @property
    def rows(self) -> int:
        return len(self.offset)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class BatchFullCache(_BatchKVBuffers):
    """Full-attention K/V of several sequences: row b holds positions 0..offsets[b]-1 of sequence b."""

    def __init__(self, step: int = DEFAULT_FULL_STEP, max_size: int | None = None):
        self.step, self.max_size = step, max_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = np.zeros(0, dtype=np.int64)  # per row; replaced, never written in place

    def row_nbytes(self) -> list[int]:
        """Bytes of K/V each row holds (its valid positions)."""
        if self.keys is None:
            return [0] * self.rows
        per = (self.keys.nbytes + self.values.nbytes) // max(1, self.keys.shape[0] * self.keys.shape[2])
        return [int(o) * per for o in self.offset]

    def add_row(self, cache: FullCache) -> None:
        """Append a sequence's own FullCache as a new row (its buffers copied once)."""
        n = cache.offset
        k, v = cache.keys[..., :n, :], cache.values[..., :n, :]
        if self.keys is None:
            cap = -(-max(n, 1) // self.step) * self.step
            self.keys, self.values = _pad_to(k, cap), _pad_to(v, cap)
        else:
            cap = max(self.keys.shape[2], -(-max(n, 1) // self.step) * self.step)
            self.keys = mx.concatenate([_pad_to(self.keys, cap), _pad_to(k, cap)], axis=0)
            self.values = mx.concatenate([_pad_to(self.values, cap), _pad_to(v, cap)], axis=0)
        self.offset = np.append(self.offset, n)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows listed (in that order)."""
        self.offset = self.offset[keep].copy()
        if self.keys is not None:
            if keep:
                idx = mx.array(keep)
                self.keys, self.values = self.keys[idx], self.values[idx]
            else:
                self.keys = self.values = None

    def row(self, b: int) -> FullCache:
        """Row b as a sequence's own FullCache (a copy)."""
        c = FullCache(self.step, self.max_size)
        n = int(self.offset[b])
        if n:
            c.keys, c.values = mx.array(self.keys[b : b + 1]), mx.array(self.values[b : b + 1])
        c.offset = n
        return c

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Write k, v (B, H, L, D) at each row's next positions; return keys, values and k_pos (B, S)."""
        L = k.shape[2]
        ends = self.offset + L
        need = int(ends.max())
        if self.max_size is not None and need > self.max_size:
            raise InputError(f"context of {need} tokens exceeds this cache's max_size {self.max_size}")
        if need > self.keys.shape[2]:
            cap = -(-need // self.step) * self.step
            if self.max_size is not None:
                cap = min(cap, self.max_size)
            self.keys, self.values = _pad_to(self.keys, cap), _pad_to(self.values, cap)
        slots = self.offset[:, None] + np.arange(L)
        self.keys = _scatter_rows(self.keys, slots, k)
        self.values = _scatter_rows(self.values, slots, v)
        self.offset = ends
        span = np.arange(need)
        k_pos = np.where(span[None, :] < ends[:, None], span[None, :], -1).astype(np.int32)
        return self.keys[..., :need, :], self.values[..., :need, :], mx.array(k_pos)

    def max_trim(self) -> np.ndarray:
        """Per row: how many of its newest positions it can forget."""
        return self.offset.copy()

    def trim(self, n) -> np.ndarray:
        """Forget the last n[b] positions of each row (at most max_trim); return how many each forgot."""
        n = np.clip(np.broadcast_to(np.asarray(n, dtype=np.int64), self.offset.shape), 0, self.max_trim())
        self.offset = self.offset - n
        return n


class BatchRingCache(_BatchKVBuffers):
    """Sliding-window K/V of several sequences: row b is sequence b's ring, position p in slot p % size."""

    def __init__(self, window: int, extra: int = DEFAULT_RING_EXTRA):
        self.window, self.extra = window, extra
        self.size = window - 1 + extra
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.positions = np.zeros((0, self.size), dtype=np.int32)
        self.offset = np.zeros(0, dtype=np.int64)

    def row_nbytes(self) -> list[int]:
        """Bytes of K/V each row holds (its whole ring)."""
        if self.keys is None:
            return [0] * self.rows
        return [(self.keys.nbytes + self.values.nbytes) // self.keys.shape[0]] * self.rows

    def add_row(self, cache: RingCache) -> None:
        """Append a sequence's own RingCache as a new row (its ring copied once)."""
        if (cache.window, cache.size) != (self.window, self.size):
            raise ValueError("a row's ring must have the batch's window and size")
        k, v = cache.keys, cache.values
        self.keys = k if self.keys is None else mx.concatenate([self.keys, k], axis=0)
        self.values = v if self.values is None else mx.concatenate([self.values, v], axis=0)
        self.positions = np.concatenate([self.positions, cache.positions[None]])
        self.offset = np.append(self.offset, cache.offset)

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows listed (in that order)."""
        self.offset, self.positions = self.offset[keep].copy(), self.positions[keep].copy()
        if keep:
            idx = mx.array(keep)
            self.keys, self.values = self.keys[idx], self.values[idx]
        else:
            self.keys = self.values = None

    def row(self, b: int) -> RingCache:
        """Row b as a sequence's own RingCache (a copy)."""
        c = RingCache(self.window, self.extra)
        c.keys, c.values = mx.array(self.keys[b : b + 1]), mx.array(self.values[b : b + 1])
        c.positions, c.offset = self.positions[b].copy(), int(self.offset[b])
        return c

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Write k, v (B, H, L, D), L <= extra, at each row's next positions; return the rings and k_pos (B, S)."""
        L = k.shape[2]
        if L > self.extra:
            raise ValueError(f"a batched step of {L} tokens needs a ring extra >= {L} (it is {self.extra})")
        pos = self.offset[:, None] + np.arange(L)
        slots = pos % self.size
        self.keys = _scatter_rows(self.keys, slots, k)
        self.values = _scatter_rows(self.values, slots, v)
        positions = self.positions.copy()
        np.put_along_axis(positions, slots, pos.astype(np.int32), axis=1)
        self.positions, self.offset = positions, self.offset + L
        return self.keys, self.values, mx.array(self.positions)

    def max_trim(self) -> np.ndarray:
        """Per row: how many newest positions it can forget while keeping a full window behind."""
        return np.where(self.offset <= self.size, self.offset, self.size - (self.window - 1))

    def trim(self, n) -> np.ndarray:
        """Forget the last n[b] positions of each row (at most max_trim); return how many each forgot."""
        n = np.clip(np.broadcast_to(np.asarray(n, dtype=np.int64), self.offset.shape), 0, self.max_trim())
        self.offset = self.offset - n
        self.positions = np.where(self.positions >= self.offset[:, None], -1, self.positions).astype(np.int32)
        return n


class BatchCaches:
    """The batched caches of every layer (None where a layer reuses another's K/V), one row per sequence."""

    def __init__(self, text_config, *, max_size: int | None = None, ring_extra: int = DEFAULT_RING_EXTRA,
                 full_step: int = DEFAULT_FULL_STEP):
        self.layers: list = []
        for spec in text_config.layers:
            if spec.kv_source is not None:
                self.layers.append(None)
            elif spec.is_sliding:
                self.layers.append(BatchRingCache(text_config.sliding_window, ring_extra))
            else:
                self.layers.append(BatchFullCache(full_step, max_size))

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def _live(self):
        return [c for c in self.layers if c is not None]

    @property
    def rows(self) -> int:
        """How many sequences the batch holds."""
        return self._live()[0].rows

    @property
    def offsets(self) -> np.ndarray:
        """Positions each row holds; every layer agrees (a disagreement is a bug and raises)."""
        offsets = [c.offset for c in self._live()]
        if any(not np.array_equal(o, offsets[0]) for o in offsets):
            raise RuntimeError(f"batched caches disagree on offsets: {offsets}")
        return offsets[0].copy()

    @property
    def state(self) -> list[mx.array]:
        return [a for c in self._live() for a in c.state]

    def add(self, caches: list[LayerCache | None]) -> int:
        """Append one sequence's own caches (from its prefill) as a new row; return the row's index."""
        for mine, theirs in zip(self.layers, caches):
            if mine is not None:
                mine.add_row(theirs)
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only the listed rows, in that order (sequences that left are dropped)."""
        for c in self._live():
            c.keep_rows(list(rows))

    def row(self, b: int) -> list[LayerCache | None]:
        """Row b as one sequence's own caches (copies), e.g. to store its prompt for reuse."""
        return [None if c is None else c.row(b) for c in self.layers]

    def row_nbytes(self) -> list[int]:
        """Bytes of K/V each row holds across all layers."""
        per_layer = [c.row_nbytes() for c in self._live()]
        return [sum(col) for col in zip(*per_layer)] if per_layer else []

    def max_trim(self) -> np.ndarray:
        """Per row: how many of its newest positions every layer can forget."""
        return np.min([c.max_trim() for c in self._live()], axis=0)

    def trim(self, n) -> np.ndarray:
        """Forget the last n[b] positions of row b in every layer, or raise if some row cannot go back that far."""
        n = np.broadcast_to(np.asarray(n, dtype=np.int64), (self.rows,))
        limit = self.max_trim()
        if np.any(n > limit):
            raise ValueError(f"cannot roll back {n.tolist()} tokens: the rows keep only {limit.tolist()}")
        for c in self._live():
            c.trim(n)
        return n
