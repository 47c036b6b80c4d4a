"""The SFT data layer below main(): every chat format gives the same examples; the token cache keys on the
format and its options; a streamed SFT run packs each pass's examples in bounded buffers and restarts exactly
from any saved position; the packed-batch guard sits in the loss path."""

from __future__ import annotations

import json
from dataclasses import asdict
from itertools import islice

import numpy as np
import pytest
import torch
from tiny import as_format, qa_pairs, write_rows

from tuner.config import parse_args
from tuner.data import build as data
from tuner.data import formats, packing, sft_stream
from tuner.data.sft import SftSettings
from tuner.train import trainer as training

T = 128


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def pairs():
    return qa_pairs()


def cfg_for(path: str, tmp_path, *extra: str):
    return parse_args(["--train_file", path, "--max_seq_length", str(T), "--cache_dir", str(tmp_path / "tok"),
                       "--validation_split_percentage", "10", *extra])  # fmt: skip


def rows_of(dataset) -> list[tuple[list, list]]:
    """Every example of a PackedDataset/ExampleDataset as (input_ids, labels), sorted: order-free comparison."""
    out = []
    for index in range(len(dataset)):
        row = dataset[index]
        if "example_index" not in row:
            out.append((list(map(int, row["input_ids"])), list(map(int, row["labels"]))))
            continue
        for example in np.unique(row["example_index"]):
            keep = row["example_index"] == example
            out.append((row["input_ids"][keep].tolist(), row["labels"][keep].tolist()))
    return sorted(out)


def test_every_chat_format_gives_the_same_examples(tokenizer, pairs, tmp_path):
    built = {}
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion_messages"):
        path = write_rows(tmp_path / f"{fmt}.jsonl", as_format(pairs, fmt))
        sets = data.build_datasets(cfg_for(path, tmp_path), tokenizer)
        built[fmt] = (rows_of(sets.train), rows_of(sets.eval))
        assert sets.chat and sets.packed and sets.figures["train_examples"] == 108
    assert all(value == built["messages"] for value in built.values())


def test_packed_rows_hold_each_example_whole_once(tokenizer, pairs, tmp_path):
    path = write_rows(tmp_path / "m.jsonl", as_format(pairs, "messages"))
    packed = data.build_datasets(cfg_for(path, tmp_path), tokenizer)
    padded = data.build_datasets(cfg_for(path, tmp_path, "--packing", "false"), tokenizer)
    assert rows_of(packed.train) == rows_of(padded.train) and len(packed.train) < len(padded.train)
    for row in packed.train.rows:
        assert len(row["input_ids"]) <= T
        starts = np.flatnonzero(row["position_ids"] == 0)
        assert (row["input_ids"][starts] == tokenizer.bos_token_id).all()  # each example starts with its one BOS


def test_the_token_cache_keys_on_the_format_and_its_options(tokenizer, pairs, tmp_path, monkeypatch):
    calls = []
    real = formats.tokenize_examples
    monkeypatch.setattr(formats, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    # both formats' columns in one file: the format is the only thing --data_format changes
    rows = [{**m, **pc} for m, pc in zip(as_format(pairs, "messages"), as_format(pairs, "prompt_completion"))]
    path = write_rows(tmp_path / "both.jsonl", rows)
    template = tmp_path / "t.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}",
        encoding="utf-8",
    )

    def builds(*extra: str) -> int:
        before = len(calls)
        data.build_datasets(cfg_for(path, tmp_path, *extra), tokenizer)
        tokenizer.chat_template = None  # as loaded: each run installs its own
        return len(calls) - before

    assert builds() > 0
    assert builds() == 0, "the same inputs reuse the cache"
    assert builds("--packing", "false") == 0, "packing happens after the cache"
    changes = [
        ["--data_format", "prompt_completion"], ["--train_on_prompt"], ["--overlong", "drop"], ["--max_seq_length", "64"],
        ["--chat_template", str(template)], ["--seed", "1"], ["--validation_split_percentage", "20"],
    ]  # fmt: skip
    for changed in changes:
        assert builds(*changed) > 0, changed


