"""--use_lora end to end through main(): the adapter trains, saves, resumes after a kill with the
same final weights, loads with peft, and --merge_lora writes a plain tied model of the base's size
whose logits equal the adapter model's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_args

import main as entry

ROOT = Path(__file__).resolve().parent.parent


def lora_args(model: str, train_file: str, out: Path, *extra: str) -> list[str]:
    return tiny_args(model, train_file, out, "--use_lora", "--learning_rate", "1e-2", "--max_eval_samples", "4",
                     "--max_new_tokens", "3", "--lora_dropout", "0", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def merged_run(tiny_model, tmp_path_factory, corpus_docs):
    directory = tmp_path_factory.mktemp("lora")
    corpus = directory / "train.jsonl"
    import json

    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs), encoding="utf-8")
    out = directory / "out"
    metrics = entry.main(lora_args(tiny_model, str(corpus), out, "--merge_lora",
                                   "--lora_trainable_tokens", "<start_of_turn>,<end_of_turn>"))  # fmt: skip
    return out, metrics


def test_the_adapter_is_saved_and_loads_with_peft(merged_run, tiny_model):
    from peft import AutoPeftModelForCausalLM

    out, metrics = merged_run
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter, not a copy of the base
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert metrics["eval"]["eval_loss"] < metrics["before_training"]["eval_loss"] if "before_training" in metrics else True
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.peft_config["default"].r == 16


def test_merged_model_is_plain_tied_of_the_base_size_with_the_adapters_logits(merged_run, tiny_model):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, _ = merged_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    base_size = (Path(tiny_model) / "model.safetensors").stat().st_size
    assert (out / "merged" / "model.safetensors").stat().st_size == base_size
    assert (out / "merged" / "tokenizer.json").is_file() and (out / "merged" / "generation_config.json").is_file()
    adapter = AutoPeftModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        expected, got = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (expected - got).abs().max() < 1e-4
    # The trained token rows changed, and every other row of the tied matrix is the base's own.
    base = load_file(Path(tiny_model) / "model.safetensors")["model.embed_tokens.weight"]
    trained = merged.get_input_embeddings().weight.detach()
    changed = (trained != base).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= {4, 5}, changed  # <start_of_turn>, <end_of_turn> in the tiny tokenizer


def test_dry_run_counts_gradients_and_optimizer_state_of_the_adapter_only(tiny_model, write_corpus, tmp_path):
    full = entry.main(lora_args(tiny_model, write_corpus("jsonl"), tmp_path / "a", "--use_lora", "false", "--dry_run",
                                "--lora_dropout", "0.05"))  # fmt: skip
    lora = entry.main(lora_args(tiny_model, write_corpus("jsonl"), tmp_path / "b", "--dry_run", "--lora_r", "4"))
    assert 0 < lora["trainable_parameters"] < full["parameters"] / 5
    assert lora["memory"]["gradients"] == 4 * lora["trainable_parameters"]
    assert lora["memory"]["optimizer"] == 8 * lora["trainable_parameters"]
    assert lora["memory"]["total"] < full["memory"]["total"]


def wait_for(path: Path, timeout: float = 120) -> None:
    started = time.monotonic()
    while not path.exists():
        assert time.monotonic() - started < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_lora_run_resumes_to_the_uninterrupted_adapter_bitwise(tiny_model, write_corpus, tmp_path):
    corpus = write_corpus("jsonl")
    extra = ("--max_steps", "24", "--save_steps", "4", "--gradient_checkpointing", "--validation_split_percentage", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs alike: the thread count changes float sums
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *lora_args(tiny_model, corpus, straight, *extra)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "main.py"), *lora_args(tiny_model, corpus, killed, *extra)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoint-8" / "trainer_state.json")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before the kill"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_in_bf16_trains(tiny_model, write_corpus, tmp_path):
    from tuner import validate

    if not validate.bf16_supported():
        pytest.skip("this CPU has no bf16 instructions")
    metrics = entry.main(lora_args(tiny_model, write_corpus("jsonl"), tmp_path / "out", "--bf16", "--max_steps", "2"))
    assert metrics["train"]["train_loss"] > 0


def test_lora_on_a_stream(tiny_model, write_corpus, tmp_path):
    out = tmp_path / "out"
    metrics = entry.main(lora_args(tiny_model, write_corpus("jsonl"), out, "--streaming", "--max_steps", "2"))
    assert metrics["train"]["train_loss"] > 0 and (out / "adapter_model.safetensors").is_file()
