"""Which training sources a run mixes, and with what weights: read from the options, checked before anything loads.

Two ways to name several sources, as Axolotl and LLaMA-Factory users write them:

    datasets:                                   # YAML (on the command line: the same list as JSON)
      - {name: docs, path: data/docs.jsonl, text_column: body, weight: 3}
      - {name: chat, dataset_name: org/chat, data_format: messages, weight: 1, validation_path: data/chat_val.jsonl}

    --train_file a.jsonl b.jsonl --mix_weights 3 1

Each source has its own format and columns (an entry's text_column, data_format, messages_column, ...
override the run's options for that source only), its own validation data (validation_path, else a hub
dataset's validation split, else its rows held out by --validation_split_percentage), and a name: the
entry's `name`, else the file's stem or the hub id's last part. The name keys the metrics
(`eval_<name>_loss`), `tokens_per_source` and influence/mixture.yaml, so it must be unique and made of
letters, digits, `_`, `.` and `-`.

A single `--train_file x` (or `--dataset_name`, with --validation_file) is a list of one source, named and
checked as it always was; there is one way to open and build a source, whatever the run names.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuner.data.sources import BUILDERS, file_problems
from tuner.errors import UsageError

COLUMN_KEYS = ("text_column", "messages_column", "prompt_column", "completion_column", "instruction_column",
               "input_column", "output_column")  # fmt: skip
FORMATS = ("auto", "text", "messages", "prompt_completion", "alpaca")
KEYS = ("name", "path", "dataset_name", "dataset_config_name", "split", "data_format", "weight", "validation_path",
        *COLUMN_KEYS)  # fmt: skip
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
EXAMPLE = '[{"name": "docs", "path": "data/docs.jsonl", "weight": 3}, {"name": "chat", "path": "data/chat.jsonl"}]'


@dataclass(frozen=True)
class SourceSpec:
    """One training source as the user named it."""

    name: str
    flag: str  # how messages name where it came from: --train_file, datasets[docs]
    path: str | None = None  # a local file, or a local dataset directory
    dataset_name: str | None = None  # a hub id
    dataset_config_name: str | None = None
    split: str = "train"
    weight: float = 1.0
    validation_path: str | None = None
    options: dict = field(default_factory=dict)  # text_column, data_format, *_column for this source only
    validation_flag: str | None = None  # how messages name validation_path: --validation_file for a single source

    @property
    def named(self) -> bool:
        """Listed under --datasets (by the name the user gave it), not given by a flag of its own."""
        return self.flag.startswith("datasets[")

    @property
    def validation_source_flag(self) -> str:
        return self.validation_flag or f"{self.flag} validation_path"

    @property
    def location(self) -> str:
        return self.path or self.dataset_name

    @property
    def is_file(self) -> bool:
        return bool(self.path) and Path(self.path).suffix.lower() in _builders() and not Path(self.path).is_dir()

    def as_entry(self, weight: float | None = None) -> dict:
        """The YAML entry that names this source again (for influence/mixture.yaml)."""
        entry = {"name": self.name}
        for key in ("path", "dataset_name", "dataset_config_name"):
            if getattr(self, key):
                entry[key] = getattr(self, key)
        if self.split != "train":
            entry["split"] = self.split
        entry.update(self.options)
        if self.validation_path:
            entry["validation_path"] = self.validation_path
        entry["weight"] = self.weight if weight is None else weight
        return entry


def _builders() -> dict:
    return BUILDERS


def uses_specs(cfg) -> bool:
    """Does this run name its training data with --datasets or several --train_file?"""
    return bool(getattr(cfg, "datasets", None)) or isinstance(cfg.train_file, list)


def specs_from_options(cfg) -> list[SourceSpec]:
    """The run's training sources: several to mix, or the one of --train_file / --dataset_name.
    Raises UsageError with every problem found (problems() without raising)."""
    found = problems(cfg)
    if found:
        raise UsageError(found)
    return _specs(cfg)[0] if uses_specs(cfg) else [single_spec(cfg)]


def single_spec(cfg) -> SourceSpec:
    """--train_file FILE or --dataset_name NAME (and its config), with --validation_file as its validation data."""
    where = {"path": cfg.train_file} if cfg.train_file else {"dataset_name": cfg.dataset_name, "dataset_config_name": cfg.dataset_config_name}
    return SourceSpec(
        name=name_of(cfg.train_file or cfg.dataset_name), flag="--train_file" if cfg.train_file else "--dataset_name",
        validation_path=cfg.validation_file, validation_flag="--validation_file", **where,
    )  # fmt: skip


def problems(cfg) -> list[str]:
    """Everything wrong with --datasets / --train_file / --mix_weights, checked without reading any data."""
    if not uses_specs(cfg):
        found = [f"--mix_weights {_show(cfg.mix_weights)}: there is one training source, so there is nothing to mix. "
                 "Give several files (--train_file a.jsonl b.jsonl --mix_weights 3 1), or drop --mix_weights."
                 ] if cfg.mix_weights and len(cfg.mix_weights) != 1 else []  # fmt: skip
        return found + _influence_problems(cfg, 1)
    specs, found = _specs(cfg)
    found += _conflicts(cfg, specs) + _influence_problems(cfg, len(specs))
    for spec in specs:
        found += _source_problems(spec)
    return found + _name_problems(specs)


def _show(values) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _specs(cfg) -> tuple[list[SourceSpec], list[str]]:
    if getattr(cfg, "datasets", None):
        entries, found = parse_datasets(cfg.datasets)
        specs = []
        for number, entry in enumerate(entries):
            spec, entry_problems = spec_from_entry(entry, number)
            found += entry_problems
            specs += [spec] if spec is not None else []
        return specs, found
    files = list(cfg.train_file)
    weights = cfg.mix_weights or [1.0] * len(files)
    found = []
    if len(weights) != len(files):
        found.append(
            f"--mix_weights {_show(weights)}: {len(weights)} weight(s) for {len(files)} --train_file files. Give one "
            f"weight per file, in the same order (e.g. --mix_weights {' '.join(['1'] * len(files))})."
        )
        weights = [1.0] * len(files)
    for path, weight in zip(files, weights):
        if not (math.isfinite(weight) and weight > 0):
            found.append(f"--mix_weights {_show(weights)}: the weight of --train_file {path} is {weight}; a weight is its "
                         "share of the mix, so it must be a positive number. Give it one, or leave the file out.")  # fmt: skip
    specs = [SourceSpec(name=name_of(path), flag="--train_file", path=path, weight=w) for path, w in zip(files, weights)]
    return specs, found


def parse_datasets(value) -> tuple[list[dict], list[str]]:
    """--datasets as a list of mappings: a YAML list, or the command line's JSON (or YAML flow) text."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            return [], [f"--datasets {value!r}: not valid JSON ({str(exc).splitlines()[0]}). Give a list, e.g. '{EXAMPLE}'."]
    if not isinstance(value, list) or not value or not all(isinstance(e, dict) for e in value):
        return [], [f"--datasets {value!r}: expected a non-empty list of mappings, one per source, e.g. {EXAMPLE}."]
    return value, []


