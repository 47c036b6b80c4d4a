"""Tokenize + group throughput with the real Gemma 3 tokenizer: run_clm.py's recipe vs tuner.grouping.

    .venv/bin/python bench/bench_data.py                  # >= 64 MB of Python sources, 2048-token chunks
    .venv/bin/python bench/bench_data.py --max_mb 8 --repeats 1

Corpus: the .py files under the base interpreter's lib directory (sysconfig "stdlib": the standard
library first, then that interpreter's site-packages), in sorted path order, one document per file,
until --max_mb of UTF-8. Available offline on any machine with this Python.

Variants, each in a fresh process, interleaved, best of --repeats:
  raw        tokenizer.backend_tokenizer.encode_batch_fast(texts): the Rust encoder alone, no
             special tokens, no grouping; the tokenizer's own batch-encoding throughput.
  raw_threads  the same encoder call on ours' thread pool and batches, ids never leaving Rust: the
             encoder at its best here, so ours/raw_threads is the cost of everything ours adds.
  raw_call   tokenizer(texts): the transformers batch call (also builds offsets and attention masks).
  baseline   run_clm.py written faithfully: Dataset.from_dict -> .map(tokenize_function, batched=True,
             num_proc=N) -> .map(group_texts, batched=True, num_proc=N), itertools.chain, labels copy.
             Run with TOKENIZERS_PARALLELISM=false (the usual setting with worker processes) and =true,
             and with num_proc=None (one process, Rust threads); the fastest counts as the baseline.
  ours       tuner.grouping.tokenize_and_group(tokenizer, texts, seq_len), with
             TOKENIZERS_PARALLELISM=false and =true.
Every rate is document tokens per second (the same count for all: the raw encoder's token count),
so rates compare time for the same work. The time covers tokenizing and grouping only, not loading
the tokenizer or reading the files; each process warms the tokenizer on one short text first.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402

# name -> (function, TOKENIZERS_PARALLELISM in its process)
VARIANTS = {
    "raw": ("raw", "true"),
    "raw_threads": ("raw_threads", "false"),
    "raw_call": ("raw_call", "true"),
    "baseline_np_par_off": ("baseline", "false"),
    "baseline_np_par_on": ("baseline", "true"),
    "baseline_1proc": ("baseline_one_process", "true"),
    "ours_par_off": ("ours", "false"),
    "ours_par_on": ("ours", "true"),
}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_mb", type=float, default=64.0, help="corpus size in MB of UTF-8")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)), help="baseline worker processes")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs per variant; the best counts")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return _common.report(run_variant(args.worker, args))
    command = _common.command_line()
    texts = corpus(args.max_mb)
    print(f"machine: {_common.machine()}")
    print(f"corpus: {len(texts)} .py files, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, from {corpus_root()}")
    print(f"seq_len {args.seq_len}, baseline num_proc {args.num_proc}, best of {args.repeats}; load average before: {_common.load_average()}")
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            worker = [str(Path(__file__).relative_to(_common.ROOT)), "--worker", name, "--max_mb", str(args.max_mb),
                      "--seq_len", str(args.seq_len), "--num_proc", str(args.num_proc)]  # fmt: skip
            result = _common.run_isolated(worker, env={"TOKENIZERS_PARALLELISM": VARIANTS[name][1]})
            runs[name].append(result)
            print(f"  {name:20s} {result.get('seconds', float('nan')):7.2f} s  {result.get('error', '')}", flush=True)
    print(f"load average after: {_common.load_average()}")
    summarize(runs)
    print(f"reproduce: {command}")


def summarize(runs: dict[str, list[dict]]) -> None:
    best = {name: min((r for r in results if "error" not in r), key=lambda r: r["seconds"], default=None) for name, results in runs.items()}
    doc_tokens = next(r["doc_tokens"] for r in best.values() if r and "doc_tokens" in r)
    for name, result in best.items():
        if result:
            print(f"{name:20s} {doc_tokens / result['seconds']:12,.0f} doc tokens/s  ({result['seconds']:.2f} s)  {result.get('note', '')}")
    rate = {name: doc_tokens / r["seconds"] for name, r in best.items() if r}
    baseline = max(((v, k) for k, v in rate.items() if k.startswith("baseline")), default=None)
    for ours in (k for k in rate if k.startswith("ours")):
        against = [(f"fastest baseline ({baseline[1]})", baseline[0])] if baseline else []
        against += [(raw, rate[raw]) for raw in ("raw", "raw_threads", "raw_call") if raw in rate]
        print(f"{ours}: " + ", ".join(f"x{rate[ours] / r:.2f} {name}" for name, r in against))
    hashes = {best[n]["stream_sha256"] for n in best if best[n] and "stream_sha256" in best[n]}
    print(f"ours and the raw encoder give the same token stream: {len(hashes) == 1}")


def corpus_root() -> str:
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def corpus(max_mb: float) -> list[str]:
    root = Path(corpus_root())
    stdlib = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    others = sorted(p for p in (root / "site-packages").rglob("*.py"))
    texts, size = [], 0
    for path in chain(stdlib, others):
        if size >= max_mb * 1e6:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode())
    return texts


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Load everything untimed, then run one variant, which times its own work."""
    from transformers import AutoTokenizer

    from tuner.offline import ensure_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_checkpoint()))
    texts = corpus(args.max_mb)
    tokenizer.backend_tokenizer.encode_batch_fast(["def warm_up(): pass"])
    return globals()[f"_{VARIANTS[name][0]}"](tokenizer, texts, args)


