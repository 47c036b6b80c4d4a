"""--streaming: read hub or local text as a stream, tokenizing and chunking it on the fly.

Training data is a `TokenStream`, a torch IterableDataset of (T,) chunks cut with grouping.py's
policy: each document becomes [BOS] ids [EOS], documents are concatenated in order, and the
running stream is cut into chunks of exactly --max_seq_length tokens; the tokens left over from
one tokenizer batch carry into the next. When the source ends the stream starts it again (the
next pass), dropping only that pass's final remainder, so it never runs dry: Trainer stops at
--max_steps. Documents are read in the source's order; nothing is shuffled.

Resume. For a dataset without a length, Trainer resumes by reading and throwing away the first
global_step x gradient_accumulation_steps batches (accelerate's skip_first_batches), which for a
stream means reading and tokenizing everything again. Instead `StreamPosition` writes, into each
checkpoint's trainer_state.json, where the first chunk that no optimizer step has used starts: the
source's datasets `state_dict()` just before that chunk's document, and how many of the document's
tokens earlier chunks hold. A resumed stream loads that state and starts there; the run sets
`ignore_data_skip=True` so that Trainer does not skip batches as well. Chunks the dataloader has
prefetched but no step has used are not counted: the stream remembers where each chunk it yielded
starts, and the callback looks up chunk number steps x gradient_accumulation_steps x
per_device_train_batch_size x world_size.

Several processes: accelerate wraps an IterableDataset in a DataLoaderDispatcher, so only process 0
reads the stream; it sends every process its slice of each batch. (With dispatch_batches=False each
process would read the whole stream and keep its slice.) Either way the run has one position, that
of process 0, which is also the process that writes trainer_state.json.

Evaluation uses a fixed set held in memory: the first --max_eval_samples chunks (DEFAULT_EVAL_CHUNKS
without it) of --validation_file, else of the hub dataset's validation split, else of the documents
held out of the training stream (--validation_split_percentage % of them, spread evenly).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import grouping
from .data import ChunkDataset, Datasets, load_hub, load_local, root_cause
from .errors import UsageError

logger = logging.getLogger(__name__)

# Characters of text per tokenizer call: enough that per-call overhead vanishes, few enough that the
# first chunk comes quickly and the read-ahead stays small (a few MB of tokens).
TOKENIZE_CHARS = 1 << 20
DEFAULT_EVAL_CHUNKS = 200  # evaluation chunks when --max_eval_samples is not given


@dataclass
class Position:
    """Where a chunk starts: enough to restart the stream there without reading what came before."""

    chunk: int  # chunks before this one in the whole run
    epoch: int  # complete passes over the source before this one
    epoch_chunk: int  # chunks before this one in this pass (for --max_train_samples)
    document: int  # row of the source that holds the chunk's first token
    offset: int  # tokens of that row's [BOS] ids [EOS] that earlier chunks hold
    source: dict  # the source's state_dict() just before that row


# ---------------------------------------------------------------- documents -> chunks


def is_training_row(row: int, held_out_percent: int) -> bool:
    """False for `held_out_percent` % of rows, spread evenly: rows 19, 39, 59, ... for 5 %."""
    return (row + 1) * held_out_percent // 100 == row * held_out_percent // 100


def is_held_out_row(row: int, held_out_percent: int) -> bool:
    return not is_training_row(row, held_out_percent)


def documents(source, column: str, start: Position, keep: Callable[[int], bool]) -> Iterator[tuple[Position, str]]:
    """(position of its first token, text) of each kept, non-empty row of one pass, from `start` on."""
    source.load_state_dict(start.source)
    state, row = start.source, start.document
    for example in source:
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
        row += 1
        state = source.state_dict()


def batched_by_size(docs: Iterable[tuple[Position, str]], max_chars: int) -> Iterator[list[tuple[Position, str]]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
    for batch in batched_by_size(docs, TOKENIZE_CHARS):
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


# ---------------------------------------------------------------- the training stream


class TokenStream(torch.utils.data.IterableDataset):
    """Endless {'input_ids', 'labels'} chunks of shape (T,) from a datasets streaming source."""

    def __init__(self, source, tokenizer, column: str, seq_len: int, keep=None, max_chunks=None, beginning=None):
        """keep(row) -> bool picks the rows to read; max_chunks ends each pass early
        (--max_train_samples); beginning is the source's state_dict() before its first row, by default
        its state now (so a source that has been iterated needs it)."""
        self.source, self.tokenizer, self.column, self.seq_len = source, tokenizer, column, seq_len
        self.keep = keep or partial(is_training_row, held_out_percent=0)
        self.max_chunks = max_chunks  # per pass: --max_train_samples
        beginning = source.state_dict() if beginning is None else beginning
        self.first = Position(chunk=0, epoch=0, epoch_chunk=0, document=0, offset=0, source=beginning)
        self.start = self.first
        # Where each chunk yielded but perhaps not yet trained on starts (the dataloader prefetches).
        self.starts: dict[int, Position] = {}

    def resume(self, position: Position) -> None:
        self.start = position

    def position(self, chunk: int) -> Position:
        """Where chunk number `chunk` of the run starts (it must be one of the last ones yielded)."""
        if chunk not in self.starts:
            known = f"{min(self.starts)}..{max(self.starts)}" if self.starts else "none"
            raise RuntimeError(f"The stream does not know where chunk {chunk} starts (it knows {known}).")
        return self.starts[chunk]

    def forget_before(self, chunk: int) -> None:
        for old in [c for c in self.starts if c < chunk]:
            del self.starts[old]

    def one_pass(self, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
        docs = documents(self.source, self.column, start, self.keep)
        for piece, after in chunks(self.tokenizer, docs, self.seq_len, start):
            if self.max_chunks is not None and after.epoch_chunk > self.max_chunks:
                return
            yield piece, after

    def passes(self) -> Iterator[tuple[np.ndarray, Position]]:
        """(chunk, where the next starts) from `self.start` on, pass after pass over the source."""
        start = self.start
        while True:
            after = None
            for piece, after in self.one_pass(start):
                yield piece, after
            if after is None and start.document == 0 and start.offset == 0:
                raise UsageError(
                    f"--max_seq_length {self.seq_len}: the data has fewer tokens than one chunk. "
                    "Lower --max_seq_length, or give more text."
                )
            chunk = after.chunk if after is not None else start.chunk
            start = replace(self.first, chunk=chunk, epoch=start.epoch + 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.starts = {self.start.chunk: self.start}
        for piece, after in self.passes():
            self.starts[after.chunk] = after
            ids = torch.from_numpy(piece.astype(np.int64))
            yield {"input_ids": ids, "labels": ids.clone()}

    def check(self, name: str) -> None:
        """Read the first chunk now, so a bad file or column fails before the model loads."""
        first = self.passes()
        try:
            next(first)
        except UsageError as error:
            raise UsageError([f"{problem} ({name})" for problem in error.problems]) from None
        except Exception as exc:  # datasets wraps parser errors in several exception types
            raise UsageError(
                f"{name}: could not be read as a stream ({root_cause(exc)}). Fix the data, or check its format."
            ) from None
        finally:
            first.close()


class StreamPosition(TrainerCallback, ExportableState):
    """Saves where the TokenStream stands in each checkpoint; a resumed run's stream starts there."""

    def __init__(self):
        self.stream: TokenStream | None = None
        self.consumed = 0  # chunks used by optimizer steps, in the whole run
        self.start_step = self.start_chunk = self.chunks_per_step = 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.stream = find_stream(train_dataloader)
        if args.dataloader_num_workers:
            raise RuntimeError("--streaming tracks its position in the main process: use dataloader_num_workers=0.")
        if state.global_step:
            if not args.ignore_data_skip:
                raise RuntimeError("--streaming restores the stream position itself: set ignore_data_skip=True.")
            saved = (state.stateful_callbacks.get(type(self).__name__) or {}).get("attributes", {}).get("position")
            if saved is None:
                raise UsageError(
                    "--streaming: the checkpoint has no stream position (it was written without --streaming). "
                    "Resume it without --streaming, or start in a new --output_dir."
                )
            self.stream.resume(Position(**saved))
            logger.info(
                "Resuming the stream at chunk %d (pass %d, row %d, token %d of that row), not from its start",
                saved["chunk"], saved["epoch"], saved["document"], saved["offset"],
            )  # fmt: skip
        self.start_step, self.start_chunk = state.global_step, self.stream.start.chunk
        self.consumed = self.start_chunk
        # Dispatched or sharded, each optimizer step takes this many chunks from the one stream.
        self.chunks_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_step_end(self, args, state, control, **kwargs):
        self.consumed = self.start_chunk + (state.global_step - self.start_step) * self.chunks_per_step
        self.stream.forget_before(self.consumed)

    def state(self) -> dict:
        position = asdict(self.stream.position(self.consumed)) if self.stream is not None else None
        return {"args": {}, "attributes": {"position": position}}


