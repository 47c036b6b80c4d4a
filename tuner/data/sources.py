"""Where rows come from: the one place that opens a source (a hub dataset, a local dataset directory, a
dataset saved with `save_to_disk`, or a local .json/.jsonl/.csv/.txt/.parquet file), in memory or as a
stream, reads its column names, and decides which rows are held out for evaluation.

A `Source` names one place rows come from and carries a weight. Every training source of a run (specs.py:
one, or several to mix) is opened by `open_spec`, checked and read the same way; mix.py mixes built ones.

The hold-out rule, the same for in-memory and streamed runs, so both evaluate on the same rows. Rows are
taken in consecutive strata of k = 100 / gcd(100, p) rows, and in each stratum exactly h = p k / 100 rows
are held out, at positions drawn by a generator seeded with (--seed, stratum number). So exactly p % of
every whole stratum is held out (p = 5: one row in each run of 20, at a random place in it), whether a
row is held out depends only on its index and the seed (a stream decides as it reads, without knowing
its length), and another seed holds out other rows. A row's index is its 0-based position in the
source, empty rows included.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuner.errors import UsageError
from tuner.offline import unreachable_note

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


# ---------------------------------------------------------------- checks before anything loads


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


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One place rows come from. `split` is None for a file; `weight` is its share in a mix."""

    flag: str  # the option that named it: --train_file, --validation_file, --dataset_name
    location: str  # a file, a hub id, or a local dataset directory
    config: str | None = None
    split: str | None = None
    weight: float = 1.0

    @property
    def name(self) -> str:
        """How messages name it: '--train_file data.jsonl', '--dataset_name wikitext (validation split)'."""
        config = f" --dataset_config_name {self.config}" if self.config else ""
        return f"{self.flag} {self.location}{config}" + (f" ({self.split} split)" if self.split else "")


@dataclass
class OpenSource:
    """A source opened: `rows` is a datasets.Dataset, or an IterableDataset when streaming."""

    source: Source
    rows: object
    beginning: dict | None = None  # a stream's state_dict() before its first row, taken before anything reads it

    def __post_init__(self):
        if self.streaming and self.beginning is None:
            self.beginning = self.rows.state_dict()

    @property
    def streaming(self) -> bool:
        return not hasattr(self.rows, "__len__")

    @property
    def columns(self) -> list[str]:
        """Column names; a stream whose schema is unknown until read is peeked at (its first row)."""
        names = getattr(self.rows, "column_names", None)
        if names is None:
            first = next(iter(self.rows), None)
            names = list(first) if first is not None else []
        return list(names)

    @property
    def fingerprint(self) -> str:
        """datasets' fingerprint of the data: changes when a file's contents or a hub revision do.

        `_fingerprint` is private (datasets has no public equivalent): this is the one place that reads
        it, and tests/test_data.py fails if it stops changing with the data."""
        return self.rows._fingerprint


@dataclass
class Opened:
    """Training sources (one today), the validation source if any, and how much of training is held out."""

    train: list[OpenSource]
    validation: OpenSource | None
    held_out_percent: int  # 0 when validation data is given
    seed: int

    @property
    def hold_out(self) -> HoldOut:
        return HoldOut(self.held_out_percent, self.seed)


def open_spec(spec, streaming: bool, validation_split_percentage: int, seed: int) -> Opened:
    """One training source (a specs.SourceSpec): a file, or a hub / local dataset directory's `spec.split`;
    its validation data is its validation_path, else the dataset's validation split, else its held-out rows."""
    if spec.is_file:
        train = OpenSource(Source(spec.flag, spec.path, weight=spec.weight), load_local(spec.flag, spec.path, streaming))
        validation = None
    else:
        splits = load_dataset_splits(spec.flag, spec.location, spec.dataset_config_name, streaming, spec.split)
        train = OpenSource(Source(spec.flag, spec.location, spec.dataset_config_name, spec.split, spec.weight), splits["train"])
        validation = splits["validation"]
        if validation is not None:
            validation = OpenSource(Source(spec.flag, spec.location, spec.dataset_config_name, "validation"), validation)
    if spec.validation_path:
        flag = spec.validation_source_flag
        validation = OpenSource(Source(flag, spec.validation_path), load_local(flag, spec.validation_path, streaming))
    held_out = validation_split_percentage if validation is None else 0
    return Opened([train], validation, held_out, seed)


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


