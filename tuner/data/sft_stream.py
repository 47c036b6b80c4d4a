"""--streaming for chat and instruction data: rows read, validated and tokenised on the fly, packed in
bounded buffers, and resumed exactly where a checkpoint left off.

A buffer is the next BUFFER_EXAMPLES rows the hold-out keeps (fewer at the end of a pass). Its rows are
validated (formats.normalise_row: a bad row stops the run with exit 2, naming it), tokenised
(sft_data.tokenize), cut at --max_train_samples examples a pass, then packed by best-fit decreasing and
shuffled with a generator seeded by (--seed, pass, the buffer's first row), so that long and short
rows mix (--packing false: one example a row, in order). At most one buffer is in memory.

Resume: a row's `Position` is its buffer's first row (its index and the source's state_dict() just
before it), how many rows of that buffer came before it (`offset`) and how many examples the pass had
kept before the buffer (`epoch_chunk`). The same rows read from the same state give the same examples,
packing and shuffle, so a resumed stream skips `offset` rows of that buffer and continues with exactly
the row an uninterrupted run would have trained on next. After a buffer's last row the position is the
row after the buffer, with the source's state after reading it.

Evaluation: the first --max_eval_samples examples (streaming.DEFAULT_EVAL_CHUNKS without it) of the
validation source, or of the held-out rows, tokenised once and packed (or padded) in memory: the same
examples an in-memory run evaluates on when it is given the same --max_eval_samples.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import replace

from tuner.data import formats, packing, sources
from tuner.data import sft as sft_data
from tuner.data.datasets import Datasets
from tuner.data.formats import FormatChoice
from tuner.data.sft import SftSettings
from tuner.data.sources import Opened, OpenSource
from tuner.data.stream import DEFAULT_EVAL_CHUNKS, Position, ResumableStream, eval_source

logger = logging.getLogger(__name__)

# Examples per packing buffer: enough that best-fit decreasing fills rows well (chat examples are tens to
# hundreds of tokens; 1024 of them fill dozens of 2048-token rows), few enough to stay a few MB.
BUFFER_EXAMPLES = 1024


class ExampleStream(ResumableStream):
    """Endless packed rows {input_ids, labels, position_ids, example_index} (or one example a row
    {input_ids, labels}) from a datasets streaming source of chat or instruction rows."""

    empty_problem = "no example of the stream has a trained token left"
    empty_fix = "Raise --max_seq_length, use --overlong truncate, or give rows with non-empty answers."

    def __init__(self, source: OpenSource, tokenizer, settings: SftSettings, keep: Callable[[int], bool] | None = None,
                 max_examples: int | None = None, seed: int = 0, name: str | None = None,
                 buffer_examples: int = BUFFER_EXAMPLES):  # fmt: skip
        super().__init__(source, name or source.source.name)
        self.tokenizer, self.settings, self.seed = tokenizer, settings, seed
        self.keep = keep or sources.everything
        self.max_examples, self.buffer_examples = max_examples, buffer_examples
        self.max_seq_length = settings.max_seq_length
        self.chat = False  # a conversation was read: the chat template is in use

    def buffers(self, start: Position) -> Iterator[tuple[Position, list, Position]]:
        """(where the buffer starts, its examples, where the rows after it start) from `start` on, one pass.
        The positions' chunk counts are left to the caller."""
        rows = self.source.rows
        first, examples, row = None, [], start.document
        for row, state, record in sources.stream_records(rows, start.source, start.document):
            if not self.keep(row):
                continue
            if not examples:
                first = replace(start, document=row, offset=0, source=state)
            examples.append(formats.normalise_row(record, self.settings.choice, self.source.source.name, row))
            if len(examples) == self.buffer_examples:
                yield first, examples, replace(start, document=row + 1, offset=0, source=rows.state_dict())
                examples = []
        if examples:
            yield first, examples, replace(start, document=row + 1, offset=0, source=rows.state_dict())

    def examples(self, start: Position) -> Iterator[tuple[Position, list, list, Position]]:
        """(buffer start, token ids, labels, buffer end) per buffer, at most max_examples kept in the pass;
        the positions' epoch_chunk count the examples kept before them in the pass."""
        kept = start.epoch_chunk
        for first, examples, after in self.buffers(start):
            self.chat = self.chat or sft_data.is_chat(examples)
            tokenized = sft_data.tokenize(self.tokenizer, examples, self.settings)
            room = None if self.max_examples is None else self.max_examples - kept
            ids, labels = tokenized.input_ids[:room], tokenized.labels[:room]
            yield replace(first, epoch_chunk=kept), ids, labels, replace(after, epoch_chunk=kept + len(ids))
            kept += len(ids)
            if room is not None and len(ids) >= room:
                return

    def rows_of(self, ids: list, labels: list, epoch: int, first_row: int) -> list[dict]:
        if not self.settings.packing:
            return [{"input_ids": i, "labels": x} for i, x in zip(ids, labels)]
        rows = packing.pack_examples(ids, labels, self.settings.max_seq_length)
        # Best-fit decreasing puts the longest examples first; shuffled (deterministically, for resume) so
        # that consecutive batches do not run from long rows to short ones.
        random.Random(f"tuner-pack/{self.seed}/{epoch}/{first_row}").shuffle(rows)
        return rows

    def one_pass(self, start: Position) -> Iterator[tuple[dict, Position]]:
        chunk, skip = start.chunk, start.offset
        for first, ids, labels, end in self.examples(start):
            rows = self.rows_of(ids, labels, start.epoch, first.document)
            for k in range(skip, len(rows)):
                chunk += 1
                after = replace(first, offset=k + 1) if k + 1 < len(rows) else end
                yield rows[k], replace(after, chunk=chunk)
            skip = 0

    def as_tensors(self, row: dict) -> dict:
        return row  # the collator (packing.PackedCollator / PaddingCollator) makes the tensors

    def first_examples(self, limit: int) -> tuple[list, list]:
        """The first `limit` examples of one pass: (token ids, labels)."""
        ids, labels = [], []
        for _, part_ids, part_labels, _ in self.examples(self.first):
            ids += part_ids
            labels += part_labels
            if len(ids) >= limit:
                break
        return ids[:limit], labels[:limit]


