"""Every option: ours as typed dataclass fields, and every field of the installed
`transformers.TrainingArguments`, parsed by `transformers.HfArgumentParser`.

`Config` is a `TrainingArguments` subclass that adds our options (as TRL's `SFTConfig` does), so
the rest of the package reads one object (`cfg.learning_rate`, `cfg.max_seq_length`) and the
Trainer takes it as its `args`. A field a future transformers release adds appears as a flag with
no code change here. Where this project's default differs from transformers', `OUR_DEFAULTS`
says so and why, and `--help` shows our value.

Precedence: field defaults < `--config FILE.yaml` < command-line flags. YAML keys are the flag
names; an unknown key or flag is an error that names the nearest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import logging
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from tuner import lora
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["The Python interpreter", "In this tutorial, we"]


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelOptions:
    _argument_group_name = "model"

    model_name_or_path: str = _opt(
        "google/gemma-3-270m",
        "Hub id or local directory of a causal LM. 'offline:gemma-3-270m' is the bundled Gemma 3 270M "
        "(Q4_K_M weights dequantized; needs no hub access).",
    )
    use_flash_attention: bool = _opt(False, "Use flash-attention 2 (CUDA + flash-attn; loads the model in bf16).")
    attn_implementation: str | None = _opt(
        None, "Attention kernel passed to transformers: eager, sdpa, flash_attention_2. Default: the model's choice."
    )


class OneOrMore(argparse.Action):
    """nargs="+" that stores one value as itself and several as a list: `--train_file x` stays the string
    it always was (in the Config and run_config.yaml); `--train_file a b` gives a list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


@dataclass
class DataOptions:
    _argument_group_name = "data"

    dataset_name: str | None = _opt(
        None, "Hub dataset name. With neither this nor --train_file: wikitext (config wikitext-2-raw-v1)."
    )
    dataset_config_name: str | None = _opt(None, "Hub dataset config, e.g. wikitext-2-raw-v1.")
    # Several files on the command line arrive as a list (OneOrMore); one file stays a plain string, as before.
    train_file: str | None = _opt(
        None, "Local training file: .json, .jsonl, .csv, .txt or .parquet. Several files mix them (see --mix_weights).",
        nargs="+", action=OneOrMore,
    )
    validation_file: str | None = _opt(None, "Local validation file (same formats as --train_file).")
    text_column: str = _opt("text", "Column that holds the text.")
    max_seq_length: int = _opt(
        2048, "Tokens per training row: running text is concatenated and cut into chunks of this length; chat and "
        "instruction examples are packed into rows of at most this many (a longer example: see --overlong)."
    )
    validation_split_percentage: int = _opt(
        5, "Percent of training rows held out for evaluation when there is no validation data (the same rows, "
        "seeded by --seed, in memory or streamed); 0 skips eval."
    )
    max_train_samples: int | None = _opt(
        None, "Keep at most this many training chunks (running text) or examples (chat/instruction data; a pass, "
        "when streamed). For quick runs."
    )
    max_eval_samples: int | None = _opt(
        None, "Keep at most this many evaluation chunks or examples (the first ones). Streamed: 200 when not given."
    )
    preprocessing_num_workers: int | None = _opt(None, "Threads for tokenization. Default: all cores.")
    streaming: bool = _opt(False, "Read the data as a stream, tokenizing and chunking on the fly (needs --max_steps).")
    cache_dir: str | None = _opt(None, "Where tokenized data is cached. Default: ~/.cache/tuner/tokens.")
    # --- supervised fine-tuning on chat and instruction data ---
    data_format: str = _opt(
        "auto", "text (running text, chunked), messages (chat; ShareGPT converted), prompt_completion, alpaca; "
        "auto picks from the columns and logs why.",
        choices=["auto", "text", "messages", "prompt_completion", "alpaca"],
    )
    messages_column: str = _opt("messages", "Column of chat messages ({role, content} or ShareGPT {from, value}).")
    prompt_column: str = _opt("prompt", "Column of prompts (prompt_completion).")
    completion_column: str = _opt("completion", "Column of completions (prompt_completion).")
    instruction_column: str = _opt("instruction", "Column of instructions (alpaca).")
    input_column: str = _opt("input", "Column of optional inputs (alpaca).")
    output_column: str = _opt("output", "Column of answers (alpaca).")
    chat_template: str | None = _opt(
        None, "Jinja chat template file. Default: the tokenizer's own, else Gemma 3's turn format (saved with the model)."
    )
    train_on_prompt: bool = _opt(False, "Chat/instruction data: train on the prompts too, not only on the answers.")
    packing: bool = _opt(
        True, "Chat/instruction data: pack whole examples into rows of --max_seq_length (no cross-attention "
        "between them); false pads each batch instead."
    )
    overlong: str = _opt(
        "truncate", "Chat/instruction examples longer than --max_seq_length: truncate (keep the start) or drop.",
        choices=["truncate", "drop"],
    )
    # --- several training sources in chosen proportions (tuner/source_specs.py, tuner/mix_data.py) ---
    datasets: str | None = _opt(
        None, "Training sources to mix, each with its own format and columns. In YAML a list of mappings with keys "
        "name, path (a local file or directory) or dataset_name (hub), dataset_config_name, split, text_column, "
        "data_format (and the other *_column options), weight (default 1), validation_path; on the command line the "
        "same list as JSON. Instead of --train_file/--dataset_name.",
    )
    mix_weights: list[float] | None = _opt(
        None, "One weight per --train_file (e.g. --train_file a.jsonl b.jsonl --mix_weights 3 1): each file's share "
        "of the training stream. Default: equal weights."
    )
    mix_unit: str = _opt(
        "tokens", "What the weights are shares of: tokens (trained tokens) or examples (training rows: a chunk of "
        "running text, a packed row of chat examples).", choices=["tokens", "examples"],
    )
    mix_exhausted: str = _opt(
        "restart", "When a mixed source runs out: restart it (its next pass, reshuffled; the proportions hold for the "
        "whole run) or stop the run once it is due again (no row is repeated).", choices=["restart", "stop"],
    )
    mixture_from_influence: bool = _opt(
        False, "With --influence and several sources: write {output_dir}/influence/mixture.yaml, new source weights "
        "from each source's summed influence, to pass as the next run's --config."
    )


