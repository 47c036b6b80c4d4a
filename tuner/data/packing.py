"""SFT packing: whole examples in rows of at most max_seq_length tokens, none attending to another.

Rows are filled by best-fit decreasing (longest example first, each into the fullest row it fits;
ties by original order, so the packing is deterministic). A row is the concatenation of its examples
with `position_ids` restarting at 0 for each, and no attention mask: given position_ids and neither
an attention_mask nor past_key_values, transformers (masking_utils.find_packed_sequence_indices)
reads a new sequence wherever a position does not follow the previous one by 1, and builds a
block-diagonal causal mask (eager, sdpa, flex) or varlen flash-attention calls. An attention_mask or
a cache (also the one `use_cache=True` creates inside forward) silently turns that detection off and
examples see each other: `check_packed_batch` refuses such a batch.

The first token of every example (its BOS) is never a target (its label is -100), so the loss never
asks one example's last token to predict the next example's first. `example_index` says which example
(its index in the list packed) each token belongs to, -1 for padding, for per-example scoring.

`PackedCollator` pads a batch of packed rows to one length: the padding is a block of its own
(positions 0, 1, ..., labels -100, example -1), so no real token attends to it. `PaddingCollator` is
`--packing false`: one example a row, right padding, an attention_mask, labels -100 on padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tuner.common import IGNORE_INDEX


class PackingIsolationError(RuntimeError):
    """A packed batch would reach the model in a way that lets examples attend to each other."""


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin: items longest first, each into the bin with least room that fits.

    Bins' free room is kept sorted (bisect), O(n log n) searches; the list inserts are memmoves, fast
    in C for the tens of thousands of rows an SFT set makes (transformers has no packer to reuse)."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        raise ValueError(f"items {too_long[:5]} have lengths outside 1..{capacity}: truncate or drop them first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack_examples(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], max_seq_length: int
) -> list[dict[str, np.ndarray]]:
    """Packed rows, each {input_ids, labels, position_ids, example_index}: (L,) int64 arrays, L <= max_seq_length."""
    bins = best_fit_decreasing([len(ids) for ids in input_ids], max_seq_length)
    rows = []
    for members in bins:
        label_parts = []
        for i in members:
            example_labels = np.array(labels[i], dtype=np.int64)
            example_labels[0] = IGNORE_INDEX  # predicted from the previous example's last token: never a target
            label_parts.append(example_labels)
        rows.append(
            {
                "input_ids": np.concatenate([np.asarray(input_ids[i], dtype=np.int64) for i in members]),
                "labels": np.concatenate(label_parts),
                "position_ids": np.concatenate([np.arange(len(input_ids[i]), dtype=np.int64) for i in members]),
                "example_index": np.concatenate([np.full(len(input_ids[i]), i, dtype=np.int64) for i in members]),
            }
        )
    return rows


@dataclass(frozen=True)
class PackingStats:
    examples: int
    rows: int
    tokens: int  # real tokens in all rows
    trained_tokens: int  # labels != -100
    max_seq_length: int

    @property
    def fill_ratio(self) -> float:
        """Real tokens over row capacity (rows x max_seq_length); 1 - this is what padding to full rows costs."""
        return self.tokens / (self.rows * self.max_seq_length) if self.rows else 0.0

    @property
    def trained_fraction(self) -> float:
        """Trained tokens over real tokens."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        return (
            f"packed {self.examples:,} examples into {self.rows:,} rows of <= {self.max_seq_length} tokens: "
            f"fill {self.fill_ratio:.1%}, {self.trained_fraction:.1%} of tokens trained"
        )


def packing_stats(rows: Sequence[Mapping[str, Any]], max_seq_length: int) -> PackingStats:
    examples = {int(i) for row in rows for i in np.unique(np.asarray(row["example_index"])) if i >= 0}
    return PackingStats(
        examples=len(examples),
        rows=len(rows),
        tokens=sum(len(row["input_ids"]) for row in rows),
        trained_tokens=sum(int((np.asarray(row["labels"]) != IGNORE_INDEX).sum()) for row in rows),
        max_seq_length=max_seq_length,
    )


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _right_pad(values: Sequence[Sequence[int]], length: int, fill: int) -> torch.Tensor:
    out = torch.full((len(values), length), fill, dtype=torch.long)
    for b, v in enumerate(values):
        out[b, : len(v)] = torch.as_tensor(np.asarray(v, dtype=np.int64))
    return out


@dataclass
class PackedCollator:
    """Packed rows -> {input_ids, labels, position_ids} (B, T) long tensors; no attention_mask, ever."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_example_index: bool = False  # off for training: the model's forward does not take it

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = _padded_length([len(f["input_ids"]) for f in features], self.pad_to_multiple_of)
        batch = {
            "input_ids": _right_pad([f["input_ids"] for f in features], length, self.pad_token_id),
            "labels": _right_pad([f["labels"] for f in features], length, IGNORE_INDEX),
            # padding restarts at 0: a sequence of its own, which no real token attends to
            "position_ids": _right_pad([f["position_ids"] for f in features], length, 0),
        }
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            batch["position_ids"][b, n:] = torch.arange(length - n)
        if self.return_example_index:
            batch["example_index"] = _right_pad([f["example_index"] for f in features], length, -1)
        return batch


@dataclass
class PaddingCollator:
    """One example a row (--packing false) -> {input_ids, attention_mask, labels} (B, T), right padded."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        length = _padded_length(lengths, self.pad_to_multiple_of)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        return {
            "input_ids": _right_pad([f["input_ids"] for f in features], length, self.pad_token_id),
            "attention_mask": mask,
            "labels": _right_pad([f["labels"] for f in features], length, IGNORE_INDEX),
        }


def has_restarting_positions(position_ids) -> bool:
    """Some row's positions go other than +1 from one token to the next: several sequences in a row."""
    if position_ids is None:
        return False
    positions = torch.as_tensor(position_ids)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    return bool((positions.diff(dim=-1) != 1).any())


def check_packed_batch(inputs: Mapping[str, Any], config_use_cache: bool | None = None) -> None:
    """Refuse a packed batch (restarting position_ids) that also carries an attention_mask or a KV cache,
    or that the model would give a cache (`use_cache`, else the model config's, true): either one makes
    transformers skip packed-sequence detection, and examples attend to each other without an error."""
    if not has_restarting_positions(inputs.get("position_ids")):
        return
    use_cache = inputs.get("use_cache")
    use_cache = config_use_cache if use_cache is None else use_cache
    culprits = []
    if inputs.get("attention_mask") is not None:
        culprits.append("an attention_mask")
    if inputs.get("past_key_values") is not None:
        culprits.append("past_key_values")
    if use_cache:
        culprits.append("use_cache=True (forward would create a KV cache)")
    if culprits:
        raise PackingIsolationError(
            f"A packed batch (position_ids restarting inside a row) also has {' and '.join(culprits)}: transformers "
            "would then ignore the sequence boundaries and let packed examples attend to each other. Give packed "
            "batches position_ids only, with use_cache=False (--use_cache false), or train with --packing false."
        )


def option_problems(packing: bool, use_cache: bool) -> list[str]:
    """For validate(): option combinations that would turn packing's isolation off."""
    if packing and use_cache:
        return [
            "--packing true with --use_cache true: a KV cache during training turns off the per-example attention "
            "of packed rows (examples would attend to each other). Drop --use_cache or set --packing false."
        ]
    return []
