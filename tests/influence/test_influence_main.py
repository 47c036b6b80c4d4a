"""--influence through main(): the files it writes, scores that equal brute force at the first step,
training bitwise unchanged, every N steps, and a resumed run's files without duplicates or gaps."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_args
from transformers import TrainerCallback

import main as entry
from tuner.config import parse_args
from tuner.train import trainer as training


def influence_args(model, train_file, out, *extra):
    return tiny_args(model, train_file, out, "--influence", "--influence_val_examples", "4", "--max_new_tokens", "0",
                     "--per_device_eval_batch_size", "2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_docs):
    path = tmp_path_factory.mktemp("influence") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def scored_run(tiny_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    entry.main(influence_args(tiny_model, corpus, out))
    return out


def test_files_hold_one_row_per_step_and_example(scored_run):
    directory = scored_run / "influence"
    for name in ("scores.parquet", "influence.parquet", "examples.jsonl", "report.md", "influence_hist.png"):
        assert (directory / name).is_file(), name
    scores = pq.read_table(directory / "scores.parquet").to_pandas()
    assert scores.groupby("step").size().to_dict() == {s: 4 for s in range(1, 7)}  # 2 rows x 2 micro-batches
    assert (scores["trained_tokens"] == 63).all()  # 64-token chunks: 63 targets after the shift
    state = json.loads((scored_run / "trainer_state.json").read_text())
    rates = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert scores.groupby("step")["learning_rate"].first().to_dict() == pytest.approx(rates)
    influence = pq.read_table(directory / "influence.parquet").to_pandas().set_index("example_id")
    expected = (scores["learning_rate"] * scores["score"]).groupby(scores["example_id"]).sum()
    assert influence["influence"].to_dict() == pytest.approx(expected.to_dict(), rel=1e-12)
    examples = [json.loads(line) for line in (directory / "examples.jsonl").read_text().splitlines()]
    assert set(influence.index) <= {e["example_id"] for e in examples}
    report = (directory / "report.md").read_text()
    assert "Most helpful" in report and "Most harmful" in report


def test_first_step_scores_equal_brute_force(scored_run, tiny_model, corpus):
    """Per-example gradients of the untrained model, one backward each, dotted with the reference gradient."""
    from transformers import AutoModelForCausalLM

    from tuner.data import build as data
    from tuner.influence import tracker as influence_run

    cfg = parse_args(influence_args(tiny_model, corpus, scored_run))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model)
    datasets = data.build_datasets(cfg, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = influence_run.reference_batches(cfg, datasets.eval, None)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in reference)
    ref_grad = [torch.zeros_like(p) for p in params]
    for batch in reference:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss * int((batch["labels"][:, 1:] != -100).sum()) / total
        for acc, g in zip(ref_grad, torch.autograd.grad(loss, params)):
            acc += g
    scores = pq.read_table(scored_run / "influence" / "scores.parquet").to_pandas()
    for row in scores[scores["step"] == 1].itertuples():
        ids = datasets.train[row.example_id]["input_ids"][None]
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
        expected = sum(float((g * r).sum()) for g, r in zip(grads, ref_grad))
        assert row.score == pytest.approx(expected, rel=2e-4, abs=1e-6)


def test_training_is_unchanged_by_scoring(scored_run, tiny_model, corpus, tmp_path):
    plain = tmp_path / "plain"
    entry.main(tiny_args(tiny_model, corpus, plain, "--max_new_tokens", "0", "--per_device_eval_batch_size", "2"))
    a, b = load_file(plain / "model.safetensors"), load_file(scored_run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_n_steps(tiny_model, corpus, tmp_path):
    out = tmp_path / "out"
    entry.main(influence_args(tiny_model, corpus, out, "--influence_steps", "2"))
    scores = pq.read_table(out / "influence" / "scores.parquet").to_pandas()
    assert sorted(scores["step"].unique()) == [2, 4, 6]


class CrashAfter(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated crash after step 5")


def test_a_resumed_run_continues_the_files_without_duplicates_or_gaps(scored_run, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        original = training.build_trainer
        patch.setattr(training, "build_trainer", lambda *a, **k: _with(original(*a, **k), CrashAfter()))
        with pytest.raises(KeyboardInterrupt):
            entry.main(influence_args(tiny_model, corpus, out))
    written = pq.read_table(out / "influence" / "scores.parquet").to_pandas()
    assert sorted(written["step"].unique()) == [1, 2, 3]  # written before checkpoint-3 was saved
    entry.main(influence_args(tiny_model, corpus, out))  # resumes from checkpoint-3: steps 4-6 again
    resumed = pq.read_table(out / "influence" / "scores.parquet").to_pandas()
    straight = pq.read_table(scored_run / "influence" / "scores.parquet").to_pandas()
    assert resumed.groupby("step").size().to_dict() == {s: 4 for s in range(1, 7)}
    assert resumed[["step", "example_id"]].values.tolist() == straight[["step", "example_id"]].values.tolist()
    assert resumed["score"].tolist() == pytest.approx(straight["score"].tolist(), rel=1e-5)


def _with(trainer, callback):
    trainer.add_callback(callback)
    return trainer
