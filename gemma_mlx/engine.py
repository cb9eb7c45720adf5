"""The engine: many sequences stepped together, one forward per decode step for all of them.

A Sequence is a prompt with its caches, its sampling state and stop criteria, and its output so far. Each engine
step (``Engine.step``) does at most two things: one prefill chunk of the sequence that is joining (so a long new
prompt delays the running ones by at most one chunk per step), then one decode forward over every running
sequence, each a row of the batched caches (cache.BatchCaches) at its own position. Sequences join between steps
once their prefill is done and leave between steps (EOS, max tokens, context, cancellation, a stop string).

A Handle gives two views of its sequence: iterating it yields TokenEvents (new ids, at the end the finish
reason and stats); ``Handle.events()`` yields the text Events every other stream yields (gemma_mlx.events: text
by kind, the final Result), detokenised with the engine's tokenizer, and ends the sequence at a stop string.

``Engine.start`` runs the steps in a thread of its own; ``submit`` (from any thread) returns a Handle whose
events can be iterated, or cancelled. A finished sequence's caches go to a shared prompt store (least recently
used evicted first, bounded in bytes), from which a later sequence starts at its longest cached prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import DEFAULT_RING_EXTRA, FLOAT_KV, BatchCaches, KVSetting, PromptCache, make_cache
from .errors import ContextLengthError, InputError
from .events import Event, TextStream
from .generation import GenerationStats, SamplingOptions
from .prefill import DEFAULT_PREFILL_CHUNK, plan_chunks, prefill
from .processing.prompt import PreparedPrompt
from .sampling import PENALTY_CONTEXT, RowSampler, sample


@dataclass
class TokenEvent:
    """What a sequence produced since its last token event: new token ids, and at the end why it finished."""

    tokens: list[int]
    finish_reason: str | None = None  # set on the last event: "stop", "length", "context", "interrupted", ...
    stats: GenerationStats | None = None  # on the last event
    error: Exception | None = None  # a request the engine refused (the last event)


@dataclass
class Sequence:
    """One request inside the engine: prompt, caches (own while prefilling, a batch row once running), output."""

    id: int
    prompt: PreparedPrompt
    opts: SamplingOptions
    budget: int
    handle: Handle
    cache: PromptCache | None = None
    chunks: list = field(default_factory=list)  # prefill chunks (start, end) still to run
    sampler: RowSampler | None = None
    pending: int | None = None  # the last token: emitted, not yet in the caches
    output: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    started: float = 0.0


class _TextFeed:
    """TokenEvents in, text Events out (one per handle): the detokenising and stop-string half of events()."""

    def __init__(self, handle: Handle):
        tokenizer = handle._engine.tokenizer
        if tokenizer is None:
            raise InputError("text events need an engine that has the tokenizer (Gemma.engine() makes one)")
        self.handle = handle
        self.stream = TextStream(tokenizer, handle.opts.stop, handle.opts.eos_ids)

    def feed(self, event: TokenEvent) -> list[Event]:
        stream, out = self.stream, []
        for token in event.tokens:
            if stream.stopped:  # tokens the engine made before the cancel took effect are not the reply's
                break
            out += stream.add(token)
            if stream.stopped:
                self.handle.cancel("stop_string")
        if event.finish_reason is not None:
            stats = event.stats or GenerationStats()
            stats.generated_tokens = len(stream.tokens)
            reason = stats.finish_reason = "stop_string" if stream.stopped else event.finish_reason
            out += stream.finish()
            out.append(stream.final_event(reason, stats))
        return out


class Handle:
    """A submitted request seen from outside: iterate its TokenEvents (or its text Events: events(), aevents()),
    read its tokens, cancel it. Thread-safe; the engine thread fills it."""

    def __init__(self, engine: Engine, opts: SamplingOptions):
        self._engine = engine
        self.opts = opts
        self._events: queue.Queue = queue.Queue()
        self._notify = None  # set by aevents: wakes its asyncio loop when an event arrives
        self.cancelled: str | None = None  # the finish reason a cancel asked for
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stats: GenerationStats | None = None
        self.cache_bytes = 0  # the sequence's K/V bytes, as last measured

    def cancel(self, reason: str = "interrupted") -> None:
        """Ask the engine to end this sequence at its next step (finish_reason = reason)."""
        if self.finish_reason is None and self.cancelled is None:
            self.cancelled = reason
            self._engine._wake()

    @property
    def done(self) -> bool:
        """Whether the sequence's last event has been read."""
        return self.finish_reason is not None

    def _put(self, event: TokenEvent) -> None:  # engine side
        self._events.put(event)
        notify = self._notify
        if notify is not None:
            notify()

    def _record(self, event: TokenEvent) -> bool:
        """Take in one event read from the queue; return whether it was the last."""
        self.tokens += event.tokens
        if event.finish_reason is not None or event.error is not None:
            self.finish_reason, self.stats = event.finish_reason or "error", event.stats
            return True
        return False

    def __iter__(self) -> Iterator[TokenEvent]:
        """The TokenEvents as they come, until the last one; with no engine thread, steps the engine itself."""
        while True:
            try:
                event = self._events.get(timeout=0.05) if self._engine.threaded else self._events.get_nowait()
            except queue.Empty:
                if not self._engine.threaded:
                    self._engine.step()
                continue
            last = self._record(event)
            yield event
            if event.error is not None:
                raise event.error
            if last:
                return

    def events(self) -> Iterator[Event]:
        """The sequence's text Events as they come (answer, thinking and tool-call text apart), the last one
        (``event.done``) with the Result; a stop string ends the sequence (finish reason "stop_string")."""
        feed = _TextFeed(self)
        for event in self:
            yield from feed.feed(event)

    async def aevents(self) -> AsyncIterator[Event]:
        """events() for an asyncio loop: awaits each event without blocking the loop or holding a thread (the
        engine must be started). If the consumer stops early (a client went away), the sequence is cancelled."""
        if not self._engine.threaded:
            raise InputError("aevents() needs a running engine thread (engine.start())")
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(arrived.set)
        feed = _TextFeed(self)
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    await arrived.wait()
                    arrived.clear()
                    continue
                last = self._record(event)
                if event.error is not None:
                    raise event.error
                for text_event in feed.feed(event):
                    yield text_event
                if last:
                    return
        finally:
            self._notify = None
            self.cancel()

    def result(self) -> list[int]:
        """All generated tokens, once the sequence has finished (waits for it)."""
        for _ in self:
            pass
        return self.tokens


