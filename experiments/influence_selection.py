"""Is per-example influence useful? Corrupt 20% of a real corpus, train the offline Gemma 3 270M
with --influence, then retrain from the same start for the same number of steps: without the 20%
least influential examples, and without a random 20% (--random_draws draws; and, for scale, without
exactly the corrupted ones). Prints the held-out loss of every run and how many of the corrupted
documents the bottom 20% caught.

    .venv/bin/python experiments/influence_selection.py                     # ~40 min on 2 CPU cores
    .venv/bin/python experiments/influence_selection.py --corruption code
    .venv/bin/python experiments/influence_selection.py --influence_only    # the catch only, ~9 min

Corpus: paragraphs of CPython's reference documentation (pydoc_data.topics) of 100-300 characters,
each its own training example (`<bos> paragraph <eos>`, every token trained; --layout chat makes each
an answer to one fixed question). 48 clean held-out paragraphs are the reference set and the
evaluation set. Corruption (--corruption): `tokens`, the document's tokens shuffled (the same
vocabulary, no language); `shuffled`, its words shuffled; `code`, replaced by a block of the standard
library's Python source of the same length (text from another domain).

The design, and why (each measured with --influence_only and the per-step scores):
- Every step trains on the whole training set (gradient accumulation over all of it), so every
  example is scored at the same weights in every step and the sums compare like for like. With
  minibatches an example's influence is mostly the scale of the step it happened to be drawn in
  (scores fell ~5x from the first epoch to the second): a run of 20 steps of 4 rows on 120 longer paragraphs
  caught 42%, although within each step the corrupted examples scored below the clean ones in 80%
  of pairs.
- --influence_preconditioner adam, what AdamW does with a gradient. Unpreconditioned, the untrained
  model's MLP gradients align with the reference set as much for shuffled tokens as for clean text
  (corrupted below clean in 47% of pairs for the MLP part of the first step's scores, 79% for the
  tied embedding and head): 50% caught in the same 4 steps.
- Few steps: 100 paragraphs are memorised within ~5 whole-set steps at 2e-5, after which the
  held-out loss rises and a training example's score says how well it is memorised rather than what
  it teaches (summed over steps 5-8 of a longer run, the bottom 20% held 2 of the 20 corrupted). 4 steps is where
  the full run's held-out loss was lowest of those measured (3: 3.137, 4: 3.109, 6: 3.194).
Goal: influence-filtered beats random on held-out loss, and the bottom 20% catches >= 70% of the
corrupted documents.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, command_line, load_average, machine  # noqa: E402

sys.path.insert(0, str(ROOT))

PROMPT = "Quote a paragraph of the Python reference documentation."


def paragraphs(min_chars: int, max_chars: int) -> list[str]:
    from pydoc_data.topics import topics

    found = []
    for text in topics.values():
        for block in text.split("\n\n"):
            block = " ".join(block.split())
            if min_chars <= len(block) <= max_chars and block.count(" ") > 20:
                found.append(block)
    return sorted(set(found))


def shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def shuffled_tokens(texts: dict[int, str], rng: random.Random) -> dict[int, str]:
    """Each text's tokens (Gemma 3's tokenizer) in random order, decoded: subword debris of the same vocabulary."""
    from transformers import AutoTokenizer

    from tuner.offline import ensure_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint())
    found = {}
    for i, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rng.shuffle(ids)
        found[i] = tokenizer.decode(ids)
    return found


def code_blocks(min_chars: int, max_chars: int) -> list[str]:
    """Blocks of the standard library's source (blank-line separated), lengths as the paragraphs'."""
    import sysconfig

    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if min_chars <= len(block) <= max_chars and '"""' not in block:
                found.append(block.strip("\n"))
    return found


