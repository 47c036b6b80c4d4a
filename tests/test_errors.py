"""Every bad input: one message naming the flag, the value and the fix; exit code 2; no traceback;
nothing loaded beyond config.json and the tokenizer; an existing output_dir left untouched.

One table drives all cases. Each row: id, a function that turns a sandbox into extra argv (the
last occurrence of a flag wins), and the fragments the message must contain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main as entry
from tuner import models, validate


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


U, A = "user", "assistant"


def chat_rows(directory: Path, conversations: list[list]) -> str:
    """chat.jsonl of {"messages": [...]} rows; a role alone gets a content, a (role, content) pair keeps its own."""
    def message(turn):
        role, content = turn if isinstance(turn, tuple) else (turn, f"some {turn} text")
        return {"role": role, "content": content}

    return jsonl(directory / "chat.jsonl", [{"messages": [message(t) for t in turns]} for turns in conversations])


CASES = [
    ("missing file", lambda d: ["--train_file", str(d / "nope.jsonl")], ["--train_file", "nope.jsonl", "no such file"]),
    ("unsupported extension", lambda d: ["--train_file", write(d / "c.xml", "<a/>")], ["--train_file", "c.xml", ".xml", "Use one of"]),
    ("empty file", lambda d: ["--train_file", write(d / "e.jsonl", "")], ["--train_file", "e.jsonl", "empty"]),
    (
        "malformed json line",
        lambda d: ["--train_file", write(d / "m.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')],
        ["--train_file", "m.jsonl", "line 3", "Fix the file"],
    ),
    (
        "csv without the text column",
        lambda d: ["--train_file", write(d / "c.csv", "body,id\nhello there,1\n")],
        ["--text_column text", "c.csv", "body, id", "Pass --text_column"],
    ),
    (
        "text column that is not text",
        lambda d: ["--train_file", jsonl(d / "n.jsonl", [{"text": i} for i in range(50)])],
        ["--text_column text", "int64", "not text"],
    ),
    (
        "all rows empty",
        lambda d: ["--train_file", jsonl(d / "blank.jsonl", [{"text": ""}, {"text": "   "}])],
        ["--text_column text", "blank.jsonl", "every row", "empty"],
    ),
    (
        "corpus shorter than one chunk",
        lambda d: ["--train_file", jsonl(d / "s.jsonl", [{"text": "short"}] * 3), "--validation_split_percentage", "0"],
        ["--max_seq_length 64", "tokens, fewer than one chunk", "Lower --max_seq_length"],
    ),
    ("max_seq_length zero", lambda d: ["--max_seq_length", "0"], ["--max_seq_length 0", "greater than 0"]),
    ("max_seq_length negative", lambda d: ["--max_seq_length", "-5"], ["--max_seq_length -5", "greater than 0"]),
    ("max_seq_length above model", lambda d: ["--max_seq_length", "4096"], ["--max_seq_length 4096", "maximum of 1024", "1024 or less"]),
    ("batch size zero", lambda d: ["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size 0", "greater than 0"]),
    ("negative learning rate", lambda d: ["--learning_rate", "-1e-4"], ["--learning_rate -0.0001", "greater than 0"]),
    ("zero epochs", lambda d: ["--num_train_epochs", "0"], ["--num_train_epochs 0", "greater than 0"]),
    ("negative steps", lambda d: ["--max_steps", "-3"], ["--max_steps -3", "greater than 0"]),
    ("bf16 with fp16", lambda d: ["--bf16", "--fp16"], ["--bf16 and --fp16", "only one"]),
    ("flash attention without gpu", lambda d: ["--use_flash_attention"], ["--use_flash_attention", "CUDA", "Drop the flag"]),
    ("resume path missing", lambda d: ["--resume_from_checkpoint", str(d / "ckpt")], ["--resume_from_checkpoint", "ckpt", "no such directory"]),
    (
        "resume path not a checkpoint",
        lambda d: ["--resume_from_checkpoint", str(d)],
        ["--resume_from_checkpoint", "not a checkpoint", "trainer_state.json"],
    ),
    (
        "model that does not exist",
        lambda d: ["--model_name_or_path", "google/gemma-270m"],
        ["--model_name_or_path google/gemma-270m", "cannot be loaded", "google/gemma-3-270m"],
    ),
    (
        "local model dir without config",
        lambda d: ["--model_name_or_path", str(d)],
        ["--model_name_or_path", "cannot be loaded", "offline:gemma-3-270m"],
    ),
    ("output_dir under a file", lambda d: ["--output_dir", str(Path(write(d / "f", "x")) / "out")], ["--output_dir", "is a file"]),
    (
        "default hub dataset unreachable offline",
        lambda d: ["--train_file", "", "--dataset_name", ""],
        ["--dataset_name wikitext (--dataset_config_name wikitext-2-raw-v1): could not be loaded", "use --train_file"],
    ),
    ("validation file without training data", lambda d: ["--train_file", "", "--validation_file", write(d / "v.jsonl", '{"text": "x"}\n')], ["needs --train_file or --dataset_name"]),
    ("validation split 100", lambda d: ["--validation_split_percentage", "100"], ["--validation_split_percentage 100", "0 to 99"]),
    ("streaming without max_steps", lambda d: ["--streaming"], ["--streaming", "--max_steps"]),
    (
        "unknown yaml key",
        lambda d: ["--config", write(d / "c.yaml", "learning_rat: 1.0e-4\n")],
        ["unknown key 'learning_rat'", "Did you mean 'learning_rate'"],
    ),
    ("yaml value of the wrong type", lambda d: ["--config", write(d / "c.yaml", "max_steps: many\n")], ["max_steps", "'many'", "of type int"]),
    ("optimizer that does not exist", lambda d: ["--optim", "adamw_nope"], ["--optim", "'adamw_nope'", "adamw_torch"]),
    ("scheduler that does not exist", lambda d: ["--lr_scheduler_type", "cosinus"], ["--lr_scheduler_type", "'cosinus'", "cosine"]),
    ("a number that is not one", lambda d: ["--learning_rate", "fast"], ["--learning_rate", "'fast'", "float"]),
    (
        "best model without evaluation",
        lambda d: ["--load_best_model_at_end", "--eval_strategy", "no"],
        ["--load_best_model_at_end", "--eval_strategy is no", "--eval_strategy steps"],
    ),
    (
        "best model without validation data",
        lambda d: ["--load_best_model_at_end", "--validation_split_percentage", "0"],
        ["--load_best_model_at_end", "no validation data", "--validation_file"],
    ),
    (
        "best model when saves miss evaluations",
        lambda d: ["--load_best_model_at_end", "--save_steps", "5", "--eval_steps", "2"],
        ["--save_steps 5", "multiple of --eval_steps 2"],
    ),
    ("plateau scheduler without evaluation", lambda d: ["--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "no"], ["reduce_lr_on_plateau", "--eval_strategy"]),
    ("deepspeed on cpu", lambda d: ["--deepspeed", "ds.json"], ["--deepspeed ds.json", "CUDA"]),
    ("fsdp on cpu", lambda d: ["--fsdp", "full_shard"], ["--fsdp full_shard", "CUDA"]),
    ("torch compile with liger", lambda d: ["--torch_compile", "--use_liger_kernel"], ["--torch_compile with --use_liger_kernel"]),
    (
        "stream with dataloader workers",
        lambda d: ["--streaming", "--max_steps", "5", "--dataloader_num_workers", "2"],
        ["--dataloader_num_workers 2 with --streaming", "0"],
    ),
    ("label smoothing above 1", lambda d: ["--label_smoothing_factor", "1.5"], ["--label_smoothing_factor 1.5", "below 1"]),
    ("merge without lora", lambda d: ["--merge_lora"], ["--merge_lora", "--use_lora"]),
    (
        "lora target that matches nothing",
        lambda d: ["--use_lora", "--lora_target_modules", "q_proj,qkv_proj"],
        ["--lora_target_modules", "qkv_proj", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
    ),
    ("lora token that is not one token", lambda d: ["--use_lora", "--lora_trainable_tokens", "<start_of_turn>,hello world"], ["--lora_trainable_tokens", "hello world"]),
    ("lora rank zero", lambda d: ["--use_lora", "--lora_r", "0"], ["--lora_r 0", "at least 1"]),
    # chat and instruction data: every bad row named (0-based), before the weights load
    (
        "chat roles that do not alternate",
        lambda d: ["--train_file", chat_rows(d, [[U, A], [U, A], [U, U]])],
        ["chat.jsonl row 2 (0-based)", "message 1 is 'user' where 'assistant' was due", "Fix the order or drop the row"],
    ),
    ("chat role that is unknown", lambda d: ["--train_file", chat_rows(d, [[U, A], [U, "bot"]])], ["chat.jsonl row 1 (0-based)", "role 'bot'"]),
    ("chat answer that is empty", lambda d: ["--train_file", chat_rows(d, [[U, A], [U, A], [U, (A, "  ")]])], ["row 2 (0-based)", "empty answer"]),
    ("chat conversation that is empty", lambda d: ["--train_file", chat_rows(d, [[], [U, A]])], ["row 0 (0-based)", "empty conversation"]),
    (
        "bad chat rows, streamed",
        lambda d: ["--train_file", chat_rows(d, [[U, A], [U, U]]), "--streaming", "--max_steps", "2"],
        ["chat.jsonl row 1 (0-based)", "where 'assistant' was due"],
    ),
    (
        "alpaca row without an answer",
        lambda d: ["--train_file", jsonl(d / "alpaca.jsonl", [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "output": ""}])],
        ["alpaca.jsonl row 1 (0-based)", "empty answer"],
    ),
    ("format without its columns", lambda d: ["--data_format", "messages"], ["--data_format messages needs the column(s) ['messages']", "--messages_column"]),
    ("chat template file missing", lambda d: ["--chat_template", str(d / "nope.jinja")], ["--chat_template", "nope.jinja", "no such file"]),
    (
        "eval only without validation data",
        lambda d: ["--eval_only", "--validation_split_percentage", "0"],
        ["--eval_only", "nothing to evaluate on", "--validation_file"],
    ),
    ("influence while streaming", lambda d: ["--influence", "--streaming", "--max_steps", "3"], ["--influence with --streaming", "Drop --streaming"]),
    ("influence reference size", lambda d: ["--influence", "--influence_val_examples", "many"], ["--influence_val_examples many", "'all'"]),
    (
        "influence without validation data",
        lambda d: ["--influence", "--validation_split_percentage", "0"],
        ["--influence", "no validation data", "--validation_file"],
    ),
    ("influence with liger", lambda d: ["--influence", "--use_liger_kernel"], ["--influence", "Liger"]),
    ("distillation option without a teacher", lambda d: ["--distill_alpha", "0.7"], ["--distill_alpha", "--teacher_model_name_or_path"]),
    ("distillation weight above 1", lambda d: ["--teacher_model_name_or_path", "x", "--distill_alpha", "1.5"], ["--distill_alpha 1.5", "between 0 and 1"]),
    (
        "teacher that does not exist",
        lambda d: ["--teacher_model_name_or_path", str(d / "no-teacher")],
        ["--teacher_model_name_or_path", "no-teacher", "cannot be loaded"],
    ),
    # several training sources (tuner/source_specs.py)
    ("mix weights that do not match the files", lambda d: ["--train_file", *two_files(d), "--mix_weights", "3"], ["--mix_weights 3", "1 weight(s) for 2 --train_file files", "--mix_weights 1 1"]),
    ("mix weight that is zero", lambda d: ["--train_file", *two_files(d), "--mix_weights", "1", "0"], ["--mix_weights 1 0", "b.jsonl is 0.0", "positive"]),
    ("mix entry with an unknown key", lambda d: mix(d, {"name": "docs", "path": two_files(d)[0], "wieght": 2}), ["datasets entry 0 (docs)", "unknown key 'wieght'", "Did you mean 'weight'"]),
    ("mix entry whose path is missing", lambda d: mix(d, {"name": "docs", "path": str(d / "nope.jsonl")}), ["datasets[docs] path", "nope.jsonl", "no such file"]),
    ("mix entry with a negative weight", lambda d: mix(d, {"name": "docs", "path": two_files(d)[0], "weight": -1}), ["datasets entry 0 (docs)", "weight -1", "positive"]),
    ("two mixed sources with one name", lambda d: mix(d, *({"name": "x", "path": p} for p in two_files(d))), ["two sources are named 'x'", "own name"]),
    ("mixture from influence without influence", lambda d: ["--train_file", *two_files(d), "--mixture_from_influence"], ["--mixture_from_influence", "needs --influence"]),
]


def two_files(directory: Path) -> list[str]:
    return [jsonl(directory / f"{name}.jsonl", [{"text": "hello"}]) for name in ("a", "b")]


def mix(directory: Path, *entries: dict) -> list[str]:
    """--datasets given in a YAML file (--config), as users write it; --train_file cleared."""
    return ["--train_file", "", "--config", write(directory / "mix.yaml", json.dumps({"datasets": list(entries)}))]


@pytest.fixture
def sandbox(tmp_path, tiny_model, write_corpus, monkeypatch):
    """A valid base command line, an existing output_dir with a file in it, and a tripwire on weights."""
    out = tmp_path / "existing_out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded before a user error was reported")

    monkeypatch.setattr(models, "load_model", no_weights)
    base = [
        "--model_name_or_path", tiny_model, "--train_file", write_corpus("jsonl"), "--output_dir", str(out),
        "--max_seq_length", "64", "--report_to", "none",
    ]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    return base, work, out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make_args, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message_and_exit_2(sandbox, make_args, fragments, capsys):
    base, work, out = sandbox
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(base + make_args(work))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from:\n{err}"
    assert snapshot(out) == before


def test_bf16_on_hardware_without_bf16(sandbox, monkeypatch, capsys):
    base, _, _ = sandbox
    monkeypatch.setattr(validate, "bf16_supported", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(base + ["--bf16"])
    assert exit_info.value.code == 2
    assert "--bf16: this machine cannot compute in bf16" in capsys.readouterr().err


def test_fp16_with_gemma3_is_refused_with_the_reason(sandbox, monkeypatch, capsys):
    base, _, _ = sandbox
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # so that only the Gemma 3 reason applies
    with pytest.raises(SystemExit) as exit_info:
        entry.main(base + ["--fp16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--fp16 with" in err and "overflow float16" in err and "Use --bf16" in err


def test_report_to_wandb_without_wandb(sandbox, monkeypatch, capsys):
    base, _, _ = sandbox
    real = validate._installed
    monkeypatch.setattr(validate, "_installed", lambda name: False if name == "wandb" else real(name))
    with pytest.raises(SystemExit):
        entry.main(base + ["--report_to", "wandb"])
    assert "--report_to wandb: the wandb package is not installed" in capsys.readouterr().err


def test_flash_attention_without_flash_attn_installed(sandbox, monkeypatch, capsys):
    base, _, _ = sandbox
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    real = validate._installed
    monkeypatch.setattr(validate, "_installed", lambda name: False if name == "flash_attn" else real(name))
    with pytest.raises(SystemExit):
        entry.main(base + ["--use_flash_attention"])
    assert "--use_flash_attention: the flash-attn package is not installed" in capsys.readouterr().err


def test_unwritable_output_dir(sandbox, monkeypatch, capsys):
    base, work, _ = sandbox
    monkeypatch.setattr(validate.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit):
        entry.main(base + ["--output_dir", str(work / "new")])
    assert "is not writable" in capsys.readouterr().err


def test_several_problems_are_reported_together(sandbox, capsys):
    base, _, _ = sandbox
    with pytest.raises(SystemExit):
        entry.main(base + ["--learning_rate", "0", "--per_device_train_batch_size", "-1", "--warmup_steps", "-2"])
    err = capsys.readouterr().err
    assert err.startswith("3 problems:\n  - ")
    assert "--learning_rate 0" in err and "--per_device_train_batch_size -1" in err and "--warmup_steps -2" in err


def test_unknown_flag_exits_2(sandbox, capsys):
    base, _, _ = sandbox
    with pytest.raises(SystemExit) as exit_info:
        entry.main(base + ["--learning_rat", "1e-4"])
    assert exit_info.value.code == 2
    assert "unknown flag '--learning_rat'. Did you mean 'learning_rate'?" in capsys.readouterr().err
