"""Distillation on CPU, nothing to download: the quickstart's fine-tuned chat model teaches the base
offline Gemma 3 270M. Prints the held-out answer loss of plain fine-tuning against distillation at
the same number of steps, on the same data, from the same start.

    bash quickstart.sh sft                           # once: the teacher, in outputs/quickstart-sft
    .venv/bin/python experiments/distill_demo.py           # ~8 min on 2 CPU cores
    .venv/bin/python experiments/distill_demo.py --teacher DIR --steps 6

Both runs use configs/quickstart-sft-cpu.yaml with --max_steps STEPS; the distilled one adds
--teacher_model_name_or_path TEACHER --distill_alpha ALPHA --distill_temperature T. The evaluation
is the plain per-token answer loss on the held-out modules in both (distillation shapes training
only), so the two figures compare directly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, command_line, load_average, machine  # noqa: E402


def run(name: str, out: Path, args, *extra: str) -> dict:
    data = ROOT / "data" / "stdlib_sft"
    cmd = [
        sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs" / "quickstart-sft-cpu.yaml"),
        "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
        "--output_dir", str(out), "--max_steps", str(args.steps), "--max_new_tokens", "0", "--report_to", "none",
        "--eval_before_training", "false", *extra,
    ]  # fmt: skip
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    loss = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
    print(f"  {name:<13} held-out answer loss {loss:.4f}   train_runtime {runtime:.0f} s   wall {time.time() - started:.0f} s", flush=True)
    return {"eval_loss": loss, "train_runtime": runtime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(ROOT / "outputs" / "quickstart-sft"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    if not (Path(args.teacher) / "config.json").is_file():
        sys.exit(f"no teacher at {args.teacher}: run `bash quickstart.sh sft` first, or pass --teacher DIR")
    if not (ROOT / "data" / "stdlib_sft" / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "stdlib_sft.py"), str(ROOT / "data" / "stdlib_sft")], check=True)
    print(f"machine: {machine()}\nload average before: {load_average()}")
    print(f"student: offline:gemma-3-270m; teacher: {args.teacher}; {args.steps} steps of configs/quickstart-sft-cpu.yaml")
    with tempfile.TemporaryDirectory(prefix="distill-demo-") as tmp:
        plain = run("plain", Path(tmp) / "plain", args)
        taught = run("distilled", Path(tmp) / "distilled", args, "--teacher_model_name_or_path", args.teacher,
                     "--distill_alpha", str(args.alpha), "--distill_temperature", str(args.temperature))  # fmt: skip
    print(f"load average after: {load_average()}")
    better = "lower" if taught["eval_loss"] < plain["eval_loss"] else "not lower"
    print(f"distillation (alpha {args.alpha}, T {args.temperature}): held-out loss {taught['eval_loss']:.4f} against "
          f"{plain['eval_loss']:.4f} plain ({better}); step time x{taught['train_runtime'] / plain['train_runtime']:.2f}")
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()