@dataclass
class RunOptions:
    _argument_group_name = "run"

    config: str | None = _opt(None, "YAML file whose keys are flag names; command-line flags override it.")
    dry_run: bool = _opt(False, "Validate, print the resolved config and derived numbers, and exit.")
    eval_before_training: bool = _opt(True, "Evaluate once before training, to show the gain.")
    sample_prompts: list[str] = _opt(DEFAULT_PROMPTS, "Prompts the fine-tuned model continues at the end.")
    max_new_tokens: int = _opt(40, "Tokens generated for each sample prompt (0 skips generation).")
    eval_only: bool = _opt(False, "Evaluate the model on the validation data without training; writes eval_results.json.")


@dataclass
class LoraOptions:
    _argument_group_name = "LoRA (peft)"

    use_lora: bool = _opt(False, "Train LoRA adapters (peft) instead of every weight.")
    lora_r: int = _opt(lora.DEFAULT_R, "LoRA rank.")
    lora_alpha: float = _opt(lora.DEFAULT_ALPHA, "LoRA scaling numerator: updates are scaled by lora_alpha / lora_r.")
    lora_dropout: float = _opt(lora.DEFAULT_DROPOUT, "Dropout on the LoRA path's input.")
    lora_target_modules: str = _opt(
        lora.DEFAULT_TARGET_MODULES, "Modules that get adapters: all-linear (every attention and MLP projection, not the output "
        "head), or a comma list such as q_proj,v_proj."
    )
    lora_trainable_tokens: str | None = _opt(
        None, "Token ids or strings whose embedding rows are trained too (e.g. '<start_of_turn>,<end_of_turn>'), "
        "without untying the embedding from the output head."
    )
    merge_lora: bool = _opt(False, "Also write the merged full model to {output_dir}/merged/.")


