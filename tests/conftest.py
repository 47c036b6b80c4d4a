import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import save_tiny_model, training_text  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: loads the real Gemma 3 270M; run with -m slow")


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Token and dataset caches in a temp dir, so tests neither read nor pollute the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["TUNER_TOKEN_CACHE"] = str(cache / "tokens")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    yield cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny Gemma 3 (2 layers, hidden 64) with a 512-token BPE tokenizer."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3")))


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return training_text()


@pytest.fixture
def write_corpus(tmp_path, corpus_docs):
    """write_corpus('jsonl', docs=None, name='train') -> path of a corpus in that format."""

    def write(fmt: str, docs: list[str] | None = None, name: str = "train", column: str = "text") -> str:
        docs = corpus_docs if docs is None else docs
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps({column: d}) + "\n" for d in docs), encoding="utf-8")
        elif fmt == "json":
            path.write_text(json.dumps([{column: d} for d in docs]), encoding="utf-8")
        elif fmt == "txt":
            path.write_text("\n\n".join(d.strip() for d in docs) + "\n", encoding="utf-8")
        elif fmt in ("csv", "parquet"):
            import pandas as pd

            frame = pd.DataFrame({column: docs, "id": range(len(docs))})
            frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
        else:
            raise ValueError(fmt)
        return str(path)

    return write
