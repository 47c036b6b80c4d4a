"""End of a run: the loss curve, the run summary, and that only the main process writes them."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_main import tiny_args

import main as entry
from tuner import report
from tuner.config import parse_args
from tuner.train import trainer as training

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory, corpus_docs):
    """One tiny run with an eval before training, then report.finish on its Trainer."""
    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs), encoding="utf-8")
    argv = tiny_args(tiny_model, str(corpus), tmp / "out", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "100",
                     "--eval_before_training", "true", "--max_new_tokens", "0")  # fmt: skip
    trainers = []
    original = training.build_trainer
    training.build_trainer = lambda *a, **k: trainers.append(original(*a, **k)) or trainers[-1]
    try:
        results = entry.main(argv)
    finally:
        training.build_trainer = original
    summary = report.finish(parse_args(argv), trainers[0], results)
    return tmp / "out", results, summary, trainers[0]


def test_loss_curve_is_a_real_png(finished_run):
    out, _, summary, _ = finished_run
    curve = out / "loss_curve.png"
    assert png_size(curve) == (840, 540)  # 7 x 4.5 inches at 120 dpi
    assert curve.stat().st_size > 10_000, "a plot with axes, two lines and a legend"
    assert summary["loss_curve"] == str(curve.resolve())


def test_summary_json_is_consistent(finished_run):
    out, results, summary, trainer = finished_run
    saved = json.loads((out / "run_summary.json").read_text())
    assert saved == summary
    assert saved["saved_to"] == str(out.resolve()) and (out / "model.safetensors").is_file()
    assert saved["global_step"] == 4
    # 4 steps x 2 accumulation x 2 sequences x 64 tokens
    assert saved["tokens_seen"] == saved["tokens_seen_this_run"] == trainer.state.num_input_tokens_seen == 1024
    assert saved["tokens_per_second"] == pytest.approx(saved["tokens_seen"] / saved["train_runtime"])
    assert saved["train_runtime"] == results["train"]["train_runtime"]
    assert saved["wall_seconds"] == results["wall_seconds"] >= saved["train_runtime"]
    assert saved["eval_loss_final"] == results["eval"]["eval_loss"]
    assert saved["perplexity_final"] == pytest.approx(math.exp(saved["eval_loss_final"]))
    assert saved["perplexity_before_training"] == pytest.approx(math.exp(saved["eval_loss_before_training"]))


def test_summary_is_printed_as_an_aligned_block(finished_run):
    _, _, summary, _ = finished_run
    text = report.format_summary(summary)
    rows = text.splitlines()[1:]
    assert text.startswith("Run summary:") and len(rows) == len(summary)
    assert len({len(r) - len(r.split()[-1]) for r in rows}) == 1, "values start in one column"
    assert "tokens per second" in text and "perplexity final" in text


def fake_trainer(log_history, main_process=True, tokens=4096, resumed_from=0):
    return SimpleNamespace(
        is_world_process_zero=lambda: main_process,
        state=SimpleNamespace(log_history=log_history, num_input_tokens_seen=tokens, global_step=20),
        _initial_num_input_tokens_seen=resumed_from,
    )


HISTORY = [
    {"loss": 3.0, "step": 5}, {"loss": 2.5, "step": 10}, {"eval_loss": 2.6, "step": 10},
    {"loss": 2.0, "step": 15}, {"train_loss": 2.4, "step": 20}, {"eval_loss": 2.2, "step": 20},
    {"eval_loss": 2.2, "step": 20},  # the final evaluate() repeats the last step's
]  # fmt: skip


def test_loss_points_split_train_and_eval_and_drop_repeats():
    train, evals = report.loss_points(HISTORY)
    assert train == [(5, 3.0), (10, 2.5), (15, 2.0)]
    assert evals == [(10, 2.6), (20, 2.2)]


def test_only_the_main_process_writes(tmp_path):
    cfg = parse_args(["--output_dir", str(tmp_path), "--train_file", "t.jsonl"])
    results = {"train": {"train_runtime": 2.0, "train_loss": 2.4}, "wall_seconds": 3.0}
    assert report.finish(cfg, fake_trainer(HISTORY, main_process=False), results) == {}
    assert list(tmp_path.iterdir()) == []
    summary = report.finish(cfg, fake_trainer(HISTORY), results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "run_summary.json"]
    assert summary["tokens_per_second"] == 4096 / 2.0
    assert "eval_loss_final" not in summary  # no eval in results: nothing invented


def test_resumed_run_counts_speed_from_this_runs_tokens_only(tmp_path):
    cfg = parse_args(["--output_dir", str(tmp_path), "--train_file", "t.jsonl"])
    results = {"train": {"train_runtime": 2.0}}
    summary = report.finish(cfg, fake_trainer(HISTORY, tokens=4096, resumed_from=1024), results)
    assert (summary["tokens_seen"], summary["tokens_seen_this_run"], summary["tokens_per_second"]) == (4096, 3072, 1536)


def test_no_points_no_plot(tmp_path):
    assert not report.plot_loss_curve([{"train_runtime": 1.0, "step": 0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_progress_is_silent_off_rank_zero(monkeypatch):
    from tuner.progress import progress

    monkeypatch.setenv("RANK", "1")
    items = [1, 2, 3]
    assert progress(items, 3, "Tokenizing") is items


def test_progress_logs_lines_when_not_a_terminal(monkeypatch, caplog):
    from tuner.progress import progress

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    with caplog.at_level("INFO", logger="tuner.progress"):
        assert list(progress(iter(range(3)), 3, "Tokenizing", every=0)) == [0, 1, 2]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["Tokenizing: 1/3 batch", "Tokenizing: 2/3 batch"]
