"""Checkpoints: which are whole, where a rerun resumes, and how a pre-empted run keeps its progress.

A rerun of the same command resumes from the newest complete checkpoint in --output_dir by itself. On
SIGTERM (what schedulers, `kill` and torchrun send) or SIGUSR1, the run finishes the current optimizer
step, saves a checkpoint, and exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete once trainer_state.json, which Trainer writes last, parses."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((path / f).exists() for f in WEIGHT_FILES)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True
    )
    for _step, path in found:
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("Skipping %s: incomplete (interrupted while saving?)", path)
    return None


def resume_point(cfg) -> str | None:
    if cfg.resume_from_checkpoint:
        return cfg.resume_from_checkpoint
    found = latest_complete_checkpoint(cfg.output_dir)
    if found:
        logger.info("Resuming from %s (pass --resume_from_checkpoint to choose another)", found)
    return found


class SaveOnSignal(TrainerCallback):
    def __init__(self):
        self.received: int | None = None

    def handle(self, signum, frame) -> None:
        self.received = signum  # acted on at the end of the step: a half-done step cannot be saved

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_received(args):
            control.should_save = True
            control.should_training_stop = True

    def _anyone_received(self, args) -> bool:
        """In a multi-process run the signal reaches each process at a slightly different moment; all
        must stop after the same step, or the ones still training wait forever in their all-reduce."""
        flag = 0 if self.received is None else int(self.received)
        if args.world_size > 1 and torch.distributed.is_initialized():
            tensor = torch.tensor([flag], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
        if flag and self.received is None:
            self.received = flag
        return bool(flag)


@contextlib.contextmanager
def saving_on_signal(trainer):
    """Around trainer.train(): signals become a checkpoint and exit code 128 + signum; the previous
    handlers come back however training ends, a crash included."""
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SaveOnSignal))
    previous = {s: signal.signal(s, callback.handle) for s in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if callback.received is not None:
        logger.warning(
            "%s received: stopped after step %d and saved checkpoint-%d in %s. Rerun the same command to resume.",
            signal.Signals(callback.received).name, trainer.state.global_step, trainer.state.global_step,
            trainer.args.output_dir,
        )  # fmt: skip
        raise SystemExit(128 + callback.received)
