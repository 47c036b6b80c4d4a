"""--dry_run numbers: parameter counts, batch and step arithmetic, and the memory estimate's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import VOCAB, build_model

from tuner import estimate
from tuner.config import parse_args
from tuner.data.datasets import ChunkDataset, Datasets


def config(*flags: str):
    return parse_args(["--train_file", "train.jsonl", *flags])


def datasets(train_chunks: int, eval_chunks: int, seq_len: int) -> Datasets:
    return Datasets(
        train=ChunkDataset(np.zeros((train_chunks, seq_len), dtype=np.int32)),
        eval=ChunkDataset(np.zeros((eval_chunks, seq_len), dtype=np.int32)) if eval_chunks else None,
        train_tokens=train_chunks * seq_len,
        eval_tokens=eval_chunks * seq_len,
    )


@pytest.fixture(scope="module")
def tiny():
    return build_model(VOCAB)


def test_parameter_count_matches_the_real_model_with_tied_weights_counted_once(tiny):
    counted = estimate.count_parameters(tiny.config)
    assert counted["parameters"] == sum(p.numel() for p in tiny.parameters()) == 107_200
    assert counted["tied_embeddings"] and counted["embedding_parameters"] == VOCAB * 64


def test_parameter_count_of_untied_embeddings_counts_lm_head():
    from transformers import Gemma3ForCausalLM

    cfg = build_model(VOCAB).config
    cfg.tie_word_embeddings = False
    real = Gemma3ForCausalLM(cfg)
    counted = estimate.count_parameters(cfg)
    assert not counted["tied_embeddings"]
    assert counted["parameters"] == sum(p.numel() for p in real.parameters()) == 107_200 + VOCAB * 64


def test_epoch_arithmetic_by_hand():
    cfg = config("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8", "--num_train_epochs", "3")
    # 1001 chunks over 2 processes x 4 = 125.1 -> 126 batches per process; the last 6 of them make
    # a partial accumulation window, which is a step: ceil(126 / 8) = 16 steps per epoch, 48 in all.
    assert estimate.step_counts(cfg, 1001, 2) == {
        "effective_batch_sequences": 64, "effective_batch_tokens": 64 * 2048,
        "steps_per_epoch": 16, "total_steps": 48, "epochs": 3.0,
    }  # fmt: skip
    drop = config("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8", "--dataloader_drop_last")
    assert estimate.step_counts(drop, 1001, 2)["steps_per_epoch"] == 16  # 125 batches: still a partial window


def test_activation_formula_on_the_tiny_config(tiny):
    # h 64, q 2 x 32 = 64, k 32, i 128, s 64, both layers sliding (one saved float mask each).
    kept = 4 * (8 * 64 + 2 * 64 + 2 * 32)  # 2816 bytes
    compute = 2 * 64 + 2 * 64 + 2 * 32 + 4 * 128  # 832 elements
    fp32 = estimate.activation_bytes_per_token(tiny.config, 4, False, "sdpa", 64)
    bf16 = estimate.activation_bytes_per_token(tiny.config, 2, True, "sdpa", 64)
    assert fp32 == {"layer": kept + 4 * compute + 4 * 64, "outside": 16 * 64}
    assert bf16["layer"] == kept + 2 * compute + 2 * (3 * 64 + 64) + 2 * 64
    flash = estimate.activation_bytes_per_token(tiny.config, 2, False, "flash_attention_2", 64)
    assert flash["layer"] == kept + 2 * compute  # no mask copy
    eager = estimate.activation_bytes_per_token(tiny.config, 4, False, "eager", 64)
    assert eager["layer"] == kept + 4 * compute + 4 * 2 * 64  # (s x s) softmax of 2 heads


def saved_bytes_per_token(model, seq_len: int, autocast: bool) -> float:
    """Bytes of the tensors autograd saves in one forward, parameters excluded, per token."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, VOCAB, (2, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long), output_hidden_states=True, use_cache=False)
    return sum(saved.values()) / ids.numel()


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_formula_tracks_what_autograd_saves(tiny, bf16):
    tiny.train()
    measured = saved_bytes_per_token(tiny, 64, autocast=bf16)
    per_token = estimate.activation_bytes_per_token(tiny.config, 2 if bf16 else 4, bf16, "sdpa", 64)
    weight_copies = 2 * sum(p.numel() for p in tiny.parameters()) / 128 if bf16 else 0  # per token of 2 x 64
    predicted = tiny.config.num_hidden_layers * per_token["layer"] + per_token["outside"] + weight_copies
    # Within 6% here (1% at 270M): per-row extras (norm statistics, logsumexp) weigh more at tiny widths.
    assert measured == pytest.approx(predicted, rel=0.06), measured / predicted


