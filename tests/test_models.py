"""Model and tokenizer set-up: pad token, embedding resize, attention and dtype choice."""

from __future__ import annotations

import logging

import torch

from tuner import models
from tuner.config import parse_args


def test_missing_pad_token_becomes_eos(tiny_model, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        loaded = models.load_tokenizer(parse_args([]), str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert "no pad token" in caplog.text


def test_embeddings_grow_to_fit_a_larger_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens([f"<new{i}>" for i in range(10)])
    model = models.load_model(parse_args([]), tiny_model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 522
    assert model.get_output_embeddings().weight.shape[0] == 522  # tied head follows


def test_flash_attention_loads_in_bf16_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        attention, dtype = models.attention_and_dtype(parse_args(["--use_flash_attention"]))
    assert (attention, dtype) == ("flash_attention_2", torch.bfloat16)
    assert "bfloat16" in caplog.text


def test_default_is_float32_with_the_models_own_attention():
    assert models.attention_and_dtype(parse_args([])) == (None, torch.float32)
    assert models.attention_and_dtype(parse_args(["--attn_implementation", "eager"])) == ("eager", torch.float32)