def test_dropped_and_truncated_rows_are_counted(tokenizer, pairs, tmp_path):
    path = write_rows(tmp_path / "m.jsonl", as_format(pairs, "messages"))
    truncated = data.build_datasets(cfg_for(path, tmp_path, "--max_seq_length", "80"), tokenizer).figures
    dropped = data.build_datasets(cfg_for(path, tmp_path, "--max_seq_length", "80", "--overlong", "drop"), tokenizer).figures
    # the same rows are too long either way; truncated ones whose answer is cut away entirely are dropped too
    too_long = truncated["train_truncated"]
    assert too_long > 0 and dropped["train_dropped_too_long"] == too_long and dropped["train_truncated"] == 0
    assert truncated["train_examples"] + truncated["train_dropped_untrained"] == 108
    assert dropped["train_examples"] == 108 - too_long


# ---------------------------------------------------------------- streamed


def stream_of(path: str, tokenizer, cfg, **kwargs) -> sft_stream.ExampleStream:
    opened = data.open_run_source(cfg, streaming=True)
    choice = data.choose_format(cfg, opened)
    settings = SftSettings.from_options(cfg, choice, tokenizer)
    return sft_stream.ExampleStream(opened.train[0], tokenizer, settings, keep=opened.hold_out.training, seed=cfg.seed, **kwargs)


def test_a_streamed_pass_packs_every_training_example_once_in_bounded_buffers(tokenizer, pairs, tmp_path):
    path = write_rows(tmp_path / "m.jsonl", as_format(pairs, "messages"))
    cfg = cfg_for(path, tmp_path)
    in_memory = data.build_datasets(cfg, tokenizer)
    stream = stream_of(path, tokenizer, cfg, buffer_examples=16)
    one_pass = [row for row, _ in stream.one_pass(stream.first)]
    assert rows_of(sft_stream_rows(one_pass)) == rows_of(in_memory.train)
    # rows of one buffer hold only that buffer's examples: 108 kept rows in buffers of 16 -> 7 buffers
    assert len({after.document for _, after in stream.one_pass(stream.first) if after.offset}) == 7


def sft_stream_rows(rows):
    from tuner.data.datasets import PackedDataset

    return PackedDataset(rows)


@pytest.mark.parametrize("packing_flag", ["true", "false"])
def test_a_saved_position_restarts_the_sft_stream_exactly_there(tokenizer, pairs, tmp_path, packing_flag):
    path = write_rows(tmp_path / "m.jsonl", as_format(pairs, "messages"))
    cfg = cfg_for(path, tmp_path, "--packing", packing_flag, "--streaming", "--max_steps", "1", "--max_train_samples", "50")
    stream = stream_of(path, tokenizer, cfg, buffer_examples=16, max_examples=50)
    run = list(islice(stream.passes(), 3 * 40))
    per_pass = next(i for i, (_, after) in enumerate(run) if after.epoch == 0 and i and run[i][1].epoch_chunk == 50) + 1
    for chunk in (1, 2, 5, per_pass - 1, per_pass, per_pass + 1, per_pass + 7):
        saved = json.loads(json.dumps(asdict(run[chunk - 1][1])))  # as trainer_state.json holds it
        assert saved["chunk"] == chunk
        resumed = stream_of(path, tokenizer, cfg, buffer_examples=16, max_examples=50)
        resumed.resume(sft_stream.Position(**saved))
        again = [row for row, _ in islice(resumed.passes(), 4)]
        for got, expected in zip(again, [row for row, _ in run[chunk : chunk + 4]]):
            assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got), f"chunk {chunk}"
    examples_per_pass = sum(len(np.unique(row["example_index"])) if "example_index" in row else 1 for row, _ in run[:per_pass])
    assert examples_per_pass == 50  # --max_train_samples counts examples a pass


# ---------------------------------------------------------------- the guard in the loss path


def test_the_loss_refuses_a_packed_batch_with_a_mask_or_a_cache(tiny_model):
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer = training.LeanLossTrainer(model=model, args=TrainingArguments(output_dir="unused", report_to=[], use_cpu=True))
    rows = packing.pack_examples([[2, 10, 11], [2, 20, 21, 22]], [[-100, 10, 11], [-100, 20, 21, 22]], 8)
    batch = packing.PackedCollator(pad_token_id=0)(rows)
    model.config.use_cache = False
    assert torch.isfinite(trainer.compute_loss(model, batch))
    with pytest.raises(packing.PackingIsolationError, match="attention_mask"):
        trainer.compute_loss(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    model.config.use_cache = True
    with pytest.raises(packing.PackingIsolationError, match="use_cache"):
        trainer.compute_loss(model, batch)
