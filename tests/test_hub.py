"""No network, fast answer: a hub model or dataset with the hub unreachable (and no HF_HUB_OFFLINE)
fails within seconds with the fix, instead of ~25 s of retries; pushing warns before training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuner import hub

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def unreachable_hub_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    # A hub that refuses connections, so the test means the same with or without a network; an empty
    # HF cache, so nothing can be served from it.
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    return env


def timed_main(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd,
        check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--model_name_or_path", "google/gemma-3-270m"], ["--model_name_or_path google/gemma-3-270m", "cannot be reached"]),
        (["--dataset_name", "wikitext", "--dataset_config_name", "wikitext-2-raw-v1"], ["--dataset_name wikitext", "cannot be reached"]),
    ],
    ids=["model", "dataset"],
)
def test_unreachable_hub_fails_fast_with_the_fix(tiny_model, tmp_path, flags, fragments):
    args = ["--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--max_seq_length", "64", *flags]
    env = unreachable_hub_env(tmp_path)
    result, elapsed = timed_main(args, env, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    for fragment in fragments + ["Check the network", "HF_TOKEN", "offline:gemma-3-270m"]:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Retrying in" not in result.stderr
    # What the network adds, measured against the same command with hub access off (imports and
    # start-up alone, ~5 s idle, three times that on a loaded machine): retries added ~20 s.
    offline, baseline = timed_main(args, {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert offline.returncode == 2, offline.stderr[-2000:]
    assert elapsed - baseline < 5, f"took {elapsed:.1f} s, {elapsed - baseline:.1f} s more than with HF_HUB_OFFLINE=1"


def test_going_offline_reaches_the_libraries_that_read_the_flag_at_import(monkeypatch):
    import datasets.config
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setitem(hub._state, "unreachable", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.go_offline()
    assert huggingface_hub.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    with pytest.raises(Exception) as error:  # answered from the (empty) cache, no request made
        huggingface_hub.hf_hub_download("someone/not-cached-anywhere", "config.json", cache_dir="/nonexistent-cache")
    assert "offline" in str(error.value).lower() or "cache" in str(error.value).lower()


def test_the_probe_says_no_quickly_for_a_closed_port(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    assert hub.reachable() is False
    assert time.monotonic() - started < hub.PROBE_SECONDS + 1


def test_push_to_hub_without_a_token_warns_before_training(monkeypatch, caplog, tmp_path):
    from tuner.config import parse_args

    monkeypatch.setattr(hub, "is_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    cfg = parse_args(["--push_to_hub", "--output_dir", str(tmp_path / "gemma-ft")])
    hub.warn_before_pushing(cfg)
    assert "no token" in caplog.text and "named after --output_dir (gemma-ft)" in caplog.text


def test_a_mixed_hub_source_counts_as_needing_the_hub(tmp_path):
    from tuner.config import parse_args

    spec = '[{"name": "wiki", "dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1"}]'
    cfg = parse_args(["--model_name_or_path", str(tmp_path), "--datasets", spec, "--output_dir", str(tmp_path / "o")])
    assert hub.needs_hub(cfg)
    local = parse_args(["--model_name_or_path", str(tmp_path), "--train_file", "a.jsonl", "--output_dir", str(tmp_path / "o")])
    assert not hub.needs_hub(local)
