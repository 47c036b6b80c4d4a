"""Where the features meet: LoRA + packed chat data + the chunked loss + data influence, in one
process and in two (gloo), through `accelerate launch`. The two-process run must end with the same
adapter and score the same examples with the same scores as the one-process run with the same
global batch (1 x 2 processes against 2 x 1 process); each process scores its own examples and the
main process writes them."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from launch import Launch, free_port, launcher_env
from safetensors.torch import load_file
from tiny import as_format, qa_pairs, write_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("combined")
    pairs = qa_pairs()
    train = write_rows(directory / "train.jsonl", as_format(pairs[:96], "messages"))
    validation = write_rows(directory / "validation.jsonl", as_format(pairs[96:], "messages"))
    options = {
        "model_name_or_path": tiny_model, "train_file": train, "validation_file": validation, "output_dir": "out",
        "data_format": "messages", "packing": True, "max_seq_length": 128, "use_lora": True, "lora_dropout": 0.0,
        "gradient_checkpointing": True, "influence": True, "influence_val_examples": "4", "max_steps": 3,
        # SGD: an update linear in the gradient, so rounding differences between 1 and 2 processes stay
        # rounding-sized (AdamW divides tiny gradient components by their own size and amplifies them).
        "optim": "sgd", "gradient_accumulation_steps": 2, "learning_rate": 0.5, "warmup_steps": 0, "logging_steps": 1,
        "save_steps": 100, "eval_steps": 100, "max_eval_samples": 8, "per_device_eval_batch_size": 2,
        "report_to": "none", "max_new_tokens": 0, "eval_before_training": False,
    }  # fmt: skip
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path


def test_lora_packed_influence_two_processes_equal_one(recipe, tmp_path):
    main = str(ROOT / "main.py")
    single = Launch("single", [sys.executable, main, "--config", str(recipe), "--per_device_train_batch_size", "2"],
                    tmp_path / "single", launcher_env())  # fmt: skip
    single.assert_clean_exit()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port())]  # fmt: skip
    ddp = Launch("ddp", [*launch, main, "--config", str(recipe), "--per_device_train_batch_size", "1"],
                 tmp_path / "ddp", launcher_env())  # fmt: skip
    ddp.assert_clean_exit()

    one, two = tmp_path / "single" / "out", tmp_path / "ddp" / "out"
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # the adapter trained (B starts at 0)
    s1 = pq.read_table(one / "influence" / "scores.parquet").to_pandas().sort_values(["step", "example_id"])
    s2 = pq.read_table(two / "influence" / "scores.parquet").to_pandas().sort_values(["step", "example_id"])
    assert len(s1) > 3 * 4  # several packed examples per row, 2 rows per step
    assert s1[["step", "example_id", "trained_tokens"]].values.tolist() == s2[["step", "example_id", "trained_tokens"]].values.tolist()
    assert s2["score"].tolist() == pytest.approx(s1["score"].tolist(), rel=1e-4, abs=1e-7)
