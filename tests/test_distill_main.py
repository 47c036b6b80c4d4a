"""--teacher_model_name_or_path through main(): alpha 0 is plain training bitwise, a real teacher
teaches (the KL term is computed and falls), a teacher with another tokenizer is refused before any
weights load, and the dry run counts the teacher."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_args

import main as entry
from tuner.train import trainer as training


def distill_args(model, train_file, out, teacher, *extra):
    return tiny_args(model, train_file, out, "--teacher_model_name_or_path", teacher, "--max_new_tokens", "0", *extra)


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory, corpus_docs):
    """The tiny model after some training: a teacher that knows more than the student."""
    import json

    directory = tmp_path_factory.mktemp("teacher")
    corpus = directory / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs), encoding="utf-8")
    entry.main(tiny_args(tiny_model, str(corpus), directory / "out", "--max_steps", "20", "--learning_rate", "3e-3",
                         "--max_new_tokens", "0", "--save_steps", "100"))  # fmt: skip
    return str(directory / "out")


def test_alpha_zero_is_plain_training_bitwise(tiny_model, write_corpus, tmp_path, teacher):
    corpus = write_corpus("jsonl")
    entry.main(tiny_args(tiny_model, corpus, tmp_path / "plain", "--max_new_tokens", "0"))
    entry.main(distill_args(tiny_model, corpus, tmp_path / "alpha0", teacher, "--distill_alpha", "0"))
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "alpha0" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_teaches(tiny_model, write_corpus, tmp_path, teacher, monkeypatch):
    seen = []
    original = training.LeanLossTrainer.distillation_loss

    def recording(self, model, inputs, num_items_in_batch):
        loss, outputs = original(self, model, inputs, num_items_in_batch)
        seen.append(float(self.distill_parts["kl"]))
        return loss, outputs

    monkeypatch.setattr(training.LeanLossTrainer, "distillation_loss", recording)
    metrics = entry.main(distill_args(tiny_model, write_corpus("jsonl"), tmp_path / "out", teacher, "--max_steps", "10",
                                      "--learning_rate", "3e-3", "--distill_alpha", "0.9", "--eval_before_training", "true"))  # fmt: skip
    assert len(seen) == 20  # 10 steps x 2 micro-batches, none in evaluation
    assert sum(seen[-4:]) < sum(seen[:4])  # the student moves towards the teacher
    assert metrics["eval"]["eval_loss"] < metrics["before_training"]["eval_loss"]


def test_a_teacher_with_another_tokenizer_is_refused_before_weights(tiny_model, write_corpus, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from tuner import models

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<an_extra_token>"])
    tokenizer.save_pretrained(other)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(SystemExit) as exit_info:
        entry.main(distill_args(tiny_model, write_corpus("jsonl"), tmp_path / "out", str(other)))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"--teacher_model_name_or_path {other}" in message and "vocabulary differs" in message


def test_dry_run_counts_the_teacher(tiny_model, write_corpus, tmp_path, teacher):
    plain = entry.main(tiny_args(tiny_model, write_corpus("jsonl"), tmp_path / "a", "--dry_run"))
    taught = entry.main(distill_args(tiny_model, write_corpus("jsonl"), tmp_path / "b", teacher, "--dry_run"))
    assert "teacher" not in plain["memory"]
    assert taught["memory"]["teacher"] >= taught["parameters"] * 4  # fp32 teacher weights, the student's size
