#!/usr/bin/env python
"""Fine-tune a small causal language model (Gemma 3 270M by default) with the Hugging Face Trainer.

    python main.py --help
    python main.py --config configs/quickstart-cpu.yaml
    accelerate launch --num_processes 2 main.py --bf16 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.config import Config, build_config, parse_namespace, to_yaml
from tuner.errors import UsageError, report_and_exit
from tuner.train.guards import NonFiniteTraining

logger = logging.getLogger("tuner")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
        level=logging.INFO if rank == 0 else logging.WARNING,
    )  # fmt: skip


def configure(argv: list[str] | None) -> Config:
    """Options parsed and checked: every problem that needs neither weights nor data, raised at once."""
    from tuner import validate

    namespace = parse_namespace(argv)
    validate.validate(namespace)
    return build_config(namespace)


@dataclass
class Prepared:
    """Everything a run needs before weights load, each loaded once."""

    model_path: str
    model_config: object
    tokenizer: object
    datasets: object  # tuner.data.datasets.Datasets
    teacher_config: object | None  # --teacher_model_name_or_path's config.json


def prepare(cfg: Config) -> Prepared:
    """Every check and every cheap load, before model weights load."""
    from tuner import hub, models, validate
    from tuner.data import build
    from tuner.train import trainer as training

    hub.check_access(cfg)  # no network: cache only, and a fast answer instead of 25 s of retries
    model_path = models.resolve(cfg.model_name_or_path)
    model_config = models.load_config(cfg, model_path)
    tokenizer = models.load_tokenizer(cfg, model_path)
    teacher = models.teacher_config_and_tokenizer(cfg) if cfg.teacher_model_name_or_path else None
    validate.check_against_model(cfg, model_config, tokenizer, teacher)
    datasets = build.build_datasets(cfg, tokenizer)  # every run a list of sources, in memory or streamed
    validate.check_against_data(cfg, datasets)
    training.finalize(cfg, datasets)  # the one place the options adapt to the data
    return Prepared(model_path, model_config, tokenizer, datasets, teacher[0] if teacher else None)


def evaluate(trainer, prefix: str) -> dict:
    """Eval metrics with perplexity; reuses the evaluation Trainer already ran at the final step."""
    from tuner.report import with_perplexity

    logged = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    metrics = with_perplexity(logged[-1] if logged and trainer.state.global_step else trainer.evaluate())
    logger.info("%s: eval_loss %.4f, perplexity %.2f", prefix, metrics["eval_loss"], metrics["perplexity"])
    return metrics


def train_and_report(cfg: Config, trainer, tokenizer, resume: str | None) -> dict:
    from tuner import lora, report
    from tuner.train import checkpoints

    started = time.time()
    results: dict = {}
    if trainer.eval_dataset is not None and cfg.eval_before_training and resume is None:
        results["before_training"] = evaluate(trainer, "Before training")
    with checkpoints.saving_on_signal(trainer):  # SIGTERM: checkpoint, then exit 143
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    trainer.save_model(cfg.output_dir)  # model + tokenizer, main process only
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    if cfg.push_to_hub:
        trainer.push_to_hub()
    results["train"] = train_metrics
    if trainer.eval_dataset is not None:
        results["eval"] = evaluate(trainer, "After training")
        trainer.save_metrics("eval", results["eval"])
    if trainer.is_world_process_zero():
        results["samples"] = report.generate_samples(
            trainer.model, tokenizer, cfg.sample_prompts, cfg.max_new_tokens, chat=cfg.data_format != "text"
        )  # chat data: each prompt a user turn
        report.print_samples(results["samples"])
        report.save_json(Path(cfg.output_dir) / "samples.json", results["samples"])
    if cfg.merge_lora:
        results["merged"] = lora.merge_if_asked(cfg, trainer, tokenizer)  # last: merges in place
    results["wall_seconds"] = time.time() - started
    results["summary"] = report.finish(cfg, trainer, results)
    return results


def evaluate_only(cfg: Config, trainer) -> dict:
    """--eval_only: the loss per trained token on the validation data, saved as eval_results.json; no training."""
    metrics = evaluate(trainer, "Evaluation")
    trainer.save_metrics("eval", metrics)
    return {"eval": metrics}


def dry_run(cfg: Config, prepared: Prepared) -> dict:
    """Print the resolved config and the derived numbers; load no weights and write nothing."""
    from tuner import estimate

    numbers = estimate.estimate(cfg, prepared.model_config, prepared.datasets, cfg.world_size, prepared.tokenizer,
                                prepared.teacher_config)  # fmt: skip
    if cfg.process_index == 0:
        print(to_yaml(cfg))
        print(estimate.format_report(cfg, numbers))
    return {"dry_run": True, **numbers}


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    results = run(argv)
    release_processes()
    return results


def release_processes() -> None:
    """After a run that succeeded everywhere: every process meets, then ends its process group while
    the interpreter is whole. Left to interpreter exit, gloo's worker threads can abort the process
    (SIGABRT, "terminate called without an active exception") after a perfect run."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        PartialState().destroy_process_group()


def run(argv: list[str] | None) -> dict:
    try:
        cfg = configure(argv)
        prepared = prepare(cfg)
    except UsageError as error:
        report_and_exit(error)
    if cfg.dry_run:
        return dry_run(cfg, prepared)

    from tuner import models
    from tuner.influence import tracker
    from tuner.train import checkpoints
    from tuner.train import trainer as training

    if cfg.should_save:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "run_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    model = models.load_model(cfg, prepared.model_path, prepared.tokenizer)
    trainer = training.build_trainer(cfg, model, prepared.tokenizer, prepared.datasets, models.load_teacher(cfg))
    if cfg.influence:
        tracker.attach(trainer, cfg, prepared.datasets, prepared.tokenizer)  # scores every example; writes influence/
    if cfg.eval_only:
        return evaluate_only(cfg, trainer)
    try:
        return train_and_report(cfg, trainer, prepared.tokenizer, checkpoints.resume_point(cfg))
    except UsageError as error:  # the few found only once training starts (a checkpoint's contents)
        report_and_exit(error)
    except NonFiniteTraining as error:
        report_and_exit(error, code=1)


if __name__ == "__main__":
    main()
