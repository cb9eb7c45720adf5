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


def _copy(x):
    """A new array object over the same data (a QuantizedKV's three arrays likewise); None stays None."""
    if x is None:
        return None
    return x.copy() if isinstance(x, QuantizedKV) else mx.array(x)


def _zeros_like(x, shape: tuple) -> mx.array:
    """Zeros of logical shape (B, H, S, D) stored as x is stored (float of x's dtype, or quantized like x)."""
    if isinstance(x, QuantizedKV):
        return QuantizedKV.zeros(shape, bits=x.bits, group_size=x.group_size, dtype=x.dtype)
    return mx.zeros(shape, dtype=x.dtype)


def _concat(xs: list, axis: int):
    """mx.concatenate for float K/V, or for QuantizedKV along a leading axis (the same bits and group size)."""
    if isinstance(xs[0], QuantizedKV):
        return QuantizedKV.concatenate(xs, axis)
    return mx.concatenate(xs, axis=axis)


def _arrays(x) -> list[mx.array]:
    """The mx.arrays that hold x (to evaluate them)."""
    if x is None:
        return []
    return x.arrays() if isinstance(x, QuantizedKV) else [x]


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64)


@dataclass(frozen=True)
class KVSetting:
    """How the K/V caches store keys and values: float (the compute dtype), or quantized with mx.quantize.

    k_bits / v_bits: None (float) or 4 | 8, set apart; group_size: 32 | 64 elements of the head dim share one
    scale and bias. quantized_kv_start: as in mlx-lm, a cache stays float until it holds more than this many
    positions, then converts what it holds and quantizes everything after (0: quantized from the first token).
    Validated once, here: a bad value is an InputError naming the field.
    """

    k_bits: int | None = None
    v_bits: int | None = None
    group_size: int = 64
    quantized_kv_start: int = 0

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            bits = getattr(self, name)
            if bits is not None and (isinstance(bits, bool) or bits not in KV_BITS):
                raise InputError(f"{name} must be one of {', '.join(map(str, KV_BITS))} (or unset for float), "
                                 f"got {bits!r}")
        if isinstance(self.group_size, bool) or self.group_size not in KV_GROUP_SIZES:
            raise InputError(f"kv group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                             f"got {self.group_size!r}")
        start = self.quantized_kv_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"quantized_kv_start must be a whole number >= 0, got {start!r}")

    @classmethod
    def of(cls, kv_bits: int | None = None, *, k_bits: int | None = None, v_bits: int | None = None,
           group_size: int | None = None, quantized_kv_start: int | None = None) -> KVSetting:
        """The setting from user-facing options: kv_bits sets both K and V; k_bits / v_bits override each."""
        return cls(k_bits=k_bits if k_bits is not None else kv_bits,
                   v_bits=v_bits if v_bits is not None else kv_bits,
                   group_size=64 if group_size is None else group_size,
                   quantized_kv_start=0 if quantized_kv_start is None else quantized_kv_start)

    @property
    def quantized(self) -> bool:
        """Whether K or V is quantized at all."""
        return self.k_bits is not None or self.v_bits is not None

    def describe(self) -> str:
        """A short name: "float", or e.g. "k8 v4 g64" (with "start N" when quantized_kv_start is set)."""
        if not self.quantized:
            return "float"
        side = lambda b: "f" if b is None else str(b)  # noqa: E731
        text = f"k{side(self.k_bits)} v{side(self.v_bits)} g{self.group_size}"
        return text + (f" start {self.quantized_kv_start}" if self.quantized_kv_start else "")

    def check(self, text_config) -> None:
        """Raise InputError unless every layer's head dim splits into whole groups."""
        if not self.quantized:
            return
        for i, spec in enumerate(text_config.layers):
            if spec.head_dim % self.group_size:
                raise InputError(f"kv group_size {self.group_size} does not divide the head dim {spec.head_dim} "
                                 f"of layer {i}; use a group size that does")

    def element_bytes(self, bits: int | None, float_bytes: int) -> float:
        """Bytes one stored element takes: float_bytes, or bits/8 plus its share of a scale and a bias."""
        if bits is None:
            return float(float_bytes)
        return bits / 8 + 2 * float_bytes / self.group_size

    def position_bytes(self, num_kv_heads: int, head_dim: int, float_bytes: int) -> float:
        """K plus V bytes of one position of one layer."""
        per = num_kv_heads * head_dim
        return per * (self.element_bytes(self.k_bits, float_bytes) + self.element_bytes(self.v_bits, float_bytes))

    def quantize_keys(self, k: mx.array):
        return k if self.k_bits is None or isinstance(k, QuantizedKV) else QuantizedKV.quantize(
            k, self.k_bits, self.group_size)

    def quantize_values(self, v: mx.array):
        return v if self.v_bits is None or isinstance(v, QuantizedKV) else QuantizedKV.quantize(
            v, self.v_bits, self.group_size)


