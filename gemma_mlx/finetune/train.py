"""The training loop: masked next-token loss over Samples, AdamW, checkpoints that resume exactly.

The loss reads only the positions a Sample marks as targets, and only those positions' logits are computed (the
262144-wide vocabulary times every position would be gigabytes). Each sample runs its own forward with its own
media (rows of one batch may hold different images), so a batch's loss is the sum of its samples' token losses
divided by their target count; a sample with no targets adds exactly zero (never 0/0). Batches are drawn in a
seeded order that depends only on (seed, step), and dropout is seeded per step, so a run resumed from a
checkpoint follows the uninterrupted run's loss curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import InputError, WeightsError
from ..jsonfile import read_json_object
from ..processing.prompt import media_items
from .data import Sample
from .lora import Adapter

STATE_FILE = "training_state.safetensors"
PROGRESS_FILE = "training_progress.json"


@dataclass(frozen=True)
class TrainSettings:
    """How to train: steps, batches, learning rate, checkpoints (validated once by check())."""

    iters: int = 600
    learning_rate: float = 1e-4
    warmup: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    grad_checkpoint: bool = False
    seed: int = 0
    steps_per_eval: int = 100
    val_batches: int = 25  # validation batches per evaluation; 0: the whole valid set
    steps_per_save: int = 100
    weight_decay: float = 0.0

    def check(self) -> TrainSettings:
        for name in ("iters", "batch_size", "grad_accum", "steps_per_eval", "steps_per_save"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, not {v!r}")
        for name in ("warmup", "val_batches", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**32:
                raise InputError(f"{name} must be an integer from 0 to 2^32 - 1, not {v!r}")
        for name in ("learning_rate", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a finite number ≥ 0, not {v!r}")
        return self


@dataclass
class StepReport:
    """What one optimizer step did (for progress bars and logs)."""

    step: int
    iters: int
    loss: float
    tokens: int  # target tokens in the step
    tokens_per_second: float
    peak_memory_gb: float
    seconds_left: float
    val_loss: float | None = None


def sample_loss(model, sample: Sample, *, checkpoint: bool = False) -> tuple[mx.array, int]:
    """(sum of the target tokens' cross-entropy, their count) for one sample."""
    p = sample.prompt
    positions = np.nonzero(sample.targets)[0]
    positions = positions[positions > 0]
    if not len(positions):
        return mx.array(0.0), 0
    h = model.embed_range(p.input_ids, p.spans, media_items(p.media), 0, len(p))[None]
    hidden = model.hidden_states(h, spans=p.spans, offset=0, checkpoint=checkpoint)
    logits = model.logits(hidden[0, mx.array(positions - 1)])
    if logits.dtype in (mx.float16, mx.bfloat16):  # the softmax and its log in float32 at least
        logits = logits.astype(mx.float32)
    labels = mx.array(p.input_ids[positions].astype(np.int32))
    return nn.losses.cross_entropy(logits, labels, reduction="sum"), len(positions)


def batch_loss(model, samples: list[Sample], *, checkpoint: bool = False) -> tuple[mx.array, int]:
    """(sum of token losses, target count) over a batch of samples."""
    total, count = mx.array(0.0), 0
    for s in samples:
        loss, n = sample_loss(model, s, checkpoint=checkpoint)
        total, count = total + loss, count + n
    return total, count


def batch_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The sample indices of step `step` (0-based): epochs are seeded permutations, batches cut from them."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:
        return [int(i) for i in np.resize(order, batch_size)]
    return [int(i) for i in order[k * batch_size:(k + 1) * batch_size]]


class Trainer:
    """Trains an adapter on a model: step() one optimizer step, run() the whole schedule with checkpoints."""

    def __init__(self, model, adapter: Adapter, train: list[Sample], settings: TrainSettings, *,
                 valid: list[Sample] = (), out_dir: str | Path | None = None, base_model: str = ""):
        if not train:
            raise InputError("no training samples")
        self.model, self.adapter, self.train, self.valid = model, adapter, train, list(valid)
        self.settings = settings.check()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.base_model = base_model
        s = self.settings
        lr = s.learning_rate
        schedule = optim.cosine_decay(lr, max(1, s.iters - s.warmup), lr * 0.1)
        if s.warmup:
            schedule = optim.join_schedules([optim.linear_schedule(0.0, lr, s.warmup), schedule], [s.warmup])
        self.optimizer = optim.AdamW(learning_rate=schedule, weight_decay=s.weight_decay)
        self.step_count = 0
        self.losses: list[float] = []
        self._grad = nn.value_and_grad(model, self._loss)

    def _loss(self, model, samples):
        total, count = batch_loss(model, samples, checkpoint=self.settings.grad_checkpoint)
        return total / max(count, 1)

    def step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum batches; returns (mean token loss, target tokens)."""
        s = self.settings
        mx.random.seed(s.seed * 1_000_003 + self.step_count)  # dropout masks depend on (seed, step) only
        grads, loss_sum, count = None, 0.0, 0
        for micro in range(s.grad_accum):
            idx = batch_order(len(self.train), s.batch_size, s.seed, self.step_count * s.grad_accum + micro)
            samples = [self.train[i] for i in idx]
            n = sum(int(x.targets[1:].sum()) for x in samples)
            if not n:
                continue
            loss, g = self._grad(self.model, samples)
            g = tree_map(lambda a: a * n, g)  # back to a sum, so micro-batches weigh by their tokens
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, loss)
            loss_sum, count = loss_sum + loss.item() * n, count + n
        if grads is not None:
            self.optimizer.update(self.model, tree_map(lambda a: a / count, grads))
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step_count += 1
        loss = loss_sum / max(count, 1)
        self.losses.append(loss)
        return loss, count

    def validation_loss(self) -> float | None:
        """Mean token loss over the validation set (or its first val_batches batches)."""
        if not self.valid:
            return None
        s = self.settings
        total, count = 0.0, 0
        batches = [self.valid[i:i + s.batch_size] for i in range(0, len(self.valid), s.batch_size)]
        for batch in batches[: s.val_batches or None]:
            loss, n = batch_loss(self.model, batch)
            total, count = total + loss.item(), count + n
        return total / max(count, 1)

    # -- checkpoints --------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """The adapter and the training state (optimizer, step, losses) into out_dir."""
        if self.out_dir is None:
            return None
        self.adapter.save(self.out_dir, self.base_model)
        state = dict(tree_flatten(self.optimizer.state))
        tmp = self.out_dir / (STATE_FILE + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), state)
        tmp.replace(self.out_dir / STATE_FILE)
        import json

        progress = {"step": self.step_count, "losses": self.losses, "settings": asdict(self.settings)}
        tmp = self.out_dir / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(progress))
        tmp.replace(self.out_dir / PROGRESS_FILE)
        return self.out_dir

    def resume(self) -> int:
        """Continue from the checkpoint in out_dir (adapter weights already loaded by the caller); the step."""
        d = self.out_dir
        if d is None or not (d / STATE_FILE).is_file() or not (d / PROGRESS_FILE).is_file():
            raise InputError(f"{d}: no checkpoint to resume from (train without --resume first)")
        progress = read_json_object(d / PROGRESS_FILE, error=WeightsError)
        try:
            state = mx.load(str(d / STATE_FILE))
        except Exception as e:  # mlx raises bare RuntimeError/ValueError for unreadable files
            raise WeightsError(f"{d / STATE_FILE}: cannot be read ({e})") from None
        step = progress.get("step")
        if not isinstance(step, int) or step < 0:
            raise WeightsError(f"{d / PROGRESS_FILE}: no valid step")
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(state.items()))
        self.step_count = step
        self.losses = [float(x) for x in progress.get("losses", [])][:step]
        return step

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> list[float]:
        """Train to settings.iters (from the current step), evaluating and saving as set; Ctrl-C saves first."""
        s = self.settings
        started, done_tokens = time.perf_counter(), 0
        first = self.step_count
        try:
            while self.step_count < s.iters:
                loss, tokens = self.step()
                done_tokens += tokens
                elapsed = time.perf_counter() - started
                val = None
                if self.step_count % s.steps_per_eval == 0 or self.step_count == s.iters:
                    val = self.validation_loss()
                if self.step_count % s.steps_per_save == 0:
                    self.save()
                if on_step is not None:
                    steps = self.step_count - first
                    on_step(StepReport(self.step_count, s.iters, loss, tokens, done_tokens / max(elapsed, 1e-9),
                                       mx.get_peak_memory() / 1e9,
                                       elapsed / steps * (s.iters - self.step_count), val))
        except KeyboardInterrupt:
            self.save()
            raise
        self.save()
        return self.losses
