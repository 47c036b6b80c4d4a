"""Load text from the hub or local files, hold out validation documents, tokenize and group into
fixed-length chunks, and cache the chunks so a rerun starts training within seconds.

In a multi-process run only the local main process of each machine tokenizes; the others wait for
its cache by polling the file system, so no collective (and no collective timeout) is involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import grouping, hub
from .errors import UsageError

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
CACHE_FORMAT = 1  # bump when the chunking policy changes, so old caches are not reused


def file_problems(flag: str, path: str | None) -> list[str]:
    """Checks that need no parsing: the file exists, has a supported extension and is not empty."""
    if not path:
        return []
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in BUILDERS:
        return [f"{flag} {path}: unsupported extension '{suffix}'. Use one of {', '.join(BUILDERS)}."]
    if not file.is_file():
        return [f"{flag} {path}: no such file. Check the path (relative paths start from {os.getcwd()})."]
    if file.stat().st_size == 0:
        return [f"{flag} {path}: the file is empty. Give a file with at least one document."]
    return []


def source_problems(cfg) -> list[str]:
    problems = file_problems("--train_file", cfg.train_file) + file_problems("--validation_file", cfg.validation_file)
    if cfg.dataset_name and cfg.train_file:
        problems.append(
            f"--dataset_name {cfg.dataset_name} and --train_file {cfg.train_file} both given. Choose one source of training text."
        )
    if not cfg.dataset_name and not cfg.train_file:
        problems.append(
            "No training data: give --train_file PATH (.json/.jsonl/.csv/.txt/.parquet) or --dataset_name NAME "
            "(e.g. --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1)."
        )
    if cfg.validation_file and not cfg.train_file and not cfg.dataset_name:
        problems.append(f"--validation_file {cfg.validation_file} needs --train_file or --dataset_name as well.")
    return problems


# ---------------------------------------------------------------- loading


def _first_bad_json_line(path: str) -> str | None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"line {number}: {exc.msg} (column {exc.colno})"
    return None


def load_local(flag: str, path: str, streaming: bool = False):
    """One local file as a datasets.Dataset (an IterableDataset when streaming); parse errors
    become messages that name the line."""
    import datasets

    builder = BUILDERS[Path(path).suffix.lower()]
    # .txt: one document per paragraph (blank-line separated), so BOS/EOS mark real boundaries.
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={"data": path}, split="data", streaming=streaming, **extra)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        where = _first_bad_json_line(path) if builder == "json" else None
        detail = f"malformed JSON at {where}" if where else f"could not be parsed as {builder} ({root_cause(exc)})"
        raise UsageError(f"{flag} {path}: {detail}. Fix the file, or check that its extension matches its format.") from None


def root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def load_hub(cfg, streaming: bool = False) -> dict:
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming=streaming)
    except Exception as exc:
        fix = hub.unreachable_note() or "Check the name and config on the hub, your network, or use --train_file."
        raise UsageError(
            f"--dataset_name {cfg.dataset_name} (--dataset_config_name {cfg.dataset_config_name}): could not be loaded "
            f"({root_cause(exc)}). {fix}"
        ) from None
    if "train" not in loaded:
        raise UsageError(f"--dataset_name {cfg.dataset_name}: has no 'train' split (it has {', '.join(loaded)}).")
    return {"train": loaded["train"], "validation": loaded.get("validation")}


def check_column(dataset, column: str, source: str) -> None:
    """The column exists and holds strings: a look at the schema, no rows read."""
    if column not in dataset.column_names:
        raise UsageError(
            f"--text_column {column}: {source} has no such column; it has: {', '.join(dataset.column_names)}. "
            f"Pass --text_column with one of those."
        )
    dtype = str(dataset.features[column].dtype) if hasattr(dataset.features[column], "dtype") else "non-text"
    if dtype not in ("string", "large_string"):
        raise UsageError(
            f"--text_column {column}: in {source} this column holds {dtype}, not text. Choose a column of strings."
        )


def texts_of(dataset, column: str, source: str) -> list[str]:
    """The non-empty texts of one column, after checking the column exists and holds strings."""
    check_column(dataset, column, source)
    texts = [t for t in dataset[column] if t is not None and t.strip()]
    if not texts:
        raise UsageError(f"--text_column {column}: every row of {source} is empty. Give a file with text in it.")
    return texts


def split_documents(docs: list[str], percentage: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out `percentage` % of the documents (at least one), chosen by a seeded shuffle."""
    if percentage <= 0:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * percentage / 100))
    if n_val >= len(docs):
        raise UsageError(
            f"--validation_split_percentage {percentage}: the training data has only {len(docs)} document(s), too few to "
            "hold any out. Pass --validation_file, or --validation_split_percentage 0 to skip evaluation."
        )
    held = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


@dataclass
class Sources:
    """The loaded (not yet read) training data and validation data, with names for messages."""

    train: object
    train_name: str
    validation: object | None
    validation_name: str | None

    @property
    def fingerprint(self) -> str:
        """datasets' own fingerprint of the raw data: changes when a file or hub revision does."""
        return self.train._fingerprint + (self.validation._fingerprint if self.validation is not None else "")


