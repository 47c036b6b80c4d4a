"""Does a mixture chosen by data influence beat the uniform one? Gemma 3 270M (offline), CPU, real CPython text.

    .venv/bin/python experiments/bench_mixture.py                 # 12 steps of 4 x 64 tokens per run (~10 min, 2 cores)
    .venv/bin/python experiments/bench_mixture.py --steps 40 --max_seq_length 128   # longer runs

Three training sources, written to --work:
  docs   pydoc_data.topics: the reference manual's topics, one document each (held out: every 8th topic)
  code   the standard library's own top-level modules, one file a document (held out: every 8th module)
  noise  a deliberately noisy source: the training docs and code with half their characters replaced by random
         printable ones (text damaged as by a broken encoding or bad OCR); it has no held-out part: nobody wants
         to model it
The held-out loss is over the docs and code held-out sets (eval_loss: per token over both; each reported).

Run 1 (uniform): weights 1:1:1 in trained tokens, with --influence (TracIn against --reference_rows held-out
rows, every step) and --mixture_from_influence, which writes influence/mixture.yaml. Run 2 (influence): the same
flags but --config that mixture.yaml, no influence. Both train --steps steps of --batch_size rows of
--max_seq_length tokens (the same tokens, every row a full chunk), from the same model and seed, and
evaluate on the same held-out rows; scoring does not change run 1's training (bitwise, tests/test_influence_main.py),
so run 1's loss is the uniform mixture's. Each run is main.py in a fresh process, no checkpoints.

Measured once (defaults, --layout chunks; 18 min 19 s wall on 2 cores shared with other jobs, load average
2.2 before, 4.0 after run 1, 3.9 after run 2): the influence weights were docs 0.434, code 0.118, noise
0.448, and the held-out loss after 12 steps was 4.1022 against the uniform mixture's 4.0207 (before
training 6.3055): NOT lower. Why: with running text cut into chunks, only a document's first chunk starts
with <bos>, and Gemma 3 predicts badly without one (the untrained model on the same 62 held-out targets:
5.99 nats a token without <bos> at position 0, 3.42 with it). Most of what 12 steps learn is to cope
without <bos>, a lesson every source teaches, the noise included (its high loss gives it large
gradients), so first-order influence ranked the noise first. `--layout documents` (each piece of text its
own example, starting with <bos>: prompt_completion with an empty prompt) removes that confound. Measured
once with it (.venv/bin/python experiments/bench_mixture.py --layout documents; 4 min 55 s, load average 0.7
before, 1.9 after): weights docs 0.311, code 0.558, noise 0.131; held-out loss 4.0174 against the uniform
mixture's 4.1056 (before training 4.2794): lower, on docs (3.8116 vs 3.8639) and code (4.1674 vs 4.2818).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

HELD_OUT_EVERY = 8
NOISE = 0.5  # share of the noisy source's characters replaced


def write_sources(work: Path, modules: int, layout: str, piece_chars: int) -> dict[str, str]:
    """docs/code train and validation files and the noise file: documents as {"text": ...} (layout chunks), or
    pieces of <= piece_chars characters at paragraph ends as {"prompt": "", "completion": ...} (layout documents)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))[:modules]]
    files = {}
    for name, texts in (("docs", docs), ("code", code)):
        files[name] = write(work / f"{name}.jsonl", [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY], layout, piece_chars)
        held = [t for i, t in enumerate(texts) if not i % HELD_OUT_EVERY]
        files[f"{name}_val"] = write(work / f"{name}_val.jsonl", held, layout, piece_chars)
    rng = random.Random(0)
    noise = [damaged(t, rng) for i, t in enumerate(docs + code) if i % HELD_OUT_EVERY]
    files["noise"] = write(work / "noise.jsonl", noise, layout, piece_chars)
    return files


def pieces(text: str, limit: int) -> list[str]:
    """Consecutive paragraphs joined up to `limit` characters (a longer paragraph cut at the limit)."""
    out, current = [], ""
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        for start in range(0, len(paragraph), limit):
            part = paragraph[start : start + limit]
            if not part.strip():
                continue
            if current and len(current) + 2 + len(part) > limit:
                out.append(current)
                current = ""
            current = f"{current}\n\n{part}" if current else part
    return out + ([current] if current else [])


def damaged(text: str, rng: random.Random) -> str:
    """The text with each character, at probability NOISE, replaced by a random printable ASCII one."""
    return "".join(chr(rng.randrange(33, 127)) if rng.random() < NOISE else c for c in text)


