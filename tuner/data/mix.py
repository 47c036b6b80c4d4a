"""Several training sources in one run: each built as a run of its own would build it, then mixed in
exact proportions (mixing.py) and evaluated one by one.

Each source (specs.SourceSpec) is opened (sources.open_spec) and built by build.build_part with its
own format and columns, in memory or streamed: running text becomes chunks of --max_seq_length, chat and
instruction data packed (or padded) rows, and each source gets its own evaluation set. The mix then
interleaves *training rows* (a chunk, a packed row, a padded example): in proportions of their trained
tokens (--mix_unit tokens, labels != -100 after the shift, what the loss counts) or of rows
(--mix_unit examples). Rows never mix sources, so every trained token belongs to one source.

In memory, `MixedRows` is a map-style dataset whose row i is the i-th row of the schedule (computed when the
data is built, from the rows' sizes alone: about 10 us a row), read in order (train.trainer.LeanLossTrainer uses a sequential sampler for it; each
source's pass is shuffled with --seed instead). Its length is the run's: --max_steps x rows per step, or,
without --max_steps, --num_train_epochs epochs of the mix, an epoch being as many trained tokens (rows) as
all sources hold together; --mix_exhausted stop ends it where the first source runs out. So Trainer's own
resume (it skips the rows earlier steps used, by index) continues the schedule exactly.

Streamed, `mix_stream.StreamMix` is the mixing.Mixture over each source's stream; train.callbacks.DataPosition saves
its state and each source's stream position in the checkpoint, so a resumed run reopens every source where
it stood, without reading what came before (as --streaming does for one source).

Rows of different kinds share one collator: with chat data packed, a text chunk gets position_ids
0..T-1 (one sequence, as without them) and its example id in example_index; with padding, text chunks are
rows like any other. A source's example ids are numbered after the previous sources' (`offset`), so
influence scores and examples.jsonl tell every example of the mix apart.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from tuner.common import rows_per_step, step_counts
from tuner.data import mixing
from tuner.data.datasets import Datasets
from tuner.data.mix_stream import StreamMix
from tuner.data.specs import SourceSpec

logger = logging.getLogger(__name__)

TEXT, PACKED, PADDED = "text", "packed", "padded"
BLOCK = 4096  # schedule rows computed at a time


@dataclass
class Part:
    """One source of the mix, built as a run of its own would build it."""

    spec: SourceSpec
    datasets: Datasets
    kind: str  # TEXT, PACKED or PADDED: what its training rows are
    offset: int = 0  # its first example id in the mix's numbering

    @property
    def ids(self) -> int:
        """Example ids it uses: chunks (text), examples (chat/instruction data)."""
        if self.kind == TEXT:
            return len(self.datasets.train)
        return self.datasets.figures.get("train_examples_used", 0)


def mix_parts(cfg, parts: list[Part]) -> Datasets:
    """The Datasets of a run with several sources, each already built as a run of its own would build it."""
    if not cfg.streaming:  # example ids matter to --influence, which needs the data in memory
        for before, part in zip(parts, parts[1:]):
            part.offset = before.offset + before.ids
    layout = next((p.kind for p in parts if p.kind != TEXT), TEXT)  # PACKED/PADDED follow --packing, the same for all
    logger.info(
        "Mixing %d sources in proportions of %s; a source that runs out %s", len(parts),
        "trained tokens" if cfg.mix_unit == mixing.TOKENS else "training rows",
        "restarts (--mix_exhausted restart, the default: the proportions hold for the whole run)"
        if cfg.mix_exhausted == mixing.RESTART else "ends the run (--mix_exhausted stop: no row is repeated)",
    )  # fmt: skip
    steps = None  # a stream runs to --max_steps
    if cfg.streaming:
        train = StreamMix(parts, [converter(p.kind, layout) for p in parts], cfg.mix_unit, cfg.mix_exhausted)
    else:
        train = MixedRows(parts, layout, cfg.mix_unit, cfg.mix_exhausted, cfg.seed)
        steps = fit_run_length(cfg, train)
    mixed = mixed_datasets(cfg, parts, layout, train)
    mixed.run_steps = steps
    return mixed


def mixed_datasets(cfg, parts: list[Part], layout: str, train) -> Datasets:
    eval_sets = {p.spec.name: Converted(p.datasets.eval, converter(p.kind, layout)) for p in parts if p.datasets.eval is not None}
    sft = [p for p in parts if p.kind != TEXT]
    in_memory = isinstance(train, MixedRows)
    return Datasets(
        train=train,
        eval=torch.utils.data.ConcatDataset(list(eval_sets.values())) if eval_sets else None,
        train_tokens=train.run_tokens() if in_memory else 0,
        eval_tokens=sum(p.datasets.eval_tokens for p in parts),
        format=TEXT if not sft else cfg.data_format,  # auto stays auto: each source resolves its own
        collator=sft[0].datasets.collator if sft else None,
        packed=layout == PACKED,
        chat=any(p.datasets.chat for p in parts),
        figures={"sources": [source_figures(p, train) for p in parts], "mix": mix_figures(cfg, train)},
        preview=[text for p in sft for text in p.datasets.preview[:1]],
        describer=partial(describe_parts, parts) if in_memory and all(p.datasets.describer for p in parts) else None,
        eval_sets=eval_sets or None,
        mix=train,
    )  # fmt: skip


def describe_parts(parts: list[Part], **_ignored) -> Iterator[dict]:
    """examples.jsonl of a mix: every source's examples, named by the source, numbered after the previous ones."""
    for part in parts:
        yield from part.datasets.describer(source=part.spec.name, offset=part.offset)