def fixed_length(cfg) -> int | None:
    """Several processes: every batch --max_seq_length long. accelerate's dispatcher reads a stream's batches
    for every process on process 0 and concatenates them before slicing, which needs one length for all
    (a packed row is at most --max_seq_length, so padding to it costs only what the rows lack)."""
    return cfg.max_seq_length if cfg.world_size > 1 else None


def build_sft_stream(cfg, tokenizer, opened: Opened, choice: FormatChoice) -> Datasets:
    """An ExampleStream to train on and a fixed evaluation set in memory; reads the first buffer now."""
    settings = SftSettings.from_options(cfg, choice, tokenizer)
    train = ExampleStream(
        opened.train[0], tokenizer, settings, keep=opened.hold_out.training, max_examples=cfg.max_train_samples,
        seed=cfg.seed,
    )  # fmt: skip
    train.check()
    val, figures = None, {"data_format": choice.format}
    found = eval_source(opened)
    if found is not None:
        source, keep, name = found
        stream = ExampleStream(source, tokenizer, settings, keep, name=name)
        stream.check()
        ids, labels = stream.first_examples(cfg.max_eval_samples or DEFAULT_EVAL_CHUNKS)
        val = sft_data.arrange(ids, labels, settings)
        figures.update(sft_data.split_figures("validation", None, ids, labels, len(val), settings))
    shown = sft_data.preview(tokenizer, *train.first_examples(sft_data.PREVIEW_EXAMPLES))
    logger.info(
        "Streaming %s (%s), %s; evaluating on %s", train.name, choice.format,
        "packed" if settings.packing else "padded per batch", f"{len(val)} rows" if val is not None else "nothing",
    )  # fmt: skip
    return Datasets(
        train=train, eval=val, train_tokens=0, eval_tokens=figures.get("validation_tokens_used", 0),
        format=choice.format, collator=sft_data.collator(settings, tokenizer, fixed_length(cfg)), packed=settings.packing,
        chat=train.chat, figures=figures, preview=shown,
    )  # fmt: skip
