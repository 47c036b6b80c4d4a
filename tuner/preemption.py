"""A pre-empted or cancelled run keeps its progress: on SIGTERM (what schedulers, `kill` and
torchrun send) or SIGUSR1, finish the current optimizer step, save a checkpoint, and exit with
128 + the signal number. Rerunning the same command resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
