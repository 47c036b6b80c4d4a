"""TrainingArguments and the Trainer: the lean loss, checkpoint completeness and auto-resume."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, default_data_collator
from transformers.trainer_utils import speed_metrics

from tuner.common import IGNORE_INDEX, perplexity, step_counts
from tuner.data.chat_template import set_stop_tokens
from tuner.data.packing import check_packed_batch
from tuner.distill import compute_distillation_loss
from tuner.errors import UsageError
from tuner.loss import compute_causal_lm_loss
from tuner.train.callbacks import DataPosition
from tuner.train.checkpoints import SaveOnSignal
from tuner.train.guards import NonFiniteGuard

logger = logging.getLogger(__name__)


def finalize(cfg, datasets) -> None:
    """The one place the options adapt to the data, before weights load: the resolved format (auto replaced,
    so run_config.yaml reproduces the run), a mix's steps, no evaluation without validation data, warm-up no
    longer than the run, and the stream's own resume position. Changes `cfg` in place."""
    from transformers.trainer_utils import IntervalStrategy

    cfg.data_format = datasets.format
    if datasets.run_steps is not None:  # a mix in memory: its schedule was built for this many steps
        cfg.max_steps = datasets.run_steps
    has_eval = datasets.eval is not None
    if not has_eval and cfg.influence:
        raise UsageError(
            "--influence: there is no validation data to take the reference set from. Pass --validation_file or "
            "--validation_split_percentage above 0."
        )
    if not has_eval and cfg.eval_strategy != IntervalStrategy.NO:
        if cfg.load_best_model_at_end:
            raise UsageError(
                "--load_best_model_at_end: there is no validation data to pick the best checkpoint by. "
                "Pass --validation_file or --validation_split_percentage above 0, or drop the flag."
            )
        logger.info("No validation data: evaluation is off (--eval_strategy no)")
        cfg.eval_strategy, cfg.do_eval = IntervalStrategy.NO, False
    total_steps = step_counts(cfg, datasets.train_chunks, cfg.world_size)["total_steps"]
    if total_steps is not None and cfg.warmup_steps >= 1 and cfg.warmup_steps > total_steps:
        logger.warning("--warmup_steps %g exceeds the %d training steps; clamped to %d", cfg.warmup_steps, total_steps, total_steps)
        cfg.warmup_steps = total_steps
    if cfg.influence:  # the rows' example ids must reach the collator (influence.tracker.CollateWithIds)
        cfg.remove_unused_columns = False
    # A stream resumes from the position saved in the checkpoint (callbacks.DataPosition)
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

    influence = None  # influence.tracker.InfluenceTracker with --influence (attached by main.py)
    teacher = None  # with --teacher_model_name_or_path: frozen, eval mode, on this device

    def training_step(self, model, inputs, num_items_in_batch=None):
        example_ids = inputs.pop("example_ids", None)  # (B,) or (B, T): for --influence, not for the model
        if self.influence is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            with self.influence.scoring(self.state.global_step, self.optimizer, inputs, example_ids):
                loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.record_loss(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("example_ids", None)  # evaluation batches of an --influence run carry them too
        # A packed batch with an attention mask or a KV cache would let its examples attend to each other.
        check_packed_batch(inputs, getattr(unwrap_model(model).config, "use_cache", None))
        if not self.lean_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Label smoothing shapes training only: the evaluation loss stays the plain per-token NLL, so
        # perplexity = exp(eval_loss) keeps its meaning.
        smoothing = self.args.label_smoothing_factor if model.training else 0.0
        head_hook = self.influence.head_hook if self.influence is not None and model.training else None
        if self.teacher is not None and model.training:  # evaluation stays plain CE: comparable perplexities
            loss, outputs = self.distillation_loss(model, inputs, num_items_in_batch)
        else:
            loss, outputs = compute_causal_lm_loss(
                model, inputs, num_items_in_batch, use_liger=self.args.use_liger_kernel, label_smoothing=smoothing,
                head_hook=head_hook,
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = loss * self.accelerator.num_processes  # Trainer divides by the world size when summing tokens globally
        return (loss, outputs) if return_outputs else loss

    def distillation_loss(self, model, inputs, num_items_in_batch):
        args = self.args
        loss, outputs, parts = compute_distillation_loss(
            model, self.teacher, inputs, num_items_in_batch, alpha=args.distill_alpha,
            temperature=args.distill_temperature, direction=args.distill_direction,
        )  # fmt: skip
        self.distill_parts = parts  # the CE and KL terms of the last micro-batch, for tests and logs
        return loss, outputs

    # ------------------------------------------------------------ evaluation per token
    # Trainer's evaluation_loop averages one loss per batch (each repeated eval_batch_size times), so the
    # evaluation loss depends on how tokens fall into batches: packed and padded runs would disagree, and
    # a short last batch would count as a full one. Here every batch adds (loss sum, trained tokens) to
    # eval_sums; the loop's loss is replaced by their ratio over the whole set and every process.

    eval_sums: torch.Tensor | None = None  # (2,) float64 while evaluating: summed loss, trained tokens
    last_eval_sums: tuple[float, float] = (0.0, 0.0)  # of the last evaluation loop, over every process

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self.eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            loss_sum, tokens = self.accelerator.reduce(self.eval_sums, reduction="sum").tolist()
        finally:
            self.eval_sums = None
        self.last_eval_sums = (loss_sum, tokens)
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Several evaluation sets (one per source of a mix): eval_<name>_loss and eval_<name>_perplexity for each,
        and eval_loss over all of them, per trained token, logged and passed to callbacks once. Trainer's own
        handling of a dict logs each set apart and has no eval_loss, which --load_best_model_at_end needs."""
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(sets, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        started, metrics, totals, samples = time.time(), {}, [0.0, 0.0], 0
        for name, dataset in sets.items():
            prefix = f"{metric_key_prefix}_{name}"
            loader = self.get_eval_dataloader(name if eval_dataset is None else dataset)  # by name: Trainer caches it
            output = self.evaluation_loop(loader, "Evaluation", prediction_loss_only=True, ignore_keys=ignore_keys,
                                          metric_key_prefix=prefix)  # fmt: skip
            preparation = output.metrics.pop(f"{prefix}_model_preparation_time", None)  # the model's, not the set's
            if preparation is not None:
                metrics[f"{metric_key_prefix}_model_preparation_time"] = preparation
            metrics.update(output.metrics)
            metrics[f"{prefix}_perplexity"] = perplexity(output.metrics[f"{prefix}_loss"])
            totals = [t + part for t, part in zip(totals, self.last_eval_sums)]
            samples += output.num_samples
        metrics[f"{metric_key_prefix}_loss"] = totals[0] / totals[1] if totals[1] else float("nan")
        metrics.update(speed_metrics(metric_key_prefix, started, num_samples=samples))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(getattr(dataset, "dataset", dataset), "in_order", False):  # a mix in memory: its schedule is the order
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.eval_sums is None or not prediction_loss_only or inputs.get("labels") is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"].clone()
        labels[self.real_rows(len(labels)) :] = IGNORE_INDEX  # accelerate's duplicates count for nothing
        inputs = {**inputs, "labels": labels}
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the targets after the causal shift
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()  # the mean over this batch's trained tokens
        if tokens:
            self.eval_sums += torch.stack([loss.double() * tokens, torch.tensor(tokens, dtype=torch.float64)]).to(self.eval_sums.device)
        return loss, None, None

    def real_rows(self, rows: int) -> int:
        """Rows of this process's batch that are real: at the end of a set whose length does not divide
        into processes x batch size, accelerate fills every process's last batch with rows from the start,
        and gather_for_metrics keeps the first `remainder` rows of the gathered (process-major) batch."""
        state = self.accelerator.gradient_state
        if not state.end_of_dataloader or state.remainder <= 0:
            return rows
        return max(0, min(rows, state.remainder - self.accelerator.process_index * rows))


def unwrap_model(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def build_trainer(cfg, model, tokenizer, datasets, teacher=None) -> Trainer:
    """The Trainer of this run. Features that watch training (influence, ...) are attached by main.py."""
    fit_model_to_data(model, tokenizer, datasets)
    trainer = LeanLossTrainer(
        model=model,
        args=cfg,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval_sets or datasets.eval,  # a mix: each source's set, by name
        processing_class=tokenizer,
        data_collator=datasets.collator or default_data_collator,  # SFT: packed rows, or padding per batch
        callbacks=[SaveOnSignal()] + ([DataPosition()] if datasets.mix is not None or cfg.streaming else []),
    )
    trainer.data_figures = datasets.figures  # for run_summary.json
    if teacher is not None:
        trainer.teacher = teacher.to(cfg.device)
    keep_logs_in_output_dir(trainer)
    return trainer


def fit_model_to_data(model, tokenizer, datasets) -> None:
    """Packed rows: no KV cache (it turns the per-example attention off; packing.py). Chat data: generation
    stops at the end of a turn too, saved in generation_config.json."""
    if datasets.packed:
        unwrap_model(model).config.use_cache = False
    if datasets.chat:
        set_stop_tokens(model, tokenizer)


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