@dataclass
class InfluenceOptions:
    _argument_group_name = "data influence"

    influence: bool = _opt(False, "Score every training example's influence on the reference set (TracIn, exact).")
    influence_val_examples: str = _opt("32", "Validation examples in the reference set (chosen with --seed), or 'all'.")
    influence_steps: int = _opt(1, "Score every N optimizer steps.")
    influence_preconditioner: str = _opt(
        "none", "none: plain gradient dot products; adam: the validation gradient divided by AdamW's denominator.",
        choices=["none", "adam"],
    )


@dataclass
class DistillOptions:
    _argument_group_name = "distillation"

    teacher_model_name_or_path: str | None = _opt(None, "A teacher model with the same tokenizer: distil from it.")
    distill_alpha: float = _opt(0.5, "Weight of the distillation term: (1 - alpha) * CE + alpha * T^2 * KL.")
    distill_temperature: float = _opt(2.0, "Softmax temperature T of both models in the KL term.")
    distill_direction: str = _opt(
        "forward", "forward: KL(teacher || student); reverse: KL(student || teacher).", choices=["forward", "reverse"]
    )


# TrainingArguments fields whose default here differs from transformers': (our default, why).
OUR_DEFAULTS: dict[str, tuple[Any, str]] = {
    "output_dir": ("./outputs", "a directory of its own, not ./trainer_output"),
    "per_device_train_batch_size": (4, "fits Gemma 3 270M at 2048 tokens on a 24 GB GPU in bf16"),
    "per_device_eval_batch_size": (4, "as training"),
    "gradient_accumulation_steps": (8, "an effective batch of 32 sequences per device"),
    "learning_rate": (2e-5, "full fine-tuning of a pre-trained model, not training from scratch"),
    "weight_decay": (0.01, "mild regularisation, as most fine-tuning recipes"),
    "warmup_steps": (500, "clamped to the total steps, with a warning"),
    "logging_steps": (10, "a loss point every 10 steps, not every 500"),
    "eval_strategy": ("steps", "evaluate during training; 'no' when there is no validation data"),
    "eval_steps": (500, "as save_steps"),
    "save_total_limit": (3, "bounded disk use; the latest complete checkpoint is always kept"),
    "report_to": ("tensorboard", "events in {output_dir}/runs/"),
    "prediction_loss_only": (True, "evaluation needs only the loss: never gather (tokens x vocab) logits"),
    "ddp_timeout": (7200, "first-time tokenization of a large corpus can outlast transformers' 1800 s"),
    "use_cpu": (not torch.cuda.is_available(), "no CUDA: processes join with gloo on the CPU"),
    "include_num_input_tokens_seen": (True, "tokens seen go into the logs and the run summary"),
    "ddp_find_unused_parameters": (False, "every parameter gets a gradient; the search costs a pass"),
}
# Defaults that follow the machine; run_config.yaml leaves them out so it carries over to another.
MACHINE_DEPENDENT = ("use_cpu", "dataloader_pin_memory")
SECRET_FIELDS = ("hub_token",)


def _with_our_defaults(base: type) -> type:
    """`base` with OUR_DEFAULTS as field defaults; transformers' help text, types and choices kept."""
    hints = typing.get_type_hints(base)
    fields = []
    for name, (default, why) in OUR_DEFAULTS.items():
        original = base.__dataclass_fields__[name]
        help_text = f"{original.metadata.get('help', '').rstrip()} [tuner: {why}]"
        fields.append((name, hints[name], field(default=default, metadata={**original.metadata, "help": help_text})))
    cls = dataclasses.make_dataclass("TrainerOptions", fields, bases=(base,))
    cls.__module__ = __name__  # pickled with training_args.bin: must be importable by name
    cls._argument_group_name = "TrainingArguments (transformers; tuner's defaults where marked [tuner: ...])"
    return cls


