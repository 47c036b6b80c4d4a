"""Tokenize documents and cut the token stream into fixed-length chunks.

Policy: each document becomes [BOS] + tokens + [EOS], documents are concatenated in order, and the
stream is split into chunks of exactly `seq_len` tokens; only the final remainder of the whole
split is dropped (not one remainder per map batch, as `run_clm.py`'s group_texts does).
"""

from __future__ import annotations

import numpy as np

TOKEN_DTYPE = np.int32


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens; we add BOS/EOS ourselves."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The Rust tokenizer encodes the batch on all cores; skipping offsets makes it faster.
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def stream_with_separators(docs: list[list[int]], bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """One flat array: [BOS] doc0 [EOS] [BOS] doc1 [EOS] ...; shape (total_tokens,)."""
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    extra = len(head) + len(tail)
    out = np.empty(int(lengths.sum()) + extra * len(docs), dtype=TOKEN_DTYPE)
    pos = 0
    for doc in docs:
        if head:
            out[pos] = head[0]
            pos += 1
        n = len(doc)
        out[pos : pos + n] = doc
        pos += n
        if tail:
            out[pos] = tail[0]
            pos += 1
    return out


def chunk(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(total_tokens,) -> (n_chunks, seq_len), dropping only the final remainder."""
    n_chunks = len(stream) // seq_len
    return stream[: n_chunks * seq_len].reshape(n_chunks, seq_len)


def tokenize_stream(tokenizer, texts: list[str], batch_size: int = 1000) -> np.ndarray:
    """All texts as one separated token stream, encoded in batches to bound memory."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts = [
        stream_with_separators(document_ids(tokenizer, texts[i : i + batch_size]), bos, eos)
        for i in range(0, len(texts), batch_size)
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)


def tokenize_and_group(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Texts -> (n_chunks, seq_len) int32 token ids."""
    return chunk(tokenize_stream(tokenizer, texts), seq_len)
