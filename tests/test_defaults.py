"""A run with the defaults a user gets (only sizes made small): evaluation before training on,
TensorBoard on, sample generation on. Run from a working directory that is not the output
directory's parent, it writes nothing outside --output_dir and the caches, and no secret from the
environment reaches a file or the console. Then the same command resumes, and writes nothing
outside either."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"HF_TOKEN": "hf_DefaultsTestSecret123", "WANDB_API_KEY": "wandbDefaultsTestSecret456"}


def files_under(directory: Path) -> set[Path]:
    # the environment, git's own files, and where the user's own runs write (other runs may be going on)
    skip = {directory / name for name in (".venv", ".git", "outputs", "data")}
    return {p for p in directory.rglob("*") if p.is_file() and not skip.intersection(p.parents)}


def run(tmp_path: Path, recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **SECRETS, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_DIR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(recipe), *extra], cwd=tmp_path / "work", env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_defaults_write_only_into_output_dir_and_leak_no_secret(tiny_model, write_corpus, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    out = tmp_path / "elsewhere" / "out"
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": tiny_model, "train_file": write_corpus("jsonl"), "output_dir": str(out),
        "max_seq_length": 64, "max_steps": 4, "save_steps": 2, "eval_steps": 2, "max_eval_samples": 8,
        "gradient_accumulation_steps": 1, "report_to": ["tensorboard", "wandb"], "max_new_tokens": 5,
    }))  # fmt: skip
    watched = [tmp_path / "work", tmp_path / "home", tmp_path / "elsewhere", ROOT]
    before = {d: files_under(d) for d in watched}

    first = run(tmp_path, recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Before training: eval_loss" in first.stdout + first.stderr  # the default evaluation did run
    resumed = run(tmp_path, recipe, "--max_steps", "6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr

    for directory in watched:
        new = {p for p in files_under(directory) - before[directory] if "__pycache__" not in p.parts}
        if directory == tmp_path / "elsewhere":
            new = {p for p in new if out not in p.parents}
        if directory == tmp_path / "home":  # caches: the offline model, tokens, datasets, matplotlib
            new = {p for p in new if ".cache" not in p.parts and ".config" not in p.parts}
        assert not new, f"written outside --output_dir: {sorted(map(str, new))[:10]}"
    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert len({e.parent for e in events}) == 2, events  # one run directory per launch, both under runs/
    assert list((out / "runs" / "wandb").glob("offline-run-*"))

    printed = first.stdout + first.stderr + resumed.stdout + resumed.stderr
    for name, secret in SECRETS.items():
        assert secret not in printed, f"{name} printed"
        for path in files_under(out):
            assert secret.encode() not in path.read_bytes(), f"{name} in {path}"
