"""End to end: main([...]) on a tiny Gemma 3, on CPU, with no network."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
from tiny import tiny_args
from transformers import TrainerCallback

import main as entry
from tuner.train import checkpoints
from tuner.train import trainer as training


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "txt", "parquet"])
def test_each_file_format_trains_evaluates_and_saves(tiny_model, write_corpus, tmp_path, fmt):
    out = tmp_path / "out"
    metrics = entry.main(tiny_args(tiny_model, write_corpus(fmt), out))
    assert metrics["train"]["train_loss"] > 0
    assert math.isfinite(metrics["eval"]["eval_loss"])
    for name in ("train_results.json", "eval_results.json", "all_results.json", "run_config.yaml", "model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_perplexity_is_exp_of_eval_loss_and_saved_as_json(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    metrics = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--eval_before_training", "true"))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]), rel=1e-9)
    assert metrics["eval"]["perplexity"] == pytest.approx(math.exp(metrics["eval"]["eval_loss"]), rel=1e-9)
    # lr 1e-3 on the same text: the held-out loss must fall
    assert metrics["eval"]["eval_loss"] < metrics["before_training"]["eval_loss"]


def test_saved_model_reloads_and_generates(tiny_model, write_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    metrics = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out))
    assert [s["prompt"] for s in metrics["samples"]] == ["The Python interpreter", "In this tutorial, we"]
    assert json.loads((out / "samples.json").read_text()) == metrics["samples"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("The Python", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def add_callback(monkeypatch, callback) -> None:
    """Make main() build its Trainer with one more callback."""
    original = training.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(training, "build_trainer", build)


class StepRecorder(TrainerCallback):
    """Records the steps a run takes; optionally dies after one, like a pre-empted machine."""

    def __init__(self, crash_after: int | None = None):
        self.steps: list[int] = []
        self.crash_after = crash_after

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.crash_after:
            raise KeyboardInterrupt(f"simulated crash at step {state.global_step}")


def test_interrupted_run_resumes_from_its_last_complete_checkpoint(tiny_model, write_corpus, tmp_path, monkeypatch, caplog):
    corpus = write_corpus("jsonl")
    straight = entry.main(tiny_args(tiny_model, corpus, tmp_path / "straight"))

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        add_callback(patch, StepRecorder(crash_after=4))
        with pytest.raises(KeyboardInterrupt):
            entry.main(tiny_args(tiny_model, corpus, out))
    assert (out / "checkpoint-3").is_dir() and not (out / "model.safetensors").exists()
    # A checkpoint interrupted while saving: weights written, trainer_state.json not yet.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "model.safetensors").write_bytes(b"partial")

    recorder = StepRecorder()
    add_callback(monkeypatch, recorder)
    with caplog.at_level("INFO"):
        resumed = entry.main(tiny_args(tiny_model, corpus, out))
    assert "Skipping" in caplog.text and "checkpoint-5" in caplog.text
    assert "Resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert recorder.steps == [4, 5, 6], "the resumed run must continue after step 3, not from 0"
    state = json.loads((out / "trainer_state.json").read_text())
    straight_state = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())
    assert state["global_step"] == straight_state["global_step"] == 6
    # Optimizer, scheduler, RNG and data order are restored: the result matches the uninterrupted run.
    assert resumed["eval"]["eval_loss"] == pytest.approx(straight["eval"]["eval_loss"], rel=1e-4)


class SignalAfter(TrainerCallback):
    """Sends this process a signal in the middle of a run, as a scheduler pre-empting it would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes_from_it(tiny_model, write_corpus, tmp_path, monkeypatch):
    corpus = write_corpus("jsonl")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        add_callback(patch, SignalAfter(4, signal.SIGTERM))  # arrives during step 5
        with pytest.raises(SystemExit) as exit_info:
            entry.main(tiny_args(tiny_model, corpus, out, "--save_steps", "100"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert checkpoints.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-5")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler must not outlive the run"
    recorder = StepRecorder()
    add_callback(monkeypatch, recorder)
    entry.main(tiny_args(tiny_model, corpus, out, "--save_steps", "100"))
    assert recorder.steps == [6]


def test_explicit_resume_from_checkpoint_overrides(tiny_model, write_corpus, tmp_path, monkeypatch):
    corpus = write_corpus("jsonl")
    out = tmp_path / "out"
    entry.main(tiny_args(tiny_model, corpus, out))
    recorder = StepRecorder()
    add_callback(monkeypatch, recorder)
    again = entry.main(tiny_args(tiny_model, corpus, out, "--resume_from_checkpoint", str(out / "checkpoint-3")))
    assert recorder.steps == [4, 5, 6]
    assert again["train"]["epoch"] > 0


def test_tensorboard_events_go_to_output_dir_runs(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--report_to", "tensorboard"))
    assert list((out / "runs").rglob("events.out.tfevents.*"))


def test_wandb_offline(tiny_model, write_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--report_to", "wandb"))
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_no_validation_split_skips_evaluation(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    metrics = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--validation_split_percentage", "0"))
    assert "eval" not in metrics and not (out / "eval_results.json").exists()


def test_validation_file_is_used(tiny_model, write_corpus, tmp_path, corpus_docs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.data import grouping

    out = tmp_path / "out"
    train = write_corpus("jsonl", corpus_docs[:60], name="train")
    val = write_corpus("csv", corpus_docs[60:], name="val")
    metrics = entry.main(tiny_args(tiny_model, train, out, "--validation_file", val, "--max_eval_samples", "3"))
    # Independently: the saved model's loss on the first 3 chunks of the validation file's documents.
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    chunks = torch.from_numpy(grouping.tokenize_and_group(tokenizer, corpus_docs[60:], 64)[:3].astype("int64"))
    with torch.no_grad():
        expected = model(input_ids=chunks, labels=chunks).loss.item()
    assert metrics["eval"]["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_gradient_checkpointing_trains_without_the_kv_cache(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    metrics = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--gradient_checkpointing"))
    assert math.isfinite(metrics["train"]["train_loss"])
    assert json.loads((out / "config.json").read_text())["use_cache"] is False


def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_model, write_corpus, tmp_path, monkeypatch, capsys):
    from tuner import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded in a dry run"))
    out = tmp_path / "out"
    result = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), out, "--dry_run"))
    printed = capsys.readouterr().out
    assert result["dry_run"] is True and not out.exists()
    assert "max_seq_length: 64" in printed  # the resolved config
    for line in ("effective batch", "total steps", "weights", "gradients", "optimizer state", "activations", "logits"):
        assert line in printed, line
