"""What every layer of the package needs and no layer owns: the label of an untrained token, the language
model's part of a config, the training rows one optimizer step takes, and how run files are written.

Kept in one leaf that imports nothing of `tuner`, so the data layer, the trainer, influence and the run's
edges can all use it without importing each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

IGNORE_INDEX = -100  # the label of an untrained token: torch cross_entropy's ignore_index


def text_config(model_config):
    """The language model's config (a multimodal config keeps it in `text_config`)."""
    return getattr(model_config, "text_config", None) or model_config


def rows_per_step(args, world_size: int | None = None) -> int:
    """Training rows (chunks, packed rows, examples) one optimizer step takes over every process."""
    world = args.world_size if world_size is None else world_size
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * world


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows (a diverged run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def save_json(path: Path, payload) -> None:
    """A run file: indented, unicode kept as written, one trailing newline."""
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def step_counts(cfg, train_chunks: int | None, world_size: int) -> dict:
    """Batch and step arithmetic, as the installed Trainer does it (Trainer.set_initial_training_values):
    each process's dataloader has ceil(chunks / (batch x processes)) batches (floor with
    --dataloader_drop_last), and a partial accumulation window at the end of an epoch is a step."""
    sequences = rows_per_step(cfg, world_size)
    counts = {"effective_batch_sequences": sequences, "effective_batch_tokens": sequences * cfg.max_seq_length}
    max_steps = cfg.max_steps if cfg.max_steps > 0 else None
    if train_chunks is None:  # a stream has no length; validation requires --max_steps then
        counts.update(steps_per_epoch=None, total_steps=max_steps, epochs=None)
        return counts
    rounding = math.floor if cfg.dataloader_drop_last else math.ceil
    batches = rounding(train_chunks / (cfg.per_device_train_batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    total = max_steps if max_steps is not None else math.ceil(cfg.num_train_epochs * per_epoch)
    counts.update(steps_per_epoch=per_epoch, total_steps=total, epochs=total / per_epoch)
    return counts
