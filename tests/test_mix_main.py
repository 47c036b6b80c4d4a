"""Several sources through main(): the proportions counted over every row the run trains on, both exhaustion
policies, streamed and in memory, text and chat data mixed, exact resume, per-source evaluation, the
examples influence describes, and influence/mixture.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import as_format, qa_pairs, tiny_args, training_text, write_rows
from transformers import AutoTokenizer, TrainerCallback

import main as entry
from tuner.config import parse_args
from tuner.train import trainer as training

IGNORE = -100


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """docs: running text (column text); body: running text in a column named body; chat: messages; small: 12 of them."""
    root = tmp_path_factory.mktemp("mix")
    docs = training_text()
    out = {
        "docs": write_rows(root / "docs.jsonl", [{"text": d} for d in docs[:40]]),
        "body": write_rows(root / "body.jsonl", [{"body": d} for d in docs[40:80]]),
        "val": write_rows(root / "val.jsonl", [{"text": d} for d in docs[:10]]),
        "body_val": write_rows(root / "body_val.jsonl", [{"body": d} for d in docs[:10]]),
    }
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz      ")
    out["noise"] = write_rows(root / "noise.jsonl", [{"text": "".join(rng.choice(letters, 400))} for _ in range(30)])
    pairs = qa_pairs()
    out["chat"] = write_rows(root / "chat.jsonl", as_format(pairs, "messages"))
    out["small"] = write_rows(root / "small.jsonl", as_format(pairs[:12], "messages"))
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def mix_args(model: str, out, files: list[str], *extra: str) -> list[str]:
    """tiny_args with several --train_file."""
    args = tiny_args(model, files[0], out, "--max_new_tokens", "0", *extra)
    at = args.index("--train_file")
    return args[: at + 1] + files + args[at + 2 :]


def datasets_args(model: str, out, entries: list[dict], *extra: str) -> list[str]:
    args = tiny_args(model, "unused", out, "--max_new_tokens", "0", "--datasets", json.dumps(entries), *extra)
    at = args.index("--train_file")
    return args[:at] + args[at + 2 :]


class Recorder(TrainerCallback):
    """Every training micro-batch, through the Trainer's loss; optionally dies after a step (a pre-empted machine)."""

    def __init__(self, crash_after: int | None = None):
        self.batches: list[dict] = []
        self.crash_after = crash_after

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.crash_after:
            raise KeyboardInterrupt(f"simulated crash after step {state.global_step}")


