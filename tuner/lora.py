"""LoRA adapters through peft: checks before weights load, wrapping, trainable tokens, merging.

Gemma 3 270M has a trap of its own: 168M of its 268M parameters are the tied 262,144 x 640
embedding, which is also the output head. `modules_to_save=["embed_tokens", "lm_head"]`, the usual
way to train it, gives each of the two a trainable copy: the pair is untied, training and saving
cost 168M parameters more, and the merged model no longer has one tied matrix. Instead, peft's
`trainable_token_indices` trains chosen rows (e.g. the chat turn tokens) as a small (k x hidden)
parameter shared by the embedding and the head (peft ties the head's token adapter to the
embedding's when `tie_word_embeddings` is set), and merging writes those rows into the one tied
matrix. LoRA itself never targets the head or the embedding here (`all-linear` skips the head).

Order of use (see each function):
    option_problems(...)                        # validate step, no model needed
    model_problems(model_config, tokenizer, ...)  # after config.json and the tokenizer, before weights
    token_ids = trainable_token_ids(spec, tokenizer)
    lora_config = build_lora_config(r, alpha, dropout, target_modules, token_ids)
    count_trainable_parameters(model_config, lora_config)  # --dry_run memory estimate (meta device)
    model = apply_lora(model, lora_config, gradient_checkpointing)  # after load_model, before Trainer
    ... train; the Trainer saves the adapter (adapter_model.safetensors, adapter_config.json) ...
    save_merged(model, tokenizer, output_dir / "merged", dtype)  # last: consumes the peft model

peft is imported inside the functions that need it, so this module is cheap to import.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from tuner.common import text_config

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear except the output head
# Defaults of the flags, kept here so config.py and option_problems agree.
DEFAULT_R, DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_TARGET_MODULES = 16, 32.0, 0.05, ALL_LINEAR
MIN_PEFT = "0.18.0"  # 0.18.0 applies Gemma 3's embedding scale to trainable tokens (peft#2809)
_INSTALL_HINT = f"pip install 'peft>={MIN_PEFT}'"
_ID = re.compile(r"-?\d+")

TokenSpec = str | Sequence[str | int] | None  # "105,<end_of_turn>" or a YAML list


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"--use_lora needs peft: {_INSTALL_HINT}") from error
    return peft


# --- options, before anything loads -------------------------------------------------------------


def parse_target_modules(value: str | Sequence[str]) -> str | list[str]:
    """ALL_LINEAR, or the list of module names. Always a list otherwise: a plain string would be a
    regular expression to peft, matched against full names (`model.layers.0.self_attn.q_proj`)."""
    if isinstance(value, str):
        if value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        value = value.split(",")
    return list(dict.fromkeys(name.strip() for name in value if str(name).strip()))


def parse_token_spec(spec: TokenSpec) -> list[str | int]:
    """Items of `--lora_trainable_tokens`: a comma list (ids and/or token strings) or a YAML list.

    A token that itself contains a comma can only be given in a YAML list, or by its id."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [item.strip() if isinstance(item, str) else item for item in items if str(item).strip()]


def option_problems(use_lora: bool, merge_lora: bool, r: int, alpha: float, dropout: float,
                    target_modules: str | Sequence[str], trainable_tokens: TokenSpec) -> list[str]:  # fmt: skip
    """Problems with the LoRA flags themselves; each names the flag, the value and the fix."""
    problems = []
    if merge_lora and not use_lora:
        problems.append("--merge_lora: there is no adapter to merge without --use_lora. Add --use_lora, or drop --merge_lora.")
    if not use_lora:
        # A LoRA option without --use_lora would be silently ignored.
        changed = {"--lora_r": r != DEFAULT_R, "--lora_alpha": alpha != DEFAULT_ALPHA, "--lora_dropout": dropout != DEFAULT_DROPOUT,
                   "--lora_target_modules": parse_target_modules(target_modules) != ALL_LINEAR,
                   "--lora_trainable_tokens": bool(parse_token_spec(trainable_tokens))}  # fmt: skip
        problems += [f"{flag}: has no effect without --use_lora. Add --use_lora, or drop {flag}." for flag, on in changed.items() if on]
        return problems
    if r < 1:
        problems.append(f"--lora_r {r}: the rank must be at least 1. Pass e.g. --lora_r {DEFAULT_R}.")
    if alpha <= 0:
        problems.append(f"--lora_alpha {alpha}: must be greater than 0 (the update is scaled by alpha / r). Pass e.g. --lora_alpha {2 * max(r, 1)}.")
    if not 0 <= dropout < 1:
        problems.append(f"--lora_dropout {dropout}: must be from 0 to less than 1. Pass e.g. --lora_dropout {DEFAULT_DROPOUT}, or 0.")
    if not parse_target_modules(target_modules):
        problems.append(f"--lora_target_modules {target_modules!r}: names no module. Pass {ALL_LINEAR} or a comma list such as q_proj,v_proj.")
    return problems


