"""What a run tells the user: perplexity, metrics JSON, generated samples, a run summary."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def with_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    key = f"{prefix}_loss"
    if key in metrics:
        metrics = {**metrics, f"{prefix}_perplexity" if prefix != "eval" else "perplexity": perplexity(metrics[key])}
    return metrics


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of each prompt by the fine-tuned model."""
    import torch

    if max_new_tokens <= 0 or not prompts:
        return []
    model.eval()
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": text})
    return samples


def save_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def print_samples(samples: list[dict]) -> None:
    for sample in samples:
        print(f"\n>>> {sample['prompt']}{sample['completion']}")