def spec_from_entry(entry: dict, number: int) -> tuple[SourceSpec | None, list[str]]:
    """One `datasets` entry as a SourceSpec, and what is wrong with it (named by its name, else its number)."""
    label = f"datasets entry {number} ({entry.get('name') or entry.get('path') or entry.get('dataset_name') or 'unnamed'})"
    found = []
    for key in entry:
        if key not in KEYS:
            near = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.5)
            hint = f"Did you mean '{near[0]}'? " if near else ""
            found.append(f"{label}: unknown key '{key}'. {hint}Valid keys: {', '.join(KEYS)}.")
    location = [k for k in ("path", "dataset_name") if entry.get(k)]
    if len(location) != 1:
        what = "both path and dataset_name" if len(location) == 2 else "neither path nor dataset_name"
        found.append(f"{label}: {what}. Give exactly one: path (a local file or directory) or dataset_name (a hub dataset).")
        return None, found
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight <= 0:
        found.append(f"{label}: weight {weight!r} must be a positive number (its share of the mix). Give e.g. weight: 1, "
                     "or leave the entry out.")  # fmt: skip
        weight = 1
    for key in ("name", "dataset_config_name", "split", "validation_path", "data_format", *COLUMN_KEYS):
        if key in entry and not isinstance(entry[key], str):
            found.append(f"{label}: {key} {entry[key]!r} must be a string. Quote it in the YAML.")
    if isinstance(entry.get("data_format"), str) and entry["data_format"] not in FORMATS:
        found.append(f"{label}: data_format {entry['data_format']!r}: expected one of {', '.join(FORMATS)}.")
    name = entry.get("name") if isinstance(entry.get("name"), str) else name_of(entry[location[0]])
    options = {k: entry[k] for k in ("data_format", *COLUMN_KEYS) if isinstance(entry.get(k), str)}
    spec = SourceSpec(
        name=name, flag=f"datasets[{name}]", path=entry.get("path"), dataset_name=entry.get("dataset_name"),
        dataset_config_name=entry.get("dataset_config_name"), split=entry.get("split") or "train", weight=weight,
        validation_path=entry.get("validation_path"), options=options,
    )  # fmt: skip
    return spec, found


