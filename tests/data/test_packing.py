"""Packing: best-fit decreasing against brute force, row layout, collators, the isolation guard, and the proof
that each example in a packed row has exactly the logits and loss it has alone (eager and sdpa)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from tuner.common import IGNORE_INDEX as IGNORE
from tuner.data import packing

# ---------------------------------------------------------------- best-fit decreasing


def reference_bfd(lengths, capacity):
    """Best-fit decreasing written as plainly as possible: scan every bin for each item."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, rooms = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: (rooms[b], b))
            bins[best].append(i)
            rooms[best] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(20))
def test_best_fit_decreasing_equals_the_plain_reference(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 16, 100])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 60))]
    assert packing.best_fit_decreasing(lengths, capacity) == reference_bfd(lengths, capacity)


def test_best_fit_decreasing_by_hand():
    # 7 -> new bin A(3 left); 5 -> new B(5); 4 -> B (fits A? no: 3 < 4) -> B(1); 3 -> A(0); 2 -> new C(8); 1 -> B(0)
    assert packing.best_fit_decreasing([3, 7, 1, 5, 2, 4], 10) == [[1, 0], [3, 5, 2], [4]]
    assert packing.best_fit_decreasing([], 10) == []
    assert packing.best_fit_decreasing([10, 10], 10) == [[0], [1]]


@pytest.mark.parametrize("lengths", [[11], [0], [3, 0]])
def test_best_fit_decreasing_refuses_items_that_cannot_fit(lengths):
    with pytest.raises(ValueError):
        packing.best_fit_decreasing(lengths, 10)


def test_no_bin_is_over_capacity_and_every_item_is_placed_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(5000)]
    bins = packing.best_fit_decreasing(lengths, 512)
    assert sorted(itertools.chain(*bins)) == list(range(5000))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # a lower bound no packing beats, and BFD's known worst-case guarantee of 11/9 OPT + 6/9
    lower = -(-sum(lengths) // 512)
    assert lower <= len(bins) <= 11 / 9 * lower + 1


# ---------------------------------------------------------------- rows


def examples():
    ids = [[2, 10, 11, 12], [2, 20], [2, 30, 31], [2, 40, 41, 42, 43]]
    labels = [[IGNORE, IGNORE, 11, 12], [2, 20], [IGNORE, 30, 31], [IGNORE, IGNORE, IGNORE, 43, IGNORE]]
    return ids, labels


def test_packed_rows_by_hand():
    ids, labels = examples()
    rows = packing.pack_examples(ids, labels, max_seq_length=7)
    # BFD: 5 (#3) -> A(2 left); 4 (#0) -> B(3); 3 (#2) -> B(0); 2 (#1) -> A(0)
    assert [r["input_ids"].tolist() for r in rows] == [[2, 40, 41, 42, 43, 2, 20], [2, 10, 11, 12, 2, 30, 31]]
    assert [r["position_ids"].tolist() for r in rows] == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert [r["example_index"].tolist() for r in rows] == [[3, 3, 3, 3, 3, 1, 1], [0, 0, 0, 0, 2, 2, 2]]
    # example 1's first label (2) is dropped: it would be predicted from example 3's last token
    assert [r["labels"].tolist() for r in rows] == [
        [IGNORE, IGNORE, IGNORE, 43, IGNORE, IGNORE, 20],
        [IGNORE, IGNORE, 11, 12, IGNORE, 30, 31],
    ]


def test_packing_figures():
    ids, labels = examples()
    rows = packing.pack_examples(ids, labels, max_seq_length=8)
    stats = packing.packing_stats(rows, 8)
    assert (stats.examples, stats.rows, stats.tokens) == (4, 2, 4 + 2 + 3 + 5)
    assert stats.trained_tokens == 6  # 11 12 | 20 | 30 31 | 43: example 1's first label (2) is never trained
    assert stats.fill_ratio == pytest.approx(14 / 16)
    assert stats.trained_fraction == pytest.approx(6 / 14)
    assert "4 examples into 2 rows" in stats.summary()


def test_packed_collator_pads_with_its_own_position_block():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "position_ids": [0, 1, 0], "example_index": [0, 0, 1]},
        {"input_ids": [8], "labels": [IGNORE], "position_ids": [0], "example_index": [2]},
    ]
    batch = packing.PackedCollator(pad_token_id=0, pad_to_multiple_of=4, return_example_index=True)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "example_index"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 2]]
    assert batch["example_index"].tolist() == [[0, 0, 1, -1], [2, -1, -1, -1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert "attention_mask" not in packing.PackedCollator(pad_token_id=0)(rows)


def test_padding_collator():
    features = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [IGNORE]}]
    batch = packing.PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert "position_ids" not in batch


# ---------------------------------------------------------------- the guard


