"""--streaming: read hub or local data as a stream, tokenizing (and chunking or packing) on the fly.

Training data is a `ResumableStream`, a torch IterableDataset: running text becomes a `TokenStream`
of (T,) chunks cut with grouping.py's policy (each document [BOS] ids [EOS], documents concatenated in
order, the running stream cut into chunks of exactly --max_seq_length tokens; the tokens left over
from one tokenizer batch carry into the next); chat and instruction data becomes an `ExampleStream`
of packed (or padded) rows (sft_stream.py). When the source ends the stream starts it again (the next
pass), dropping only that pass's final remainder, so it never runs dry: Trainer stops at --max_steps.
Rows are read in the source's order; rows held out for evaluation (sources.HoldOut, the same rule as
in memory) are skipped.

Resume. For a dataset without a length, Trainer resumes by reading and throwing away the first
global_step x gradient_accumulation_steps batches (accelerate's skip_first_batches), which for a
stream means reading and tokenizing everything again. Instead `train.callbacks.DataPosition` writes, into each
checkpoint's trainer_state.json, where the first item (chunk or row) that no optimizer step has used
starts: a `Position`, holding the source's datasets `state_dict()` just before a row and how far into
that row (text) or into the rows packed from it (SFT) earlier items reach. A resumed stream loads that
state and starts there; the run sets `ignore_data_skip=True` so that Trainer does not skip batches as
well. Items the dataloader has prefetched but no step has used are not counted: the stream remembers
where each item it yielded starts, and the callback looks up item number steps x
gradient_accumulation_steps x per_device_train_batch_size x world_size.

Several processes: accelerate wraps an IterableDataset in a DataLoaderDispatcher, so only process 0
reads the stream; it sends every process its slice of each batch. (With dispatch_batches=False each
process would read the whole stream and keep its slice.) Either way the run has one position, that
of process 0, which is also the process that writes trainer_state.json.

Evaluation uses a fixed set held in memory: the first --max_eval_samples chunks (DEFAULT_EVAL_CHUNKS
without it) of --validation_file, else of the hub dataset's validation split, else of the documents
held out of the training stream: the same documents, so the same chunks, as an in-memory run's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from itertools import islice

import numpy as np
import torch

from tuner.data import grouping, sources
from tuner.data.datasets import ChunkDataset, Datasets
from tuner.data.sources import Opened, OpenSource
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_EVAL_CHUNKS = 200  # evaluation chunks (or SFT examples) when --max_eval_samples is not given


@dataclass
class Position:
    """Where an item (a chunk, or a packed row) starts: enough to restart the stream there without reading
    what came before."""

    chunk: int  # items before this one in the whole run
    epoch: int  # complete passes over the source before this one
    epoch_chunk: int  # text: chunks before this one in this pass; SFT: examples before its buffer (--max_train_samples)
    document: int  # text: row that holds the chunk's first token; SFT: first row of the buffer the row is packed from
    offset: int  # text: tokens of that row's [BOS] ids [EOS] that earlier chunks hold; SFT: rows of the buffer before it
    source: dict  # the source's state_dict() just before that row


# ---------------------------------------------------------------- one resumable stream


class ResumableStream(torch.utils.data.IterableDataset):
    """Items from `one_pass(start)`, pass after pass, remembering where each starts (see the module docstring).

    Subclasses give `one_pass(start) -> (item, Position after it)` and `as_tensors(item)`."""

    empty_problem = "the data has fewer tokens than one chunk"

    def __init__(self, source: OpenSource, name: str):
        self.source, self.name = source, name
        self.first = Position(chunk=0, epoch=0, epoch_chunk=0, document=0, offset=0, source=source.beginning)
        self.start = self.first
        # Where each item yielded but perhaps not yet trained on starts (the dataloader prefetches).
        self.starts: dict[int, Position] = {}

    def one_pass(self, start: Position) -> Iterator[tuple[object, Position]]:
        raise NotImplementedError

    def as_tensors(self, item) -> dict:
        raise NotImplementedError

    def resume(self, position: Position) -> None:
        self.start = position

    def position(self, chunk: int) -> Position:
        """Where item number `chunk` of the run starts (it must be one of the last ones yielded)."""
        if chunk not in self.starts:
            known = f"{min(self.starts)}..{max(self.starts)}" if self.starts else "none"
            raise RuntimeError(f"The stream does not know where item {chunk} starts (it knows {known}).")
        return self.starts[chunk]

    def forget_before(self, chunk: int) -> None:
        for old in [c for c in self.starts if c < chunk]:
            del self.starts[old]

    # What train.callbacks.DataPosition saves in a checkpoint and restores (a streamed mix offers the same).
    resume_problem = ("--streaming: the checkpoint has no stream position (it was written without --streaming). "
                      "Resume it without --streaming, or start in a new --output_dir.")  # fmt: skip

    @property
    def rows_read(self) -> int:
        """Items yielded so far (or, before the first, where the stream starts)."""
        return max(self.starts, default=self.start.chunk)

    def state_at(self, chunk: int) -> dict:
        return asdict(self.position(chunk))

    def load_state(self, saved: dict) -> None:
        if "chunk" not in saved:  # written by a mix of sources
            raise UsageError(self.resume_problem)
        self.resume(Position(**saved))
        logger.info(
            "Resuming the stream at item %d (pass %d, row %d, offset %d there), not from its start",
            saved["chunk"], saved["epoch"], saved["document"], saved["offset"],
        )  # fmt: skip

    def passes(self) -> Iterator[tuple[object, Position]]:
        """(item, where the next starts) from `self.start` on, pass after pass over the source."""
        start = self.start
        while True:
            after = None
            for item, after in self.one_pass(start):
                yield item, after
            if after is None and start.document == 0 and start.offset == 0 and start.epoch_chunk == 0:
                raise UsageError(f"--max_seq_length {self.max_seq_length}: {self.empty_problem}. {self.empty_fix}")
            chunk = after.chunk if after is not None else start.chunk
            start = replace(self.first, chunk=chunk, epoch=start.epoch + 1)

    empty_fix = "Lower --max_seq_length, or give more text."

    def __iter__(self) -> Iterator[dict]:
        self.starts = {self.start.chunk: self.start}
        for item, after in self.passes():
            self.starts[after.chunk] = after
            yield self.as_tensors(item)

    def check(self) -> None:
        """Read the first item now, so a bad file, column or row fails before the model loads."""
        first = self.passes()
        try:
            next(first)
        except UsageError as error:
            named = self.source.source.name
            raise UsageError([p if named in p else f"{p} ({self.name})" for p in error.problems]) from None
        except Exception as exc:  # datasets wraps parser errors in several exception types
            raise UsageError(
                f"{self.name}: could not be read as a stream ({sources.root_cause(exc)}). Fix the data, or check its format."
            ) from None
        finally:
            first.close()


# ---------------------------------------------------------------- running text -> chunks


def documents(source, column: str, start: Position, keep: Callable[[int], bool]) -> Iterator[tuple[Position, str]]:
    """(position of its first token, text) of each kept, non-empty row of one pass, from `start` on."""
    for row, state, example in sources.stream_records(source, start.source, start.document):
        if column not in example:
            raise UsageError(
                f"--text_column {column}: the stream has no such column; it has: {', '.join(example)}. "
                "Pass --text_column with one of those."
            )
        text = example[column]
        if text is not None and not isinstance(text, str):
            kind = type(text).__name__
            raise UsageError(f"--text_column {column}: this column holds {kind}, not text. Choose a column of strings.")
        if text and text.strip() and keep(row):
            yield replace(start, document=row, offset=0, source=state), text


def chunks(tokenizer, docs: Iterable[tuple[Position, str]], seq_len: int, start: Position):
    """(seq_len,) chunks of the documents' token stream, less its first `start.offset` tokens, each
    with the Position where the next chunk starts."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = (bos is not None) + (eos is not None)
    buffer = np.empty(0, dtype=grouping.TOKEN_DTYPE)
    # Token indices count from the first document's first token; buffer[0] is token `base`.
    base, appended = start.offset, 0
    marks: deque[tuple[int, Position]] = deque()  # (token index where a document starts, its position)
    chunk, epoch_chunk = start.chunk, start.epoch_chunk
    for batch in grouping.by_size(docs, grouping.BATCH_CHARS, size=lambda doc: len(doc[1])):
        ids = grouping.document_ids(tokenizer, [text for _, text in batch])
        flat = grouping.join_documents(ids, bos, eos)
        for (position, _), doc in zip(batch, ids):
            marks.append((appended, position))
            appended += len(doc) + extra
        buffer = np.concatenate([buffer, flat[max(0, base - (appended - len(flat))) :]])
        while len(buffer) >= seq_len:
            piece, buffer = buffer[:seq_len], buffer[seq_len:]
            base += seq_len
            while len(marks) > 1 and marks[1][0] <= base:
                marks.popleft()
            chunk, epoch_chunk = chunk + 1, epoch_chunk + 1
            at, position = marks[0]
            yield piece, replace(position, chunk=chunk, epoch_chunk=epoch_chunk, offset=base - at)