def _raw(tokenizer, texts, args) -> dict:
    started = time.perf_counter()
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    seconds = time.perf_counter() - started
    # The policy's stream built the obvious way, untimed, to check ours against.
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [t for e in encodings for t in (bos, *e.ids, eos)]
    kept = len(stream) // args.seq_len * args.seq_len
    return {"seconds": seconds, "doc_tokens": sum(len(e) for e in encodings), "stream_sha256": _sha256(stream[:kept])}


def _raw_threads(tokenizer, texts, args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tuner.data import grouping

    encode = functools.partial(tokenizer.backend_tokenizer.encode_batch_fast, add_special_tokens=False)
    started = time.perf_counter()
    batches = list(grouping.text_batches(texts, grouping.BATCH_CHARS))
    with ThreadPoolExecutor(grouping.available_cores()) as pool:
        list(pool.map(encode, batches))  # keep every Encoding alive, as a real caller would
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "note": f"{len(batches)} batches"}


def _raw_call(tokenizer, texts, args) -> dict:
    started = time.perf_counter()
    encoded = tokenizer(texts)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "note": f"{sum(map(len, encoded['input_ids']))} tokens incl. one BOS per document"}


def _ours(tokenizer, texts, args) -> dict:
    from tuner.data import grouping

    started = time.perf_counter()
    stream = grouping.tokenize_stream(tokenizer, texts)
    chunks = grouping.chunk(stream, args.seq_len)  # what tokenize_and_group does, keeping the stream to count
    seconds = time.perf_counter() - started
    note = f"{chunks.shape[0]} chunks of {chunks.shape[1]}, int32"
    return {"seconds": seconds, "doc_tokens": len(stream) - 2 * len(texts), "stream_sha256": _sha256(chunks.ravel()), "note": note}


def _baseline(tokenizer, texts, args, num_proc="from args") -> dict:
    import datasets

    datasets.disable_progress_bars()
    num_proc = args.num_proc if num_proc == "from args" else num_proc
    started = time.perf_counter()
    raw_datasets = datasets.Dataset.from_dict({"text": texts})
    tokenized = raw_datasets.map(
        functools.partial(tokenize_function, tokenizer=tokenizer, text_column_name="text"),
        batched=True, num_proc=num_proc, remove_columns=["text"], desc="Running tokenizer on dataset",
    )  # fmt: skip
    lm_datasets = tokenized.map(
        functools.partial(group_texts, block_size=args.seq_len),
        batched=True, num_proc=num_proc, desc=f"Grouping texts in chunks of {args.seq_len}",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "note": f"{len(lm_datasets)} chunks (input_ids, attention_mask, labels), num_proc={num_proc}"}


def _baseline_one_process(tokenizer, texts, args) -> dict:
    return _baseline(tokenizer, texts, args, num_proc=None)


# run_clm.py's two map functions, as module-level functions instead of closures.
def tokenize_function(examples, tokenizer, text_column_name):
    return tokenizer(examples[text_column_name])


def group_texts(examples, block_size):
    # Concatenate all texts.
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    # We drop the small remainder, and if the total_length < block_size we exclude this batch and return an empty dict.
    total_length = (total_length // block_size) * block_size
    # Split by chunks of max_len.
    result = {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def _sha256(tokens) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


if __name__ == "__main__":
    main()
