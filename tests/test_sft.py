"""Supervised fine-tuning end to end: main([...]) on the tiny Gemma 3 for every format, file type, hub-style
dataset and --streaming; the evaluation loss per trained token (packed = padded = an independent
computation, one process = two); --eval_only; exact resume; and the saved model chatting in plain
transformers, stopping at <end_of_turn>."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import free_port
from safetensors.torch import load_file
from tiny import SFT_FORMATS, as_format, qa_pairs, write_rows

import main as entry
from tuner.data import chat_template, sources
from tuner.train import trainer as training

ROOT = Path(__file__).resolve().parent.parent
PLAIN = "prompt_completion"  # plain-text pairs: no chat template


@pytest.fixture(scope="module")
def pairs():
    return qa_pairs()  # 120 docstring Q&A pairs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, pairs) -> Path:
    """train/validation files of every format (jsonl), and of the messages format in every file type."""
    root = tmp_path_factory.mktemp("sft")
    for fmt in SFT_FORMATS:
        write_rows(root / f"{fmt}.jsonl", as_format(pairs, fmt))
    train, val = as_format(pairs[:100], "messages"), as_format(pairs[100:], "messages")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        write_rows(root / f"train.{suffix}", train)
        write_rows(root / f"validation.{suffix}", val)
    hub = root / "hub_repo"  # a dataset "repository" of data files, as on the hub
    hub.mkdir()
    write_rows(hub / "train.jsonl", train)
    write_rows(hub / "validation.jsonl", val)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(val)}).save_to_disk(
        str(root / "saved")
    )
    return root


def sft_args(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--output_dir", str(out), "--max_seq_length", "128",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--max_steps", "2", "--save_steps", "100", "--eval_steps", "100", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none", "--max_new_tokens", "3",
        "--eval_before_training", "false", "--validation_split_percentage", "10", *extra,
    ]  # fmt: skip


def files(data_dir: Path, kind: str) -> list[str]:
    """The source flags of one file type, or of a hub-style directory, or of a save_to_disk directory."""
    if kind in ("hub_repo", "saved"):
        return ["--dataset_name", str(data_dir / kind)]
    return ["--train_file", str(data_dir / f"train.{kind}"), "--validation_file", str(data_dir / f"validation.{kind}")]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", SFT_FORMATS)
def test_each_format_trains_end_to_end(tiny_model, data_dir, tmp_path, caplog, fmt):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        metrics = entry.main(sft_args(tiny_model, out, "--train_file", str(data_dir / f"{fmt}.jsonl")))
    detected = "messages" if fmt == "sharegpt" else PLAIN if fmt.startswith(PLAIN) else fmt
    assert f"Data format: {detected} (auto: the data has" in caplog.text
    assert math.isfinite(metrics["eval"]["eval_loss"]) and metrics["train"]["train_loss"] > 0
    summary = json.loads((out / "run_summary.json").read_text())
    # 120 rows, 10 % held out: exactly one in each stratum of 10 rows
    assert (summary["train_rows_read"], summary["validation_rows_read"]) == (108, 12)
    assert summary["train_examples"] == 108 and summary["train_dropped_untrained"] == 0
    assert yaml_value(out / "run_config.yaml", "data_format") == detected
    assert AutoConfig.from_pretrained(out).use_cache is False  # packed rows: no KV cache
    chat = fmt != PLAIN
    assert (AutoTokenizer.from_pretrained(out).chat_template == chat_template.GEMMA3_CHAT_TEMPLATE) is chat
    assert GenerationConfig.from_pretrained(out).eos_token_id == ([1, 5] if chat else 1)
    assert all(sample.get("chat", False) is chat for sample in metrics["samples"])


def yaml_value(path: Path, key: str):
    import yaml

    return yaml.safe_load(path.read_text())[key]


@pytest.fixture(scope="module")
def jsonl_run(tiny_model, data_dir, tmp_path_factory) -> dict:
    """The reference run: messages in .jsonl files, 2 steps."""
    return entry.main(sft_args(tiny_model, tmp_path_factory.mktemp("jsonl") / "out", *files(data_dir, "jsonl")))


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "hub_repo", "saved"])
def test_every_file_type_and_hub_dataset_trains_the_same(tiny_model, data_dir, tmp_path, jsonl_run, kind):
    """The same rows from any file type, a hub-style dataset directory or a saved dataset: the same
    examples in the same order, so the same training and the same evaluation, bit for bit."""
    metrics = entry.main(sft_args(tiny_model, tmp_path / "out", *files(data_dir, kind)))
    assert metrics["train"]["train_loss"] == jsonl_run["train"]["train_loss"]
    assert metrics["eval"]["eval_loss"] == jsonl_run["eval"]["eval_loss"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "hub_repo"])
def test_streaming_trains_and_evaluates_on_the_same_validation_set(tiny_model, data_dir, tmp_path, jsonl_run, kind):
    out = tmp_path / "out"
    before = entry.main(sft_args(tiny_model, out, *files(data_dir, kind), "--streaming", "--eval_only"))
    reference = entry.main(sft_args(tiny_model, tmp_path / "ref", *files(data_dir, "jsonl"), "--eval_only"))
    assert before["eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-6)
    metrics = entry.main(sft_args(tiny_model, tmp_path / "trained", *files(data_dir, kind), "--streaming"))
    assert metrics["eval"]["eval_loss"] < before["eval"]["eval_loss"]
    assert json.loads((tmp_path / "trained" / "run_summary.json").read_text())["validation_examples_used"] == 20


# ---------------------------------------------------------------- evaluation per token


def reference_eval_loss(model_dir: Path, data_dir: Path) -> float:
    """Independently: every validation example alone through plain transformers; summed token losses over
    the number of trained tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.data import formats

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines()]
    examples = [formats.Conversation(tuple(r["messages"])) for r in rows]
    tokenized = formats.tokenize_examples(tokenizer, examples, 128)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(tokenized.input_ids, tokenized.labels):
            ids, labels = torch.tensor(ids[None], dtype=torch.long), torch.tensor(labels[None], dtype=torch.long)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def test_eval_loss_is_per_token_the_same_packed_or_padded(tiny_model, data_dir, tmp_path, jsonl_run):
    """--eval_only on the trained model: packed rows (several examples each) and padded batches give the same
    loss, and it is the mean over trained tokens, not of batch means (batches here hold unequal counts)."""
    trained = Path(jsonl_run["summary"]["saved_to"])
    common = ["--model_name_or_path", str(trained), *files(data_dir, "jsonl"), "--eval_only", "--per_device_eval_batch_size", "3"]
    packed = entry.main(sft_args(tiny_model, tmp_path / "packed", *common))
    padded = entry.main(sft_args(tiny_model, tmp_path / "padded", *common, "--packing", "false"))
    expected = reference_eval_loss(trained, data_dir)
    assert packed["eval"]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert padded["eval"]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert packed["eval"]["eval_loss"] == pytest.approx(padded["eval"]["eval_loss"], rel=1e-6)


