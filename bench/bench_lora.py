"""One training step of the real Gemma 3 270M on CPU: full fine-tuning against LoRA, same batch and sequence.

    .venv/bin/python bench/bench_lora.py                         # batch 1 x 2048 tokens
    .venv/bin/python bench/bench_lora.py --batch_size 4 --seq_len 512 --variants full lora

Variants (each in a fresh process):
  full         every parameter trained
  lora         tuner.lora defaults: r 16, alpha 32, all-linear (attention and MLP projections)
  lora+tokens  the same, plus the embedding rows of <start_of_turn> and <end_of_turn> (ids 105, 106)
A step is forward + tuner.loss.compute_causal_lm_loss + backward + fused AdamW step over the
trainable parameters (the Trainer's default optimizer) + zero_grad, fp32 weights, SDPA attention.
Each process first takes one short warm-up step (AdamW's state exists, kernels primed), then
times one full step. Memory is the peak resident set (VmHWM, reset just before the timed step);
`above start` subtracts the RSS before the step (weights, AdamW state, inputs).

Saved: what a run writes as its model (full: model.safetensors; LoRA: adapter_model.safetensors +
adapter_config.json) and what each checkpoint holds on top (AdamW's state, torch.save'd as the
Trainer does). Written to a temporary directory after the timed step, then deleted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

VARIANTS = ("full", "lora", "lora+tokens")
TURN_TOKENS = [105, 106]  # <start_of_turn>, <end_of_turn> in Gemma 3's tokenizer


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--gradient_checkpointing", action="store_true", help="in every variant")
    _common.add_step_options(parser, VARIANTS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(one_step(args))
    command = _common.command_line()
    limit = args.rss_limit_gib or _common.available_gib() - 1.0
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"machine: {_common.machine()}")
    print(f"model: Gemma 3 270M (tuner.offline.ensure_checkpoint()), fp32, batch {args.batch_size} x {args.seq_len} tokens{checkpointing}")
    print(f"each variant in a fresh process, killed above {limit:.1f} GiB RSS; load average before: {_common.load_average()}")
    results = {}
    for variant in args.variants:
        worker = [str(Path(__file__).relative_to(_common.ROOT)), "--worker", variant, "--batch_size", str(args.batch_size),
                  "--seq_len", str(args.seq_len), "--warmup_seq_len", str(args.warmup_seq_len)]  # fmt: skip
        worker += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
        results[variant] = result = _common.run_isolated(worker, rss_limit_gib=limit)
        print(f"  {variant:12s} {describe(result)}", flush=True)
    print(f"load average after: {_common.load_average()}")
    for variant in args.variants:
        if variant != "full" and "full" in results:
            print(compare(results["full"], results[variant], variant))
    print(f"reproduce: {command}")


def build(variant: str, gradient_checkpointing: bool):
    """(model, trainable parameters) for a variant, loaded as main.py would."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuner import lora
    from tuner.offline import ensure_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(ensure_checkpoint()), dtype=torch.float32)
    if gradient_checkpointing:
        model.config.use_cache = False
    if variant != "full":
        config = lora.build_lora_config(token_ids=TURN_TOKENS if variant == "lora+tokens" else None)
        model = lora.apply_lora(model, config, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # as the Trainer does; non-reentrant
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def one_step(args) -> dict:
    import torch

    from tuner.loss import compute_causal_lm_loss

    model, trainable = build(args.worker, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)

    def step(inputs) -> float:
        loss, _ = compute_causal_lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    vocab = model.config.vocab_size
    step(_common.random_batch(vocab, args.batch_size, args.warmup_seq_len, seed=1))
    inputs = _common.random_batch(vocab, args.batch_size, args.seq_len, seed=0)
    _common.reset_peak_rss()
    start_gib, started, cpu_started = _common.rss_gib(), time.perf_counter(), time.process_time()
    loss = step(inputs)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_gib = _common.rss_gib(field="VmHWM")
    return {"loss": loss, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": args.batch_size * args.seq_len,
            "peak_gib": peak_gib, "start_gib": start_gib, "trainable": sum(p.numel() for p in trainable),
            **saved_sizes(model, optimizer)}  # fmt: skip


def saved_sizes(model, optimizer) -> dict:
    """Bytes of the saved model (or adapter) and of the optimizer state a checkpoint adds."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_lora-") as directory:
        model.save_pretrained(directory)
        torch.save(optimizer.state_dict(), Path(directory) / "optimizer.pt")
        sizes = {path.name: path.stat().st_size for path in Path(directory).iterdir()}
    optimizer_bytes = sizes.pop("optimizer.pt")
    return {"saved_bytes": sum(sizes.values()), "saved_files": sorted(sizes), "optimizer_bytes": optimizer_bytes}


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 / 10 else f"{n_bytes / 2**20:.1f} MiB"


def describe(result: dict) -> str:
    if "error" in result:
        return f"{result['error']} (after {result['process_wall_s']:.0f} s)"
    return (
        f"{result['trainable']:,} trainable; {result['seconds']:.1f} s/step, {result['tokens'] / result['seconds']:.1f} tokens/s "
        f"({result['tokens'] / result['cpu_seconds']:.1f} per CPU-second), peak RSS {result['peak_gib']:.2f} GiB "
        f"({result['peak_gib'] - result['start_gib']:.2f} GiB above start), loss {result['loss']:.4f}; saved "
        f"{size(result['saved_bytes'])} ({', '.join(result['saved_files'])}) + {size(result['optimizer_bytes'])} "
        "optimizer state per checkpoint"
    )


def compare(full: dict, other: dict, variant: str) -> str:
    if "error" in other:
        return f"{variant}: failed ({other['error']})"
    if "error" in full:
        return f"{variant}: full fine-tuning failed ({full['error']}); {variant} peaks at {other['peak_gib']:.2f} GiB"
    checkpoint = (other["saved_bytes"] + other["optimizer_bytes"]) / (full["saved_bytes"] + full["optimizer_bytes"])
    return (
        f"{variant} vs full: peak RSS {other['peak_gib']:.2f} vs {full['peak_gib']:.2f} GiB ({1 - other['peak_gib'] / full['peak_gib']:.0%} "
        f"lower); speed x{full['seconds'] / other['seconds']:.2f} wall, x{full['cpu_seconds'] / other['cpu_seconds']:.2f} per "
        f"CPU-second; saved model {size(other['saved_bytes'])} vs {size(full['saved_bytes'])} "
        f"(1/{full['saved_bytes'] / other['saved_bytes']:.0f}); checkpoint {checkpoint:.2%} of full's"
    )


if __name__ == "__main__":
    main()