class TokenStream(ResumableStream):
    """Endless {'input_ids', 'labels'} chunks of shape (T,) from a datasets streaming source."""

    def __init__(self, source: OpenSource, tokenizer, column: str, seq_len: int, keep=None, max_chunks=None, name=None):
        """keep(row) -> bool picks the rows to read (default: all); max_chunks ends each pass early
        (--max_train_samples)."""
        super().__init__(source, name or source.source.name)
        self.tokenizer, self.column, self.max_seq_length = tokenizer, column, seq_len
        self.keep = keep or sources.everything
        self.max_chunks = max_chunks

    def one_pass(self, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
        docs = documents(self.source.rows, self.column, start, self.keep)
        for piece, after in chunks(self.tokenizer, docs, self.max_seq_length, start):
            if self.max_chunks is not None and after.epoch_chunk > self.max_chunks:
                return
            yield piece, after

    def as_tensors(self, piece: np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(piece.astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------- resume


# ---------------------------------------------------------------- datasets


def eval_chunks(stream: TokenStream, limit: int | None) -> np.ndarray:
    """The first `limit` chunks (DEFAULT_EVAL_CHUNKS if None) of one pass: (N, T) int32."""
    wanted = limit or DEFAULT_EVAL_CHUNKS
    stream.check()
    pieces = [piece for piece, _ in islice(stream.one_pass(stream.first), wanted + 1)]
    if len(pieces) > wanted and limit is None:
        logger.warning("Evaluating on the first %d chunks of %s only; --max_eval_samples sets how many", wanted, stream.name)
    return np.stack(pieces[:wanted])


def eval_source(opened: Opened) -> tuple[OpenSource, Callable[[int], bool], str] | None:
    """(source, keep-rule, name) of the evaluation rows: the validation source, else the held-out rows."""
    if opened.validation is not None:
        return opened.validation, sources.everything, opened.validation.source.name
    if opened.held_out_percent:
        name = f"the {opened.held_out_percent} % of {opened.train[0].source.name} held out"
        return opened.train[0], opened.hold_out.held_out, name
    return None


def build_text_stream(cfg, tokenizer, opened: Opened) -> Datasets:
    """A TokenStream to train on and a fixed evaluation set; reads only the first chunks now."""
    train_source = opened.train[0]
    train = TokenStream(
        train_source, tokenizer, cfg.text_column, cfg.max_seq_length, keep=opened.hold_out.training,
        max_chunks=cfg.max_train_samples,
    )  # fmt: skip
    train.check()
    val = None
    found = eval_source(opened)
    if found is not None:
        source, keep, name = found
        val = eval_chunks(TokenStream(source, tokenizer, cfg.text_column, cfg.max_seq_length, keep, name=name), cfg.max_eval_samples)
    logger.info(
        "Streaming %s in %d-token chunks; evaluating on %s", train.name, cfg.max_seq_length,
        f"{len(val)} chunks" if val is not None else "nothing",
    )  # fmt: skip
    return Datasets(
        train=train,
        eval=ChunkDataset(val) if val is not None else None,
        train_tokens=0,  # unknown until the stream is read
        eval_tokens=int(val.size) if val is not None else 0,
    )
