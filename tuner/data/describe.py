"""What each training example is, for influence/examples.jsonl: `{example_id, source, rows, text}`.

The example ids are the ones the influence scorer sees (tuner/influence_run.py): a running-text chunk's
index in the training chunks, a chat/instruction example's index in the training examples (packed rows
carry it per token, padded rows are one example each). `rows` are 0-based row indices in the source
(the file, or the hub split), empty rows counted, as the hold-out rule counts them: for a chunk, every
document it holds a token of; for a chat example, its row. `text` is the example's first
PREVIEW_CHARS characters, decoded from its first tokens without special tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

PREVIEW_CHARS = 200
PREVIEW_TOKENS = 100  # decoded per example; more than 200 characters of text or code in practice
BATCH = 1024  # examples decoded per batch_decode call


def preview_texts(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    texts = tokenizer.batch_decode([list(map(int, ids[:PREVIEW_TOKENS])) for ids in token_lists], skip_special_tokens=True)
    return [text[:PREVIEW_CHARS] for text in texts]


def chunk_rows(n_chunks: int, seq_len: int, doc_starts: np.ndarray, doc_rows: np.ndarray) -> list[list[int]]:
    """For each chunk (tokens [c T, (c + 1) T) of the split's token stream), the source rows of the documents it
    overlaps. doc_starts: (D,) the token where each document's [BOS] ids [EOS] starts, ascending; doc_rows: (D,)."""
    begins = np.arange(n_chunks, dtype=np.int64) * seq_len
    first = np.searchsorted(doc_starts, begins, side="right") - 1
    last = np.searchsorted(doc_starts, begins + seq_len - 1, side="right") - 1
    return [doc_rows[f : end + 1].tolist() for f, end in zip(first, last)]


def text_chunks(chunks: np.ndarray, doc_starts: np.ndarray, doc_rows: np.ndarray, tokenizer, source: str,
                offset: int = 0) -> Iterator[dict]:  # fmt: skip
    """Descriptions of (N, T) training chunks; ids start at `offset` (a mix numbers its sources one after another)."""
    rows = chunk_rows(len(chunks), chunks.shape[1], doc_starts, doc_rows)
    for start in range(0, len(chunks), BATCH):
        texts = preview_texts(tokenizer, chunks[start : start + BATCH])
        for k, text in enumerate(texts):
            index = start + k
            yield {"example_id": offset + index, "source": source, "rows": rows[index], "text": text}


def examples(input_ids: Sequence[np.ndarray], rows: Sequence[int], tokenizer, source: str, offset: int = 0) -> Iterator[dict]:
    """Descriptions of chat/instruction examples, one source row each."""
    for start in range(0, len(input_ids), BATCH):
        texts = preview_texts(tokenizer, input_ids[start : start + BATCH])
        for k, text in enumerate(texts):
            index = start + k
            yield {"example_id": offset + index, "source": source, "rows": [int(rows[index])], "text": text}