def name_of(location: str) -> str:
    """A source's default name: the file's stem, or the hub id's last part; characters a metric name cannot
    hold become '_'."""
    text = str(location).rstrip("/")
    stem = Path(text).stem if Path(text).suffix.lower() in _builders() else Path(text).name
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", stem) or "source"


def _conflicts(cfg, specs: list[SourceSpec]) -> list[str]:
    found = []
    if getattr(cfg, "datasets", None):
        for flag, value in (("--train_file", cfg.train_file), ("--dataset_name", cfg.dataset_name), ("--mix_weights", cfg.mix_weights)):
            if value:
                fix = "give each entry its weight: instead" if flag == "--mix_weights" else "list every source under datasets"
                found.append(f"--datasets and {flag} {_show(value) if isinstance(value, list) else value} both given: {fix}.")
    elif cfg.dataset_name:
        found.append(f"--dataset_name {cfg.dataset_name} and --train_file {_show(cfg.train_file)} both given. To mix a hub "
                     "dataset with files, list them all under datasets: (path: for files, dataset_name: for the hub).")  # fmt: skip
    if len(specs) > 1 and cfg.validation_file:
        found.append(f"--validation_file {cfg.validation_file} with several training sources: each source is evaluated on "
                     "its own. Give a source its validation_path: in datasets:, or hold out part of every source with "
                     "--validation_split_percentage.")  # fmt: skip
    return found


def _influence_problems(cfg, sources: int) -> list[str]:
    if not getattr(cfg, "mixture_from_influence", False):
        return []
    found = []
    if not getattr(cfg, "influence", False):
        found.append("--mixture_from_influence: needs --influence (the weights come from the influence scores). Add --influence.")
    if sources < 2:
        found.append("--mixture_from_influence: there is one training source, so there is no mixture to weigh. "
                     "Give several sources (datasets: or --train_file a b), or drop the flag.")  # fmt: skip
    return found


def _source_problems(spec: SourceSpec) -> list[str]:
    where = spec.flag if spec.flag == "--train_file" else f"{spec.flag} path"
    found = []
    if spec.path:
        if Path(spec.path).is_dir():
            pass  # a local dataset directory, opened as --dataset_name opens one
        elif not Path(spec.path).exists() and Path(spec.path).suffix.lower() in _builders():
            found.append(f"{where} {spec.path}: no such file. Check the path, or for a hub dataset write dataset_name: instead of path:.")
        elif not Path(spec.path).exists():
            found.append(f"{where} {spec.path}: no such file or directory. Give a local .json/.jsonl/.csv/.txt/.parquet file "
                         "or a dataset directory; for a hub dataset write dataset_name: instead of path:.")  # fmt: skip
        else:
            found += file_problems(where, spec.path)
        if spec.split != "train" and spec.is_file:
            found.append(f"{spec.flag} split {spec.split}: a file has no splits. Drop split:, or give a dataset directory.")
    if spec.validation_path:
        found += file_problems(f"{spec.flag} validation_path", spec.validation_path)
    return found


def _name_problems(specs: list[SourceSpec]) -> list[str]:
    found = []
    for spec in specs:
        if not NAME.match(spec.name):
            found.append(f"{spec.flag}: name {spec.name!r} becomes the metric eval_<name>_loss, so it may hold only letters, "
                         "digits, _ . - (starting with a letter or digit). Give another name: in datasets:.")  # fmt: skip
    seen: dict[str, SourceSpec] = {}
    for spec in specs:
        if spec.name in seen:
            first = seen[spec.name]
            fix = ("rename one file, or list them under datasets: with a name: each" if spec.flag == "--train_file"
                   else "give each entry its own name:")  # fmt: skip
            found.append(f"two sources are named '{spec.name}' ({first.location} and {spec.location}): the names key the "
                         f"metrics and tokens_per_source, so they must differ. Fix: {fix}.")  # fmt: skip
        seen.setdefault(spec.name, spec)
    return found


class SourceView:
    """The run's options as one source sees them: its own columns and format over the run's, the rest
    (--max_seq_length, --seed, --cache_dir, ...) as given. The data builders read options from it as from
    the Config."""

    def __init__(self, cfg, spec: SourceSpec):
        self._cfg, self._spec = cfg, spec
        self._own = {"train_file": spec.path if spec.is_file else None, "dataset_name": spec.dataset_name,
                     "dataset_config_name": spec.dataset_config_name, "validation_file": spec.validation_path,
                     **spec.options}  # fmt: skip

    def __getattr__(self, name: str):
        own = self.__dict__.get("_own", {})
        return own[name] if name in own else getattr(self.__dict__["_cfg"], name)