def write(path: Path, texts: list[str], layout: str, piece_chars: int) -> str:
    if layout == "chunks":
        rows = [{"text": t} for t in texts]
    else:  # each piece its own example, <bos> piece <eos>, every token trained (plain prompt/completion, no template)
        rows = [{"prompt": "", "completion": piece} for t in texts for piece in pieces(t, piece_chars)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def common_flags(args, out: Path) -> list[str]:
    return [
        "--model_name_or_path", "offline:gemma-3-270m", "--output_dir", str(out), "--max_seq_length", str(args.max_seq_length),
        "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
        "--max_steps", str(args.steps), "--learning_rate", str(args.learning_rate), "--warmup_steps", "0",
        "--validation_split_percentage", "0", "--max_eval_samples", str(args.eval_rows), "--per_device_eval_batch_size", "8",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--max_new_tokens", "0", "--seed", "0",
    ]  # fmt: skip


def run(flags: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "main.py", *flags], cwd=_common.ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"main.py failed (exit {done.returncode}); see {log}")
    return time.time() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench_mixture", help="where the data, runs and logs go")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--eval_rows", type=int, default=16, help="held-out chunks per clean source")
    parser.add_argument("--reference_rows", type=int, default=4, help="--influence_val_examples")
    parser.add_argument("--modules", type=int, default=60, help="stdlib modules in the code source")
    parser.add_argument("--layout", choices=["chunks", "documents"], default="chunks",
                        help="chunks: running text cut into --max_seq_length chunks (only a document's first chunk "
                        "starts with <bos>); documents: pieces of text, each its own example starting with <bos>")  # fmt: skip
    parser.add_argument("--piece_chars", type=int, default=200, help="--layout documents: characters per piece")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {_common.machine()}")
    print(f"command: {_common.command_line()}")
    print(f"load average before: {_common.load_average()}")
    files = write_sources(work, args.modules, args.layout, args.piece_chars)
    fmt = {"data_format": "text" if args.layout == "chunks" else "prompt_completion"}
    uniform = {"datasets": [
        {"name": "docs", "path": files["docs"], "validation_path": files["docs_val"], "weight": 1, **fmt},
        {"name": "code", "path": files["code"], "validation_path": files["code_val"], "weight": 1, **fmt},
        {"name": "noise", "path": files["noise"], "weight": 1, **fmt},
    ]}  # fmt: skip
    (work / "uniform.yaml").write_text(yaml.safe_dump(uniform, sort_keys=False), encoding="utf-8")
    first = work / "uniform"
    seconds = {"uniform": run(["--config", str(work / "uniform.yaml"), *common_flags(args, first), "--influence",
                               "--influence_val_examples", str(args.reference_rows), "--mixture_from_influence"],
                              work / "uniform.log")}  # fmt: skip
    mixture = first / "influence" / "mixture.yaml"
    print(f"load average after run 1: {_common.load_average()}")
    second = work / "influence"
    seconds["influence"] = run(["--config", str(mixture), *common_flags(args, second), "--eval_before_training", "false"],
                               work / "influence.log")  # fmt: skip
    print(f"load average after run 2: {_common.load_average()}")
    print_results(first, second, mixture, seconds, args)


def print_results(first: Path, second: Path, mixture: Path, seconds: dict, args) -> None:
    print("\n" + "\n".join(line for line in mixture.read_text().splitlines() if line.startswith("#")))
    tokens = args.steps * args.batch_size * args.max_seq_length
    print(f"\nheld-out loss after {args.steps} steps ({tokens:,} tokens) per token; docs and code held-out sets:")
    before = json.loads((first / "run_summary.json").read_text()).get("eval_loss_before_training")
    if before is not None:
        print(f"  {'before training':<22}eval_loss {before:.4f}")
    losses = {}
    for name, out in (("uniform (1:1:1)", first), ("influence weights", second)):
        result = json.loads((out / "eval_results.json").read_text())
        summary = json.loads((out / "run_summary.json").read_text())
        losses[name] = result["eval_loss"]
        print(f"  {name:<22}eval_loss {result['eval_loss']:.4f}  (docs {result['eval_docs_loss']:.4f}, code "
              f"{result['eval_code_loss']:.4f})  tokens per source {summary['tokens_per_source']}  "
              f"wall {seconds['uniform' if out == first else 'influence']:.0f} s")  # fmt: skip
    gain = losses["uniform (1:1:1)"] - losses["influence weights"]
    verdict = "lower" if gain > 0 else "not lower"
    print(f"influence weights vs uniform: {gain:+.4f} nats per token ({verdict} held-out loss with the influence mixture)")


if __name__ == "__main__":
    main()
