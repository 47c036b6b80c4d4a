"""The dry run's step arithmetic is the installed Trainer's: checked against the Trainer's own
computation, and against trainer_state.json after real runs with 1 and 2 processes, for sizes that
divide evenly and sizes that leave a partial batch or accumulation window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import free_port

import main as entry
from tuner import estimate
from tuner.config import parse_args
from tuner.data.datasets import ChunkDataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "chunks, batch, accumulation, epochs, drop_last",
    [
        (64, 4, 4, 1, False),  # divides evenly
        (65, 4, 4, 1, False),  # one more chunk: a partial batch
        (100, 3, 8, 2.5, False),  # partial batch and partial accumulation window, fractional epochs
        (100, 3, 8, 2, True),  # --dataloader_drop_last drops the partial batch
        (5, 4, 8, 3, False),  # fewer batches than one accumulation window
    ],
)
def test_step_counts_equal_the_trainers_own(tiny_model, tmp_path, chunks, batch, accumulation, epochs, drop_last):
    from transformers import AutoModelForCausalLM, Trainer

    cfg = parse_args([
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
        str(accumulation), "--num_train_epochs", str(epochs), "--dataloader_drop_last", str(drop_last), "--report_to", "none",
        "--eval_strategy", "no",
    ])  # fmt: skip
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model), args=cfg,
        train_dataset=ChunkDataset(np.zeros((chunks, 8), dtype=np.int32)),
    )  # fmt: skip
    values = trainer.set_initial_training_values(cfg, trainer.get_train_dataloader())
    counts = estimate.step_counts(cfg, chunks, 1)
    assert (counts["steps_per_epoch"], counts["total_steps"]) == (values[1], values[-1])


def run_args(model: str, train_file: str, out: Path) -> list[str]:
    # 79 documents -> an uneven number of 64-token chunks; batch 3 x accumulation 4 leaves partial windows.
    return [
        "--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(out), "--max_seq_length", "64",
        "--max_train_samples", "50", "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "4",
        "--num_train_epochs", "2", "--save_steps", "1000", "--report_to", "none", "--max_new_tokens", "0",
        "--validation_split_percentage", "0", "--learning_rate", "1e-4",
    ]  # fmt: skip


def saved_max_steps(out: Path) -> int:
    return json.loads((out / "trainer_state.json").read_text())["max_steps"]


def test_one_process_dry_run_steps_equal_the_trained_run(tiny_model, write_corpus, tmp_path):
    args = run_args(tiny_model, write_corpus("jsonl"), tmp_path / "out")
    planned = entry.main(args + ["--dry_run"])
    result = entry.main(args)
    assert planned["total_steps"] == saved_max_steps(tmp_path / "out") == result["summary"]["global_step"]
    assert planned["total_steps"] == 10  # 50 chunks: 17 batches of 3 -> ceil(17 / 4) = 5 steps per epoch, 2 epochs


def test_two_process_dry_run_steps_equal_the_trained_run(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(free_port()), str(ROOT / "main.py"),
    ]  # fmt: skip
    args = run_args(tiny_model, write_corpus("jsonl"), out)
    dry = subprocess.run(launch + args + ["--dry_run"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    # 50 chunks over 2 processes x 3 = 9 batches each -> ceil(9 / 4) = 3 steps per epoch, 6 in all
    assert [line.split()[2] for line in dry.stdout.splitlines() if line.strip().startswith("total steps")] == ["6"]
    real = subprocess.run(launch + args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert real.returncode == 0, real.stderr[-3000:]
    assert saved_max_steps(out) == 6
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 6
