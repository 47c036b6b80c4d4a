"""Cost of influence scoring: one optimizer step of the real Gemma 3 270M on CPU, with and without.

    .venv/bin/python bench/bench_influence.py                         # batch 4 x 2048, 2048 reference tokens
    .venv/bin/python bench/bench_influence.py --batch_size 1 --seq_len 256 --reference_rows 2 --reference_seq_len 128

plain:     compute_causal_lm_loss + backward per micro-batch, fused AdamW step, zero_grad.
influence: the same, plus `InfluenceScorer.refresh` (forward + backward of the reference set, its
           gradient W_val kept for the step) and every micro-batch scored inside `scoring()`
           (one extra matmul per linear layer and per output-head chunk).
Each variant runs in a fresh process, first takes a short untimed step (AdamW state exists, kernels
primed), then times one full step of --grad_accum micro-batches. fp32 weights, SDPA attention.

Besides the measured ratio it prints the ratio projected for other accumulation counts from the
measured parts: the reference gradient is paid once per optimizer step, the taps per micro-batch,
so the ratio falls towards the per-micro-batch one as accumulation grows.

Memory is the process's peak resident set (VmHWM) during the timed step, as in bench_loss.py; the
influence variant's extra peak is mostly W_val, one copy of the trainable parameters (1.07 GB in
fp32 for the full 270M model), plus the reference set's activations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

VARIANTS = ("plain", "influence")
PROJECT_FOR = (1, 8, 32)  # accumulation counts the ratio is projected for (the default config uses 8)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per training row")
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per timed optimizer step")
    parser.add_argument("--reference_rows", type=int, default=4, help="rows in the reference set")
    parser.add_argument("--reference_seq_len", type=int, default=512, help="tokens per reference row (4 x 512 = 2048)")
    parser.add_argument("--reference_batch_size", type=int, default=4, help="reference rows per forward")
    parser.add_argument("--preconditioner", choices=("none", "adam"), default="none")
    _common.add_step_options(parser, VARIANTS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(one_step(args))
    command = _common.command_line()
    limit = args.rss_limit_gib or _common.available_gib() - 1.0
    print(f"machine: {_common.machine()}\nmodel: Gemma 3 270M (tuner.offline.ensure_checkpoint()), fp32")
    print(f"step: {args.grad_accum} x {args.batch_size} x {args.seq_len} tokens; reference set "
          f"{args.reference_rows} x {args.reference_seq_len} = {args.reference_rows * args.reference_seq_len} tokens, "
          f"preconditioner {args.preconditioner}")  # fmt: skip
    print(f"each variant in a fresh process, killed above {limit:.1f} GiB RSS; load average before: {_common.load_average()}")
    results = {}
    for variant in VARIANTS:
        worker = [str(Path(__file__).relative_to(_common.ROOT)), *sys.argv[1:], "--worker", variant]
        results[variant] = result = _common.run_isolated(worker, rss_limit_gib=limit)
        print(f"  {variant:9s}: {describe(result)}", flush=True)
    print(f"load average after: {_common.load_average()}")
    print(compare(results["plain"], results["influence"], args.grad_accum))
    print(f"reproduce: {command}")


def one_step(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuner.influence.scores import InfluenceScorer
    from tuner.offline import ensure_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(ensure_checkpoint()), dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    vocab = model.config.vocab_size
    reference = [_common.random_batch(vocab, min(args.reference_batch_size, args.reference_rows - start), args.reference_seq_len, seed=100 + start)
                 for start in range(0, args.reference_rows, args.reference_batch_size)]  # fmt: skip
    scorer = InfluenceScorer(model, reference, args.preconditioner) if args.worker == "influence" else None
    warmup = [_common.random_batch(vocab, args.batch_size, args.warmup_seq_len, seed=1)]
    train_step(model, optimizer, scorer, warmup, step=0)
    batches = [_common.random_batch(vocab, args.batch_size, args.seq_len, seed=2 + i) for i in range(args.grad_accum)]
    _common.reset_peak_rss()
    start_gib = _common.rss_gib()
    timings = train_step(model, optimizer, scorer, batches, step=1)
    return timings | {"tokens": args.grad_accum * args.batch_size * args.seq_len, "start_gib": start_gib,
                      "peak_gib": _common.rss_gib(field="VmHWM")}  # fmt: skip


def train_step(model, optimizer, scorer, batches: list[dict], step: int) -> dict:
    """One optimizer step; seconds spent in its parts."""
    from tuner.loss import compute_causal_lm_loss

    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    started, cpu_started = time.perf_counter(), time.process_time()
    if scorer is not None:
        scorer.refresh(step, optimizer)
    reference_s, reference_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    micro_s, micro_cpu_s, loss_sum, score_sum = [], [], 0.0, 0.0
    for batch in batches:
        mark, cpu_mark = time.perf_counter(), time.process_time()
        if scorer is None:
            loss, _ = compute_causal_lm_loss(model, batch, num_items)
            loss.backward()
        else:
            with scorer.scoring(batch):
                loss, _ = compute_causal_lm_loss(model, batch, num_items, head_hook=scorer.head_hook)
                loss.backward()
            score_sum += float(scorer.result.scores.sum())
        loss_sum += loss.item()
        micro_s.append(time.perf_counter() - mark)
        micro_cpu_s.append(time.process_time() - cpu_mark)
    mark, cpu_mark = time.perf_counter(), time.process_time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer_s, optimizer_cpu_s = time.perf_counter() - mark, time.process_time() - cpu_mark
    # CPU seconds beside wall seconds: less distorted when other processes share the cores.
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "reference_s": reference_s, "reference_cpu_s": reference_cpu_s, "micro_s": micro_s,
            "micro_cpu_s": micro_cpu_s, "optimizer_s": optimizer_s, "optimizer_cpu_s": optimizer_cpu_s,
            "loss": loss_sum, "score_sum": score_sum}  # fmt: skip


def describe(result: dict) -> str:
    if "error" in result:
        return f"{result['error']} (after {result['process_wall_s']:.0f} s)"
    micro = sum(result["micro_s"]) / len(result["micro_s"])
    return (
        f"{result['seconds']:.1f} s/step (reference gradient {result['reference_s']:.1f} s, {micro:.1f} s per micro-batch, "
        f"optimizer {result['optimizer_s']:.1f} s), peak RSS {result['peak_gib']:.2f} GiB "
        f"({result['peak_gib'] - result['start_gib']:.2f} GiB above start), loss {result['loss']:.4f}"
    )


def compare(plain: dict, influence: dict, grad_accum: int) -> str:
    if "error" in plain or "error" in influence:
        return "no comparison: a variant failed"
    if abs(plain["loss"] - influence["loss"]) != 0:
        return f"LOSSES DIFFER: {plain['loss']!r} vs {influence['loss']!r}; scoring must not change training"
    lines = [
        f"measured: step time x{influence['seconds'] / plain['seconds']:.2f} wall, "
        f"x{influence['cpu_seconds'] / plain['cpu_seconds']:.2f} CPU-seconds with influence ({grad_accum} micro-batch(es)); "
        f"extra peak RSS {influence['peak_gib'] - plain['peak_gib']:+.2f} GiB; losses identical"
    ]
    for clock in ("", "cpu_"):
        per_micro = [sum(r[f"micro_{clock}s"]) / len(r[f"micro_{clock}s"]) for r in (plain, influence)]
        reference = influence[f"reference_{clock}s"]
        projected = [(reference + a * per_micro[1] + influence[f"optimizer_{clock}s"]) / (a * per_micro[0] + plain[f"optimizer_{clock}s"])
                     for a in PROJECT_FOR]  # fmt: skip
        lines.append(
            f"  {'CPU' if clock else 'wall'}: per micro-batch x{per_micro[1] / per_micro[0]:.2f}; reference gradient "
            f"{reference:.1f} s = {reference / per_micro[0]:.2f} plain micro-batches; projected for "
            + ", ".join(f"{a} micro-batches x{r:.2f}" for a, r in zip(PROJECT_FOR, projected))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