def find_stream(dataloader) -> TokenStream:
    """The TokenStream under accelerate's wrappers (DataLoaderDispatcher, IterableDatasetShard)."""
    node = dataloader
    for _ in range(4):
        node = getattr(node, "dataset", None)
        if isinstance(node, TokenStream):
            return node
    raise RuntimeError("StreamPosition needs a TokenStream as the training dataset (see tuner/streaming.py).")


# ---------------------------------------------------------------- sources and datasets


def open_sources(cfg) -> tuple:
    """(train source, its name, validation source or None, its name); names are for messages."""
    if cfg.train_file:
        train, validation = load_local("--train_file", cfg.train_file, streaming=True), None
        train_name = f"--train_file {cfg.train_file}"
    else:
        splits = load_hub(cfg, streaming=True)
        train, train_name, validation = splits["train"], f"--dataset_name {cfg.dataset_name}", splits["validation"]
    validation_name = f"the validation split of {train_name}"
    if cfg.validation_file:  # given, it wins over a hub validation split
        validation = load_local("--validation_file", cfg.validation_file, streaming=True)
        validation_name = f"--validation_file {cfg.validation_file}"
    return train, train_name, validation, validation_name


def eval_chunks(stream: TokenStream, limit: int | None, name: str) -> np.ndarray:
    """The first `limit` chunks (DEFAULT_EVAL_CHUNKS if None) of one pass: (N, T) int32."""
    wanted = limit or DEFAULT_EVAL_CHUNKS
    stream.check(name)
    pieces = [piece for piece, _ in islice(stream.one_pass(stream.first), wanted + 1)]
    if len(pieces) > wanted and limit is None:
        logger.warning("Evaluating on the first %d chunks of %s only; --max_eval_samples sets how many", wanted, name)
    return np.stack(pieces[:wanted])