def recorded(monkeypatch, crash_after: int | None = None) -> Recorder:
    recorder = Recorder(crash_after)
    compute_loss, build = training.LeanLossTrainer.compute_loss, training.build_trainer

    def recording_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            recorder.batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(self, model, inputs, *args, **kwargs)

    def building(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(recorder)
        return trainer

    monkeypatch.setattr(training.LeanLossTrainer, "compute_loss", recording_loss)
    monkeypatch.setattr(training, "build_trainer", building)
    return recorder


def rows_seen(recorder: Recorder) -> list[tuple[str, int, bytes]]:
    """(kind, trained tokens, the row's bytes) of every training row in order. A running-text chunk is trained on
    its first token's label; a chat row never is (its first label is -100): an independent way to tell them apart."""
    out = []
    for batch in recorder.batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            kind = "text" if labels[0] != IGNORE else "chat"
            real = labels != IGNORE
            out.append((kind, int(real[1:].sum()), ids[: int(real.nonzero().max()) + 1].numpy().tobytes()))
    return out


# ---------------------------------------------------------------- exact proportions


@pytest.mark.parametrize("unit", ["tokens", "examples"])
def test_in_memory_mix_holds_its_proportions_after_every_row(tiny_model, files, tmp_path, monkeypatch, unit):
    recorder = recorded(monkeypatch)
    result = entry.main(mix_args(tiny_model, tmp_path / "out", [files["docs"], files["chat"]], "--mix_weights", "3", "1",
                                 "--mix_unit", unit, "--max_steps", "10"))  # fmt: skip
    seen = rows_seen(recorder)
    assert len(seen) == 40  # 10 steps x 2 micro-batches x 2 rows
    counts, longest = {"text": 0, "chat": 0}, max(tokens for _, tokens, _ in seen)
    for kind, tokens, _ in seen:
        counts[kind] += tokens if unit == "tokens" else 1
        total = sum(counts.values())
        if unit == "examples":  # quota method: floor or ceil of the exact share after every row
            assert math.floor(total * 3 / 4) <= counts["text"] <= math.ceil(total * 3 / 4)
        else:  # never ahead of its share by a row of its own, nor behind by more than the longest row
            assert abs(counts["text"] - total * 3 / 4) <= longest and abs(counts["chat"] - total / 4) <= longest
    trained = {"docs": sum(t for k, t, _ in seen if k == "text"), "chat": sum(t for k, t, _ in seen if k == "chat")}
    assert result["summary"]["tokens_per_source"] == trained
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["tokens_per_source"] == trained
    dry = entry.main(mix_args(tiny_model, tmp_path / "dry", [files["docs"], files["chat"]], "--mix_weights", "3", "1",
                              "--mix_unit", unit, "--max_steps", "10", "--dry_run"))  # fmt: skip
    assert dry["train_chunks"] == 40 and dry["train_tokens"] == sum(int((b["input_ids"] != 0).sum()) for b in recorder.batches)
    assert [s["run_trained_tokens"] for s in dry["data_figures"]["sources"]] == list(trained.values())


def test_stop_ends_the_run_when_a_source_runs_out_and_repeats_no_row(tiny_model, files, tmp_path, monkeypatch, caplog):
    recorder = recorded(monkeypatch)
    with caplog.at_level("INFO"):
        result = entry.main(mix_args(tiny_model, tmp_path / "stop", [files["docs"], files["small"]],
                                     "--mix_exhausted", "stop", "--max_steps", "-1", "--validation_split_percentage", "0"))  # fmt: skip
    seen = rows_seen(recorder)
    chat = [row for kind, _, row in seen if kind == "chat"]
    alone = __import__("tuner.data.build", fromlist=["x"]).build_datasets(
        parse_args(["--train_file", files["small"], "--max_seq_length", "64", "--validation_split_percentage", "0"]),
        AutoTokenizer.from_pretrained(tiny_model),
    )  # the small source's packed rows, as a run of its own builds them
    assert len(chat) == len(set(chat)) == len(alone.train), "every row of the small source once, none twice"
    assert len({row for kind, _, row in seen if kind == "text"}) == sum(kind == "text" for kind, _, _ in seen)
    assert result["summary"]["global_step"] == math.ceil(len(seen) / 4)
    assert "ends the run (--mix_exhausted stop" in caplog.text

    recorder = recorded(monkeypatch)
    with caplog.at_level("INFO"):
        entry.main(mix_args(tiny_model, tmp_path / "restart", [files["docs"], files["small"]], "--max_steps", "8",
                            "--validation_split_percentage", "0"))  # fmt: skip
    chat = [row for kind, _, row in rows_seen(recorder) if kind == "chat"]
    assert len(chat) > len(set(chat)) == len(alone.train), "restart: the small source again, every row of it"
    assert "restarts (--mix_exhausted restart, the default" in caplog.text


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("streaming", [False, True], ids=["in memory", "streamed"])
def test_a_killed_run_resumes_to_the_same_weights_bitwise(tiny_model, files, tmp_path, monkeypatch, streaming):
    flags = [files["docs"], files["chat"]]
    extra = ["--mix_weights", "2", "1"] + (["--streaming"] if streaming else [])
    with monkeypatch.context() as patch:
        straight = recorded(patch)
        first = entry.main(mix_args(tiny_model, tmp_path / "straight", flags, *extra))
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        recorded(patch, crash_after=4)
        with pytest.raises(KeyboardInterrupt):
            entry.main(mix_args(tiny_model, out, flags, *extra))
    if streaming:
        saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        assert saved["stateful_callbacks"]["DataPosition"]["attributes"]["position"]["mixture"]["examples"] == 12
    resumed = recorded(monkeypatch)
    second = entry.main(mix_args(tiny_model, out, flags, *extra))
    assert len(resumed.batches) == 6  # steps 4-6, two micro-batches each
    for after, before in zip(resumed.batches, straight.batches[6:]):
        assert torch.equal(after["input_ids"], before["input_ids"])
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must end with the uninterrupted run's weights"
    assert second["summary"]["tokens_per_source"] == first["summary"]["tokens_per_source"]


# ---------------------------------------------------------------- evaluation per source


def test_each_source_is_evaluated_and_eval_loss_is_per_token_over_all(tiny_model, files, tmp_path, tokenizer):
    entries = [{"name": "docs", "path": files["docs"], "weight": 2},
               {"name": "body", "path": files["body"], "text_column": "body", "validation_path": files["body_val"]},
               {"name": "chat", "path": files["chat"]}]  # fmt: skip
    out = tmp_path / "out"
    argv = datasets_args(tiny_model, out, entries, "--report_to", "tensorboard", "--eval_before_training", "true")
    result = entry.main(argv)
    saved = json.loads((out / "eval_results.json").read_text())
    from tuner.data import build as data

    sets = data.build_datasets(parse_args(argv), tokenizer).eval_sets  # the rows each source is evaluated on
    tokens = {name: sum(int((np.asarray(r["labels"])[1:] != IGNORE).sum()) for r in rows) for name, rows in sets.items()}
    assert sorted(tokens) == ["body", "chat", "docs"] and tokens["docs"] == 8 * 63
    overall = sum(saved[f"eval_{n}_loss"] * t for n, t in tokens.items()) / sum(tokens.values())
    assert saved["eval_loss"] == pytest.approx(overall, rel=1e-9)
    for name in tokens:
        assert saved[f"eval_{name}_perplexity"] == pytest.approx(math.exp(saved[f"eval_{name}_loss"]), rel=1e-9)
    assert result["before_training"]["eval_chat_loss"] > saved["eval_chat_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").iterdir()))).Reload()
    assert {"eval/loss", "eval/docs_loss", "eval/body_loss", "eval/chat_loss", "eval/chat_perplexity"} <= set(events.Tags()["scalars"])


