"""--streaming: the stream cuts the chunks grouping.py cuts, and a resumed run continues the stream
where its checkpoint left it, without reading what came before."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import main as entry
from tuner.config import parse_args
from tuner.data import build as data
from tuner.data import grouping, sources, text
from tuner.data import stream as streaming
from tuner.errors import UsageError
from tuner.train import trainer as training
from tuner.train.callbacks import DataPosition

T = 64  # tokens per chunk in these tests
EDGE_DOCS = ["", "   ", "x", "naïve café — 日本語のテキスト 🤖", "def f():\n    return 1\n"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def paragraphs(corpus_docs) -> list[str]:
    """~2600 short documents, so that a chunk in the middle of a run lies many documents in."""
    return [p for doc in corpus_docs for p in doc.split("\n\n") if p.strip()]


def opened(path: str, streaming: bool = True) -> sources.OpenSource:
    return sources.OpenSource(sources.Source("--train_file", path), sources.load_local("--train_file", path, streaming))


def stream_of(path: str, tokenizer, **kwargs) -> streaming.TokenStream:
    return streaming.TokenStream(opened(path), tokenizer, "text", T, **kwargs)


def expected_chunks(path: str, tokenizer) -> np.ndarray:
    """What the non-streaming path trains on: data.py's documents, grouped by grouping.py."""
    return grouping.tokenize_and_group(tokenizer, text.non_empty(text.texts_of(opened(path, streaming=False), "text")), T)


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_stream_cuts_the_chunks_grouping_cuts_then_starts_over(tokenizer, write_corpus, corpus_docs, monkeypatch, fmt):
    monkeypatch.setattr(grouping, "BATCH_CHARS", 3000)  # many tokenizer batches: tokens carry over between them
    path = write_corpus(fmt, EDGE_DOCS + corpus_docs[:20])
    expected = expected_chunks(path, tokenizer)
    got = [piece for piece, _ in islice(stream_of(path, tokenizer).passes(), len(expected) + 2)]
    np.testing.assert_array_equal(np.stack(got[: len(expected)]), expected)
    # The second pass starts from the first document again, as a second epoch would.
    np.testing.assert_array_equal(np.stack(got[len(expected) :]), expected[:2])


def test_a_saved_position_restarts_the_stream_exactly_there(tokenizer, write_corpus, paragraphs, monkeypatch):
    monkeypatch.setattr(grouping, "BATCH_CHARS", 2000)
    path = write_corpus("jsonl", paragraphs[:300])
    stream = stream_of(path, tokenizer, max_chunks=40)  # --max_train_samples 40: each pass is 40 chunks
    run = list(islice(stream.passes(), 90))
    pieces = np.stack([piece for piece, _ in run])
    np.testing.assert_array_equal(pieces[40:80], pieces[:40])
    for chunk in (1, 2, 17, 39, 40, 41, 85):  # mid-document, at the end of a pass, in the next pass
        saved = json.loads(json.dumps(asdict(run[chunk - 1][1])))  # as trainer_state.json holds it
        assert saved["chunk"] == chunk
        resumed = stream_of(path, tokenizer, max_chunks=40)
        resumed.resume(streaming.Position(**saved))
        again = [piece for piece, _ in islice(resumed.passes(), 3)]
        np.testing.assert_array_equal(np.stack(again), pieces[chunk : chunk + 3], err_msg=f"chunk {chunk}")


def cfg_for(path: str, *extra: str):
    return parse_args(["--train_file", path, "--max_seq_length", str(T), "--streaming", "--max_steps", "1", *extra])