def is_saved_dataset(name: str) -> bool:
    """A directory written by Dataset(Dict).save_to_disk, which load_dataset cannot read (load_from_disk can)."""
    path = Path(name)
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_dataset_splits(flag: str, name: str, config: str | None, streaming: bool = False, split: str = "train") -> dict:
    """{'train': the `split` to train on, 'validation': the validation split or None} of a dataset by name."""
    import datasets

    try:
        if is_saved_dataset(name):
            loaded = datasets.load_from_disk(name)
            loaded = {"train": loaded} if isinstance(loaded, datasets.Dataset) else loaded
            if streaming:
                loaded = {split: rows.to_iterable_dataset() for split, rows in loaded.items()}
        else:
            loaded = datasets.load_dataset(name, config, streaming=streaming)
    except Exception as exc:
        fix = unreachable_note() or "Check the name and config on the hub, your network, or use --train_file."
        raise UsageError(
            f"{flag} {name} (--dataset_config_name {config}): could not be loaded ({root_cause(exc)}). {fix}"
        ) from None
    if split not in loaded:
        raise UsageError(f"{flag} {name}: has no '{split}' split (it has {', '.join(loaded)}).")
    return {"train": loaded[split], "validation": loaded.get("validation") if split != "validation" else None}


# ---------------------------------------------------------------- reading rows


def column_values(rows, column: str) -> list:
    """One column of an in-memory dataset as a Python list (one Arrow conversion, no per-row decoding)."""
    return rows[column]


def records(rows, columns: list[str]) -> list[dict]:
    """The given columns of every row of an in-memory dataset, as dicts, in order."""
    present = [c for c in columns if c in rows.column_names]
    return rows.select_columns(present).to_list()


def stream_records(rows, state: dict, first_row: int):
    """(row index, the stream's state_dict() just before that row, row) from `state` on; `first_row` is
    the index of the row that state is before."""
    rows.load_state_dict(state)
    index = first_row
    for row in rows:
        yield index, state, row
        index += 1
        state = rows.state_dict()


# ---------------------------------------------------------------- the hold-out rule


def stratum(percent: int) -> tuple[int, int]:
    """(rows per stratum, rows held out in each): (20, 1) for 5 %, (10, 3) for 30 %, (100, 7) for 7 %."""
    common = math.gcd(100, percent)
    return 100 // common, percent // common


class HoldOut:
    """Which rows are held out for evaluation (see the module docstring): `held_out(row)` for a stream,
    `mask(n)` for a dataset in memory; both give the same answer for every row."""

    def __init__(self, percent: int, seed: int):
        self.percent, self.seed = percent, seed
        self.size, self.count = stratum(percent) if percent > 0 else (1, 0)
        self._cached: tuple[int, frozenset[int]] = (-1, frozenset())

    def positions(self, number: int) -> frozenset[int]:
        """The held-out positions (0..size-1) in stratum `number`."""
        if self._cached[0] != number:
            # Seeded with a string: Python hashes it with SHA-512, the same on every machine and process.
            chosen = random.Random(f"tuner-hold-out/{self.seed}/{number}").sample(range(self.size), self.count)
            self._cached = (number, frozenset(chosen))
        return self._cached[1]

    def held_out(self, row: int) -> bool:
        return self.count > 0 and row % self.size in self.positions(row // self.size)

    def training(self, row: int) -> bool:
        return not self.held_out(row)

    def mask(self, n_rows: int) -> np.ndarray:
        """(n_rows,) bool, True for held-out rows."""
        mask = np.zeros(n_rows, dtype=bool)
        if self.count:
            for number in range(-(-n_rows // self.size)):
                for position in self.positions(number):
                    if number * self.size + position < n_rows:
                        mask[number * self.size + position] = True
        return mask


def everything(row: int) -> bool:
    """The keep-rule of a validation source: every row."""
    return True
