"""tokenize_and_group must equal a plain pure-Python reference, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import tiny

from tuner.data import grouping

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "",  # an empty document still contributes its BOS and EOS
    "naïve café — 日本語のテキスト 🤖 emoji, Ελληνικά, עברית",
    "x",
    "class Stack:\n    def __init__(self):\n        self.items = []\n" * 3,
    "   leading spaces and trailing   ",
]


def build_tokenizer(bos: str | None = "<bos>", eos: str | None = "<eos>"):
    return tiny.build_tokenizer(DOCS * 5, vocab=300, bos=bos, eos=eos)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def reference_stream(tokenizer, texts) -> list[int]:
    """The policy written as plainly as possible: [BOS] ids [EOS] per document, concatenated."""
    stream = []
    for text in texts:
        if tokenizer.bos_token_id is not None:
            stream.append(tokenizer.bos_token_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    return stream


def reference_chunks(tokenizer, texts, seq_len) -> list[list[int]]:
    stream = reference_stream(tokenizer, texts)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
@pytest.mark.parametrize("num_threads", [1, 3])
def test_chunks_equal_the_reference(tokenizer, seq_len, num_threads, monkeypatch):
    monkeypatch.setattr(grouping, "BATCH_CHARS", 40)  # many small batches, finishing out of order
    texts = DOCS * 4
    chunks = grouping.tokenize_and_group(tokenizer, texts, seq_len, num_threads=num_threads)
    expected = reference_chunks(tokenizer, texts, seq_len)
    assert chunks.dtype == np.int32
    assert chunks.shape == (len(expected), seq_len)
    assert chunks.tolist() == expected


def test_only_the_final_remainder_is_dropped(tokenizer):
    stream = reference_stream(tokenizer, DOCS)
    seq_len = 10
    assert len(stream) % seq_len, "the test needs a remainder"
    chunks = grouping.tokenize_and_group(tokenizer, DOCS, seq_len)
    assert chunks.size == len(stream) - len(stream) % seq_len
    assert chunks.ravel().tolist() == stream[: chunks.size]


def test_bos_opens_and_eos_closes_every_document(tokenizer):
    stream = grouping.tokenize_stream(tokenizer, DOCS).tolist()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    position = 0
    for text in DOCS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert stream[position : position + len(ids) + 2] == [bos, *ids, eos]
        position += len(ids) + 2
    assert position == len(stream)


def test_unicode_round_trips(tokenizer):
    text = DOCS[2]
    stream = grouping.tokenize_stream(tokenizer, [text])
    assert tokenizer.decode(stream[1:-1].tolist()) == text


def test_no_documents_give_no_chunks(tokenizer):
    assert grouping.tokenize_stream(tokenizer, []).shape == (0,)
    chunks = grouping.tokenize_and_group(tokenizer, [], 8)
    assert chunks.shape == (0, 8) and chunks.dtype == np.int32


def test_one_document_shorter_than_a_chunk_gives_no_chunks(tokenizer):
    assert grouping.tokenize_and_group(tokenizer, ["x"], 16).shape == (0, 16)


@pytest.mark.parametrize("bos, eos", [(None, "<eos>"), ("<bos>", None), (None, None)])
def test_missing_markers_are_left_out(bos, eos):
    tokenizer = build_tokenizer(bos=bos, eos=eos)
    assert tokenizer.bos_token_id is None if bos is None else tokenizer.bos_token_id is not None
    chunks = grouping.tokenize_and_group(tokenizer, DOCS, 5)
    assert chunks.tolist() == reference_chunks(tokenizer, DOCS, 5)


def test_a_tokenizer_without_a_rust_backend_gives_the_same_stream(tokenizer):
    class PythonOnly:  # what the fallback needs: __call__ and the marker ids
        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def __call__(self, texts, add_special_tokens):
            return tokenizer(texts, add_special_tokens=add_special_tokens)

    stream = grouping.tokenize_stream(PythonOnly(), DOCS)
    assert stream.tolist() == reference_stream(tokenizer, DOCS)


def test_text_batches_keep_order_and_cover_everything():
    texts = ["a" * n for n in (5, 1, 30, 2, 2, 2, 50)]
    batches = list(grouping.text_batches(texts, max_chars=10))
    assert [t for batch in batches for t in batch] == texts
    assert all(sum(map(len, batch[:-1])) < 10 for batch in batches)


def test_chunk_rejects_a_non_positive_length():
    with pytest.raises(ValueError, match="seq_len"):
        grouping.chunk(np.arange(10, dtype=np.int32), 0)