TrainerOptions = _with_our_defaults(TrainingArguments)
OUR_GROUPS = (ModelOptions, DataOptions, RunOptions, LoraOptions, InfluenceOptions, DistillOptions)
OPTION_GROUPS = (*OUR_GROUPS, TrainerOptions)


@dataclass
class Config(TrainerOptions, DistillOptions, InfluenceOptions, LoraOptions, RunOptions, DataOptions, ModelOptions):
    """Our options and every TrainingArguments field, in one object the Trainer takes as `args`."""


_HINTS = typing.get_type_hints(Config)
OURS = {f.name for group in OUR_GROUPS for f in dataclasses.fields(group)}
FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.init}


class Parser(HfArgumentParser):
    def error(self, message: str):
        # argparse would print the whole usage first: hundreds of lines, one per TrainingArguments field.
        raise UsageError(f"{message}. Fix the value; `python main.py --help` lists every option.")


def build_parser() -> HfArgumentParser:
    parser = Parser(
        OPTION_GROUPS, prog="main.py", description="Fine-tune a small causal language model (Gemma 3 270M by default).",
        allow_abbrev=False,
    )  # fmt: skip
    if "gradient_checkpointing" not in FIELDS:  # a transformers release that dropped the old name
        parser.add_argument("--gradient_checkpointing", dest="activation_checkpointing", nargs="?", const=True,
                            type=parse_bool, help="Alias of --activation_checkpointing.")  # fmt: skip
    return parser


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y", "t"):
        return True
    if text in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def closest_flag(name: str) -> str | None:
    match = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), list(FIELDS), n=1, cutoff=0.5)
    return match[0] if match else None


def _unknown(name: str, where: str) -> str:
    near = closest_flag(name)
    hint = f" Did you mean '{near}'?" if near else " See `python main.py --help` for the valid names."
    return f"{where}: unknown {'key' if where.startswith('--config') else 'flag'} '{name}'.{hint}"


