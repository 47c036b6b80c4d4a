"""Bad numbers in training stop the run with a message naming the step; nothing non-finite is
saved, and rerunning resumes from the latest complete checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_args
from transformers import TrainerCallback

import main as entry
from tuner.train import checkpoints
from tuner.train import trainer as training


def run_args(model: str, train_file: str, out, *extra: str) -> list[str]:
    return tiny_args(model, train_file, out, "--save_steps", "1", "--max_new_tokens", "0", "--validation_split_percentage",
                     "0", *extra)  # fmt: skip


class PoisonStep(TrainerCallback):
    """Makes the embeddings NaN during one optimizer step, as a bad batch or a kernel bug would."""

    def __init__(self, step: int):
        self.step, self.handle = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()


def with_callback(monkeypatch, callback) -> None:
    original = training.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)  # before the guard, as a model hook would be
        return trainer

    monkeypatch.setattr(training, "build_trainer", build)


def all_finite(checkpoint) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_a_nan_loss_stops_the_run_at_its_step_and_the_rerun_resumes(tiny_model, write_corpus, tmp_path, monkeypatch, capsys):
    corpus, out = write_corpus("jsonl"), tmp_path / "out"
    with monkeypatch.context() as patch:
        with_callback(patch, PoisonStep(4))
        with pytest.raises(SystemExit) as exit_info:
            entry.main(run_args(tiny_model, corpus, out))
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "Training stopped at step 4: the training loss is nan" in message and "Traceback" not in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert checkpoints.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert all(all_finite(c) for c in out.glob("checkpoint-*"))
    resumed = entry.main(run_args(tiny_model, corpus, out))
    assert resumed["summary"]["global_step"] == 6 and math.isfinite(resumed["train"]["train_loss"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]  # 1-3 from checkpoint-3


def test_a_diverging_learning_rate_stops_with_the_gradient_or_loss_named(tiny_model, write_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        entry.main(run_args(tiny_model, write_corpus("jsonl"), out, "--learning_rate", "1e30", "--max_grad_norm", "0"))
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "Training stopped at step" in message and ("loss is" in message or "gradient norm is" in message)
    assert not (out / "model.safetensors").exists()
    assert all(all_finite(c) for c in out.glob("checkpoint-*"))
