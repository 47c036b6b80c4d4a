"""Every option as a typed dataclass field whose help text becomes `--help`.

Precedence: field defaults < `--config FILE.yaml` < command-line flags. YAML keys are the flag
names; an unknown key or flag is an error. Names follow `TrainingArguments` where one exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

DEFAULT_PROMPTS = ["The Python interpreter", "In this tutorial, we"]


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # --- model ---
    model_name_or_path: str = _opt(
        "google/gemma-3-270m",
        "Hub id or local directory of a causal LM. 'offline:gemma-3-270m' is the bundled Gemma 3 270M "
        "(Q4_K_M weights dequantized; needs no hub access).",
    )
    use_flash_attention: bool = _opt(False, "Use flash-attention 2 (CUDA + flash-attn; loads the model in bf16).")
    attn_implementation: str | None = _opt(
        None, "Attention kernel passed to transformers: eager, sdpa, flash_attention_2. Default: the model's choice."
    )
    use_liger_kernel: bool = _opt(False, "Use Liger's fused linear cross-entropy (CUDA + liger-kernel only).")
    # --- data ---
    dataset_name: str | None = _opt(
        None, "Hub dataset name. With neither this nor --train_file: wikitext (config wikitext-2-raw-v1)."
    )
    dataset_config_name: str | None = _opt(None, "Hub dataset config, e.g. wikitext-2-raw-v1.")
    train_file: str | None = _opt(None, "Local training file: .json, .jsonl, .csv, .txt or .parquet.")
    validation_file: str | None = _opt(None, "Local validation file (same formats as --train_file).")
    text_column: str = _opt("text", "Column that holds the text.")
    max_seq_length: int = _opt(2048, "Tokens per training chunk; documents are concatenated and split into chunks.")
    validation_split_percentage: int = _opt(
        5, "Percent of training documents held out for evaluation when there is no validation data; 0 skips eval."
    )
    max_train_samples: int | None = _opt(None, "Keep at most this many training chunks (for quick runs).")
    max_eval_samples: int | None = _opt(None, "Keep at most this many evaluation chunks.")
    preprocessing_num_workers: int | None = _opt(None, "Processes for tokenization. Default: all cores.")
    streaming: bool = _opt(False, "Read the data as a stream, tokenizing and chunking on the fly (needs --max_steps).")
    cache_dir: str | None = _opt(None, "Where tokenized data is cached. Default: ~/.cache/tuner/tokens.")
    # --- training (TrainingArguments names) ---
    output_dir: str = _opt("./outputs", "Where checkpoints, logs, metrics and the final model go.")
    num_train_epochs: float = _opt(3.0, "Passes over the training data (ignored when --max_steps is set).")
    max_steps: int | None = _opt(None, "Total optimizer steps; overrides --num_train_epochs.")
    per_device_train_batch_size: int = _opt(4, "Sequences per device per forward pass in training.")
    per_device_eval_batch_size: int = _opt(4, "Sequences per device per forward pass in evaluation.")
    gradient_accumulation_steps: int = _opt(8, "Forward passes per optimizer step.")
    learning_rate: float = _opt(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    warmup_steps: int = _opt(500, "Linear warm-up steps (clamped to the total steps, with a warning).")
    bf16: bool = _opt(False, "Train in bfloat16 mixed precision (GPUs with bf16 support).")
    fp16: bool = _opt(False, "Train in float16 mixed precision (refused for Gemma 3: its activations overflow).")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    logging_steps: int = _opt(10, "Log the training loss every N steps.")
    save_steps: int = _opt(500, "Save a checkpoint every N steps.")
    eval_steps: int = _opt(500, "Evaluate every N steps.")
    save_total_limit: int | None = _opt(3, "Keep at most this many checkpoints.")
    report_to: str = _opt("tensorboard", "Where to log: tensorboard, wandb or none.", choices=["tensorboard", "wandb", "none"])
    resume_from_checkpoint: str | None = _opt(
        None, "Resume from this checkpoint. Default: the latest complete checkpoint in --output_dir, if any."
    )
    seed: int = _opt(42, "Random seed.")
    ddp_timeout: int = _opt(
        7200, "Seconds a collective may wait before the run is aborted (multi-process runs)."
    )
    # --- run ---
    config: str | None = _opt(None, "YAML file whose keys are flag names; command-line flags override it.")
    dry_run: bool = _opt(False, "Validate, print the resolved config and derived numbers, and exit.")
    eval_before_training: bool = _opt(True, "Evaluate once before training, to show the gain.")
    sample_prompts: list[str] = _opt(DEFAULT_PROMPTS, "Prompts the fine-tuned model continues at the end.", nargs="*")
    max_new_tokens: int = _opt(40, "Tokens generated for each sample prompt (0 skips generation).")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


_HINTS = typing.get_type_hints(Config)


def field_type(name: str) -> Any:
    """The field's type without its Optional: `int | None` -> int."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _convert(name: str, value: Any) -> Any:
    """Coerce a YAML value to the field's type (PyYAML reads 5e-5 as a string, for one)."""
    kind = field_type(name)
    if value is None:
        return None
    if kind is bool:
        return parse_bool(value)
    if typing.get_origin(kind) is list:
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    return kind(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Fine-tune a small causal language model (Gemma 3 270M by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for name, f in FIELDS.items():
        kind = field_type(name)
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs=f.metadata.get("nargs", "*"), type=str)
        else:
            kwargs["type"] = kind
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parser.add_argument(f"--{name}", default=default, **kwargs)
    return parser


def closest_flag(name: str) -> str | None:
    match = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.5)
    return match[0] if match else None


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError([f"--config {path}: no such file. Give the path of a YAML file, e.g. configs/quickstart-cpu.yaml."])
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError([f"--config {path}: not valid YAML ({exc}). Fix the file's syntax."]) from None
    if not isinstance(data, dict):
        raise UsageError([f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}."])
    problems, values = [], {}
    for key, value in data.items():
        if key not in FIELDS or key == "config":
            near = closest_flag(str(key))
            hint = f" Did you mean '{near}'?" if near else " See `python main.py --help` for the valid names."
            problems.append(f"--config {path}: unknown key '{key}'.{hint}")
            continue
        try:
            values[key] = _convert(key, value)
        except (TypeError, ValueError):
            problems.append(
                f"--config {path}: key '{key}' has value {value!r}, which is not of type {field_type(key).__name__}. "
                "Fix the value in the file."
            )
    if problems:
        raise UsageError(problems)
    return values


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-4` -> `--learning_rate=-1e-4`: argparse would read -1e-4 as a flag, and
    the user should hear that the value is negative, not that it is missing."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_args(argv: list[str] | None = None) -> Config:
    """Defaults < --config YAML < command line. argparse itself exits 2 on an unknown flag."""
    argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml(known.config))
    namespace = parser.parse_args(argv)
    return with_default_dataset(Config(**vars(namespace)))


DEFAULT_DATASET = ("wikitext", "wikitext-2-raw-v1")


def with_default_dataset(cfg: Config) -> Config:
    """`python main.py --bf16` fine-tunes on wikitext-2: the hub dataset used when no data is named."""
    if not cfg.train_file and not cfg.dataset_name and not cfg.validation_file:
        cfg.dataset_name, cfg.dataset_config_name = DEFAULT_DATASET
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as a file that `--config` accepts and that reproduces the run."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("config", "dry_run")}
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