def _check_yaml_value(parser: HfArgumentParser, key: str, value: Any) -> Any:
    """The YAML value converted as argparse converts the command line's; ValueError if it would refuse it.

    PyYAML reads 5e-5 as a string and `on` as a bool, so strings go through the option's type.
    """
    action = parser._option_string_actions[f"--{key}"]  # argparse keeps no public index of options
    if value is None or isinstance(value, (dict, bool)):
        return value
    if key == "datasets" and isinstance(value, list):
        return value  # a list of source mappings, checked with the other options (tuner/source_specs.py)
    if isinstance(value, list):
        if action.nargs not in ("+", "*") and key != "report_to":  # a list is report_to's own form
            raise ValueError("a single value, not a list")
        return [_convert(action, key, v) for v in value]
    return _convert(action, key, value)


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    text = str(value)
    if action.choices is not None and text not in [str(c) for c in action.choices]:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    if str in typing.get_args(_HINTS[key]):
        return text  # e.g. include_num_input_tokens_seen: true/false on the command line, or "all"
    if action.type is None:
        return value
    try:
        return action.type(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        expected = "true or false" if action.type.__name__ == "string_to_bool" else f"of type {action.type.__name__}"
        raise ValueError(f"expected a value {expected}") from None


def load_yaml(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file. Give the path of a YAML file, e.g. configs/quickstart-cpu.yaml.")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({exc}). Fix the file's syntax.") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    problems, values = [], {}
    for key, value in data.items():
        if key not in FIELDS or key == "config":
            problems.append(_unknown(str(key), f"--config {path}"))
            continue
        try:
            values[key] = _check_yaml_value(parser, key, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            problems.append(f"--config {path}: key '{key}' has value {value!r}, which is not valid: {exc}. Fix the value in the file.")
    if problems:
        raise UsageError(problems)
    return values


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


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


def parse_namespace(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed options, not yet checked: defaults < --config YAML < command line."""
    argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    namespace, rest = parser.parse_known_args(argv)
    unknown = [token.split("=")[0] for token in rest if token.startswith("-")]
    if rest:
        raise UsageError([_unknown(t, "command line") for t in unknown] or [f"unexpected value(s) {' '.join(rest)}."])
    if known.config:
        from_command_line = given_on_command_line(argv)
        for key, value in load_yaml(known.config, parser).items():
            if key not in from_command_line:
                setattr(namespace, key, value)
    return with_default_dataset(_old_checkpointing_name(namespace))


def given_on_command_line(argv: list[str]) -> set[str]:
    """The options the command line sets (which YAML must not override)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_known_args(argv)[0]))


def _old_checkpointing_name(ns: argparse.Namespace) -> argparse.Namespace:
    """`--gradient_checkpointing` sets the new name itself, so transformers does not warn about the old one."""
    if getattr(ns, "activation_checkpointing", None) is None and getattr(ns, "gradient_checkpointing", None) is not None:
        ns.activation_checkpointing, ns.gradient_checkpointing = ns.gradient_checkpointing, None
    return ns


def parse_args(argv: list[str] | None = None) -> Config:
    """Parsed, unchecked options as a Config (main.py runs validate.validate in between)."""
    return build_config(parse_namespace(argv))


def build_config(namespace: argparse.Namespace) -> Config:
    """Config from parsed options; TrainingArguments' own checks become user errors."""
    values = vars(namespace)
    if values.get("hub_token"):
        # Kept out of the Config: Trainer pickles its args into every checkpoint (training_args.bin).
        os.environ["HF_TOKEN"] = values["hub_token"]
        values = {**values, "hub_token": None}
        logger.info("--hub_token moved to the HF_TOKEN environment variable of this process")
    try:
        return Config(**values)
    except (ValueError, NotImplementedError) as exc:
        raise UsageError(f"TrainingArguments refused the options: {exc} Change the flags it names.") from None


DEFAULT_DATASET = ("wikitext", "wikitext-2-raw-v1")


def with_default_dataset(cfg):
    """`python main.py --bf16` fine-tunes on wikitext-2: the hub dataset used when no data is named."""
    if not cfg.train_file and not cfg.dataset_name and not cfg.validation_file and not getattr(cfg, "datasets", None):
        cfg.dataset_name, cfg.dataset_config_name = DEFAULT_DATASET
    return cfg


def plain(value: Any) -> Any:
    """A value as YAML (and the command line) spell it: enums by value, nested objects as dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return plain(dataclasses.asdict(value))
    return value


def transformers_defaults() -> dict[str, Any]:
    """TrainingArguments' defaults as its __post_init__ leaves them (e.g. report_to 'none' -> [])."""
    global _REFERENCE
    if _REFERENCE is None:
        reference = TrainingArguments(output_dir="trainer_output", use_cpu=OUR_DEFAULTS["use_cpu"][0])
        _REFERENCE = {f.name: plain(getattr(reference, f.name)) for f in dataclasses.fields(TrainingArguments) if f.init}
    return _REFERENCE


_REFERENCE: dict[str, Any] | None = None


def resolved_options(cfg: Config) -> dict[str, Any]:
    """Our options, the TrainingArguments fields whose default we change, and those that differ from
    transformers' defaults."""
    reference = transformers_defaults()
    values = {}
    for name in FIELDS:
        value = plain(getattr(cfg, name))
        if name in ("config", "dry_run") or name in SECRET_FIELDS:
            continue
        if name in MACHINE_DEPENDENT:
            continue
        if name in OURS or name in OUR_DEFAULTS or value != reference.get(name):
            values[name] = value
    return values


def to_yaml(cfg: Config) -> str:
    """The resolved config as a file that `--config` accepts and that reproduces the run."""
    return yaml.safe_dump(resolved_options(cfg), sort_keys=False, allow_unicode=True)


def checkpointing(cfg) -> bool:
    """--gradient_checkpointing, under either of its transformers names."""
    return bool(getattr(cfg, "activation_checkpointing", None) or getattr(cfg, "gradient_checkpointing", None))
