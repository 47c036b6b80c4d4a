"""The token cache: tokenized data on disk, built once and memory-mapped after, so a rerun starts training
within seconds. Its key holds everything that decides the token ids: the data (datasets' fingerprint),
the tokenizer, the format and its columns, the chat template, --max_seq_length, --train_on_prompt,
--overlong, the hold-out (--validation_split_percentage, --seed), and CACHE_FORMAT.

In a multi-process run only the local main process of each machine builds; the others wait for its
directory by polling the file system, so no collective (and no collective timeout) is involved. A
build writes into a temporary directory renamed into place when complete, so a crash never leaves a
half-written cache that a later run would trust. A user error during the build is written next to
the directory, where the waiting processes read it and stop with the same message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tuner.errors import UsageError
from tuner.offline import cache_root

logger = logging.getLogger(__name__)

# Bump when what is cached, or how, changes, so old caches are not reused.
# 2: the hold-out rule became the stratified seeded one of sources.py (was a shuffle of documents).
# 3: each example's source row (SFT) and each document's start and row (text) are kept, for describe.py.
CACHE_FORMAT = 3


def root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)

    return Path(os.environ.get("TUNER_TOKEN_CACHE") or cache_root() / "tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}".encode()).hexdigest()


def key(parts: Sequence) -> str:
    return hashlib.sha256("|".join(map(str, [CACHE_FORMAT, *parts])).encode()).hexdigest()[:24]


def is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def build_once(directory: Path, build: Callable[[Path], None]) -> Path:
    """`directory`, built by `build(work_directory)` unless a complete one exists; see the module docstring."""
    failed = directory.with_suffix(".failed")
    if (directory / "done").exists():
        logger.info("Reusing tokenized data from %s", directory)
    elif is_local_main():
        failed.unlink(missing_ok=True)  # a failure of an earlier run, with the same inputs
        work = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            build(work)
        except UsageError as error:
            shutil.rmtree(work, ignore_errors=True)
            failed.write_text(str(error), encoding="utf-8")
            raise
        (work / "done").write_text("ok")
        if directory.exists():
            shutil.rmtree(work, ignore_errors=True)  # another machine sharing the cache won the race
        else:
            work.rename(directory)
    else:
        wait_for(directory)
    return directory


def wait_for(directory: Path, poll_seconds: float = 2.0) -> None:
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


# ---------------------------------------------------------------- what is stored


def save_ragged(directory: Path, name: str, arrays: Sequence[np.ndarray], dtype=np.int32) -> None:
    """Arrays of different lengths as one flat array and (n + 1,) int64 offsets."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(arrays).astype(dtype) if len(arrays) else np.empty(0, dtype=dtype)
    np.save(directory / f"{name}.npy", flat)
    np.save(directory / f"{name}.offsets.npy", offsets)


class Ragged:
    """Read side of save_ragged: `ragged[i]` is the i-th array (a view of the memory-mapped flat array)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def load(cls, directory: Path, name: str) -> Ragged:
        return cls(np.load(directory / f"{name}.npy", mmap_mode="r"), np.load(directory / f"{name}.offsets.npy"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.flat[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)



def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))
