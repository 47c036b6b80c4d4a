"""--influence in a training run: the reference set, which steps are scored, example identities,
the scores of every process gathered on the main one, and the files in {output_dir}/influence/.

The Trainer (training.LeanLossTrainer) calls `scoring(...)` around each micro-batch's training step
and passes `head_hook` to the loss; this callback does the rest at the step's edges:
on_pre_optimizer_step records the learning rate the step applies, on_step_end gathers the step's
scores and, before a checkpoint is saved, writes them (see influence_report.py for the resume rule).
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import TrainerCallback, default_data_collator

from tuner.common import IGNORE_INDEX
from tuner.influence import files as influence_report
from tuner.influence.mixture import MixtureFromInfluence
from tuner.influence.scores import InfluenceScorer

logger = logging.getLogger(__name__)



class IndexedDataset(torch.utils.data.Dataset):
    """A dataset whose items also carry their example id: the row's index, or the id the dataset gives it
    (`dataset.example_id(index)`: a mix numbers each source's rows, and repeats a row under the same id)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.example_id = getattr(dataset, "example_id", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "example_id": self.example_id(index) if self.example_id else index}


class CollateWithIds:
    """Batches with `example_ids`: (B,) row ids, or (B, T) packed example ids (-1 for padding)."""

    def __init__(self, collator):
        self.collator = collator or default_data_collator
        if hasattr(self.collator, "return_example_index"):  # packing.PackedCollator
            self.collator.return_example_index = True

    def __call__(self, features):
        if "example_id" not in features[0]:  # evaluation batches: the Trainer uses one collator for both
            return self.collator(features)
        ids = torch.tensor([f["example_id"] for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != "example_id"} for f in features])
        packed = batch.pop("example_index", None)
        batch["example_ids"] = packed if packed is not None else ids
        return batch


def reference_batches(cfg, eval_dataset, collator) -> list[dict]:
    """--influence_val_examples rows of the validation data, chosen once with --seed, collated."""
    total = len(eval_dataset)
    wanted = total if cfg.influence_val_examples == "all" else min(int(cfg.influence_val_examples), total)
    chosen = sorted(random.Random(cfg.seed).sample(range(total), wanted))
    collate = collator or default_data_collator
    size = cfg.per_device_eval_batch_size
    rows = [eval_dataset[i] for i in chosen]
    return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]


class InfluenceTracker(TrainerCallback):
    def __init__(self, cfg, model, datasets, tokenizer):
        self.every = cfg.influence_steps
        self.directory = Path(cfg.output_dir) / "influence"
        found = reference_batches(cfg, datasets.eval, datasets.collator)
        batches = [{k: v.to(cfg.device) for k, v in b.items()} for b in found]
        self.scorer = InfluenceScorer(model, batches, preconditioner=cfg.influence_preconditioner)
        self.describe = datasets.describe
        self.log: influence_report.ScoreLog | None = None
        self.step_results: list[tuple] = []
        self.learning_rate = 0.0
        tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        logger.info("Influence: scoring every %s against %d reference rows (%d tokens); each scored step adds one "
                    "forward and backward of them", "step" if self.every == 1 else f"{self.every} steps",
                    sum(len(b["input_ids"]) for b in batches), tokens)  # fmt: skip

    def due(self, completed: int) -> bool:
        """Is the optimizer step after `completed` steps (step number completed + 1) scored?"""
        return (completed + 1) % self.every == 0

    @property
    def head_hook(self):
        return self.scorer.head_hook

    @contextmanager
    def scoring(self, step: int, optimizer, inputs: dict, example_ids: torch.Tensor | None):
        """Around one micro-batch's training step: scores its examples if this step is scored."""
        if not self.due(step):
            with nullcontext():
                yield
            return
        self.scorer.refresh(step, optimizer)
        packed = example_ids if example_ids is not None and example_ids.dim() == 2 else None
        with self.scorer.scoring(inputs, packed):
            yield
        result = self.scorer.result
        ids = result.example_ids if packed is not None or example_ids is None else example_ids.cpu()[result.example_ids]
        self.step_results.append((ids.numpy(), result.scores.numpy(), result.trained_tokens.numpy()))

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.log = influence_report.ScoreLog(self.directory, resume_step=state.global_step)
        if state.is_world_process_zero and not (self.directory / influence_report.EXAMPLES).exists():
            influence_report.write_examples(self.directory, self.describe())

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step applies

    def on_step_end(self, args, state, control, **kwargs):
        results, self.step_results = self.step_results, []
        if results or args.world_size > 1:
            for ids, scores, tokens in gather(results, args.world_size):
                self.log.add(state.global_step, self.learning_rate, ids, scores, tokens)
        if control.should_save and state.is_world_process_zero:
            self.log.write()  # before the checkpoint: a resumed run finds every step up to it

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            influence = self.log.write()
            influence_report.write_report(self.directory, influence)
            logger.info("Influence of %d training examples written to %s (report.md: the most helpful and harmful)",
                        influence.num_rows, self.directory)  # fmt: skip
        self.scorer.close()


def gather(results: list[tuple], world_size: int) -> list[tuple]:
    """Every process's (ids, scores, tokens) of this step, on every process (main uses them)."""
    if world_size <= 1 or not torch.distributed.is_initialized():
        return results
    everyone: list = [None] * world_size
    torch.distributed.all_gather_object(everyone, results)
    return [r for process in everyone for r in process]


def attach(trainer, cfg, datasets, tokenizer) -> None:
    """Score every training example at every step: each row carries its example id(s) to the scorer, the
    tracker watches training and writes influence/ at the end; with --mixture_from_influence the next run's
    weights are written after it."""
    trainer.train_dataset = IndexedDataset(trainer.train_dataset)
    trainer.data_collator = CollateWithIds(trainer.data_collator)
    trainer.influence = InfluenceTracker(cfg, trainer.model, datasets, tokenizer)
    trainer.add_callback(trainer.influence)
    if cfg.mixture_from_influence:  # after the tracker: it reads the files the tracker writes at the end
        trainer.add_callback(MixtureFromInfluence(cfg))