# --- checks against the model's config and tokenizer, before weights load ----------------------


def _meta_model(model_config):
    """The model built on the meta device: module names and shapes, no memory, no weights read.

    `torch.device("meta")` rather than accelerate's init_empty_weights, which leaves lm_head untied
    with transformers 5.x (see estimate.count_parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    model.tie_weights()
    return model


def _is_linear(module) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer; LoRA supports it too

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _tied_head(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def target_module_problems(model_config, target_modules: str | Sequence[str]) -> list[str]:
    """A comma-list entry that matches no linear layer, or matches the tied embedding/head."""
    names = parse_target_modules(target_modules)
    if names == ALL_LINEAR or not names:  # an empty list is option_problems' to report
        return []
    model = _meta_model(model_config)
    modules = dict(model.named_modules())
    embedding, head, tied = model.get_input_embeddings(), model.get_output_embeddings(), _tied_head(model)
    linear = [key for key, module in modules.items() if _is_linear(module) and not (tied and module is head)]
    choices = ", ".join(dict.fromkeys(key.rsplit(".", 1)[-1] for key in linear))
    shown = target_modules if isinstance(target_modules, str) else ",".join(target_modules)
    problems = []
    for name in names:
        # peft's rule for a list of names (LoraConfig.target_modules): the full name, or its suffix after a dot.
        matched = [modules[key] for key in modules if key == name or key.endswith("." + name)]
        if tied and any(module is head or module is embedding for module in matched):
            which = "output head" if any(module is head for module in matched) else "embedding"
            problems.append(
                f"--lora_target_modules {shown}: {name} is the {which}, and the embedding and output head share one "
                "weight (tied): a LoRA merged into it would change both. Leave it out; to train particular tokens' "
                "rows use --lora_trainable_tokens."
            )
        elif not matched:
            problems.append(
                f"--lora_target_modules {shown}: {name} matches no module of {model_config.model_type}. Its linear "
                f"layers are: {choices}. Pass {ALL_LINEAR} or a comma list of these."
            )
        elif not all(_is_linear(module) for module in matched):
            kinds = ", ".join(sorted({type(module).__name__ for module in matched if not _is_linear(module)}))
            problems.append(
                f"--lora_target_modules {shown}: {name} is a {kinds}, not a linear layer. Name linear layers: {choices}."
                + (" To train embedding rows use --lora_trainable_tokens." if any(m is embedding for m in matched) else "")
            )
    return problems


def _resolve_tokens(spec: TokenSpec, tokenizer, vocab_size: int | None) -> tuple[list[int], list[str]]:
    """(token ids, problems). An item of digits is an id (checked against vocab_size unless None);
    anything else must be one entry of the tokenizer's vocabulary."""
    shown = spec if isinstance(spec, str) else ",".join(str(item) for item in spec or [])
    ids, problems = [], []
    for item in parse_token_spec(spec):
        if isinstance(item, int) or _ID.fullmatch(item):
            token_id = int(item)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                problems.append(
                    f"--lora_trainable_tokens {shown}: token id {token_id} is out of range; the embedding has ids 0 to "
                    f"{(vocab_size or 0) - 1}. Pass ids in that range, or token strings such as {tokenizer.eos_token}."
                )
            else:
                ids.append(token_id)
        elif (token_id := _token_id(tokenizer, item)) is not None:
            ids.append(token_id)
        else:
            pieces = tokenizer.tokenize(item)
            problems.append(
                f"--lora_trainable_tokens {shown}: {item!r} is not a single token of the tokenizer (it splits into "
                f"{len(pieces)}: {pieces[:8]}). Name tokens exactly as in the vocabulary (e.g. {tokenizer.eos_token}), "
                "or give their ids."
            )
    return list(dict.fromkeys(ids)), problems


