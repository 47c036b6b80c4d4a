"""Peak memory and speed of one training step of the real Gemma 3 270M on CPU: default loss vs ours.

    .venv/bin/python bench/bench_loss.py                      # batch 1 and 4, 2048 tokens each
    .venv/bin/python bench/bench_loss.py --batch_sizes 1 --seq_len 512

baseline: `model(**inputs, labels=labels).loss`, what transformers' Trainer computes by default.
ours:     `tuner.loss.compute_causal_lm_loss(model, inputs)`.
A step is forward + loss + backward + fused AdamW step (the Trainer's default optimizer) + zero_grad,
fp32 weights, SDPA attention. Each (variant, batch) runs in a fresh process that first takes one
short warm-up step (so AdamW's state exists and kernels are primed, as in any step after the
first), then times one full step.

Memory is the process's peak resident set (VmHWM, reset just before the timed step): on CPU every
tensor lives in ordinary memory and large blocks go back to the OS when freed, so the peak RSS is
the peak tensor memory plus the interpreter. `above start` subtracts the RSS before the step
(weights, AdamW state, inputs), leaving what the step itself needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

VARIANTS = ("baseline", "ours")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq_len", type=int, default=2048)
    _common.add_step_options(parser, VARIANTS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(one_step(args.worker, args.batch_size, args.seq_len, args.warmup_seq_len))
    command = _common.command_line()
    limit = args.rss_limit_gib or _common.available_gib() - 1.0
    print(f"machine: {_common.machine()}\nmodel: Gemma 3 270M (tuner.offline.ensure_checkpoint()), fp32, seq_len {args.seq_len}")
    print(f"each variant in a fresh process, killed above {limit:.1f} GiB RSS; load average before: {_common.load_average()}")
    results = {}
    for batch in args.batch_sizes:
        for variant in VARIANTS:
            worker = [str(Path(__file__).relative_to(_common.ROOT)), "--worker", variant, "--batch_size", str(batch),
                      "--seq_len", str(args.seq_len), "--warmup_seq_len", str(args.warmup_seq_len)]  # fmt: skip
            results[variant, batch] = result = _common.run_isolated(worker, rss_limit_gib=limit)
            print(f"  {variant:8s} batch {batch}: {describe(result)}", flush=True)
    print(f"load average after: {_common.load_average()}")
    for batch in args.batch_sizes:
        print(compare(results["baseline", batch], results["ours", batch], batch))
    print(f"reproduce: {command}")


def one_step(variant: str, batch: int, seq_len: int, warmup_seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuner.loss import compute_causal_lm_loss
    from tuner.offline import ensure_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(ensure_checkpoint()), dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(inputs) -> float:
        if variant == "baseline":
            loss = model(**inputs).loss
        else:
            loss, _ = compute_causal_lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(_common.random_batch(model.config.vocab_size, batch, warmup_seq_len, seed=1))
    inputs = _common.random_batch(model.config.vocab_size, batch, seq_len, seed=0)
    _common.reset_peak_rss()
    start_gib, started = _common.rss_gib(), time.perf_counter()
    cpu_started = time.process_time()
    loss = step(inputs)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_gib = _common.rss_gib(field="VmHWM")
    return {"loss": loss, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": batch * seq_len,
            "peak_gib": peak_gib, "start_gib": start_gib}  # fmt: skip


def describe(result: dict) -> str:
    if "error" in result:
        return f"{result['error']} (after {result['process_wall_s']:.0f} s)"
    return (
        f"{result['seconds']:.1f} s/step, {result['tokens'] / result['seconds']:.1f} tokens/s "
        f"({result['tokens'] / result['cpu_seconds']:.1f} per CPU-second), peak RSS {result['peak_gib']:.2f} GiB "
        f"({result['peak_gib'] - result['start_gib']:.2f} GiB above start), loss {result['loss']:.4f}"
    )


def compare(baseline: dict, ours: dict, batch: int) -> str:
    if "error" in ours:
        return f"batch {batch}: ours failed ({ours['error']})"
    if "error" in baseline:
        return f"batch {batch}: the baseline does not fit ({baseline['error']}); ours peaks at {ours['peak_gib']:.2f} GiB"
    memory = 1 - ours["peak_gib"] / baseline["peak_gib"]
    step = 1 - (ours["peak_gib"] - ours["start_gib"]) / (baseline["peak_gib"] - baseline["start_gib"])
    speed = baseline["seconds"] / ours["seconds"]
    cpu_speed = baseline["cpu_seconds"] / ours["cpu_seconds"]
    return (
        f"batch {batch}: ours peaks {memory:.0%} lower ({step:.0%} lower above start); speed ours/baseline "
        f"x{speed:.2f} wall, x{cpu_speed:.2f} per CPU-second; loss difference {abs(ours['loss'] - baseline['loss']):.2e}"
    )


if __name__ == "__main__":
    main()
