"""Bad numbers stop the run: a NaN or infinite training loss or gradient norm ends training before
the optimizer applies that step, so no checkpoint with poisoned weights is ever written and the
latest complete checkpoint stays the resume point.

The check runs once per optimizer step, after the gradients are summed over accumulation and over
processes (so every process sees the same gradients and stops at the same step), and costs one
pass over the gradients: a few milliseconds against a step of seconds.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback


class NonFiniteTraining(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm; main() reports it without a traceback."""


class NonFiniteGuard(TrainerCallback):
    def __init__(self):
        self.bad_loss: float | None = None  # the first non-finite micro-batch loss of this step

    def record_loss(self, loss: torch.Tensor) -> None:
        """Called by the Trainer with each micro-batch's loss (see training.LeanLossTrainer)."""
        if self.bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self.bad_loss = float(loss.detach().float().mean())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = gradient_norm(model)
        problem = self._problem(norm)
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([problem is not None], dtype=torch.int32, device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and problem is None:
                problem = "another process's loss is not finite"
        self.bad_loss = None
        if problem:
            raise NonFiniteTraining(
                f"Training stopped at step {state.global_step + 1}: {problem}. That step was not applied and no "
                f"checkpoint holds it; rerunning resumes from the latest complete checkpoint in {args.output_dir}. "
                "Lower --learning_rate, keep --max_grad_norm above 0, check the data, or use --bf16 rather than --fp16."
            )

    def _problem(self, norm: float) -> str | None:
        if self.bad_loss is not None:
            return f"the training loss is {self.bad_loss}"
        if not math.isfinite(norm):
            return f"the gradient norm is {norm}"
        return None


def gradient_norm(model) -> float:
    """The 2-norm of all gradients: nan or inf if any element is."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
