"""Step time and peak memory of a training step with distillation against plain training, on CPU.

    .venv/bin/python bench/bench_distill.py                              # batch 1 and 4, 2048 tokens
    .venv/bin/python bench/bench_distill.py --batch_sizes 1 --seq_len 64 # a quick check that it runs

plain:   `tuner.loss.compute_causal_lm_loss(model, inputs)`, the lean chunked cross-entropy.
distill: `tuner.distill.compute_distillation_loss(model, teacher, inputs, alpha, temperature, direction)`,
         the teacher's forward (no grad, no logits) + the chunked CE + KL.
Student and teacher are both the real Gemma 3 270M (tuner.offline.ensure_checkpoint(), or
--teacher): the same size is fine for measuring what distillation costs, since the teacher adds one
forward and one head matmul per token whatever its weights. A step is forward + loss + backward +
fused AdamW step + zero_grad, fp32 weights, SDPA attention, as in bench_loss.py. Each (variant,
batch) runs in a fresh process: one short warm-up step, then one timed step.

Memory is the process's peak resident set during the timed step (VmHWM, reset just before it);
`above start` subtracts the RSS before the step, which for `distill` already holds the teacher's
weights (reported as `teacher weights`: its parameters' bytes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402
from bench.bench_loss import describe  # noqa: E402

VARIANTS = ("plain", "distill")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint directory; default: the offline Gemma 3 270M")
    parser.add_argument("--teacher_dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--direction", choices=["forward", "reverse"], default="forward")
    _common.add_step_options(parser, VARIANTS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(one_step(args))
    command = _common.command_line()
    limit = args.rss_limit_gib or _common.available_gib() - 1.0
    print(f"machine: {_common.machine()}\nstudent: Gemma 3 270M, fp32; teacher: {args.teacher or 'the same checkpoint'}, "
          f"{args.teacher_dtype}; seq_len {args.seq_len}; alpha {args.alpha}, T {args.temperature}, {args.direction} KL")  # fmt: skip
    print(f"each variant in a fresh process, killed above {limit:.1f} GiB RSS; load average before: {_common.load_average()}")
    results = {}
    for batch in args.batch_sizes:
        for variant in VARIANTS:
            results[variant, batch] = result = _common.run_isolated(worker_args(args, variant, batch), rss_limit_gib=limit)
            extra = f"; teacher weights {result['teacher_gib']:.2f} GiB" if result.get("teacher_gib") else ""
            print(f"  {variant:8s} batch {batch}: {describe(result)}{extra}", flush=True)
    print(f"load average after: {_common.load_average()}")
    for batch in args.batch_sizes:
        print(compare(results["plain", batch], results["distill", batch], batch))
    print(f"reproduce: {command}")


def worker_args(args, variant: str, batch: int) -> list[str]:
    worker = [str(Path(__file__).relative_to(_common.ROOT)), "--worker", variant, "--batch_size", str(batch),
              "--seq_len", str(args.seq_len), "--warmup_seq_len", str(args.warmup_seq_len), "--alpha", str(args.alpha),
              "--temperature", str(args.temperature), "--direction", args.direction, "--teacher_dtype", args.teacher_dtype]  # fmt: skip
    return worker + (["--teacher", args.teacher] if args.teacher else [])


def one_step(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuner.offline import ensure_checkpoint

    path = str(ensure_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    teacher, teacher_gib = None, 0.0
    if args.worker == "distill":
        from tuner.distill import prepare_teacher

        teacher = prepare_teacher(AutoModelForCausalLM.from_pretrained(args.teacher or path, dtype=getattr(torch, args.teacher_dtype)))
        # Its parameters' bytes, not the RSS that loading added: safetensors maps the file, and pages
        # become resident only when the warm-up step reads them (they are part of `start` then).
        teacher_gib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30
    step(model, teacher, optimizer, _common.random_batch(model.config.vocab_size, args.batch_size, args.warmup_seq_len, seed=1), args)
    inputs = _common.random_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=0)
    _common.reset_peak_rss()
    start_gib, started, cpu_started = _common.rss_gib(), time.perf_counter(), time.process_time()
    loss = step(model, teacher, optimizer, inputs, args)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"loss": loss, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": args.batch_size * args.seq_len,
            "peak_gib": _common.rss_gib(field="VmHWM"), "start_gib": start_gib, "teacher_gib": teacher_gib}  # fmt: skip


def step(model, teacher, optimizer, inputs: dict, args) -> float:
    from tuner.distill import compute_distillation_loss
    from tuner.loss import compute_causal_lm_loss

    if teacher is None:
        loss, _ = compute_causal_lm_loss(model, inputs)
    else:
        options = {"alpha": args.alpha, "temperature": args.temperature, "direction": args.direction}
        loss, _, _ = compute_distillation_loss(model, teacher, inputs, **options)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def compare(plain: dict, distill: dict, batch: int) -> str:
    if "error" in plain or "error" in distill:
        return f"batch {batch}: plain {plain.get('error', 'ok')}, distill {distill.get('error', 'ok')}"
    slower = distill["seconds"] / plain["seconds"]
    cpu = distill["cpu_seconds"] / plain["cpu_seconds"]
    step_plain, step_distill = plain["peak_gib"] - plain["start_gib"], distill["peak_gib"] - distill["start_gib"]
    return (
        f"batch {batch}: distillation step x{slower:.2f} the plain step's wall time (x{cpu:.2f} CPU time); peak RSS "
        f"{distill['peak_gib']:.2f} against {plain['peak_gib']:.2f} GiB ({distill['peak_gib'] - plain['peak_gib']:+.2f} GiB, of which "
        f"teacher weights {distill['teacher_gib']:.2f}); above start {step_distill:.2f} against {step_plain:.2f} GiB"
    )


if __name__ == "__main__":
    main()