def row(text: str, layout: str) -> dict:
    if layout == "chat":
        return {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": text}]}
    return {"prompt": "", "completion": text}  # <bos> text <eos>, every token trained


def write(path: Path, texts: list[str], layout: str) -> str:
    path.write_text("".join(json.dumps(row(t, layout)) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def train(name: str, train_file: str, validation_file: str, work: Path, args, *extra: str) -> dict:
    out = work / name
    cmd = [
        sys.executable, str(ROOT / "main.py"), "--model_name_or_path", "offline:gemma-3-270m", "--train_file", train_file,
        "--validation_file", validation_file, "--output_dir", str(out), "--data_format", "messages" if args.layout == "chat" else "prompt_completion",
        "--max_seq_length", str(args.max_seq_length), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--gradient_accumulation_steps", str(accumulation(args)), "--max_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps), "--lr_scheduler_type", "constant_with_warmup",
        "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--max_new_tokens", "0", "--seed", "7", "--cache_dir", str(work / "tokens"), *extra,
    ]  # fmt: skip
    started = time.time()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "eval_results.json").read_text())
    before = json.loads((out / "run_summary.json").read_text()).get("eval_loss_before_training")
    start = f"  (before training {before:.4f})" if before is not None else ""
    print(f"  {name:<18} eval_loss {results['eval_loss']:.4f}{start}  ({time.time() - started:.0f} s)", flush=True)
    return {"eval_loss": results["eval_loss"], "out": out}