def test_held_out_documents_are_evaluated_and_not_trained_on(tokenizer, write_corpus, paragraphs):
    docs = paragraphs[:400]
    path = write_corpus("jsonl", docs)
    cfg = cfg_for(path, "--validation_split_percentage", "10", "--max_eval_samples", "5")
    sets = data.build_datasets(cfg, tokenizer)
    hold_out = sources.HoldOut(10, cfg.seed)
    train_docs = [d for row, d in enumerate(docs) if hold_out.training(row)]
    held_docs = [d for row, d in enumerate(docs) if hold_out.held_out(row)]
    assert len(held_docs) == 40
    train = grouping.tokenize_and_group(tokenizer, train_docs, T)
    got = [piece for piece, _ in islice(sets.train.passes(), len(train))]
    np.testing.assert_array_equal(np.stack(got), train)
    np.testing.assert_array_equal(sets.eval.chunks, grouping.tokenize_and_group(tokenizer, held_docs, T)[:5])


def test_streamed_and_in_memory_runs_evaluate_on_the_same_chunks(tokenizer, write_corpus, paragraphs, tmp_path):
    """One hold-out rule: the in-memory run's held-out documents are the stream's, in the same order."""
    path = write_corpus("jsonl", ["", "  "] + paragraphs[:300])  # empty rows count as rows in both
    flags = ["--validation_split_percentage", "5", "--max_eval_samples", "6", "--seed", "7"]
    streamed = data.build_datasets(cfg_for(path, *flags), tokenizer)
    in_memory = data.build_datasets(cfg_for(path, *flags, "--streaming", "false", "--cache_dir", str(tmp_path)), tokenizer)
    np.testing.assert_array_equal(streamed.eval.chunks, np.asarray(in_memory.eval.chunks))
    np.testing.assert_array_equal(np.stack([p for p, _ in islice(streamed.train.passes(), 20)]), in_memory.train.chunks[:20])


def test_bad_column_and_too_little_text_fail_before_the_model_loads(tokenizer, write_corpus):
    with pytest.raises(UsageError, match="--text_column body: the stream has no such column; it has: text"):
        data.build_datasets(cfg_for(write_corpus("jsonl"), "--text_column", "body"), tokenizer)
    with pytest.raises(UsageError, match="--max_seq_length 64: the data has fewer tokens than one chunk"):
        data.build_datasets(cfg_for(write_corpus("jsonl", ["tiny"], name="short"), "--validation_split_percentage", "0"), tokenizer)


def test_resuming_a_checkpoint_without_a_stream_position_is_refused(tokenizer, write_corpus):
    stream = stream_of(write_corpus("jsonl"), tokenizer)
    args = SimpleNamespace(dataloader_num_workers=0, ignore_data_skip=True, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, world_size=1)
    state = SimpleNamespace(global_step=3, stateful_callbacks={})
    loader = SimpleNamespace(dataset=stream)
    with pytest.raises(UsageError, match="the checkpoint has no stream position"):
        DataPosition().on_train_begin(args, state, None, train_dataloader=loader)


# ---------------------------------------------------------------- end to end


def tiny_args(model: str, train_file: str, validation_file: str, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--train_file", train_file, "--validation_file", validation_file,
        "--output_dir", str(out), "--streaming", "--max_seq_length", str(T), "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "6",
        "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "0", "--report_to", "none", "--max_eval_samples", "8", "--max_new_tokens", "3",
        "--eval_before_training", "false", *extra,
    ]  # fmt: skip


def run_main(argv: list[str]) -> dict:
    return entry.main(argv)


class Crash(Exception):
    pass