def test_memory_components(tiny):
    cfg = config("--max_seq_length", "64", "--per_device_train_batch_size", "2")
    n = 107_200
    base = estimate.estimate(cfg, tiny.config, datasets(10, 2, 64), 1)
    memory = base["memory"]
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == (4 * n, 4 * n, 8 * n)
    # Tiny vocabulary: the loss chunk covers the whole micro-batch of 2 x 64 tokens.
    assert base["loss_chunk_tokens"] == 128
    assert memory["logits"] == 3 * 128 * VOCAB * 4 + VOCAB * 64 * 4
    assert base["standard_loss_logits"] == 3 * 128 * VOCAB * 4
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert "ddp_buckets" not in memory
    assert estimate.estimate(cfg, tiny.config, datasets(10, 2, 64), 2)["memory"]["ddp_buckets"] == 4 * n


def test_gradient_checkpointing_and_bf16_lower_activations(tiny):
    ds = datasets(10, 0, 64)
    plain = estimate.estimate(config("--max_seq_length", "64"), tiny.config, ds, 1)["memory"]
    checkpointed = estimate.estimate(config("--max_seq_length", "64", "--gradient_checkpointing"), tiny.config, ds, 1)["memory"]
    bf16 = estimate.estimate(config("--max_seq_length", "64", "--bf16"), tiny.config, ds, 1)["memory"]
    per_token = estimate.activation_bytes_per_token(tiny.config, 4, False, "sdpa", 64)
    tokens = 4 * 64
    assert plain["activations"] == tokens * (2 * per_token["layer"] + per_token["outside"])
    assert checkpointed["activations"] == tokens * (2 * 64 * 4 + per_token["layer"] + per_token["outside"])
    assert checkpointed["activations"] < plain["activations"]
    # Not half: Gemma keeps its residual stream and norms in fp32 under autocast.
    assert 0.5 * plain["activations"] < bf16["activations"] < plain["activations"]
    assert bf16["weights"] == plain["weights"] + 2 * 107_200  # the autocast copies


def test_flash_attention_loads_bf16_weights(tiny):
    memory = estimate.estimate(config("--use_flash_attention", "--bf16"), tiny.config, datasets(10, 0, 2048), 1)["memory"]
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == (2 * 107_200, 2 * 107_200, 4 * 107_200)


def test_report_text_names_the_numbers(tiny):
    cfg = config("--max_seq_length", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3")
    text = estimate.dry_run_report(cfg, tiny.config, datasets(100, 5, 64), 2)
    for expected in (
        "effective batch", "12 sequences = 2 per device x 3 accumulation x 2 process(es)", "768 = 12 x 64",
        "6,400 tokens in 100 chunks of 64", "320 tokens in 5 chunks", "27 (3 epochs)", "107,200", "tied with lm_head",
        "ESTIMATE", "weights", "gradients", "optimizer state", "activations", "logits (chunked loss)", "DDP gradient buckets", "total", "standard loss",
    ):  # fmt: skip
        assert expected in text, expected
    # 100 chunks over 2 processes x 2 = 25 batches; ceil(25 / 3) accumulation windows = 9 steps per epoch
    assert [line.split()[-1] for line in text.splitlines() if "steps per epoch" in line] == ["9"]


def test_streamed_data_without_length_uses_max_steps(tiny):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    cfg = config("--max_steps", "50", "--max_seq_length", "64")
    numbers = estimate.estimate(cfg, tiny.config, Datasets(Stream(), None, 0, 0), 1)
    assert (numbers["total_steps"], numbers["steps_per_epoch"], numbers["train_chunks"]) == (50, None, None)
    assert "unknown (streaming)" in estimate.format_report(cfg, numbers)
