"""Every check that needs neither the model weights nor the data contents, collected and raised once.

Each message names the flag as typed, the value received, and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tuner import distill, lora, models
from tuner.config import FIELDS
from tuner.data import sources
from tuner.data import specs as source_specs
from tuner.data.chat_template import template_file_problems
from tuner.errors import UsageError
from tuner.influence import scores as influence
from tuner.loss import liger_problem

POSITIVE = (
    "max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "num_train_epochs", "logging_steps", "save_steps",
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
    for name in ("eval_steps", "max_train_samples", "max_eval_samples", "save_total_limit", "preprocessing_num_workers"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} {value}: must be greater than 0. Pass a positive value, or leave it out.")
    if cfg.max_steps == 0 or cfg.max_steps < -1:  # -1 is TrainingArguments' "not set"
        problems.append(
            f"--max_steps {cfg.max_steps}: must be greater than 0. Pass a positive value, or leave it out to train "
            "for --num_train_epochs."
        )
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
        problem = liger_problem(torch.cuda.is_available(), _installed("liger_kernel"))
        if problem:
            problems.append(f"--use_liger_kernel: {problem}")
    for name, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("trackio", "trackio")):
        if name in reporters(cfg) and not _installed(package):
            problems.append(f"--report_to {name}: the {package} package is not installed. pip install {package}, or --report_to none.")
    if cfg.streaming and cfg.max_steps <= 0 and not cfg.eval_only:
        problems.append("--streaming: a stream has no known length, so --max_steps is required. Pass e.g. --max_steps 1000.")
    return problems


def reporters(cfg) -> list[str]:
    """--report_to as a list, whether parsed (a string) or resolved by TrainingArguments (a list)."""
    value = cfg.report_to
    if value is None or value == "none":
        return []
    return [value] if isinstance(value, str) else list(value)


def path_problems(cfg) -> list[str]:
    # several sources (--datasets, several --train_file): each checked by source_specs, named in its messages
    data = source_specs.problems(cfg) if source_specs.uses_specs(cfg) else sources.source_problems(cfg) + source_specs.problems(cfg)
    problems = data + models.offline_problems(cfg.model_name_or_path)
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


def _value(option) -> str:
    return str(getattr(option, "value", option))  # an enum once TrainingArguments has converted it


def trainer_problems(cfg) -> list[str]:
    """TrainingArguments options that conflict with each other or with this machine. Choice names
    (--optim, --lr_scheduler_type, ...) are checked by the parser itself."""
    import torch

    problems = []
    evaluation, saving = _value(cfg.eval_strategy), _value(cfg.save_strategy)
    if cfg.load_best_model_at_end:
        if evaluation == "no":
            problems.append("--load_best_model_at_end: needs evaluation, but --eval_strategy is no. "
                            "Pass --eval_strategy steps (the default) with validation data.")  # fmt: skip
        elif saving not in (evaluation, "best"):
            problems.append(f"--load_best_model_at_end: --save_strategy {saving} and --eval_strategy {evaluation} "
                            "must match (or --save_strategy best). Pass the same strategy to both.")  # fmt: skip
        elif evaluation == "steps" and cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
            problems.append(f"--load_best_model_at_end: --save_steps {cfg.save_steps:g} is not a multiple of --eval_steps "
                            f"{cfg.eval_steps:g}, so the best evaluation may have no checkpoint. Make it a multiple.")  # fmt: skip
    for name in ("reduce_lr_on_plateau", "greedy"):
        if _value(cfg.lr_scheduler_type) == name and evaluation == "no":
            problems.append(f"--lr_scheduler_type {name}: steps on the evaluation loss, but --eval_strategy is no. "
                            "Pass --eval_strategy steps with validation data, or another scheduler.")  # fmt: skip
    if cfg.deepspeed and not torch.cuda.is_available():
        problems.append(f"--deepspeed {cfg.deepspeed}: DeepSpeed needs CUDA GPUs, and there are none. Drop the flag.")
    elif isinstance(cfg.deepspeed, str) and not cfg.deepspeed.lstrip().startswith("{") and not Path(cfg.deepspeed).is_file():
        problems.append(f"--deepspeed {cfg.deepspeed}: no such file. Give the path of a DeepSpeed JSON config.")
    if cfg.fsdp and not torch.cuda.is_available():
        problems.append(f"--fsdp {cfg.fsdp}: FSDP needs CUDA GPUs here (on CPU, accelerate runs DDP). Drop the flag.")
    if cfg.torch_compile and cfg.use_liger_kernel:
        problems.append("--torch_compile with --use_liger_kernel: Liger's Triton kernels are not traced by "
                        "torch.compile. Pass only one of them.")  # fmt: skip
    if cfg.streaming and cfg.dataloader_num_workers:
        problems.append(f"--dataloader_num_workers {cfg.dataloader_num_workers} with --streaming: the stream position is "
                        "tracked in the main process. Pass --dataloader_num_workers 0.")  # fmt: skip
    if cfg.label_smoothing_factor and not 0 <= cfg.label_smoothing_factor < 1:
        problems.append(f"--label_smoothing_factor {cfg.label_smoothing_factor}: must be from 0 to below 1, e.g. 0.1.")
    return problems


def lora_problems(cfg) -> list[str]:
    return lora.option_problems(cfg.use_lora, cfg.merge_lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                cfg.lora_target_modules, cfg.lora_trainable_tokens)  # fmt: skip


def data_problems(cfg) -> list[str]:
    """SFT options that can be checked before anything loads."""
    problems = template_file_problems(cfg.chat_template)
    if (cfg.eval_only and cfg.validation_split_percentage == 0 and not cfg.validation_file and not cfg.dataset_name
            and not getattr(cfg, "datasets", None)):  # a datasets entry may bring its own validation data
        problems.append("--eval_only with --validation_split_percentage 0 and no --validation_file: there is nothing to "
                        "evaluate on. Pass --validation_file, or hold out some training rows.")  # fmt: skip
    return problems


def influence_problems(cfg) -> list[str]:
    if not cfg.influence:
        return []
    problems = []
    problem = influence.config_problem(cfg.use_liger_kernel, bool(cfg.fsdp or cfg.deepspeed))
    if problem:
        problems.append(f"--influence: {problem}.")
    if cfg.streaming:
        problems.append("--influence with --streaming: scores are kept per training example, which needs data in memory "
                        "(stable example ids). Drop --streaming.")  # fmt: skip
    if cfg.influence_val_examples != "all" and not (cfg.influence_val_examples.isdigit() and int(cfg.influence_val_examples) > 0):
        problems.append(f"--influence_val_examples {cfg.influence_val_examples}: a positive number of examples, or 'all'. "
                        "Pass e.g. --influence_val_examples 32.")  # fmt: skip
    if cfg.influence_steps < 1:
        problems.append(f"--influence_steps {cfg.influence_steps}: must be at least 1 (score every N steps).")
    if cfg.use_lora and cfg.lora_trainable_tokens:
        problems.append("--influence with --lora_trainable_tokens: peft's trainable token rows are not a layer the scores "
                        "can cover exactly. Drop --lora_trainable_tokens, or --influence.")  # fmt: skip
    return problems


def distill_problems(cfg) -> list[str]:
    if not cfg.teacher_model_name_or_path:
        names = ("distill_alpha", "distill_temperature", "distill_direction")
        changed = [f"--{name}" for name in names if getattr(cfg, name) != FIELDS[name].default]
        return [f"{flag}: has no effect without --teacher_model_name_or_path. Add a teacher, or drop {flag}." for flag in changed]
    problems = distill.option_problems(cfg.distill_alpha, cfg.distill_temperature, cfg.distill_direction)
    conflicts = {"--use_liger_kernel": cfg.use_liger_kernel, "--fsdp/--deepspeed": bool(cfg.fsdp or cfg.deepspeed),
                 "--influence": cfg.influence}  # fmt: skip
    problems += [
        f"--teacher_model_name_or_path with {flag}: the distillation loss runs its own chunked loop over the two output "
        f"layers, which {flag} does not support. Drop {flag}, or the teacher."
        for flag, on in conflicts.items() if on
    ]  # fmt: skip
    return problems


def validate(cfg) -> None:
    problems = (
        number_problems(cfg) + precision_problems(cfg) + feature_problems(cfg) + trainer_problems(cfg) + path_problems(cfg)
        + lora_problems(cfg) + data_problems(cfg) + influence_problems(cfg) + distill_problems(cfg)
    )  # fmt: skip
    if problems:
        raise UsageError(problems)


def check_against_model(cfg, model_config, tokenizer, teacher=None) -> None:
    """Checks that need the model's config.json and tokenizer (but not its weights); `teacher` is the
    teacher's (config, tokenizer) with --teacher_model_name_or_path."""
    problems = []
    if cfg.use_lora:
        problems += lora.model_problems(model_config, tokenizer, cfg.lora_target_modules, cfg.lora_trainable_tokens)
    if teacher is not None:
        teacher_config, teacher_tokenizer = teacher
        name = cfg.teacher_model_name_or_path
        found = [distill.tokenizer_problem(tokenizer, teacher_tokenizer, name), distill.vocab_problem(model_config, teacher_config, name)]
        problems += [p for p in found if p]
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


def check_against_data(cfg, datasets) -> None:
    """Checks that need the data (read, but no weights loaded yet)."""
    if cfg.eval_only and datasets.eval is None:
        raise UsageError(
            "--eval_only: there is no validation data. Pass --validation_file, or --validation_split_percentage "
            "above 0 to hold out some training rows."
        )
