"""What the Trainer reads: torch datasets of token ids, and the `Datasets` bundle the data layer hands over.

- `ChunkDataset`: running text cut into fixed-length chunks (grouping.py); labels are the inputs.
- `PackedDataset`: SFT rows, each several whole examples with restarting position_ids (packing.py).
- `ExampleDataset`: SFT examples one per row (--packing false), padded per batch by the collator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


class ChunkDataset(torch.utils.data.Dataset):
    """Fixed-length chunks; labels are the inputs (the model shifts them)."""

    def __init__(self, chunks: np.ndarray):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.chunks[index], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows {input_ids, labels, position_ids, example_index}, (L,) each; packing.PackedCollator batches them."""

    def __init__(self, rows: Sequence[Mapping[str, np.ndarray]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]:
        return self.rows[index]


class ExampleDataset(torch.utils.data.Dataset):
    """One example a row {input_ids, labels}; packing.PaddingCollator pads each batch."""

    def __init__(self, input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray(self.input_ids[index]), "labels": np.asarray(self.labels[index])}


@dataclass
class Datasets:
    """The training and evaluation datasets, and what the rest of the run needs to know about them."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset | None
    train_tokens: int  # tokens in the training rows (0 for a stream: unknown until read)
    eval_tokens: int
    format: str = "text"  # as resolved from --data_format (auto replaced by what was detected)
    collator: Callable | None = None  # None: transformers' default_data_collator (fixed-length chunks)
    packed: bool = False  # rows hold several examples, told apart by position_ids alone
    chat: bool = False  # examples were rendered through the chat template
    figures: dict = field(default_factory=dict)  # counts for the dry run and run_summary.json
    preview: list[str] = field(default_factory=list)  # first examples with the trained tokens marked
    # describe.py's iterator over the training examples, for influence/examples.jsonl (None for a stream);
    # takes keyword arguments source= and offset= (a mix renames and renumbers each source's examples).
    describer: Callable[..., Iterator[dict]] | None = None
    eval_sets: dict | None = None  # several sources: each one's evaluation set, by name (`eval` holds them all)
    mix: object | None = None  # several sources: mix.MixedRows or mix_stream.StreamMix (the training data)
    run_steps: int | None = None  # a mix in memory: the optimizer steps its schedule was built for

    def describe(self) -> Iterator[dict]:
        """{example_id, source, rows, text} for every training example id the influence scorer can see."""
        return self.describer() if self.describer is not None else iter(())

    @property
    def train_chunks(self) -> int | None:
        """Training rows (chunks or packed rows); None for a stream, whose length is unknown."""
        try:
            return len(self.train)
        except TypeError:
            return None