def _token_id(tokenizer, token: str) -> int | None:
    """The id of a vocabulary entry, or None. convert_tokens_to_ids answers the unknown token's id (or
    None) for strings that are not entries; get_vocab() would build a 262,144-entry dict (0.5 s)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


def trainable_token_problems(spec: TokenSpec, tokenizer, vocab_size: int) -> list[str]:
    """Token strings that are not single tokens, and ids outside 0..vocab_size-1."""
    return _resolve_tokens(spec, tokenizer, vocab_size)[1]


def trainable_token_ids(spec: TokenSpec, tokenizer) -> list[int]:
    """The ids of `--lora_trainable_tokens`, in the order given, without repeats. Validate first
    (model_problems checks the ids against the embedding's rows)."""
    ids, problems = _resolve_tokens(spec, tokenizer, vocab_size=None)
    if problems:
        raise ValueError("; ".join(problems))  # model_problems reports these to the user first
    return ids


def embedding_rows(model_config, tokenizer) -> int:
    """Rows of the embedding once the model is loaded: models.load_model grows it to fit the tokenizer."""
    text = text_config(model_config)
    return max(text.vocab_size, len(tokenizer))


def model_problems(model_config, tokenizer, target_modules: str | Sequence[str], trainable_tokens: TokenSpec) -> list[str]:
    """Every LoRA check that needs config.json and the tokenizer but no weights (for check_against_model)."""
    rows = embedding_rows(model_config, tokenizer)
    return target_module_problems(model_config, target_modules) + trainable_token_problems(trainable_tokens, tokenizer, rows)


# --- the adapter ---------------------------------------------------------------------------------


def build_lora_config(r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA, dropout: float = DEFAULT_DROPOUT,
                      target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
                      token_ids: Sequence[int] | None = None):  # fmt: skip
    """peft's LoraConfig for a causal LM. `token_ids` rows of the (tied) embedding are trained."""
    peft = _peft()
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
        bias="none",
        # A list (not a dict) targets the input embedding; peft then ties the head's token adapter to it
        # when the model's tie_word_embeddings is set, so one (k x hidden) parameter serves both.
        trainable_token_indices=list(token_ids) if token_ids else None,
    )


def config_from_options(cfg, tokenizer):
    """The LoraConfig that --use_lora and the --lora_* options ask for."""
    token_ids = trainable_token_ids(cfg.lora_trainable_tokens, tokenizer)
    return build_lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, token_ids)


def _get_peft_model(model, lora_config):
    import warnings

    peft = _peft()
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: noise on every run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # A copy: peft resolves all-linear into module names in the config it is given.
        return peft.get_peft_model(model, copy.deepcopy(lora_config))


def count_trainable_parameters(model_config, lora_config) -> dict:
    """{'trainable_parameters', 'parameters', 'trainable_percent'} of the model with this adapter, as
    peft counts them, on the meta device (no weights). Gradients and AdamW states exist only for the
    trainable ones."""
    model = _get_peft_model(_meta_model(model_config), lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_parameters": trainable, "parameters": total, "trainable_percent": 100 * trainable / total}


def apply_lora(model, lora_config, gradient_checkpointing: bool = False):
    """Wrap a loaded causal LM with the adapter; every base weight is frozen. Returns the PeftModel.

    With gradient checkpointing the embedding's output is made to require grad: a checkpointed block
    whose inputs and (frozen) weights need no gradient would otherwise pass none to the LoRA weights
    inside it (reentrant checkpointing). Harmless when the Trainer does the same on enabling it.
    """
    peft_model = _get_peft_model(model, lora_config)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    log_trainable(peft_model)
    return peft_model


def log_trainable(peft_model) -> None:
    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in peft_model.targeted_module_names))
    tokens = config.trainable_token_indices
    logger.info(
        "LoRA r=%d alpha=%g dropout=%g on %d modules (%s)%s: %s of %s parameters trainable (%.2f%%)",
        config.r, config.lora_alpha, config.lora_dropout, len(peft_model.targeted_module_names), targets,
        f", embedding rows of tokens {tokens} trained" if tokens else "", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )  # fmt: skip


def save_merged(peft_model, tokenizer, directory: str | Path, dtype=None):
    """Merge the adapter into the base weights and save a plain model that
    `AutoModelForCausalLM.from_pretrained(directory)` loads alone, with tokenizer and generation config.

    Call last: merging is done in place and `peft_model` must not be used afterwards; the merged
    model is returned instead (same outputs). `dtype` (torch.dtype or its name): the dtype the base
    checkpoint was saved in, e.g. the `dtype` of the config read before the weights loaded; the merge
    runs at training precision and the result is cast, so the files are the size of the base model's.
    """
    import torch

    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    merged.config.use_cache = True  # models.load_model turns it off for gradient checkpointing
    if getattr(merged.config, "tie_word_embeddings", False) and not _tied_head(merged):
        raise RuntimeError("merging untied the embedding and the output head; the merged model would be wrong")
    directory = Path(directory)
    merged.save_pretrained(directory)  # tied: one copy of the matrix in the file; generation_config.json too
    tokenizer.save_pretrained(directory)
    logger.info("Merged model saved in %s (AutoModelForCausalLM.from_pretrained loads it without peft)", directory)
    return merged


def merge_if_asked(cfg, trainer, tokenizer) -> str | None:
    """--merge_lora: the merged model in {output_dir}/merged/, in the dtype the base model was saved in.
    Call last: the merge happens in place (see save_merged)."""
    if not cfg.merge_lora or not trainer.is_world_process_zero():
        return None
    from transformers import AutoConfig

    peft_model = trainer.model
    base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    directory = Path(cfg.output_dir) / "merged"
    save_merged(peft_model, tokenizer, directory, dtype=AutoConfig.from_pretrained(base).dtype)
    return str(directory)