def load_sources(cfg) -> Sources:
    if cfg.train_file:
        sources = Sources(load_local("--train_file", cfg.train_file), cfg.train_file, None, None)
    else:
        splits = load_hub(cfg)
        sources = Sources(splits["train"], f"{cfg.dataset_name} train", splits["validation"], f"{cfg.dataset_name} validation")
    if cfg.validation_file:  # given, it wins over a hub validation split
        sources.validation, sources.validation_name = load_local("--validation_file", cfg.validation_file), cfg.validation_file
    check_column(sources.train, cfg.text_column, sources.train_name)
    if sources.validation is not None:
        check_column(sources.validation, cfg.text_column, sources.validation_name)
    return sources


def load_texts(cfg, sources: Sources) -> tuple[list[str], list[str]]:
    """(train texts, validation texts): the given validation data, else documents held out of train."""
    train = texts_of(sources.train, cfg.text_column, sources.train_name)
    if sources.validation is not None:
        return train, texts_of(sources.validation, cfg.text_column, sources.validation_name)
    return split_documents(train, cfg.validation_split_percentage, cfg.seed)


# ---------------------------------------------------------------- token cache


def token_cache_root(cfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    from .offline import cache_root

    return Path(os.environ.get("TUNER_TOKEN_CACHE") or cache_root() / "tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode()).hexdigest()


def cache_key(cfg, sources: Sources, tokenizer) -> str:
    held_out = cfg.validation_split_percentage if sources.validation is None else "given"
    parts = [
        CACHE_FORMAT, sources.fingerprint, tokenizer_fingerprint(tokenizer), cfg.max_seq_length, cfg.text_column,
        held_out, cfg.seed,
    ]  # fmt: skip
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


def is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _wait_for(directory: Path, poll_seconds: float = 2.0) -> None:
    """Wait, without any collective, until the local main process finishes (or fails) the cache."""
    failed = directory.with_suffix(".failed")
    waited = 0.0
    while not (directory / "done").exists():
        if failed.exists():
            raise UsageError(failed.read_text(encoding="utf-8"))
        if waited and waited % 60 < poll_seconds:
            logger.info("Waiting for the main process to tokenize (%.0f s so far)", waited)
        time.sleep(poll_seconds)
        waited += poll_seconds


def _build(cfg, tokenizer, sources: Sources, directory: Path) -> None:
    train, val = load_texts(cfg, sources)  # read the rows only now: a cache hit never needs them
    work = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for split, texts in (("train", train), ("validation", val)):
        if not texts:
            continue
        started = time.time()
        logger.info("Tokenizing %d %s documents into %d-token chunks", len(texts), split, cfg.max_seq_length)
        stream = grouping.tokenize_stream(tokenizer, texts, cfg.preprocessing_num_workers)
        too_short_check(split, len(stream), cfg.max_seq_length)
        chunks = grouping.chunk(stream, cfg.max_seq_length)
        np.save(work / f"{split}.npy", chunks)
        rate = len(stream) / max(time.time() - started, 1e-9)
        logger.info("  %s: %d tokens -> %d chunks (%.0f tokens/s)", split, len(stream), len(chunks), rate)
    (work / "done").write_text("ok")
    if directory.exists():
        shutil.rmtree(work, ignore_errors=True)  # another machine sharing the cache won the race
    else:
        work.rename(directory)


def too_short_check(split: str, n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len:
        flag = "--train_file/--dataset_name" if split == "train" else "--validation_file/--validation_split_percentage"
        raise UsageError(
            f"--max_seq_length {seq_len}: the {split} data has only {n_tokens} tokens, fewer than one chunk. "
            f"Lower --max_seq_length below {n_tokens}, or give more text ({flag})."
        )


def cached_chunks(cfg, tokenizer) -> dict[str, np.ndarray]:
    """{'train': (N, T) int32, 'validation': (M, T) or absent}, built once and memory-mapped after."""
    sources = load_sources(cfg)
    directory = token_cache_root(cfg) / cache_key(cfg, sources, tokenizer)
    if (directory / "done").exists():
        logger.info("Reusing tokenized data from %s", directory)
    elif is_local_main():
        try:
            _build(cfg, tokenizer, sources, directory)
        except UsageError as error:
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.with_suffix(".failed").write_text(str(error), encoding="utf-8")
            raise
    else:
        _wait_for(directory)
    return {s: np.load(directory / f"{s}.npy", mmap_mode="r") for s in ("train", "validation") if (directory / f"{s}.npy").exists()}


# ---------------------------------------------------------------- datasets


class ChunkDataset(torch.utils.data.Dataset):
    """Fixed-length chunks; labels are the inputs (the model shifts them)."""

    def __init__(self, chunks: np.ndarray):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.chunks[index], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    train_tokens: int
    eval_tokens: int

    @property
    def train_chunks(self) -> int | None:
        """None for a stream, whose length is unknown."""
        try:
            return len(self.train)
        except TypeError:
            return None


def build_datasets(cfg, tokenizer) -> Datasets:
    chunks = cached_chunks(cfg, tokenizer)
    train = chunks["train"][: cfg.max_train_samples] if cfg.max_train_samples else chunks["train"]
    val = chunks.get("validation")
    if val is not None and cfg.max_eval_samples:
        val = val[: cfg.max_eval_samples]
    return Datasets(
        train=ChunkDataset(train),
        eval=ChunkDataset(val) if val is not None and len(val) else None,
        train_tokens=int(train.size),
        eval_tokens=int(val.size) if val is not None else 0,
    )
