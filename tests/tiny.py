"""A tiny Gemma 3 and its tokenizer, built from a config: no network, a few seconds on CPU."""

from __future__ import annotations

from pathlib import Path

VOCAB = 512
# Gemma's turn markers are special tokens, as in the real tokenizer (ids 105/106 there, 4/5 here).
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def training_text() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Every byte in the alphabet: any unicode text encodes and decodes exactly.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


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
