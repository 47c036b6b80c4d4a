"""TrainingArguments options end to end on CPU: each one takes effect in a real run, the resolved
configuration reproduces the run, and --push_to_hub pushes (the hub mocked at huggingface_hub's
HfApi, never the network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_args

import main as entry
from tuner import config
from tuner.train import trainer as training

STEPS = 6
LEARNING_RATE = 5e-2


def run_args(model: str, train_file: str, out: Path, *extra: str) -> list[str]:
    return tiny_args(model, train_file, out, "--gradient_accumulation_steps", "1", "--save_steps", "1", "--eval_steps", "1",
                     "--max_new_tokens", "0", *extra)  # fmt: skip


def capture_trainer(monkeypatch) -> dict:
    captured: dict = {}
    original = training.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        captured["trainer"] = trainer
        clip = trainer.accelerator.clip_grad_norm_

        def recording_clip(parameters, max_norm, *a, **k):
            captured.setdefault("clip_norms", []).append(max_norm)
            return clip(parameters, max_norm, *a, **k)

        trainer.accelerator.clip_grad_norm_ = recording_clip
        return trainer

    monkeypatch.setattr(training, "build_trainer", build)
    return captured


def test_scheduler_optimizer_clipping_and_best_model_take_effect(tiny_model, write_corpus, tmp_path, monkeypatch):
    from transformers.optimization import Adafactor

    captured = capture_trainer(monkeypatch)
    out = tmp_path / "out"
    entry.main(run_args(
        tiny_model, write_corpus("jsonl"), out, "--lr_scheduler_type", "cosine", "--optim", "adafactor",
        "--learning_rate", str(LEARNING_RATE), "--max_grad_norm", "0.5", "--load_best_model_at_end",
        "--metric_for_best_model", "eval_loss", "--save_total_limit", "10",
    ))  # fmt: skip
    trainer = captured["trainer"]
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, Adafactor)
    assert captured["clip_norms"] == [0.5] * STEPS
    # Cosine from the peak to 0 over the run, no warm-up: the rate logged at step s is the one step s used.
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    expected = [LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * s / STEPS)) for s in range(STEPS)]
    assert logged == pytest.approx(expected, rel=1e-6)
    # The best checkpoint by eval_loss is the one whose weights the final model holds.
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and "step" in e}
    best_step = min((loss, step) for step, loss in evals.items() if step <= STEPS)[1]
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best_step}")
    final, best = load_file(out / "model.safetensors"), load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_run_config_reproduces_the_training_arguments_and_the_dry_run_prints_it(tiny_model, write_corpus, tmp_path, capsys):
    corpus = write_corpus("jsonl")
    args = run_args(tiny_model, corpus, tmp_path / "out", "--lr_scheduler_type", "cosine", "--adam_beta2", "0.95",
                     "--max_steps", "2", "--warmup_steps", "500")  # fmt: skip
    entry.main(args + ["--dry_run"])
    printed = capsys.readouterr().out
    entry.main(args)
    saved = (tmp_path / "out" / "run_config.yaml").read_text()
    assert yaml.safe_load(saved) == yaml.safe_load(printed[: printed.index("Derived numbers:")])
    assert yaml.safe_load(saved)["warmup_steps"] == 2  # clamped to the run, as trained
    first = config.parse_args(args)
    again = config.parse_args(["--config", str(tmp_path / "out" / "run_config.yaml")])
    for name in config.FIELDS:
        if name not in ("config", "warmup_steps", "eval_strategy", "do_eval", "data_format"):  # decided from the data
            assert config.plain(getattr(again, name)) == config.plain(getattr(first, name)), name


def test_push_to_hub_pushes_the_model_at_the_end_and_no_secret(tiny_model, write_corpus, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs))
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls[-1][1]["files"] = files

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret_token_value")
    out = tmp_path / "out"
    entry.main(run_args(tiny_model, write_corpus("jsonl"), out, "--push_to_hub", "--hub_model_id", "me/gemma-ft",
                         "--hub_strategy", "end", "--save_steps", "3", "--eval_steps", "3"))  # fmt: skip
    assert calls[0][0] == "create_repo" and calls[0][1]["repo_id"] == "me/gemma-ft"
    final = [c for name, c in calls if name == "upload_folder"][-1]
    assert final["repo_id"] == "me/gemma-ft" and Path(final["folder_path"]) == out
    assert "model.safetensors" in final["files"] and "README.md" in final["files"]
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_test_secret_token_value" not in path.read_bytes(), path


def test_eval_strategy_epoch(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    entry.main(run_args(tiny_model, write_corpus("jsonl"), out, "--eval_strategy", "epoch", "--max_steps", "-1",
                         "--num_train_epochs", "1", "--max_train_samples", "6", "--save_strategy", "epoch"))  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["epoch"] for e in state["log_history"] if "eval_loss" in e] == [pytest.approx(1.0)]


def test_label_smoothing_changes_the_training_loss_but_not_the_evaluation(tiny_model, write_corpus, tmp_path):
    corpus = write_corpus("jsonl")
    runs = [
        entry.main(run_args(tiny_model, corpus, tmp_path / str(eps), "--max_steps", "1", "--eval_before_training", "true",
                             "--label_smoothing_factor", str(eps)))  # fmt: skip
        for eps in (0.0, 0.2)
    ]
    plain, smoothed = (r["train"]["train_loss"] for r in runs)
    assert abs(smoothed - plain) > 1e-3  # the same first batch, another loss (exactness: tests/test_loss.py)
    assert runs[0]["before_training"]["eval_loss"] == runs[1]["before_training"]["eval_loss"]