def test_eval_only_evaluates_and_writes_eval_results_without_training(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    metrics = entry.main(sft_args(tiny_model, out, *files(data_dir, "jsonl"), "--eval_only"))
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_loss"] == metrics["eval"]["eval_loss"] and saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]))
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert "train" not in metrics


def test_eval_loss_of_two_processes_equals_one(tiny_model, data_dir, tmp_path, jsonl_run):
    """20 validation examples over 2 processes x batch 3: accelerate repeats 4 rows to fill the last batches,
    and those repeats must not count."""
    trained = jsonl_run["summary"]["saved_to"]
    args = sft_args(tiny_model, tmp_path / "one", "--model_name_or_path", trained, *files(data_dir, "jsonl"), "--eval_only",
                    "--per_device_eval_batch_size", "3", "--packing", "false")  # fmt: skip
    one = entry.main(args)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "main.py", *args[:-2], "--output_dir", str(two)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((two / "eval_results.json").read_text())
    assert one["eval"]["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------- resume


class Crash(Exception):
    pass


def crash_after(monkeypatch, step: int) -> None:
    original = training.build_trainer

    def build(*args, **kwargs):
        from transformers import TrainerCallback

        class Die(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == step:
                    raise Crash(f"after step {step}")

        trainer = original(*args, **kwargs)
        trainer.add_callback(Die())
        return trainer

    monkeypatch.setattr(training, "build_trainer", build)


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_a_resumed_packed_run_ends_with_the_same_weights(tiny_model, data_dir, tmp_path, monkeypatch, streamed):
    args = [*files(data_dir, "jsonl"), "--max_steps", "5", "--save_steps", "2", "--eval_steps", "5"]
    if streamed:
        args.append("--streaming")
    entry.main(sft_args(tiny_model, tmp_path / "straight", *args))
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_after(patch, 3)
        with pytest.raises(Crash):
            entry.main(sft_args(tiny_model, out, *args))
    assert (out / "checkpoint-2").is_dir() and not (out / "model.safetensors").exists()
    entry.main(sft_args(tiny_model, out, *args))
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


# ---------------------------------------------------------------- the saved model chats


def test_the_saved_model_answers_in_plain_transformers_and_stops_at_end_of_turn(tiny_model, tmp_path):
    """Trained on one exchange, the model answers it through apply_chat_template and generate, and stops by
    itself: the answer's closing <end_of_turn> was trained, and generation_config stops there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question, answer = "What does json.dumps do?", "Serialize obj to a JSON str."
    train = write_rows(tmp_path / "one.jsonl", as_format([(question, answer)] * 64, "messages"))
    out = tmp_path / "out"
    metrics = entry.main(sft_args(tiny_model, out, "--train_file", train, "--validation_split_percentage", "0", "--max_steps",
                                  "40", "--learning_rate", "5e-3", "--max_new_tokens", "40", "--sample_prompts", question))  # fmt: skip
    # main's own samples: the question as a user turn, the answer ending at the turn's end (no repetition
    # penalty on the prompt's <end_of_turn>)
    assert metrics["samples"] == [{"prompt": question, "completion": answer, "chat": True}]
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<end_of_turn>") and len(new) < 40
    assert tokenizer.decode(new, skip_special_tokens=True) == answer


# ---------------------------------------------------------------- dry run


def test_dry_run_shows_the_trained_tokens_and_the_packing(tiny_model, data_dir, tmp_path, capsys, monkeypatch):
    from tuner import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded in a dry run"))
    result = entry.main(sft_args(tiny_model, tmp_path / "out", "--train_file", str(data_dir / "alpaca.jsonl"), "--dry_run"))
    printed = capsys.readouterr().out
    assert "Data (alpaca):" in printed and "108 rows -> 108 examples" in printed and "fill" in printed
    first_row = next(row for row in range(120) if sources.HoldOut(10, 42).training(row))
    first_answer = qa_pairs()[first_row][1]
    assert f"<start_of_turn>model\n[[{first_answer}<end_of_turn>]]" in printed
    rows = result["data_figures"]["train_rows_used"]
    assert result["train_chunks"] == rows and result["steps_per_epoch"] == math.ceil(rows / 4)  # steps over packed rows