# ---------------------------------------------------------------- rows of every kind through one collator


def converter(kind: str, layout: str, offset: int = 0):
    return partial(as_row, kind, layout, offset)


def as_row(kind: str, layout: str, offset: int, row: dict, local_id: int = 0) -> dict:
    """A source's row as the mix's collator takes it. local_id: its example id in its own source."""
    if kind == TEXT and layout == PACKED:
        length = len(row["input_ids"])
        return {**row, "position_ids": np.arange(length, dtype=np.int64),
                "example_index": np.full(length, offset + local_id, dtype=np.int64)}  # fmt: skip
    if kind == PACKED and offset:
        return {**row, "example_index": np.asarray(row["example_index"]) + offset}
    return row


class Converted(torch.utils.data.Dataset):
    """A source's evaluation set, its rows converted for the mix's collator."""

    def __init__(self, dataset, convert):
        self.dataset, self.convert = dataset, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.convert(self.dataset[index], index)


def row_sizes(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(trained tokens (N,), tokens (N,)) of each row: the loss's count (mixing.trained_tokens) and the length."""
    if hasattr(dataset, "chunks"):  # torch_data.ChunkDataset: every row T tokens, T - 1 of them targets
        n, length = dataset.chunks.shape
        return np.full(n, length - 1, dtype=np.int64), np.full(n, length, dtype=np.int64)
    trained = np.fromiter((mixing.trained_tokens(dataset[i]) for i in range(len(dataset))), np.int64, len(dataset))
    lengths = np.fromiter((len(dataset[i]["input_ids"]) for i in range(len(dataset))), np.int64, len(dataset))
    return trained, lengths


def source_seed(seed: int, name: str) -> int:
    """Each source's own shuffling seed, from --seed and its name (stable across machines and runs)."""
    return int.from_bytes(hashlib.sha256(f"tuner-mix/{seed}/{name}".encode()).digest()[:4], "little")


# ---------------------------------------------------------------- in memory


class _Indices(Sequence):
    """(source, row) for every row of one source, without a list of them."""

    def __init__(self, source: int, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> tuple[int, int]:
        return self.source, int(row)


def _scheduled_size(sizes: list[np.ndarray], pair: tuple[int, int]) -> int:
    return int(sizes[pair[0]][pair[1]])


class MixedRows(torch.utils.data.Dataset):
    """Row i of the run is row i of the schedule; see the module docstring."""

    in_order = True  # training.LeanLossTrainer reads it with a sequential sampler: the schedule is the order

    def __init__(self, parts: list[Part], layout: str, unit: str, exhausted: str, seed: int):
        self.parts, self.unit = parts, unit
        self.rows = [p.datasets.train for p in parts]
        self.convert = [converter(p.kind, layout, p.offset) for p in parts]
        sizes = [row_sizes(rows) for rows in self.rows]
        self.trained, self.lengths = [s[0] for s in sizes], [s[1] for s in sizes]
        mix = [mixing.in_memory(p.spec.name, p.spec.weight, _Indices(s, len(p.datasets.train)), source_seed(seed, p.spec.name))
               for s, p in enumerate(parts)]  # fmt: skip
        self.mixture = mixing.Mixture(mix, unit, exhausted, count_tokens=partial(_scheduled_size, self.trained))
        self._order = iter(self.mixture)
        self.source = np.empty(0, dtype=np.int32)  # (scheduled,) which source each row of the run comes from
        self.row = np.empty(0, dtype=np.int64)  # (scheduled,) its row there
        self.length = 0  # rows of the run (fit_run_length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        s, r = self.at(index)
        return self.convert[s](self.rows[s][r], r)

    def at(self, index: int) -> tuple[int, int]:
        self.schedule(index + 1)
        return int(self.source[index]), int(self.row[index])

    def example_id(self, index: int) -> int:
        """The id influence scores row `index` under (influence_run.IndexedDataset): its source's numbering."""
        s, r = self.at(index)
        return self.parts[s].offset + r

    def schedule(self, n: int) -> int:
        """Schedule at least n rows (fewer when the mix ends first, under stop); returns how many there are."""
        while len(self.source) < n and not self.mixture.finished:
            block = [pair for _, pair in zip(range(n - len(self.source)), self._order)]
            self.source = np.concatenate([self.source, np.array([p[0] for p in block], dtype=np.int32)])
            self.row = np.concatenate([self.row, np.array([p[1] for p in block], dtype=np.int64)])
        return len(self.source)

    def units(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) the unit (trained tokens, or 1) of each of those scheduled rows."""
        return np.ones(stop - start, dtype=np.int64) if self.unit == mixing.EXAMPLES else self._trained_of(stop, start)

    def _trained_of(self, n: int, start: int = 0) -> np.ndarray:
        out = np.zeros(n - start, dtype=np.int64)
        for s, trained in enumerate(self.trained):
            mine = self.source[start:n] == s
            out[mine] = trained[self.row[start:n][mine]]
        return out

    def rows_for_units(self, target: float) -> int:
        """The fewest rows whose units reach `target` (all of the mix if it ends first), scheduling no row past
        them: a source's restart is logged only when the run will see it."""
        largest = 1 if self.unit == mixing.EXAMPLES else max(int(t.max()) for t in self.trained)
        n, reached = 0, 0
        while reached < target and not self.mixture.finished:
            # No fewer rows than that can reach the target, so none of them is past it.
            more = BLOCK if math.isinf(target) else max(1, math.ceil((target - reached) / largest))
            done = self.schedule(n + more)
            reached += int(self.units(n, done).sum())
            n = done
        reached_by = np.cumsum(self.units(0, n))
        return int(min(np.searchsorted(reached_by, target) + 1, n))

    def tokens_per_source(self, n: int) -> dict[str, int]:
        """Trained tokens of the first n rows of the run, by source."""
        n = min(n, self.schedule(n))
        counts = np.bincount(self.source[:n], weights=self._trained_of(n), minlength=len(self.parts))
        return {p.spec.name: int(c) for p, c in zip(self.parts, counts)}

    def run_tokens(self) -> int:
        """Tokens in the rows of the run (the schedule may run further: the epoch's length was measured on it)."""
        n = min(self.length, self.schedule(self.length))
        out = 0
        for s, lengths in enumerate(self.lengths):
            out += int(lengths[self.row[:n][self.source[:n] == s]].sum())
        return out


def fit_run_length(cfg, mix: MixedRows) -> int:
    """The run's optimizer steps, and the schedule built for them (the run sets --max_steps to them, so that
    Trainer runs one pass over `mix`): --max_steps, else --num_train_epochs epochs of the mix (Trainer's own
    step arithmetic, common.step_counts); under --mix_exhausted stop, no further than where the mix ends."""
    per_step = rows_per_step(cfg)
    if cfg.mix_exhausted == mixing.STOP:
        end = mix.rows_for_units(math.inf)
        steps = math.ceil(end / per_step)
        if cfg.max_steps > steps:
            logger.warning("--max_steps %d: the mix ends after %d rows (--mix_exhausted stop), so the run stops at step %d",
                           cfg.max_steps, end, steps)  # fmt: skip
        steps = min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps
        mix.epoch_rows, rows = end, min(end, steps * per_step)
    else:
        everything = sum(len(t) if mix.unit == mixing.EXAMPLES else int(t.sum()) for t in mix.trained)
        mix.epoch_rows = mix.rows_for_units(everything)
        steps = step_counts(cfg, mix.epoch_rows, cfg.world_size)["total_steps"]
        rows = steps * per_step
        if cfg.max_steps <= 0:
            logger.info("An epoch of the mix is %d rows (as many %s as all sources hold): --num_train_epochs %g = %d steps",
                        mix.epoch_rows, "trained tokens" if mix.unit == mixing.TOKENS else "rows", cfg.num_train_epochs, steps)  # fmt: skip
    mix.length = rows
    mix.schedule(rows)
    return steps


def source_figures(part: Part, train) -> dict:
    """One source's line in the dry run and run_summary.json: its weight, its rows and tokens, and (in memory)
    the trained tokens the run will take from it."""
    d, spec = part.datasets, part.spec
    figures = {"name": spec.name, "weight": spec.weight, "format": d.format, "train_rows": d.train_chunks,
               "train_tokens": d.train_tokens or None, "eval_rows": len(d.eval) if d.eval is not None else 0,
               "eval_tokens": d.eval_tokens}  # fmt: skip
    if isinstance(train, MixedRows):
        s = train.parts.index(part)
        figures["train_trained_tokens"] = int(train.trained[s].sum())
        figures["run_trained_tokens"] = train.tokens_per_source(train.length)[spec.name]
    figures.update({k: v for k, v in d.figures.items() if k != "data_format"})
    return figures


def mix_figures(cfg, train) -> dict:
    figures = {"unit": cfg.mix_unit, "exhausted": cfg.mix_exhausted}
    if isinstance(train, MixedRows):
        figures.update(epoch_rows=train.epoch_rows, run_rows=train.length)
    return figures
