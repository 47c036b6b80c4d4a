"""Running text in memory: the rows of --text_column are documents (empty ones skipped); without validation
data, the rows sources.HoldOut picks are held out (the same rows a streamed run holds out). Each split is
tokenised, grouped into fixed-length chunks and cached (cache.py), so a rerun starts training within
seconds. The cache also keeps where each document starts in the token stream and its row in the source,
so `Datasets.describe()` can say which rows each chunk holds (describe.py).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import numpy as np

from tuner.data import cache as token_cache
from tuner.data import describe, grouping, sources
from tuner.data.datasets import ChunkDataset, Datasets
from tuner.data.sources import Opened, OpenSource
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

def check_column(rows, column: str, source: str, auto: bool = False) -> None:
    """The column exists and holds strings: a look at the schema, no rows read."""
    if column not in rows.column_names:
        other = " Or, for chat or instruction data, name its columns (see --data_format)." if auto else ""
        raise UsageError(
            f"--text_column {column}: {source} has no such column; it has: {', '.join(rows.column_names)}. "
            f"Pass --text_column with one of those.{other}"
        )
    feature = rows.features[column]
    dtype = str(feature.dtype) if hasattr(feature, "dtype") else "non-text"
    if dtype not in ("string", "large_string"):
        raise UsageError(
            f"--text_column {column}: in {source} this column holds {dtype}, not text. Choose a column of strings."
        )


def texts_of(source: OpenSource, column: str, auto: bool = False) -> list[str | None]:
    """Every row's text (None or blank where empty), after checking the column exists and holds strings."""
    check_column(source.rows, column, source.source.name, auto)
    return sources.column_values(source.rows, column)


def non_empty(texts) -> list[str]:
    return [t for t in texts if t is not None and t.strip()]


def documents_of(texts, keep=None) -> tuple[list[str], list[int]]:
    """(the non-empty texts, their row indices) among the rows `keep` (a bool mask) marks, all rows if None."""
    rows = [i for i, t in enumerate(texts) if t is not None and t.strip() and (keep is None or keep[i])]
    return [texts[i] for i in rows], rows


def text_splits(cfg, opened: Opened) -> dict[str, tuple[list[str], list[int]]]:
    """{'train': (documents, their rows), 'validation': ...}: the validation source's, else the held-out rows'."""
    source, auto = opened.train[0], cfg.data_format == "auto"
    texts = texts_of(source, cfg.text_column, auto)
    if not non_empty(texts):
        raise UsageError(f"--text_column {cfg.text_column}: every row of {source.source.name} is empty. Give a file with text in it.")
    if opened.validation is not None:
        val = documents_of(texts_of(opened.validation, cfg.text_column))
        if not val[0]:
            raise UsageError(f"--text_column {cfg.text_column}: every row of {opened.validation.source.name} is empty.")
        return {"train": documents_of(texts), "validation": val}
    if not opened.held_out_percent:
        return {"train": documents_of(texts), "validation": ([], [])}
    held = opened.hold_out.mask(len(texts))
    train, val = documents_of(texts, ~held), documents_of(texts, held)
    if not train[0] or not val[0]:
        raise UsageError(
            f"--validation_split_percentage {opened.held_out_percent}: {source.source.name} has only {len(texts)} row(s), "
            "too few to hold some out and train on the rest. Pass --validation_file, or --validation_split_percentage 0 "
            "to skip evaluation."
        )
    return {"train": train, "validation": val}


def too_short_check(split: str, n_tokens: int, seq_len: int, source: str | None = None) -> None:
    if n_tokens < seq_len:
        flag = "--train_file/--dataset_name" if split == "train" else "--validation_file/--validation_split_percentage"
        of = f" of {source}" if source else ""  # a mix: which source
        raise UsageError(
            f"--max_seq_length {seq_len}: the {split} data{of} has only {n_tokens} tokens, fewer than one chunk. "
            f"Lower --max_seq_length below {n_tokens}, or give more text ({flag})."
        )


def _build_chunks(work: Path, cfg, tokenizer, opened: Opened) -> None:
    splits = text_splits(cfg, opened)  # read the rows only now: a cache hit never needs them
    for split, (texts, rows) in splits.items():
        if not texts:
            continue
        started = time.time()
        logger.info("Tokenizing %d %s documents into %d-token chunks", len(texts), split, cfg.max_seq_length)
        stream, lengths = grouping.tokenize_documents(tokenizer, texts, cfg.preprocessing_num_workers)
        too_short_check(split, len(stream), cfg.max_seq_length, opened.train[0].source.name)
        chunks = grouping.chunk(stream, cfg.max_seq_length)
        np.save(work / f"{split}.npy", chunks)
        # Where each document starts in the stream, and its row: which rows a chunk holds (describe.py).
        np.save(work / f"{split}.doc_starts.npy", np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        np.save(work / f"{split}.doc_rows.npy", np.asarray(rows, dtype=np.int64))
        rate = len(stream) / max(time.time() - started, 1e-9)
        logger.info("  %s: %d tokens -> %d chunks (%.0f tokens/s)", split, len(stream), len(chunks), rate)


def cache_key(cfg, opened: Opened, tokenizer) -> str:
    held_out = opened.held_out_percent if opened.validation is None else "given"
    fingerprints = [o.fingerprint for o in opened.train] + ([opened.validation.fingerprint] if opened.validation else [])
    parts = ["text", *fingerprints, token_cache.tokenizer_fingerprint(tokenizer), cfg.max_seq_length, cfg.text_column]
    return token_cache.key([*parts, held_out, opened.seed])


def cached_chunks(cfg, tokenizer, opened: Opened) -> dict[str, np.ndarray]:
    """{'train': (N, T) int32, 'validation': (M, T) or absent, 'train.doc_starts', 'train.doc_rows': (D,)
    int64}, built once and memory-mapped after."""
    directory = token_cache.root(cfg.cache_dir) / cache_key(cfg, opened, tokenizer)
    token_cache.build_once(directory, lambda work: _build_chunks(work, cfg, tokenizer, opened))
    names = ("train", "validation", "train.doc_starts", "train.doc_rows")
    return {s: np.load(directory / f"{s}.npy", mmap_mode="r") for s in names if (directory / f"{s}.npy").exists()}


def build_text(cfg, tokenizer, opened: Opened) -> Datasets:
    chunks = cached_chunks(cfg, tokenizer, opened)
    train = chunks["train"][: cfg.max_train_samples] if cfg.max_train_samples else chunks["train"]
    val = chunks.get("validation")
    if val is not None and cfg.max_eval_samples:
        val = val[: cfg.max_eval_samples]
    starts, rows = np.asarray(chunks["train.doc_starts"]), np.asarray(chunks["train.doc_rows"])
    return Datasets(
        train=ChunkDataset(train),
        eval=ChunkDataset(val) if val is not None and len(val) else None,
        train_tokens=int(train.size),
        eval_tokens=int(val.size) if val is not None else 0,
        describer=partial(describe.text_chunks, train, starts, rows, tokenizer, source=opened.train[0].source.name),
    )