def accumulation(args) -> int:
    """Micro-batches per step; 0 asks for the whole training set in every step (each row holds >= 1 document, so
    ceil(documents / 4) micro-batches cover an epoch, and the Trainer ends a step at the epoch's end)."""
    return args.grad_accum or -(-args.documents // 4)


def source_rows(out: Path) -> dict[int, int]:
    """example_id -> its row in the training file (influence/examples.jsonl)."""
    examples = [json.loads(line) for line in (out / "influence" / "examples.jsonl").read_text().splitlines()]
    return {e["example_id"]: (e["rows"][0] if e.get("rows") else e["example_id"]) for e in examples}


def steps_of(args) -> str:
    rows = f"packed rows of <= {args.max_seq_length} tokens, 4 per micro-batch"
    return f"the whole training set ({rows})" if not args.grad_accum else f"{args.grad_accum} micro-batches ({rows})"


def least_influential(out: Path, fraction: float, n_train: int) -> list[int]:
    """Source rows of the `fraction` least influential training examples (never seen: influence 0)."""
    import pyarrow.parquet as pq

    influence = pq.read_table(out / "influence" / "influence.parquet").to_pandas().set_index("example_id")["influence"]
    row_of = source_rows(out)
    by_row = {row_of[i]: value for i, value in influence.items()}
    ranked = sorted(range(n_train), key=lambda row: (by_row.get(row, 0.0), row))
    return ranked[: round(fraction * n_train)]


def separation_per_step(out: Path, corrupted: set[int]) -> list[float]:
    """Per scored step, the share of (corrupted, clean) pairs of its examples in which the corrupted one scores
    lower (the area under the ROC curve of -score as a detector; 0.5 is chance)."""
    import pyarrow.parquet as pq

    scores = pq.read_table(out / "influence" / "scores.parquet").to_pandas()
    scores["bad"] = scores["example_id"].map(source_rows(out)).isin(corrupted)
    found = []
    for _, step in scores.groupby("step"):
        bad, clean = step.loc[step["bad"], "score"].to_numpy(), step.loc[~step["bad"], "score"].to_numpy()
        if len(bad) and len(clean):
            found.append(float((bad[:, None] < clean[None, :]).mean()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=100, help="training documents")
    parser.add_argument("--held_out", type=int, default=48, help="clean held-out documents (reference and evaluation)")
    parser.add_argument("--corrupt", type=float, default=0.2, help="fraction of training documents corrupted and removed")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of every run")
    parser.add_argument("--grad_accum", type=int, default=0, help="micro-batches of 4 rows per step; 0: the whole training set")
    parser.add_argument("--warmup_steps", type=int, default=0, help="then a constant learning rate")
    parser.add_argument("--max_seq_length", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW")
    parser.add_argument("--layout", choices=("chat", "documents"), default="documents", help="documents: each paragraph an example, <bos> paragraph <eos>; chat: each paragraph an answer")
    parser.add_argument("--min_chars", type=int, default=100, help="paragraph length, characters")
    parser.add_argument("--max_chars", type=int, default=300)
    parser.add_argument("--corruption", choices=("tokens", "shuffled", "code"), default="tokens", help="shuffled: words of the document shuffled; tokens: its tokens shuffled; code: replaced by standard-library source")
    parser.add_argument("--influence_val_examples", default="all", help="the reference set: held-out examples scored against")
    parser.add_argument("--preconditioner", choices=("none", "adam"), default="adam", help="--influence_preconditioner")
    parser.add_argument("--work", help="keep every run's output here (default: a temporary directory)")
    parser.add_argument("--influence_only", action="store_true", help="stop after the influence run")
    parser.add_argument("--random_draws", type=int, default=3, help="runs without a random 20%%, each another draw")
    args = parser.parse_args()
    train_texts, held_out, corrupted = corpus(args)
    print(f"machine: {machine()}\nload average before: {load_average()}")
    print(f"{args.documents} training paragraphs of pydoc_data.topics ({len(corrupted)} corrupted: {args.corruption}), "
          f"{len(held_out)} clean held-out; {args.steps} steps of {steps_of(args)}, AdamW lr {args.learning_rate}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="influence-selection-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(args, work, train_texts, held_out, corrupted)
    print(f"reproduce: {command_line()}")


def corpus(args) -> tuple[list[str], list[str], set[int]]:
    """Training paragraphs (the corrupted ones replaced), clean held-out paragraphs, the corrupted rows."""
    rng = random.Random(0)
    texts = paragraphs(args.min_chars, args.max_chars)
    rng.shuffle(texts)
    train_texts, held_out = texts[: args.documents], texts[args.documents : args.documents + args.held_out]
    corrupted = set(rng.sample(range(args.documents), round(args.corrupt * args.documents)))
    if args.corruption == "code":
        code = code_blocks(args.min_chars, args.max_chars)
        replacement = {i: code[j] for i, j in zip(sorted(corrupted), rng.sample(range(len(code)), len(corrupted)))}
    elif args.corruption == "tokens":
        replacement = shuffled_tokens({i: train_texts[i] for i in sorted(corrupted)}, rng)
    else:
        replacement = {i: shuffled(train_texts[i], rng) for i in sorted(corrupted)}
    return [replacement.get(i, t) for i, t in enumerate(train_texts)], held_out, corrupted


def run(args, work: Path, train_texts: list[str], held_out: list[str], corrupted: set[int]) -> None:
    (work / "corrupted.json").write_text(json.dumps(sorted(corrupted)))
    validation = write(work / "validation.jsonl", held_out, args.layout)

    def without(name: str, rows: set[int]) -> float:
        kept = [t for i, t in enumerate(train_texts) if i not in rows]
        return train(name, write(work / f"{name}.jsonl", kept, args.layout), validation, work, args)["eval_loss"]

    full = train("all", write(work / "all.jsonl", train_texts, args.layout), validation, work, args,
                 "--influence", "--influence_val_examples", args.influence_val_examples,
                 "--influence_preconditioner", args.preconditioner)  # fmt: skip
    dropped = set(least_influential(full["out"], args.corrupt, args.documents))
    caught = len(corrupted & dropped)
    print("per step, corrupted scored below clean in this share of pairs:",
          " ".join(f"{a:.2f}" for a in separation_per_step(full["out"], corrupted)))
    catch = f"the least influential {len(dropped)} caught {caught} of the {len(corrupted)} corrupted documents ({100 * caught / len(corrupted):.0f}%)"
    print(catch, flush=True)
    if args.influence_only:
        return
    filtered = without("influence-filtered", dropped)
    draws = [without(f"random-{seed}", set(random.Random(seed).sample(range(args.documents), len(dropped))))
             for seed in range(1, args.random_draws + 1)]  # fmt: skip
    oracle = without("without-corrupted", corrupted)  # the best any filter could do here, for scale
    mean = sum(draws) / len(draws)
    print(f"load average after: {load_average()}")
    print(f"held-out loss: all {full['eval_loss']:.4f}; without the {len(dropped)} least influential {filtered:.4f}; "
          f"without a random {len(dropped)} {' '.join(f'{d:.4f}' for d in draws)} (mean {mean:.4f}); "
          f"without the {len(corrupted)} corrupted {oracle:.4f}")  # fmt: skip
    print(catch)
    beaten = sum(filtered < d for d in draws)
    verdict = "meets" if filtered < mean and caught >= 0.7 * len(corrupted) else "misses"
    print(f"influence-filtered beats {beaten} of {len(draws)} random draws; goal (filtered < random mean, catch >= 70%): {verdict}")


if __name__ == "__main__":
    main()