def record_training(monkeypatch, crash_after_step: int | None = None) -> SimpleNamespace:
    """Records each training micro-batch's input_ids and, from the start of a training pass over the
    stream, the rows it reads; optionally crashes once that step is done (a pre-empted machine)."""
    seen = SimpleNamespace(batches=[], rows=[], rows_before_first_chunk=None)
    compute_loss, documents = training.LeanLossTrainer.compute_loss, streaming.documents
    iterate = streaming.TokenStream.__iter__

    def recording_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            if crash_after_step is not None and self.state.global_step == crash_after_step:
                raise Crash(f"after step {crash_after_step}")
            seen.batches.append(inputs["input_ids"].clone())
        return compute_loss(self, model, inputs, *args, **kwargs)

    def counted(*args, **kwargs):
        for position, doc in documents(*args, **kwargs):
            seen.rows.append(position.document)
            yield position, doc

    def watched(self):
        seen.rows.clear()
        for item in iterate(self):
            if seen.rows_before_first_chunk is None:
                seen.rows_before_first_chunk = list(seen.rows)
            yield item

    monkeypatch.setattr(training.LeanLossTrainer, "compute_loss", recording_loss)
    monkeypatch.setattr(streaming, "documents", counted)
    monkeypatch.setattr(streaming.TokenStream, "__iter__", watched)
    return seen


def rows_holding(tokenizer, docs: list[str], first_token: int, last_token: int) -> list[int]:
    """Rows whose [BOS] ids [EOS] overlap tokens first_token..last_token of the stream."""
    lengths = np.array([len(ids) + 2 for ids in grouping.document_ids(tokenizer, docs)])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [row for row, (s, e) in enumerate(zip(starts, ends)) if s <= last_token and e > first_token]


def test_streamed_run_resumes_from_the_stream_position_of_its_checkpoint(
    tiny_model, write_corpus, paragraphs, tokenizer, tmp_path, monkeypatch
):
    docs = paragraphs[:600]
    train_file, val_file = write_corpus("jsonl", docs), write_corpus("jsonl", paragraphs[600:700], name="val")
    expected = grouping.tokenize_and_group(tokenizer, docs, T)
    with monkeypatch.context() as patch:
        straight_seen = record_training(patch)
        straight = run_main(tiny_args(tiny_model, train_file, val_file, tmp_path / "straight"))
    # 6 steps x 2 micro-batches x 2 chunks: the stream in order, from its first chunk.
    np.testing.assert_array_equal(torch.cat(straight_seen.batches).numpy(), expected[:24])
    assert math.isfinite(straight["eval"]["eval_loss"])

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        record_training(patch, crash_after_step=4)
        with pytest.raises(Crash):
            run_main(tiny_args(tiny_model, train_file, val_file, out))
    # The checkpoint holds the position of what 3 steps used (12 chunks), not of what was prefetched.
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["DataPosition"]["attributes"]["position"]["chunk"] == 12

    monkeypatch.setattr(grouping, "BATCH_CHARS", 1)  # one document per tokenizer call, to count rows read
    seen = record_training(monkeypatch)
    resumed = run_main(tiny_args(tiny_model, train_file, val_file, out))
    np.testing.assert_array_equal(seen.batches[0].numpy(), expected[12:14], "first batch: the chunks after step 3's")
    np.testing.assert_array_equal(torch.cat(seen.batches).numpy(), expected[12:24])
    # Before its first chunk the resumed stream read only the rows that chunk is cut from, not rows 0, 1, ...
    assert seen.rows_before_first_chunk == rows_holding(tokenizer, docs, 12 * T, 13 * T - 1)
    assert seen.rows_before_first_chunk[0] > 5
    assert resumed["eval"]["eval_loss"] == pytest.approx(straight["eval"]["eval_loss"], rel=1e-4)


def test_streaming_onto_a_non_streamed_checkpoint_exits_2(tiny_model, write_corpus, tmp_path, capsys):
    train_file, out = write_corpus("jsonl"), tmp_path / "out"
    plain = [a for a in tiny_args(tiny_model, train_file, write_corpus("csv", name="val"), out) if a != "--streaming"]
    entry.main(plain[: plain.index("--max_steps")] + ["--max_steps", "3"] + plain[plain.index("--max_steps") + 2 :])
    with pytest.raises(SystemExit) as exit_info:
        entry.main(tiny_args(tiny_model, train_file, write_corpus("csv", name="val"), out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "stream position" in err and "Traceback" not in err
