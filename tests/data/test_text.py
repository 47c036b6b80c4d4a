"""Loading, hold-out, and the token cache of running text in memory (tuner/data/text.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.config import parse_args
from tuner.data import build as data
from tuner.data import grouping, sources, text
from tuner.errors import UsageError


def cached_chunks(cfg, tokenizer):
    return text.cached_chunks(cfg, tokenizer, data.open_run_source(cfg, streaming=False))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def cfg_for(train_file: str, tmp_path, *extra: str):
    return parse_args(["--train_file", train_file, "--max_seq_length", "32", "--cache_dir", str(tmp_path / "tok"), *extra])


def test_split_of_a_single_document_is_refused(tmp_path, tokenizer):
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "one"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="only 1 row"):
        cached_chunks(cfg_for(str(path), tmp_path, "--validation_split_percentage", "99"), tokenizer)


def test_txt_files_are_split_into_paragraph_documents(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first para\nstill first\n\nsecond para\n\n\nthird\n", encoding="utf-8")
    source = sources.OpenSource(sources.Source("--train_file", str(path)), sources.load_local("--train_file", str(path)))
    texts = text.non_empty(text.texts_of(source, "text"))
    assert [t.strip() for t in texts] == ["first para\nstill first", "second para", "third"]


def test_held_out_documents_follow_the_hold_out_rule(write_corpus, tmp_path, tokenizer, corpus_docs):
    cfg = cfg_for(write_corpus("jsonl"), tmp_path, "--validation_split_percentage", "10", "--seed", "3")
    chunks = cached_chunks(cfg, tokenizer)
    held = sources.HoldOut(10, 3).mask(len(corpus_docs))
    expected = grouping.tokenize_and_group(tokenizer, [d for d, h in zip(corpus_docs, held) if h], 32)
    np.testing.assert_array_equal(np.asarray(chunks["validation"]), expected)
    assert 7 <= held.sum() <= 8  # exactly 1 in each whole stratum of 10 rows: 7, and 0 or 1 of the last 9


def test_chunks_hold_the_whole_corpus_with_bos_and_eos(write_corpus, tmp_path, tokenizer, corpus_docs):
    cfg = cfg_for(write_corpus("jsonl"), tmp_path, "--validation_split_percentage", "0")
    chunks = cached_chunks(cfg, tokenizer)["train"]
    expected = grouping.tokenize_stream(tokenizer, corpus_docs)
    assert chunks.shape == (len(expected) // 32, 32)
    assert np.array_equal(np.asarray(chunks).reshape(-1), expected[: chunks.size])
    assert chunks[0, 0] == tokenizer.bos_token_id
    assert (np.asarray(chunks) == tokenizer.eos_token_id).sum() >= len(corpus_docs) - 1


def test_unicode_text_round_trips(tmp_path, tokenizer):
    docs = ["naïve café — 日本語のテキスト 🎉 " * 20, "Ωmega ∑ λ → ∞ " * 20]
    path = tmp_path / "u.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = cfg_for(str(path), tmp_path, "--validation_split_percentage", "0")
    flat = np.asarray(cached_chunks(cfg, tokenizer)["train"]).reshape(-1)
    decoded = tokenizer.decode(flat.tolist(), skip_special_tokens=True)
    assert "日本語のテキスト 🎉" in decoded and "Ωmega ∑ λ → ∞" in decoded
    # Only the final remainder is dropped, and the cut may split a character: compare before it.
    assert (docs[0] + docs[1]).startswith(decoded[:-4])


def test_cache_is_reused_and_rebuilt_when_inputs_change(write_corpus, tmp_path, tokenizer, monkeypatch, corpus_docs):
    calls = []
    real = grouping.tokenize_documents
    monkeypatch.setattr(grouping, "tokenize_documents", lambda tok, texts, threads=None: calls.append(len(texts)) or real(tok, texts, threads))
    path = write_corpus("jsonl")
    cached_chunks(cfg_for(path, tmp_path), tokenizer)
    assert len(calls) == 2  # train and validation
    cached_chunks(cfg_for(path, tmp_path), tokenizer)
    assert len(calls) == 2, "a second run with the same inputs must not tokenize again"
    cached_chunks(cfg_for(path, tmp_path, "--max_seq_length", "48"), tokenizer)
    assert len(calls) == 4, "a new --max_seq_length rebuilds"
    write_corpus("jsonl", corpus_docs[:70])
    cached_chunks(cfg_for(path, tmp_path), tokenizer)
    assert len(calls) == 6, "changed data rebuilds"


def test_waiting_ranks_reuse_the_main_process_cache(write_corpus, tmp_path, tokenizer, monkeypatch):
    cfg = cfg_for(write_corpus("jsonl"), tmp_path)
    built = cached_chunks(cfg, tokenizer)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(grouping, "tokenize_documents", lambda *a: pytest.fail("a non-main rank tokenized"))
    again = cached_chunks(cfg, tokenizer)
    assert np.array_equal(np.asarray(again["train"]), np.asarray(built["train"]))


def test_a_failure_on_the_main_process_reaches_waiting_ranks(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "tiny"}\n', encoding="utf-8")
    cfg = cfg_for(str(path), tmp_path, "--validation_split_percentage", "0")
    with pytest.raises(UsageError, match="fewer than one chunk"):
        cached_chunks(cfg, tokenizer)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match="fewer than one chunk"):
        cached_chunks(cfg, tokenizer)


def test_max_samples_limit_the_chunks(write_corpus, tmp_path, tokenizer):
    cfg = cfg_for(write_corpus("jsonl"), tmp_path, "--max_train_samples", "5", "--max_eval_samples", "2")
    sets = data.build_datasets(cfg, tokenizer)
    assert len(sets.train) == 5 and len(sets.eval) == 2
    item = sets.train[0]
    assert item["input_ids"].shape == (32,) and item["labels"].tolist() == item["input_ids"].tolist()
