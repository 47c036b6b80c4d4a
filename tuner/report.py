"""What a run tells the user: perplexity, metrics JSON, generated samples, a run summary."""

from __future__ import annotations

import logging
from pathlib import Path

from tuner.common import perplexity, save_json  # noqa: F401  (callers use report's names)
from tuner.train.callbacks import tokens_per_source

PLOT_NAME = "loss_curve.png"
SUMMARY_NAME = "run_summary.json"

logger = logging.getLogger(__name__)



def with_perplexity(metrics: dict) -> dict:
    return {**metrics, "perplexity": perplexity(metrics["eval_loss"])} if "eval_loss" in metrics else metrics


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[dict]:
    """Greedy continuations of each prompt by the fine-tuned model. With `chat` (an SFT run) and a chat
    template, each prompt is a user turn and the answer ends at the end of the turn (generation_config)."""
    import torch

    if max_new_tokens <= 0 or not prompts:
        return []
    model.eval()
    samples = []
    chat = chat and bool(getattr(tokenizer, "chat_template", None))
    for prompt in prompts:
        if chat:
            turn = [{"role": "user", "content": prompt}]
            inputs = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = inputs.to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                **repetition_penalty(1.3, inputs["input_ids"].shape[1] if chat else None),
            )  # fmt: skip
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": text, **({"chat": True} if chat else {})})
    return samples


def repetition_penalty(penalty: float, prompt_length: int | None) -> dict:
    """generate() keyword arguments that discourage loops. With a prompt_length (a chat prompt) the prompt's
    tokens are not penalised: it ends with the <end_of_turn> that should also end the answer."""
    if prompt_length is None:
        return {"repetition_penalty": penalty}
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    return {"logits_processor": LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length)])}



def print_samples(samples: list[dict]) -> None:
    for sample in samples:
        gap = "\n" if sample.get("chat") else ""  # a chat answer is a reply, not a continuation
        print(f"\n>>> {sample['prompt']}{gap}{sample['completion']}")


# ---------------------------------------------------------------- end of a run


def loss_points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as (step, loss) pairs from trainer.state.log_history; one eval point per step."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e and "step" in e}
    return train, sorted(evals.items())


def plot_loss_curve(log_history: list[dict], path: Path, before_training: float | None = None, title: str = "") -> bool:
    """Train and eval loss against the optimizer step, as a PNG. False when there is nothing to plot.

    `before_training` is the eval loss at step 0: Trainer.train() starts a fresh log_history, so an
    evaluation made before it is not in there.
    """
    try:  # the object-oriented API with the Agg canvas: no pyplot, no global backend switch
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("No loss curve: matplotlib is not installed (pip install matplotlib)")
        return False
    train, evals = loss_points(log_history)
    if before_training is not None and not any(step == 0 for step, _ in evals):
        evals.insert(0, (0, before_training))
    if not train and not evals:
        return False
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def run_summary(cfg, trainer, results: dict) -> dict:
    """The headline numbers of a run, from the Trainer's state and the metrics main() collected."""
    train = results.get("train", {})
    runtime = train.get("train_runtime")
    seen = trainer.state.num_input_tokens_seen  # summed over all processes
    # On a resumed run the count starts at the checkpoint's; the speed is of this run's tokens only.
    this_run = seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    summary = {
        "model": cfg.model_name_or_path,
        "saved_to": str(Path(cfg.output_dir).resolve()),
        "wall_seconds": results.get("wall_seconds"),
        "train_runtime": runtime,
        "global_step": trainer.state.global_step,
        "tokens_seen": seen,
        "tokens_seen_this_run": this_run,
        "tokens_per_second": this_run / runtime if runtime else None,
        "train_loss": train.get("train_loss"),
        **getattr(trainer, "data_figures", {}),  # SFT: examples kept, dropped and truncated, packing fill
    }

    mixed = tokens_per_source(trainer)  # several sources: trained tokens the optimizer steps took from each
    if mixed is not None:
        summary["tokens_per_source"] = mixed
    for key, name in (("before_training", "before_training"), ("eval", "final")):
        if key in results:
            summary[f"eval_loss_{name}"] = results[key]["eval_loss"]
            summary[f"perplexity_{name}"] = results[key]["perplexity"]
    return summary


def format_summary(summary: dict) -> str:
    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    rows = [(k.replace("_", " "), show(v)) for k, v in summary.items() if v is not None]
    width = max(len(k) for k, _ in rows) + 2
    return "Run summary:\n" + "\n".join(f"  {k:<{width}}{v}" for k, v in rows)


def finish(cfg, trainer, results: dict) -> dict:
    """After training, on the main process only: loss_curve.png, run_summary.json, and the summary printed."""
    if not trainer.is_world_process_zero():
        return {}
    out = Path(cfg.output_dir)
    before = results.get("before_training", {}).get("eval_loss")
    summary = run_summary(cfg, trainer, results)
    model = Path(cfg.model_name_or_path).name if Path(cfg.model_name_or_path).is_dir() else cfg.model_name_or_path
    files = [cfg.train_file] if isinstance(cfg.train_file, str) else cfg.train_file or []
    data = ", ".join(Path(f).name for f in files) or cfg.dataset_name or "a mix of sources"
    if plot_loss_curve(trainer.state.log_history, out / PLOT_NAME, before, title=f"{model} on {data}"):
        summary["loss_curve"] = str((out / PLOT_NAME).resolve())
    save_json(out / SUMMARY_NAME, summary)
    print("\n" + format_summary(summary))
    return summary