class Engine:
    """Steps many sequences of one model together (see the module docstring)."""

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_context: int | None = None, ring_extra: int = DEFAULT_RING_EXTRA,
                 memory_limit: int | None = None, store_bytes: int = 0, kv: KVSetting = FLOAT_KV,
                 tokenizer=None):
        self.model = model
        self.kv = kv  # how every sequence's caches (and the batch's rows) store K/V
        self.tokenizer = tokenizer  # for Handle.events(); token-level use needs none
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context or model.config.text.max_position_embeddings
        self.ring_extra = ring_extra
        self.memory_limit = memory_limit  # bytes all sequences' caches may take together
        self.store_bytes = store_bytes  # bytes the shared prompt store may keep
        self.store: OrderedDict[int, PromptCache] = OrderedDict()
        self.batch = BatchCaches(model.config.text, max_size=max_context, ring_extra=ring_extra, kv=kv)
        self.running: list[Sequence] = []  # row b of self.batch is running[b]
        self.waiting: list[Sequence] = []
        self.joining: Sequence | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        cfg = model.config
        self._placeholders = [t for t in (cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id)
                              if t is not None]
        self._per_token = self._bytes_per_token()

    # -- outside: submit, threads ------------------------------------------------------------------

    def submit(self, prompt, opts: SamplingOptions, *, media: dict | None = None) -> Handle:
        """Queue a prompt (a PreparedPrompt, or token ids with their media inputs); return its Handle."""
        opts.check()
        if not isinstance(prompt, PreparedPrompt):
            prompt = PreparedPrompt.from_ids(prompt, self.model.config.token_ids, media)
        ids = prompt.input_ids
        if len(ids) >= self.max_context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context allowed is "
                                     f"{self.max_context} tokens, which leaves no room for an answer")
        handle = Handle(self, opts)
        seq = Sequence(id=next(self._ids), prompt=prompt, opts=opts, budget=min(opts.max_tokens, self.max_context - len(ids)), handle=handle)
        need = self.sequence_bytes(seq)
        if self.memory_limit is not None and need > self.memory_limit:
            raise InputError(f"this request's caches would take {need / 1e9:.2f} GB but the engine's memory "
                             f"limit is {self.memory_limit / 1e9:.2f} GB; shorten the prompt or max_tokens")
        with self._lock:
            self.waiting.append(seq)
        self._wake()
        return handle

    @property
    def threaded(self) -> bool:
        """Whether the engine thread is stepping."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        """Step in a thread of its own until close()."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="gemma-mlx-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the engine thread (running sequences stay where they are)."""
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _wake(self) -> None:
        self._wakeup.set()

    def _loop(self) -> None:
        while not self._stop:
            if not self.step():
                self._wakeup.wait(0.1)
                self._wakeup.clear()

    @property
    def busy(self) -> bool:
        """Whether any sequence is waiting, joining or running."""
        return bool(self.waiting or self.joining or self.running)

    # -- memory --------------------------------------------------------------------------------------

    def _bytes_per_token(self) -> tuple[int, int]:
        """(K/V bytes per position of the full layers, bytes of all rings of one sequence)."""
        t = self.model.config.text
        item = mx.zeros((), dtype=self.model.language_model.embed_tokens.weight.dtype).itemsize
        full = ring = 0
        for spec in t.layers:
            if spec.kv_source is not None:
                continue
            per = self.kv.position_bytes(spec.num_kv_heads, spec.head_dim, item)
            if spec.is_sliding:
                ring += per * (t.sliding_window - 1 + self.ring_extra)
            else:
                full += per
        return math.ceil(full), math.ceil(ring)  # quantized K/V: a fraction of a byte per element

    def sequence_bytes(self, seq: Sequence) -> int:
        """The most K/V bytes seq's caches can take (its prompt plus its whole budget)."""
        full, ring = self._per_token
        return full * (len(seq.prompt) + seq.budget) + ring

    def _in_use(self) -> int:
        return sum(self.sequence_bytes(s) for s in self.running) + (
            self.sequence_bytes(self.joining) if self.joining else 0)

    # -- stepping ------------------------------------------------------------------------------------

    def step(self) -> bool:
        """One engine step: cancellations, one prefill chunk of a joining sequence, one decode of all running
        ones. Returns whether there was anything to do."""
        with self._lock:
            self._drop_cancelled()
            if self.joining is None and self.waiting and len(self.running) < self.max_batch:
                seq = self.waiting[0]
                if self.memory_limit is None or self._in_use() + self.sequence_bytes(seq) <= self.memory_limit:
                    self.waiting.pop(0)
                    self._begin(seq)
        worked = False
        if self.joining is not None:
            self._prefill_chunk(self.joining)
            worked = True
        if self.running:
            self._decode()
            worked = True
        return worked

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.handle.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, seq.handle.cancelled, keep=False)
        if self.joining is not None and self.joining.handle.cancelled:
            seq, self.joining = self.joining, None
            self._finish(seq, seq.handle.cancelled, keep=False)
        gone = [b for b, s in enumerate(self.running) if s.handle.cancelled]
        if gone:
            self._leave(gone, [self.running[b].handle.cancelled for b in gone])

    def _begin(self, seq: Sequence) -> None:
        """Start seq's prefill from the longest prefix the prompt store holds."""
        seq.started = time.perf_counter()
        prompt = seq.prompt
        seq.stats.prompt_tokens = len(prompt)
        seq.cache = self._from_store(prompt.keys)
        reuse = seq.stats.reused_tokens = seq.cache.rewind(prompt.keys, prompt.spans)
        seq.cache.keys = list(prompt.keys)
        seq.chunks = plan_chunks(prompt.spans, reuse, len(prompt), self.prefill_chunk)
        self.joining = seq

    def _prefill_chunk(self, seq: Sequence) -> None:
        start, end = seq.chunks.pop(0)
        # One planned chunk: prefill embeds it (and any media item inside it) just before its forward.
        hidden = prefill(self.model, seq.prompt, seq.cache.caches, start, end, chunk_size=end - start)
        mx.eval([c.state for c in seq.cache.caches if c is not None])
        if seq.chunks:
            return
        self.joining = None
        seq.sampler = RowSampler.from_options(seq.opts, self.model.config.text.vocab_size,
                                              seq.prompt.input_ids[-PENALTY_CONTEXT:])
        token = int(sample(self.model.logits(hidden[:, -1:, :])[:, -1, :], [seq.sampler])[0])
        seq.stats.prompt_seconds = time.perf_counter() - seq.started
        seq.started = time.perf_counter()
        if self._emit(seq, token):
            self._finish(seq, seq.stats.finish_reason, keep=True, caches=seq.cache)
            return
        self.batch.add(seq.cache.caches)
        seq.cache = None  # the batch row holds them now
        self.running.append(seq)
        seq.handle.cache_bytes = self.batch.row_nbytes()[-1]

    def _decode(self) -> None:
        tokens = np.array([s.pending for s in self.running], dtype=np.int32)
        if self._placeholders:  # a sampled placeholder id embeds as pad (decode steps carry no media)
            tokens = np.where(np.isin(tokens, self._placeholders), self.model.config.text.pad_token_id, tokens)
        offsets = self.batch.offsets
        h = self.model.language_model.embed(mx.array(tokens)[:, None])
        hidden = self.model.hidden_states(h, cache=self.batch, offset=offsets)
        new = sample(self.model.logits(hidden)[:, -1, :], [s.sampler for s in self.running])
        mx.eval(new, self.batch.state)
        done, reasons = [], []
        for b, (seq, token) in enumerate(zip(self.running, new.tolist())):
            if self._emit(seq, token):
                done.append(b)
                reasons.append(seq.stats.finish_reason)
        if done:
            self._leave(done, reasons)
        sizes = self.batch.row_nbytes() if self.running else []
        for seq, n in zip(self.running, sizes):
            seq.handle.cache_bytes = n

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand token to seq's handle; return whether seq is finished (its stats.finish_reason says why)."""
        seq.output.append(token)
        seq.pending = token
        seq.stats.generated_tokens = len(seq.output)
        seq.stats.generation_seconds = time.perf_counter() - seq.started
        finished = None
        if token in seq.opts.eos_ids:
            finished = "stop"
        elif len(seq.output) >= seq.budget:
            finished = "length" if seq.budget == seq.opts.max_tokens else "context"
        seq.stats.finish_reason = finished or ""
        seq.handle._put(TokenEvent([token]))
        return finished is not None

    def _leave(self, rows: list[int], reasons: list[str]) -> None:
        """Take the listed rows out of the batch; each sequence ends with its reason; its caches go to the store."""
        for b, reason in zip(rows, reasons):
            seq = self.running[b]
            cache = None
            if self.store_bytes:
                cache = PromptCache(self.batch.row(b), keys=list(seq.prompt.keys) + seq.output[:-1])
            self._finish(seq, reason, keep=True, caches=cache)
        keep = [b for b in range(len(self.running)) if b not in set(rows)]
        self.batch.keep(keep)
        self.running = [self.running[b] for b in keep]

    def _finish(self, seq: Sequence, reason: str, *, keep: bool, caches: PromptCache | None = None) -> None:
        seq.stats.finish_reason = reason
        seq.handle._put(TokenEvent([], finish_reason=reason, stats=seq.stats))
        if keep and caches is not None and self.store_bytes:
            self._to_store(seq.id, caches)

    # -- the shared prompt store -----------------------------------------------------------------------

    @staticmethod
    def _cache_bytes(cache: PromptCache) -> int:
        return sum(c.nbytes for c in cache.caches if c is not None)

    def _to_store(self, key: int, cache: PromptCache) -> None:
        if self._cache_bytes(cache) > self.store_bytes:
            return
        self.store[key] = cache
        while sum(self._cache_bytes(c) for c in self.store.values()) > self.store_bytes:
            self.store.popitem(last=False)  # least recently used first

    def _from_store(self, keys: list) -> PromptCache:
        """The stored cache sharing the longest prefix with keys (taken out of the store), or a new one."""
        best, best_n = None, 0
        for k, cache in self.store.items():
            n = 0
            for a, b in zip(cache.keys, keys):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = k, n
        if best is not None:
            return self.store.pop(best)
        return PromptCache(make_cache(self.model.config.text, max_size=self.max_context, ring_extra=self.ring_extra,
                                      kv=self.kv))

    def store_prefixes(self) -> list[int]:
        """How many tokens each stored prompt holds, least recently used first."""
        return [len(c.keys) for c in self.store.values()]

    def run(self, handles: list[Handle]) -> None:
        """Step until every handle's sequence has finished (without the thread)."""
        while any(h.finish_reason is None for h in handles):
            for h in handles:
                while not h.done and not h._events.empty():
                    h._record(h._events.get())
            if any(h.finish_reason is None for h in handles) and not self.step():
                break
