"""Options: the flags and defaults users rely on, YAML precedence, and the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner import config, validate
from tuner.config import Config, parse_args, to_yaml

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_DEFAULTS = {
    "model_name_or_path": "google/gemma-3-270m", "use_flash_attention": False, "attn_implementation": None,
    "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "train_file": None, "validation_file": None,
    "text_column": "text", "max_seq_length": 2048, "output_dir": "./outputs", "num_train_epochs": 3,
    "max_steps": None, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 8, "learning_rate": 2e-5, "weight_decay": 0.01, "warmup_steps": 500,
    "bf16": False, "fp16": False, "gradient_checkpointing": False, "logging_steps": 10, "save_steps": 500,
    "eval_steps": 500, "save_total_limit": 3, "report_to": "tensorboard", "resume_from_checkpoint": None,
    "seed": 42, "validation_split_percentage": 5, "max_train_samples": None, "max_eval_samples": None,
    "preprocessing_num_workers": None,
}  # fmt: skip


def test_defaults_match_the_documented_ones():
    cfg = parse_args([])
    for name, value in EXPECTED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name


def test_help_lists_every_flag_with_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True, check=True).stdout
    for name in EXPECTED_DEFAULTS:
        assert f"--{name}" in out, name
    assert "(default: google/gemma-3-270m)" in out and "(default: 2048)" in out


def test_with_no_data_named_the_dataset_is_wikitext_2():
    cfg = parse_args([])
    assert (cfg.dataset_name, cfg.dataset_config_name) == ("wikitext", "wikitext-2-raw-v1")
    assert parse_args(["--train_file", "a.jsonl"]).dataset_name is None


def test_bool_flags_take_an_optional_value():
    assert parse_args(["--bf16"]).bf16 is True
    assert parse_args(["--bf16", "false"]).bf16 is False
    assert parse_args(["--gradient_checkpointing", "yes"]).gradient_checkpointing is True


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 5e-5\nmax_steps: 10\nbf16: true\nsample_prompts: [a, b]\n")
    cfg = parse_args(["--config", str(recipe), "--max_steps", "20"])
    assert cfg.learning_rate == 5e-5  # from YAML; PyYAML reads 5e-5 as a string, we convert it
    assert cfg.max_steps == 20  # the command line wins
    assert cfg.bf16 is True and cfg.sample_prompts == ["a", "b"]
    assert cfg.warmup_steps == 500  # untouched default


def test_resolved_config_reproduces_the_run(tmp_path):
    cfg = parse_args(["--learning_rate", "3e-4", "--max_steps", "7", "--sample_prompts", "x y", "z"])
    saved = tmp_path / "run_config.yaml"
    saved.write_text(to_yaml(cfg))
    again = parse_args(["--config", str(saved)])
    assert {**vars(again), "config": None} == {**vars(cfg), "config": None}


def test_closest_flag_suggestion():
    assert config.closest_flag("learnig_rate") == "learning_rate"
    assert config.closest_flag("zzzz") is None


def test_negative_numbers_are_values_not_flags():
    assert parse_args(["--weight_decay", "-0.5"]).weight_decay == -0.5
    assert parse_args(["--learning_rate", "-1e-4"]).learning_rate == -1e-4


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_validates(recipe, monkeypatch, tmp_path):
    keys = yaml.safe_load(recipe.read_text())
    assert set(keys) <= set(config.FIELDS), f"unknown keys in {recipe.name}"
    cfg = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    # GPU recipes are checked as if on a bf16 GPU; data files are checked for existence elsewhere.
    monkeypatch.setattr(validate, "bf16_supported", lambda: True)
    problems = [
        p for p in validate.number_problems(cfg) + validate.feature_problems(cfg) + validate.precision_problems(cfg)
        if "CUDA GPU" not in p
    ]  # fmt: skip
    assert problems == []
    assert isinstance(cfg, Config)
