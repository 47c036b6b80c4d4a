"""TrainingArguments and the Trainer: the lean loss, checkpoint completeness and auto-resume."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from .preemption import SaveOnSignal
from .streaming import StreamPosition

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def build_training_args(cfg, has_eval: bool, total_steps: int | None = None) -> TrainingArguments:
    warmup = cfg.warmup_steps
    if total_steps is not None and warmup > total_steps:
        logger.warning("--warmup_steps %d exceeds the %d training steps; clamped to %d", warmup, total_steps, total_steps)
        warmup = total_steps
    return TrainingArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=warmup,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        **_checkpointing_kwarg(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        # Only the loss is needed in evaluation: never gather (tokens x vocab) logits across batches.
        prediction_loss_only=True,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        ddp_timeout=cfg.ddp_timeout,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, processes must join with gloo on the CPU even when launched with --multi_gpu
        # (otherwise accelerate starts N unconnected copies that each train on all the data).
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; the search costs a pass
        include_num_input_tokens_seen=True,
        # A stream resumes from the position saved in the checkpoint (streaming.StreamPosition)
        # instead of Trainer re-reading and discarding every batch before it.
        ignore_data_skip=cfg.streaming,
        use_liger_kernel=False,  # Liger is applied by our loss, not by patching the model
    )


def _checkpointing_kwarg(enabled: bool) -> dict:
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing; keep our flag name.
    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


class LeanLossTrainer(Trainer):
    """Trainer whose loss never holds the full (tokens x vocab) logits; see loss.py."""

    def __init__(self, *args, use_liger: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_liger = use_liger
        # FSDP and ZeRO-3 keep lm_head sharded outside its own forward, where the chunked loss needs it whole.
        self.lean_loss = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        if not self.lean_loss:
            logger.warning("FSDP/DeepSpeed shard lm_head: using the standard loss, which holds the full logits")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .loss import compute_causal_lm_loss

        if not self.lean_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = compute_causal_lm_loss(model, inputs, num_items_in_batch, use_liger=self.use_liger)
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


def build_trainer(cfg, model, tokenizer, datasets, args: TrainingArguments) -> Trainer:
    return LeanLossTrainer(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        use_liger=cfg.use_liger_kernel,
        callbacks=[SaveOnSignal()] + ([StreamPosition()] if cfg.streaming else []),
    )
