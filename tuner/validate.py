"""Every check that needs neither the model weights nor the data contents, collected and raised once.

Each message names the flag as typed, the value received, and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import data, models
from .errors import UsageError

POSITIVE = (
    "max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps",
)  # fmt: skip
NON_NEGATIVE = ("weight_decay", "warmup_steps", "max_new_tokens", "ddp_timeout")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def number_problems(cfg) -> list[str]:
    problems = [
        f"--{name} {getattr(cfg, name)}: must be greater than 0. Pass a positive value."
        for name in POSITIVE
        if getattr(cfg, name) <= 0
    ]
    problems += [
        f"--{name} {getattr(cfg, name)}: must not be negative. Pass 0 or more." for name in NON_NEGATIVE if getattr(cfg, name) < 0
    ]
    for name in ("max_steps", "max_train_samples", "max_eval_samples", "save_total_limit", "preprocessing_num_workers"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} {value}: must be greater than 0. Pass a positive value, or leave it out.")
    if not 0 <= cfg.validation_split_percentage < 100:
        problems.append(
            f"--validation_split_percentage {cfg.validation_split_percentage}: must be from 0 to 99. "
            "Pass 0 to skip evaluation, or e.g. 5."
        )
    return problems


def precision_problems(cfg) -> list[str]:
    import torch

    problems = []
    cuda = torch.cuda.is_available()
    if cfg.bf16 and cfg.fp16:
        problems.append("--bf16 and --fp16 both given. Pass only one; --bf16 is the right one for Gemma 3.")
    if cfg.bf16 and not bf16_supported():
        where = "its GPU lacks bf16" if cuda else "no CUDA GPU, and the CPU lacks avx512_bf16/amx_bf16"
        problems.append(f"--bf16: this machine cannot compute in bf16 ({where}). Drop --bf16 to train in float32.")
    if cfg.fp16 and not cuda:
        problems.append("--fp16: needs a CUDA GPU, and there is none. Drop --fp16 to train in float32.")
    return problems


def bf16_supported() -> bool:
    """A CUDA GPU with bf16, or a CPU with native bf16 instructions (Trainer then autocasts on CPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def feature_problems(cfg) -> list[str]:
    import torch

    problems = []
    if cfg.use_flash_attention:
        if not torch.cuda.is_available():
            problems.append("--use_flash_attention: needs a CUDA GPU, and there is none. Drop the flag (sdpa is used).")
        elif not _installed("flash_attn"):
            problems.append("--use_flash_attention: the flash-attn package is not installed. pip install flash-attn --no-build-isolation, or drop the flag.")
        if cfg.attn_implementation and cfg.attn_implementation != "flash_attention_2":
            problems.append(
                f"--use_flash_attention with --attn_implementation {cfg.attn_implementation}: they conflict. Pass only one."
            )
    if cfg.attn_implementation and cfg.attn_implementation not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        problems.append(
            f"--attn_implementation {cfg.attn_implementation}: unknown. Use eager, sdpa, flash_attention_2 or flex_attention."
        )
    if cfg.use_liger_kernel:
        from .loss import liger_problem

        problem = liger_problem(torch.cuda.is_available(), _installed("liger_kernel"))
        if problem:
            problems.append(f"--use_liger_kernel: {problem}")
    if cfg.report_to == "wandb" and not _installed("wandb"):
        problems.append("--report_to wandb: the wandb package is not installed. pip install wandb, or --report_to tensorboard.")
    if cfg.report_to == "tensorboard" and not _installed("tensorboard"):
        problems.append("--report_to tensorboard: the tensorboard package is not installed. pip install tensorboard, or --report_to none.")
    if cfg.streaming and cfg.max_steps is None:
        problems.append("--streaming: a stream has no known length, so --max_steps is required. Pass e.g. --max_steps 1000.")
    return problems


def path_problems(cfg) -> list[str]:
    problems = data.source_problems(cfg) + models.offline_problems(cfg.model_name_or_path)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--output_dir {cfg.output_dir}: exists and is a file. Give a directory path.")
    else:
        existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"--output_dir {cfg.output_dir}: {existing} is a file, not a directory. Choose another path.")
        elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"--output_dir {cfg.output_dir}: {existing} is not writable. Choose a directory you can write to.")
    if cfg.resume_from_checkpoint:
        ckpt = Path(cfg.resume_from_checkpoint)
        if not ckpt.is_dir():
            problems.append(f"--resume_from_checkpoint {ckpt}: no such directory. Give a checkpoint-N directory, or leave the flag out to resume automatically.")
        elif not (ckpt / "trainer_state.json").is_file():
            problems.append(f"--resume_from_checkpoint {ckpt}: not a checkpoint (no trainer_state.json). Give a checkpoint-N directory written by a run.")
    return problems


def validate(cfg) -> None:
    problems = number_problems(cfg) + precision_problems(cfg) + feature_problems(cfg) + path_problems(cfg)
    if problems:
        raise UsageError(problems)


def check_against_model(cfg, model_config) -> None:
    """Checks that need the model's config.json (but not its weights)."""
    problems = []
    limit = models.max_positions(model_config)
    if limit and cfg.max_seq_length > limit:
        problems.append(
            f"--max_seq_length {cfg.max_seq_length}: above {cfg.model_name_or_path}'s maximum of {limit} positions. "
            f"Pass --max_seq_length {limit} or less."
        )
    if cfg.fp16 and not cfg.bf16 and str(getattr(model_config, "model_type", "")).startswith("gemma3"):
        problems.append(
            f"--fp16 with {cfg.model_name_or_path}: Gemma 3's activations overflow float16 and the loss becomes NaN. "
            "Use --bf16 instead, or plain float32 (no flag) on GPUs without bf16."
        )
    if problems:
        raise UsageError(problems)