def test_guard_refuses_what_turns_isolation_off():
    packed = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1]])}
    packing.check_packed_batch(packed, config_use_cache=False)
    packing.check_packed_batch({**packed, "use_cache": False}, config_use_cache=True)
    for extra, config_use_cache in [
        ({"attention_mask": torch.ones(1, 4)}, False),
        ({"past_key_values": object()}, False),
        ({"use_cache": True}, False),
        ({}, True),
    ]:
        with pytest.raises(packing.PackingIsolationError, match="attend to each other"):
            packing.check_packed_batch({**packed, **extra}, config_use_cache=config_use_cache)


def test_guard_lets_unpacked_batches_through():
    plain = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)}
    packing.check_packed_batch(plain, config_use_cache=True)
    packing.check_packed_batch({**plain, "position_ids": torch.arange(3).expand(2, 3)}, config_use_cache=True)
    assert packing.option_problems(packing=True, use_cache=True)
    assert not packing.option_problems(packing=True, use_cache=False)
    assert not packing.option_problems(packing=False, use_cache=True)


# ---------------------------------------------------------------- isolation on the tiny Gemma 3


def random_examples(vocab: int, lengths: list[int], seed: int = 0):
    """Token ids starting with BOS (2); labels trained on the second half, the first token never."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = np.concatenate([[2], rng.integers(6, vocab, size=n - 1)])
        y = np.where(np.arange(n) >= n // 2, x, IGNORE)
        y[0] = IGNORE
        ids.append(x)
        labels.append(y)
    return ids, labels


def load(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    assert model.config.sliding_window == 64 and "sliding_attention" in model.config.layer_types
    return model.eval()


def per_token_loss(logits, labels):
    """(T,) loss of each label position after the shift; 0 where not trained."""
    shifted = labels[1:]
    loss = torch.nn.functional.cross_entropy(logits[:-1], shifted.clamp(min=0), reduction="none")
    return torch.cat([torch.zeros(1), loss * (shifted != IGNORE)])


# lengths over the 64-token sliding window, at and just past it, short ones, and a one-token one
LENGTHS = [150, 97, 65, 64, 40, 17, 3, 1, 120, 80]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_each_packed_example_equals_the_example_alone(tiny_model, attn):
    model = load(tiny_model, attn)
    ids, labels = random_examples(model.config.vocab_size, LENGTHS)
    rows = packing.pack_examples(ids, labels, max_seq_length=256)
    assert any(len(set(r["example_index"].tolist())) >= 3 for r in rows)  # real packing happened
    batch = packing.PackedCollator(pad_token_id=0, return_example_index=True)(rows)
    example_index = batch.pop("example_index")
    with pytest.raises(packing.PackingIsolationError):  # a fresh model's config asks for a cache
        packing.check_packed_batch(batch, config_use_cache=model.config.use_cache)
    model.config.use_cache = False  # what Trainer does (TrainingArguments.use_cache defaults to False)
    packing.check_packed_batch(batch, config_use_cache=model.config.use_cache)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        packed_loss = per_token_loss_rows(packed.logits, batch["labels"])
        worst = 0.0
        for i, (x, y) in enumerate(zip(ids, labels)):
            where = example_index == i
            row = int(where.any(dim=1).nonzero())
            alone = model(input_ids=torch.as_tensor(x)[None], labels=torch.as_tensor(y, dtype=torch.long)[None], use_cache=False)
            worst = max(worst, (packed.logits[row][where[row]] - alone.logits[0]).abs().max().item())
            trained = (torch.as_tensor(y)[1:] != IGNORE).sum()
            if trained:
                # the model's own loss on the example alone vs the packed row's per-token loss of its tokens
                assert packed_loss[row][where[row]].sum() / trained == pytest.approx(alone.loss.item(), abs=1e-5)
    assert worst <= 1e-5, f"max |packed - alone| logit = {worst}"


def per_token_loss_rows(logits, labels):
    return torch.stack([per_token_loss(logits[b], labels[b]) for b in range(len(labels))])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_an_attention_mask_silently_breaks_isolation(tiny_model, attn):
    """Why the guard exists: the same packed batch with an all-ones attention_mask mixes the examples."""
    model = load(tiny_model, attn)
    ids, labels = random_examples(model.config.vocab_size, [30, 30], seed=1)
    rows = packing.pack_examples(ids, labels, max_seq_length=64)
    assert len(rows) == 1
    batch = packing.PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        isolated = model(**batch, use_cache=False).logits
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        cached = model(**batch, use_cache=True).logits
    second = batch["position_ids"][0].tolist().index(0, 1)
    assert torch.allclose(isolated[0, :second], masked[0, :second], atol=1e-5)  # the first example is unaffected
    assert (isolated[0, second:] - masked[0, second:]).abs().max() > 1e-3
    assert (isolated[0, second:] - cached[0, second:]).abs().max() > 1e-3
    with pytest.raises(packing.PackingIsolationError):
        packing.check_packed_batch({**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