# ---------------------------------------------------------------- example identities, mixture from influence


def influence_args(model: str, out, train: str, *extra: str) -> list[str]:
    return tiny_args(model, train, out, "--influence", "--influence_val_examples", "4", "--max_new_tokens", "0",
                     "--per_device_eval_batch_size", "2", *extra)  # fmt: skip


def test_examples_jsonl_names_the_documents_each_chunk_holds(tiny_model, files, tmp_path, tokenizer):
    docs = ["", *training_text()[:30]]  # an empty row 0: rows count as in the file
    train = write_rows(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    entry.main(influence_args(tiny_model, out, train, "--validation_file", files["val"]))
    described = [json.loads(line) for line in (out / "influence" / "examples.jsonl").read_text().splitlines()]
    # brute force: each document as [BOS] ids [EOS] in file order; a chunk holds tokens [64 c, 64 c + 63]
    rows = [r for r, d in enumerate(docs) if d.strip()]
    lengths = [len(tokenizer(docs[r], add_special_tokens=False)["input_ids"]) + 2 for r in rows]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    assert [d["example_id"] for d in described] == list(range(int(ends[-1]) // 64))
    for d in described:
        first, last = 64 * d["example_id"], 64 * d["example_id"] + 63
        assert d["rows"] == [r for r, s, e in zip(rows, starts, ends) if s <= last and e > first]
        assert d["source"] == f"--train_file {train}" and len(d["text"]) <= 200
    scored = set(pq.read_table(out / "influence" / "influence.parquet")["example_id"].to_pylist())
    assert scored <= {d["example_id"] for d in described}


def test_examples_jsonl_gives_each_packed_chat_example_its_row(tiny_model, files, tmp_path):
    out = tmp_path / "out"
    entry.main(influence_args(tiny_model, out, files["chat"]))
    described = {d["example_id"]: d for d in map(json.loads, (out / "influence" / "examples.jsonl").read_text().splitlines())}
    questions = [row["messages"][0]["content"] for row in map(json.loads, Path(files["chat"]).read_text().splitlines())]
    scored = pq.read_table(out / "influence" / "influence.parquet")["example_id"].to_pylist()
    assert len(scored) > 4 and set(scored) <= set(described)
    for d in described.values():
        assert len(d["rows"]) == 1 and questions[d["rows"][0]] in d["text"], d
    assert sorted(d["rows"][0] for d in described.values()) == sorted(set(d["rows"][0] for d in described.values()))


def test_mixture_from_influence_writes_weights_the_next_run_takes(tiny_model, files, tmp_path):
    out = tmp_path / "out"
    argv = influence_args(tiny_model, out, files["docs"], "--mixture_from_influence", "--max_steps", "4")
    at = argv.index("--train_file")
    entry.main(argv[: at + 1] + [files["docs"], files["noise"], files["chat"]] + argv[at + 2 :])
    directory = out / "influence"
    section = yaml.safe_load((directory / "mixture.yaml").read_text())
    weights = {e["name"]: e["weight"] for e in section["datasets"]}
    assert list(weights) == ["docs", "noise", "chat"] and section["mix_unit"] == "tokens"
    assert sum(weights.values()) == pytest.approx(1, abs=1e-3) and min(weights.values()) >= 0.05 - 1e-4
    # brute force: each source's summed influence from the two files the influence run wrote
    source = {d["example_id"]: d["source"] for d in map(json.loads, (directory / "examples.jsonl").read_text().splitlines())}
    summed = dict.fromkeys(weights, 0.0)
    for row in pq.read_table(directory / "influence.parquet").to_pylist():
        summed[source[row["example_id"]]] += row["influence"]
    positive = {n: max(v, 0) for n, v in summed.items()}
    for a in weights:
        for b in weights:
            if positive[a] > positive[b] and weights[b] > 0.0501:
                assert weights[a] > weights[b], (summed, weights)
    dry = entry.main(["--config", str(directory / "mixture.yaml"), "--model_name_or_path", tiny_model, "--output_dir",
                      str(tmp_path / "next"), "--max_seq_length", "64", "--dry_run", "--report_to", "none"])  # fmt: skip
    assert [(s["name"], s["weight"]) for s in dry["data_figures"]["sources"]] == list(weights.items())


# ---------------------------------------------------------------- several processes


def test_two_processes_train_on_the_rows_one_process_does(tiny_model, files, tmp_path):
    """A streamed mix, 2 processes x 2 rows against 1 process x 4: the same losses (to float rounding, see
    test_multiprocess.py) and tokens per source. accelerate's dispatcher concatenates every process's batch on
    process 0, so packed chat rows and text chunks must share one length (sft_stream.fixed_length). (In memory,
    the same comparison gave equal losses too; it is left out to keep the suite fast.)"""
    import subprocess
    import sys

    from launch import ROOT, free_port, launcher_env

    extra = ["--mix_weights", "2", "1", "--save_steps", "100", "--streaming"]
    one = mix_args(tiny_model, tmp_path / "one", [files["docs"], files["chat"]], *extra, "--per_device_train_batch_size", "4")
    two = mix_args(tiny_model, tmp_path / "two", [files["docs"], files["chat"]], *extra, "--per_device_train_batch_size", "2")
    single = entry.main(one)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    done = subprocess.run([*launch, str(ROOT / "main.py"), *two], env=launcher_env(), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    expected = [e["loss"] for e in json.loads((tmp_path / "one" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["loss"] for e in history if "loss" in e] == pytest.approx(expected, abs=1e-4)
    summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert summary["tokens_per_source"] == single["summary"]["tokens_per_source"]
