"""TrainingArguments and the Trainer: the lean loss, checkpoint completeness and auto-resume."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers import Trainer, default_data_collator

from .errors import UsageError
from .guards import NonFiniteGuard
from .preemption import SaveOnSignal
from .streaming import StreamPosition

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def finalize(cfg, has_eval: bool, total_steps: int | None) -> None:
    """The choices that need the data: no evaluation without validation data, warm-up no longer
    than the run, and the stream's own resume position. Changes `cfg` in place."""
    from transformers.trainer_utils import IntervalStrategy

    if not has_eval and cfg.eval_strategy != IntervalStrategy.NO:
        if cfg.load_best_model_at_end:
            raise UsageError(
                "--load_best_model_at_end: there is no validation data to pick the best checkpoint by. "
                "Pass --validation_file or --validation_split_percentage above 0, or drop the flag."
            )
        logger.info("No validation data: evaluation is off (--eval_strategy no)")
        cfg.eval_strategy, cfg.do_eval = IntervalStrategy.NO, False
    if total_steps is not None and cfg.warmup_steps >= 1 and cfg.warmup_steps > total_steps:
        logger.warning("--warmup_steps %g exceeds the %d training steps; clamped to %d", cfg.warmup_steps, total_steps, total_steps)
        cfg.warmup_steps = total_steps
    # A stream resumes from the position saved in the checkpoint (streaming.StreamPosition)
    # instead of Trainer re-reading and discarding every batch before it.
    cfg.ignore_data_skip = cfg.ignore_data_skip or cfg.streaming


class LeanLossTrainer(Trainer):
    """Trainer whose loss never holds the full (tokens x vocab) logits; see loss.py."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = NonFiniteGuard()
        self.add_callback(self.guard)
        # FSDP and ZeRO-3 keep lm_head sharded outside its own forward, where the chunked loss needs it whole.
        self.lean_loss = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        if not self.lean_loss:
            logger.warning("FSDP/DeepSpeed shard lm_head: using the standard loss, which holds the full logits")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.record_loss(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .loss import compute_causal_lm_loss

        if not self.lean_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Label smoothing shapes training only: the evaluation loss stays the plain per-token NLL, so
        # perplexity = exp(eval_loss) keeps its meaning.
        smoothing = self.args.label_smoothing_factor if model.training else 0.0
        loss, outputs = compute_causal_lm_loss(
            model, inputs, num_items_in_batch, use_liger=self.args.use_liger_kernel, label_smoothing=smoothing
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = loss * self.accelerator.num_processes  # Trainer divides by the world size when summing tokens globally
        return (loss, outputs) if return_outputs else loss


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


def build_trainer(cfg, model, tokenizer, datasets) -> Trainer:
    trainer = LeanLossTrainer(
        model=model,
        args=cfg,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[SaveOnSignal()] + ([StreamPosition()] if cfg.streaming else []),
    )
    keep_logs_in_output_dir(trainer)
    return trainer


def keep_logs_in_output_dir(trainer) -> None:
    """TensorBoard and W&B files under {output_dir}/runs/, whatever the working directory.

    TensorBoard's callback chooses its directory in on_train_begin; an evaluation before training
    logs first, and the callback then writes to ./runs of the working directory. wandb writes to
    ./wandb unless WANDB_DIR says otherwise.
    """
    from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(trainer.args.output_dir) / default_logdir())
    if "wandb" in trainer.args.report_to and "WANDB_DIR" not in os.environ:
        runs = Path(trainer.args.output_dir) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(runs)
