"""A tiny Gemma 3 and its tokenizer, built from a config: no network, a few seconds on CPU."""

from __future__ import annotations

from pathlib import Path

VOCAB = 512
# Gemma's turn markers are special tokens, as in the real tokenizer (ids 105/106 there, 4/5 here).
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def training_text() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def build_tokenizer(texts: list[str] | None = None, vocab: int = VOCAB, bos: str | None = "<bos>", eos: str | None = "<eos>"):
    """A byte-level BPE trained in milliseconds (on `texts`, CPython's reference docs by default);
    `bos`/`eos` None builds one without that marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Every byte in the alphabet: any unicode text encodes and decodes exactly.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(training_text() if texts is None else texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos, bos_token=bos, unk_token="<unk>")


def build_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Gemma3ForCausalLM(config)


def masked_batch(vocab: int, batch: int, seq: int) -> dict:
    """Random ids with right padding in row 1 and a masked stretch (a prompt) in row 0."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, -3:] = 0
    labels = input_ids.clone()
    labels[1, -3:] = -100
    labels[0, 2:4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def save_tiny_model(directory: Path) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_args(model: str, train_file: str, out, *extra: str) -> list[str]:
    """main.py flags for a quick run of the tiny model; later flags in `extra` override these."""
    return [
        "--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(out),
        "--max_seq_length", "64", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3",
        "--logging_steps", "1", "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none",
        "--max_eval_samples", "8", "--max_new_tokens", "5", "--eval_before_training", "false", *extra,
    ]  # fmt: skip


def qa_pairs(modules: tuple[str, ...] = ("json", "textwrap", "string", "heapq", "bisect", "fnmatch", "shlex", "base64", "random", "statistics")):
    """(question, answer) pairs from the standard library's docstrings (scripts/stdlib_sft.py), in order."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "stdlib_sft.py"
    spec = importlib.util.spec_from_file_location("stdlib_sft", script)
    stdlib_sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stdlib_sft)
    train, _ = stdlib_sft.build(list(modules), validation_fraction=0.0)
    return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in train]


SFT_FORMATS = ("messages", "sharegpt", "prompt_completion", "prompt_completion_messages", "alpaca")


def as_format(pairs, fmt: str) -> list[dict]:
    """The same question/answer pairs as rows of one SFT format (tuner/formats.py)."""
    def user(q):
        return {"role": "user", "content": q}

    def assistant(a):
        return {"role": "assistant", "content": a}

    make = {
        "messages": lambda q, a: {"messages": [user(q), assistant(a)]},
        "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "prompt_completion": lambda q, a: {"prompt": f"Q: {q}\nA:", "completion": f" {a}"},
        "prompt_completion_messages": lambda q, a: {"prompt": [user(q)], "completion": [assistant(a)]},
        "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
    }[fmt]
    return [make(q, a) for q, a in pairs]


def write_rows(path: Path, rows: list[dict]) -> str:
    """Rows as .jsonl, .json, .csv (lists as JSON text in the cell, as spreadsheets hold them) or .parquet."""
    import json

    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix in (".csv", ".parquet"):
        import pandas as pd

        if path.suffix == ".csv":
            rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
            pd.DataFrame(rows).to_csv(path, index=False)
        else:
            pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(path.suffix)
    return str(path)