def build_streaming_datasets(cfg, tokenizer) -> Datasets:
    """A TokenStream to train on and a fixed evaluation set; reads only the first chunks now."""
    train_source, train_name, val_source, val_name = open_sources(cfg)
    held_out = cfg.validation_split_percentage if val_source is None else 0
    train = TokenStream(
        train_source, tokenizer, cfg.text_column, cfg.max_seq_length,
        keep=partial(is_training_row, held_out_percent=held_out), max_chunks=cfg.max_train_samples,
    )  # fmt: skip
    train.check(train_name)
    val = None
    if val_source is not None:
        stream = TokenStream(val_source, tokenizer, cfg.text_column, cfg.max_seq_length)
        val = eval_chunks(stream, cfg.max_eval_samples, val_name)
    elif held_out:
        keep = partial(is_held_out_row, held_out_percent=held_out)
        stream = TokenStream(
            train_source, tokenizer, cfg.text_column, cfg.max_seq_length, keep, beginning=train.first.source
        )  # the training stream has read its first chunk: its source's state now is no longer its beginning
        val = eval_chunks(stream, cfg.max_eval_samples, f"the {held_out} % of {train_name} held out")
    logger.info(
        "Streaming %s in %d-token chunks; evaluating on %s", train_name, cfg.max_seq_length,
        f"{len(val)} chunks" if val is not None else "nothing",
    )  # fmt: skip
    return Datasets(
        train=train,
        eval=ChunkDataset(val) if val is not None else None,
        train_tokens=0,  # unknown until the stream is read
        eval_tokens=int(val.size) if val is not None else 0,
    )