FLOAT_KV = KVSetting()


@dataclass
class QuantizedKV:
    """Keys or values (B, H, S, D) as mx.quantize stores them: packed data (B, H, S, D * bits / 32) uint32 and a
    scale and bias per group of the head dim (B, H, S, D / group_size) in the compute dtype.

    It indexes, assigns, reshapes and concatenates along the leading axes like the float buffer it replaces (the
    head dim is never indexed), so the caches write and read it in place the same way; attention dequantizes it
    one key block at a time (kernels/reference.py).
    """

    data: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @classmethod
    def quantize(cls, x: mx.array, bits: int, group_size: int) -> QuantizedKV:
        data, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
        return cls(data, scales, biases, bits, group_size)

    @classmethod
    def zeros(cls, shape: tuple, *, bits: int, group_size: int, dtype) -> QuantizedKV:
        """A buffer that dequantizes to zeros (scale and bias 0)."""
        lead, D = tuple(shape[:-1]), shape[-1]
        return cls(mx.zeros(lead + (D * bits // 32,), dtype=mx.uint32), mx.zeros(lead + (D // group_size,), dtype),
                   mx.zeros(lead + (D // group_size,), dtype), bits, group_size)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[:-1]) + (self.data.shape[-1] * 32 // self.bits,)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        """The float dtype it dequantizes to."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.biases.nbytes

    def arrays(self) -> list[mx.array]:
        return [self.data, self.scales, self.biases]

    def dequantize(self) -> mx.array:
        """The float values (in self.dtype)."""
        return mx.dequantize(self.data, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    def _like(self, data, scales, biases) -> QuantizedKV:
        return QuantizedKV(data, scales, biases, self.bits, self.group_size)

    def __getitem__(self, index) -> QuantizedKV:
        return self._like(self.data[index], self.scales[index], self.biases[index])

    def __setitem__(self, index, value: QuantizedKV) -> None:
        if not isinstance(value, QuantizedKV) or (value.bits, value.group_size) != (self.bits, self.group_size):
            raise TypeError("a quantized K/V buffer takes only K/V quantized the same way")
        self.data[index] = value.data
        self.scales[index] = value.scales
        self.biases[index] = value.biases

    def reshape(self, *shape) -> QuantizedKV:
        """Reshape the leading axes; the last entry of shape is the (unchanged) head dim."""
        lead = tuple(shape[:-1])
        return self._like(self.data.reshape(lead + (self.data.shape[-1],)),
                          self.scales.reshape(lead + (self.scales.shape[-1],)),
                          self.biases.reshape(lead + (self.biases.shape[-1],)))

    def copy(self) -> QuantizedKV:
        return self._like(mx.array(self.data), mx.array(self.scales), mx.array(self.biases))

    @staticmethod
    def concatenate(xs: list[QuantizedKV], axis: int) -> QuantizedKV:
        if axis in (-1, xs[0].ndim - 1):
            raise ValueError("quantized K/V concatenate along a leading axis only")
        if not all(isinstance(x, QuantizedKV) and (x.bits, x.group_size) == (xs[0].bits, xs[0].group_size)
                   for x in xs):
            raise TypeError("quantized K/V concatenate only with K/V quantized the same way")
        return xs[0]._like(*(mx.concatenate([getattr(x, f) for x in xs], axis=axis)
                             for f in ("data", "scales", "biases")))


def dequantized(x) -> mx.array:
    """x as a float array: dequantized if it is a QuantizedKV, else itself."""
    return x.dequantize() if isinstance(x, QuantizedKV) else x


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
        return _arrays(self.keys) + _arrays(self.values)


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
        new_k = _zeros_like(k, (B, H, target, D))
        new_v = _zeros_like(v, (B, H, target, v.shape[3]))
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
            self.keys = _zeros_like(k, (B, H, self.size, D))
            self.values = _zeros_like(v, (B, H, self.size, v.shape[3]))
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
        keys = _concat([self.keys[..., slots, :], k], axis=2) if len(past) else k
        values = _concat([self.values[..., slots, :], v], axis=2) if len(past) else v
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


class _QuantizedHeld:
    """What the quantized caches add to a cache kind: K/V go through kv (a KVSetting) on their way in.

    The buffers are float until the cache would hold more than kv.quantized_kv_start positions; then what it
    holds is quantized once and every later write is quantized. Trimming or restoring keeps whichever form the
    buffers are in (a snapshot holds its own buffers, float or quantized); reset starts float again.
    """

    kv: KVSetting

    def is_quantized(self) -> bool:
        """Whether the buffers hold quantized K/V now."""
        return isinstance(self.keys, QuantizedKV) or isinstance(self.values, QuantizedKV)

    def quantize_held(self) -> None:
        """Quantize what the buffers hold (nothing to do if they already are, or hold nothing)."""
        if self.keys is not None and not self.is_quantized():
            self.keys, self.values = self.kv.quantize_keys(self.keys), self.kv.quantize_values(self.values)

    def _incoming(self, k: mx.array, v: mx.array):
        """k, v as the buffers will store them once these L positions are written."""
        if self.is_quantized() or self.offset + k.shape[2] > self.kv.quantized_kv_start:
            self.quantize_held()
            return self.kv.quantize_keys(k), self.kv.quantize_values(v)
        return k, v

    def _restart_float(self) -> None:
        if self.kv.quantized_kv_start:
            self.keys = self.values = None


class QuantizedFullCache(_QuantizedHeld, FullCache):
    """A FullCache whose K/V are stored quantized (per kv: a KVSetting)."""

    def __init__(self, kv: KVSetting, step: int = DEFAULT_FULL_STEP, max_size: int | None = None):
        super().__init__(step, max_size)
        self.kv = kv

    def reset(self) -> None:
        super().reset()
        self._restart_float()

    def update(self, k: mx.array, v: mx.array):
        return super().update(*self._incoming(k, v))


class QuantizedRingCache(_QuantizedHeld, RingCache):
    """A RingCache whose K/V are stored quantized (per kv: a KVSetting)."""

    def __init__(self, kv: KVSetting, window: int, extra: int = DEFAULT_RING_EXTRA):
        super().__init__(window, extra)
        self.kv = kv

    def reset(self) -> None:
        super().reset()
        self._restart_float()

    def update(self, k: mx.array, v: mx.array):
        return super().update(*self._incoming(k, v))


LayerCache = FullCache | RingCache


def make_cache(text_config, *, max_size: int | None = None, ring_extra: int = DEFAULT_RING_EXTRA,
               full_step: int = DEFAULT_FULL_STEP, kv: KVSetting = FLOAT_KV) -> list[LayerCache | None]:
    """One cache per decoder layer (None for layers that reuse another layer's K/V), storing K/V as kv says."""
    kv.check(text_config)
    caches: list[LayerCache | None] = []
    for spec in text_config.layers:
        if spec.kv_source is not None:
            caches.append(None)
        elif spec.is_sliding:
            caches.append(QuantizedRingCache(kv, text_config.sliding_window, ring_extra) if kv.quantized
                          else RingCache(text_config.sliding_window, ring_extra))
        else:
            caches.append(QuantizedFullCache(kv, full_step, max_size) if kv.quantized
                          else FullCache(full_step, max_size))
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
    def new(cls, model, *, max_context: int | None = None, kv: KVSetting = FLOAT_KV) -> PromptCache:
        """Empty caches for model (full-attention buffers capped at max_context when given; K/V stored per kv)."""
        return cls(make_cache(model.config.text, max_size=max_context, kv=kv))

    @property
    def kv(self) -> KVSetting:
        """How these caches store K/V."""
        return next((c.kv for c in self.caches if isinstance(c, _QuantizedHeld)), FLOAT_KV)

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
    pad = _zeros_like(x, x.shape[:2] + (size - x.shape[2], x.shape[3]))
    return _concat([x, pad], axis=2)


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
        return _arrays(self.keys) + _arrays(self.values)


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
            self.keys = _concat([_pad_to(self.keys, cap), _pad_to(k, cap)], axis=0)
            self.values = _concat([_pad_to(self.values, cap), _pad_to(v, cap)], axis=0)
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
        c = self._solo()
        n = int(self.offset[b])
        if n:
            c.keys, c.values = _copy(self.keys[b : b + 1]), _copy(self.values[b : b + 1])
        c.offset = n
        return c

    def _solo(self) -> FullCache:
        """An empty cache of one sequence, of this batch's kind."""
        return FullCache(self.step, self.max_size)

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
        self.keys = k if self.keys is None else _concat([self.keys, k], axis=0)
        self.values = v if self.values is None else _concat([self.values, v], axis=0)
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
        c = self._solo()
        c.keys, c.values = _copy(self.keys[b : b + 1]), _copy(self.values[b : b + 1])
        c.positions, c.offset = self.positions[b].copy(), int(self.offset[b])
        return c

    def _solo(self) -> RingCache:
        """An empty ring of one sequence, of this batch's kind."""
        return RingCache(self.window, self.extra)

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


class _BatchQuantized:
    """What the quantized batched caches add: rows are always held quantized (a batch holds rows at different
    depths, so quantized_kv_start applies only to a sequence's own caches before it joins)."""

    kv: KVSetting

    def add_row(self, cache) -> None:
        """Append a sequence's own quantized cache as a new row (quantizing what it holds first, if need be)."""
        cache.quantize_held()
        super().add_row(cache)

    def update(self, k: mx.array, v: mx.array):
        return super().update(self.kv.quantize_keys(k), self.kv.quantize_values(v))


class BatchQuantizedFullCache(_BatchQuantized, BatchFullCache):
    """BatchFullCache with K/V stored quantized per kv."""

    def __init__(self, kv: KVSetting, step: int = DEFAULT_FULL_STEP, max_size: int | None = None):
        super().__init__(step, max_size)
        self.kv = kv

    def _solo(self) -> QuantizedFullCache:
        return QuantizedFullCache(self.kv, self.step, self.max_size)


class BatchQuantizedRingCache(_BatchQuantized, BatchRingCache):
    """BatchRingCache with K/V stored quantized per kv."""

    def __init__(self, kv: KVSetting, window: int, extra: int = DEFAULT_RING_EXTRA):
        super().__init__(window, extra)
        self.kv = kv

    def _solo(self) -> QuantizedRingCache:
        return QuantizedRingCache(self.kv, self.window, self.extra)


class BatchCaches:
    """The batched caches of every layer (None where a layer reuses another's K/V), one row per sequence."""

    def __init__(self, text_config, *, max_size: int | None = None, ring_extra: int = DEFAULT_RING_EXTRA,
                 full_step: int = DEFAULT_FULL_STEP, kv: KVSetting = FLOAT_KV):
        kv.check(text_config)
        self.kv = kv
        self.layers: list = []
        for spec in text_config.layers:
            if spec.kv_source is not None:
                self.layers.append(None)
            elif spec.is_sliding:
                self.layers.append(BatchQuantizedRingCache(kv, text_config.sliding_window, ring_extra)
                                   if kv.quantized else BatchRingCache(text_config.sliding_window, ring_extra))
            else:
                self.layers.append(BatchQuantizedFullCache(kv, full_step, max_size) if kv.quantized
                                   else BatchFullCache(full_step, max_size))

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
