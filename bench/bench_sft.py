"""SFT on the real Gemma 3 270M, CPU: packed rows against one example a row (padded per batch), the same examples.

    .venv/bin/python bench/bench_sft.py                                   # 512 examples, rows of 1024 tokens
    .venv/bin/python bench/bench_sft.py --examples 64 --max_seq_length 256 # a quick look

Both variants run main.py's training (the Trainer, tuner's loss, fp32, sdpa) for one epoch over the first
--examples examples of the stdlib demo set (scripts/stdlib_sft.py, written to a temporary directory),
with the same --per_device_train_batch_size and --gradient_accumulation_steps, each in a fresh process:
  packed   --packing true: best-fit-decreasing rows of <= --max_seq_length tokens, position_ids restarting
  padded   --packing false: one example a row, each batch padded to its longest row
The figure is trained tokens per second (answer tokens, the ones the loss counts: identical in both, as
the examples are) over the Trainer's train_runtime; memory is the process's peak resident set (VmHWM,
model load included). The packed run takes fewer, fuller steps: per-step costs (AdamW over 268M
parameters, the output layer's weight gradient) are paid once per row of ~1,000 tokens instead of per
example of ~40, and no time goes to padding. Goal: packed >= 1.5x padded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

VARIANTS = ("packed", "padded")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512, help="training examples, the same in both variants")
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4, help="--per_device_train_batch_size of both variants")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(train(args))
    command = _common.command_line()
    print(f"machine: {_common.machine()}")
    print(f"model: Gemma 3 270M (offline:gemma-3-270m), fp32, sdpa; {args.examples} examples of the stdlib set, one epoch, "
          f"batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, rows <= {args.max_seq_length} tokens")  # fmt: skip
    print(f"each variant in a fresh process; load average before: {_common.load_average()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_set(Path(tmp))
        for variant in args.variants:
            worker = [str(Path(__file__).relative_to(_common.ROOT)), "--worker", variant, "--data", str(data),
                      "--examples", str(args.examples), "--max_seq_length", str(args.max_seq_length),
                      "--batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(args.gradient_accumulation_steps)]  # fmt: skip
            results[variant] = result = _common.run_isolated(worker)
            print(f"  {variant:7s} {describe(result)}", flush=True)
    print(f"load average after: {_common.load_average()}")
    if {"packed", "padded"} <= results.keys() and all("error" not in r for r in results.values()):
        ratio = results["packed"]["trained_tokens_per_s"] / results["padded"]["trained_tokens_per_s"]
        verdict = "meets" if ratio >= 1.5 else "misses"
        print(f"packed / padded trained tokens per second: {ratio:.2f}x ({verdict} the 1.5x goal)")
    print(f"reproduce: {command}")


def write_demo_set(directory: Path) -> Path:
    """scripts/stdlib_sft.py in a process of its own: this one has imported torch, which patches the stdlib."""
    import subprocess

    subprocess.run([sys.executable, str(_common.ROOT / "scripts" / "stdlib_sft.py"), str(directory)], check=True)
    return directory / "train.jsonl"


def train(args) -> dict:
    """One variant, in this (fresh) process: main.main() as a user runs it, less evaluation and samples."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import main as entry

    with tempfile.TemporaryDirectory() as out:
        metrics = entry.main([
            "--model_name_or_path", "offline:gemma-3-270m", "--train_file", args.data, "--output_dir", out,
            "--data_format", "messages", "--packing", "true" if args.worker == "packed" else "false",
            "--max_seq_length", str(args.max_seq_length), "--max_train_samples", str(args.examples),
            "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
            "--num_train_epochs", "1", "--learning_rate", "1e-5", "--warmup_steps", "0", "--validation_split_percentage", "0",
            "--eval_before_training", "false", "--max_new_tokens", "0", "--save_steps", "100000", "--logging_steps", "1000",
            "--report_to", "none", "--seed", "0",
        ])  # fmt: skip
    summary, runtime = metrics["summary"], metrics["train"]["train_runtime"]
    return {
        "examples": summary["train_examples_used"],
        "rows": summary["train_rows_used"],
        "steps": summary["global_step"],
        "trained_tokens": summary["train_trained_tokens_used"],
        "tokens": summary["train_tokens_used"],
        "train_runtime_s": runtime,
        "trained_tokens_per_s": summary["train_trained_tokens_used"] / runtime,
        "peak_rss_gib": _common.rss_gib(field="VmHWM"),
    }


def describe(result: dict) -> str:
    if "error" in result:
        return f"FAILED ({result['error']})"
    return (
        f"{result['trained_tokens_per_s']:7.1f} trained tokens/s  ({result['trained_tokens']:,} trained of {result['tokens']:,} "
        f"tokens, {result['examples']} examples in {result['rows']} rows, {result['steps']} steps, "
        f"{result['train_runtime_s']:.1f} s)  peak RSS {result['peak_rss_gib']:.2f} GiB"
    )


if __name__ == "__main__":
    main()
