"""Options: ours and every TrainingArguments field, our defaults, YAML precedence, the resolved
config that reproduces a run, and the shipped recipes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

from tuner import config, validate
from tuner.config import parse_args, to_yaml
from tuner.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_DEFAULTS = {
    "model_name_or_path": "google/gemma-3-270m", "use_flash_attention": False, "attn_implementation": None,
    "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1", "train_file": None, "validation_file": None,
    "text_column": "text", "max_seq_length": 2048, "output_dir": "./outputs", "num_train_epochs": 3,
    "max_steps": -1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 8, "learning_rate": 2e-5, "weight_decay": 0.01, "warmup_steps": 500,
    "bf16": False, "fp16": False, "gradient_checkpointing": False, "logging_steps": 10, "save_steps": 500,
    "eval_steps": 500, "eval_strategy": "steps", "save_total_limit": 3, "report_to": ["tensorboard"],
    "resume_from_checkpoint": None, "seed": 42, "validation_split_percentage": 5, "max_train_samples": None,
    "max_eval_samples": None, "preprocessing_num_workers": None, "prediction_loss_only": True, "ddp_timeout": 7200,
    "use_cpu": True, "dataloader_pin_memory": False, "include_num_input_tokens_seen": "all",
}  # fmt: skip
TRAINING_FIELDS = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


def test_defaults_are_ours_where_they_differ_and_transformers_elsewhere():
    cfg = parse_args([])
    assert {name: config.plain(getattr(cfg, name)) for name in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS
    reference = TrainingArguments(output_dir="x", use_cpu=True)
    derived = ("output_dir", "do_eval")  # do_eval: on when eval_strategy is not "no"
    untouched = [n for n in TRAINING_FIELDS if n not in config.OUR_DEFAULTS and n not in derived]
    assert len(untouched) > 80
    for name in untouched:
        assert config.plain(getattr(cfg, name)) == config.plain(getattr(reference, name)), name


def test_every_training_arguments_field_is_a_flag_after_ours_in_help():
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True, check=True).stdout
    ours_at, theirs_at = out.index("\ndata:"), out.index("\nTrainingArguments (transformers")
    assert ours_at < theirs_at
    for name in TRAINING_FIELDS:
        assert f"--{name} " in out[theirs_at:] or f"--{name}\n" in out[theirs_at:], name
    # transformers' own help text, with our default where it differs
    assert "The initial learning rate for" in out and "(default: 2e-05)" in out
    assert "(default: google/gemma-3-270m)" in out and "(default: 2048)" in out


def test_a_field_added_by_a_future_transformers_appears_without_code_change():
    @dataclass
    class FutureArguments(TrainingArguments):
        shiny_new_option: int = field(default=7, metadata={"help": "Added in a later release."})

    parser = HfArgumentParser((config.ModelOptions, config._with_our_defaults(FutureArguments)))
    namespace, rest = parser.parse_known_args(["--shiny_new_option", "9", "--learning_rate", "1e-3"])
    assert rest == [] and namespace.shiny_new_option == 9 and namespace.learning_rate == 1e-3


def test_the_options_users_of_this_stack_reach_for(tmp_path):
    cfg = parse_args([
        "--lr_scheduler_type", "cosine", "--optim", "adafactor", "--max_grad_norm", "0.5", "--warmup_steps", "0.03",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--neftune_noise_alpha", "5", "--hub_model_id", "me/gemma-ft",
        "--dataloader_num_workers", "4", "--save_only_model", "--load_best_model_at_end", "--metric_for_best_model",
        "eval_loss", "--label_smoothing_factor", "0.1", "--adam_beta2", "0.95", "--train_sampling_strategy",
        "group_by_length", "--output_dir", str(tmp_path),
    ])  # fmt: skip
    assert (config.plain(cfg.lr_scheduler_type), config.plain(cfg.optim)) == ("cosine", "adafactor")
    assert (cfg.max_grad_norm, cfg.warmup_steps, cfg.neftune_noise_alpha, cfg.adam_beta2) == (0.5, 0.03, 5, 0.95)
    assert config.plain(cfg.eval_strategy) == "epoch" and cfg.load_best_model_at_end and cfg.save_only_model
    assert cfg.hub_model_id == "me/gemma-ft" and cfg.dataloader_num_workers == 4
    assert cfg.label_smoothing_factor == 0.1 and cfg.train_sampling_strategy == "group_by_length"


def test_with_no_data_named_the_dataset_is_wikitext_2():
    cfg = parse_args([])
    assert (cfg.dataset_name, cfg.dataset_config_name) == ("wikitext", "wikitext-2-raw-v1")
    assert parse_args(["--train_file", "a.jsonl"]).dataset_name is None


def test_bool_flags_take_an_optional_value():
    assert parse_args(["--bf16"]).bf16 is True
    assert parse_args(["--bf16", "false"]).bf16 is False
    assert parse_args(["--gradient_checkpointing", "yes"]).activation_checkpointing is True
    assert parse_args(["--eval_before_training", "false"]).eval_before_training is False
    assert parse_args(["--prediction_loss_only", "false"]).prediction_loss_only is False


def test_the_old_checkpointing_name_sets_the_new_one_without_a_warning(recwarn):
    cfg = parse_args(["--gradient_checkpointing"])
    assert cfg.activation_checkpointing is True and config.checkpointing(cfg)
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "learning_rate: 5e-5\nmax_steps: 10\nsample_prompts: [a, b]\nlr_scheduler_type: cosine\n"
        "report_to: [tensorboard, wandb]\nlr_scheduler_kwargs: {num_cycles: 2}\nsave_only_model: on\n"
    )
    cfg = parse_args(["--config", str(recipe), "--max_steps", "20"])
    assert cfg.learning_rate == 5e-5  # from YAML; PyYAML reads 5e-5 as a string, argparse converts it
    assert cfg.max_steps == 20  # the command line wins
    assert cfg.sample_prompts == ["a", "b"] and config.plain(cfg.lr_scheduler_type) == "cosine"
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.lr_scheduler_kwargs == {"num_cycles": 2}
    assert cfg.save_only_model is True
    assert cfg.warmup_steps == 500  # untouched default


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("learnig_rate: 1e-4\n", ["unknown key 'learnig_rate'", "Did you mean 'learning_rate'"]),
        ("learning_rate: fast\n", ["key 'learning_rate'", "'fast'", "of type float"]),
        ("optim: adamw_nope\n", ["key 'optim'", "adamw_nope", "adamw_torch"]),
        ("lr_scheduler_type: cosinus\n", ["key 'lr_scheduler_type'", "cosine"]),
        ("max_steps: [1, 2]\n", ["key 'max_steps'", "not a list"]),
        ("- a\n- b\n", ["expected a mapping"]),
    ],
)
def test_bad_yaml_names_the_key_the_value_and_the_fix(tmp_path, text, fragments):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(UsageError) as error:
        parse_args(["--config", str(recipe)])
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_unknown_flag_names_the_nearest_one():
    with pytest.raises(UsageError, match="unknown flag '--learnig_rate'. Did you mean 'learning_rate'"):
        parse_args(["--learnig_rate", "1e-4"])
    with pytest.raises(UsageError, match="unknown flag '--adam_betta2'. Did you mean 'adam_beta2'"):
        parse_args(["--adam_betta2=0.9"])


def test_negative_numbers_are_values_not_flags():
    assert parse_args(["--weight_decay", "-0.5"]).weight_decay == -0.5
    assert parse_args(["--learning_rate", "-1e-4"]).learning_rate == -1e-4


def test_resolved_config_reproduces_every_training_argument(tmp_path):
    cfg = parse_args([
        "--learning_rate", "3e-4", "--max_steps", "7", "--sample_prompts", "x y", "z", "--lr_scheduler_type", "cosine",
        "--optim", "adafactor", "--adam_beta2", "0.95", "--lr_scheduler_kwargs", '{"num_cycles": 0.5}',
        "--gradient_checkpointing", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    saved = tmp_path / "run_config.yaml"
    saved.write_text(to_yaml(cfg))
    again = parse_args(["--config", str(saved)])
    for name in config.FIELDS:
        if name != "config":
            assert config.plain(getattr(again, name)) == config.plain(getattr(cfg, name)), name
    written = yaml.safe_load(saved.read_text())
    assert written["learning_rate"] == 3e-4 and written["report_to"] == []
    assert "adam_beta1" not in written  # transformers' default, left out
    assert "use_cpu" not in written  # follows the machine the file is used on


def test_the_hub_token_never_reaches_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = parse_args(["--hub_token", "hf_secret_value", "--output_dir", str(tmp_path)])
    assert cfg.hub_token is None and "hf_secret_value" not in to_yaml(cfg)
    import os

    assert os.environ["HF_TOKEN"] == "hf_secret_value"


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_validates(recipe, monkeypatch, tmp_path):
    keys = yaml.safe_load(recipe.read_text())
    assert set(keys) <= set(config.FIELDS), f"unknown keys in {recipe.name}"
    cfg = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    for key, value in {**keys, "output_dir": str(tmp_path / "out")}.items():  # each key took effect
        assert config.plain(getattr(cfg, key)) == (value if key != "report_to" else [value]), key
    # GPU recipes are checked as if on a bf16 GPU; data files are checked for existence elsewhere.
    monkeypatch.setattr(validate, "bf16_supported", lambda: True)
    problems = [
        p for p in validate.number_problems(cfg) + validate.feature_problems(cfg) + validate.precision_problems(cfg)
        + validate.trainer_problems(cfg)
        if "CUDA GPU" not in p
    ]  # fmt: skip
    assert problems == []
