#!/usr/bin/env python
"""Fine-tune a small causal language model (Gemma 3 270M by default) with the Hugging Face Trainer.

    python main.py --help
    python main.py --config configs/quickstart-cpu.yaml
    accelerate launch --num_processes 2 main.py --bf16 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

from tuner.config import Config, parse_args, to_yaml
from tuner.errors import UsageError, report_and_exit

logger = logging.getLogger("tuner")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
        level=logging.INFO if rank == 0 else logging.WARNING,
    )  # fmt: skip


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(cfg: Config, train_chunks: int) -> int:
    """Optimizer steps the run will take; Trainer computes the same from the dataloader length."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches = math.ceil(train_chunks / (cfg.per_device_train_batch_size * world_size()))
    steps_per_epoch = max(1, batches // cfg.gradient_accumulation_steps)
    return math.ceil(cfg.num_train_epochs * steps_per_epoch)


def prepare(cfg: Config):
    """Every check and every cheap load, before model weights load: (model path, tokenizer, datasets)."""
    from tuner import data, models, validate

    validate.validate(cfg)
    model_path = models.resolve(cfg.model_name_or_path)
    validate.check_against_model(cfg, models.load_config(cfg, model_path))
    tokenizer = models.load_tokenizer(cfg, model_path)
    return model_path, tokenizer, data.build_datasets(cfg, tokenizer)


def evaluate(trainer, prefix: str) -> dict:
    from tuner.report import with_perplexity

    metrics = with_perplexity(trainer.evaluate(metric_key_prefix="eval"))
    logger.info("%s: eval_loss %.4f, perplexity %.2f", prefix, metrics["eval_loss"], metrics["perplexity"])
    return metrics


def train_and_report(cfg: Config, trainer, tokenizer, resume: str | None) -> dict:
    from tuner import report

    started = time.time()
    results: dict = {}
    if trainer.eval_dataset is not None and cfg.eval_before_training and resume is None:
        results["before_training"] = evaluate(trainer, "Before training")
    train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    trainer.save_model(cfg.output_dir)  # model + tokenizer, main process only
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    results["train"] = train_metrics
    if trainer.eval_dataset is not None:
        results["eval"] = evaluate(trainer, "After training")
        trainer.save_metrics("eval", results["eval"])
    if trainer.is_world_process_zero():
        results["samples"] = report.generate_samples(trainer.model, tokenizer, cfg.sample_prompts, cfg.max_new_tokens)
        report.print_samples(results["samples"])
        report.save_json(Path(cfg.output_dir) / "samples.json", results["samples"])
    results["wall_seconds"] = time.time() - started
    return results


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    try:
        cfg = parse_args(argv)
        model_path, tokenizer, datasets = prepare(cfg)
    except UsageError as error:
        report_and_exit(error)
    if cfg.dry_run:
        print(to_yaml(cfg))
        return {"dry_run": True}

    from tuner import models, training

    args = training.build_training_args(cfg, datasets.eval is not None, total_steps(cfg, len(datasets.train)))
    if args.should_save:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "run_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    model = models.load_model(cfg, model_path, tokenizer)
    trainer = training.build_trainer(cfg, model, tokenizer, datasets, args)
    return train_and_report(cfg, trainer, tokenizer, training.resume_point(cfg))


if __name__ == "__main__":
    main()
