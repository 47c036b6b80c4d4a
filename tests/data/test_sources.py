"""sources.py: the hold-out rule against brute force, the same decision for a row in memory or streamed, and
opening hub-style directories and saved datasets, in memory and streamed."""

from __future__ import annotations

import json
import random
from collections import Counter

import datasets
import numpy as np
import pytest

from tuner.config import parse_args
from tuner.data import build, sources


@pytest.mark.parametrize("percent", [1, 5, 7, 10, 25, 30, 50, 99])
def test_every_whole_stratum_holds_out_exactly_its_share(percent):
    size, count = sources.stratum(percent)
    # brute force: the smallest run of rows in which percent % is a whole number of rows
    assert size == min(k for k in range(1, 101) if percent * k % 100 == 0) and count == percent * size // 100
    mask = sources.HoldOut(percent, seed=0).mask(size * 50)
    assert all(block.sum() == count for block in mask.reshape(50, size))


def test_a_row_is_decided_by_its_index_and_the_seed_alone():
    """In memory (mask) and streamed (row by row, in any order) give the same answer for every row."""
    mask = sources.HoldOut(5, seed=3).mask(1000)
    rows = list(range(1000))
    random.Random(0).shuffle(rows)
    assert all(sources.HoldOut(5, seed=3).held_out(r) == mask[r] for r in rows)
    assert not np.array_equal(sources.HoldOut(5, seed=4).mask(1000), mask)
    assert not sources.HoldOut(0, seed=3).mask(1000).any()


def test_held_out_positions_are_spread_over_the_stratum():
    """Over 4000 strata of 20 rows, every position is chosen about as often (200 expected each)."""
    mask = sources.HoldOut(5, seed=11).mask(20 * 4000)
    counts = Counter(int(i) % 20 for i in np.flatnonzero(mask))
    assert len(counts) == 20 and all(140 <= n <= 260 for n in counts.values())


def messages(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(n)]


def test_a_hub_style_directory_and_a_saved_dataset_open_in_memory_and_streamed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for split, n in (("train", 7), ("validation", 3)):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages(n)), encoding="utf-8")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(messages(7))}).save_to_disk(str(tmp_path / "saved"))
    for name, has_validation in ((repo, True), (tmp_path / "saved", False)):
        for streaming in (False, True):
            opened = build.open_run_source(parse_args(["--dataset_name", str(name)]), streaming)
            assert opened.train[0].columns == ["messages"] and opened.train[0].streaming is streaming
            assert len(list(opened.train[0].rows)) == 7
            assert (opened.validation is not None) is has_validation
            assert opened.held_out_percent == (0 if has_validation else 5)
            assert opened.train[0].source.name == f"--dataset_name {name} (train split)"


def test_a_stream_peeked_for_its_columns_still_starts_at_its_first_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in messages(4)), encoding="utf-8")
    source = sources.OpenSource(sources.Source("--train_file", str(path)), sources.load_local("--train_file", str(path), True))
    assert source.columns == ["messages"]
    read = [(row, record["messages"][0]["content"]) for row, _, record in sources.stream_records(source.rows, source.beginning, 0)]
    assert read == [(0, "q0"), (1, "q1"), (2, "q2"), (3, "q3")]


def test_the_fingerprint_follows_the_file(tmp_path):
    """The one use of datasets' private _fingerprint: it must change with the data (else the token cache
    would serve stale tokens), and stay when nothing changed (else the cache would never be reused)."""
    path = tmp_path / "rows.jsonl"

    def fingerprint() -> str:
        return sources.OpenSource(sources.Source("--train_file", str(path)), sources.load_local("--train_file", str(path))).fingerprint

    path.write_text("".join(json.dumps(r) + "\n" for r in messages(3)), encoding="utf-8")
    first = fingerprint()
    assert fingerprint() == first
    path.write_text("".join(json.dumps(r) + "\n" for r in messages(4)), encoding="utf-8")
    assert fingerprint() != first
