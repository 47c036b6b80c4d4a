"""A mix of streamed sources (mix.py, --streaming): mixing.Mixture over each source's stream, with a state
that says where every source stands in its stream, so that a resumed run reopens each one there without
reading what came before (train.callbacks.DataPosition saves it in each checkpoint, as it does a single
stream's position)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, replace

import torch

from tuner.data import mixing
from tuner.data.stream import Position
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

KEEP_POSITIONS = 4096  # stream positions kept per source: far more than a dataloader reads ahead


class StreamOpener:
    """mixing.Source.open for one source's stream (a streaming.ResumableStream): a pass from its example number
    `start`, as the mix's rows. It remembers where its recent examples start, so that a checkpoint can reopen
    the source there; without one, it reads the pass from its start and drops what comes before."""

    def __init__(self, stream, convert):
        self.stream, self.convert = stream, convert
        self.known: OrderedDict[tuple[int, int], Position] = OrderedDict()  # (pass, example number) -> where it starts

    def __call__(self, pass_index: int, start: int) -> Iterator[dict]:
        at = self.known.get((pass_index, start))
        number = start if at is not None else 0
        for item, after in self.stream.one_pass(at or replace(self.stream.first, epoch=pass_index)):
            number += 1  # `after` is where example `number` of the pass starts
            self.remember((pass_index, number), after)
            if number > start:
                yield self.convert(self.stream.as_tensors(item))

    def remember(self, key: tuple[int, int], position: Position) -> None:
        self.known[key] = position
        if len(self.known) > KEEP_POSITIONS:
            self.known.popitem(last=False)


class StreamMix(torch.utils.data.IterableDataset):
    """The streamed sources, mixed (mixing.Mixture); its state includes each source's stream position."""

    def __init__(self, parts: list, converters: list, unit: str, exhausted: str):
        """parts: mix_data.Part, each with a streaming.ResumableStream to train on; converters: each one's rows
        as the mix's collator takes them (mix_data.as_row)."""
        self.parts = parts
        self.openers = [StreamOpener(p.datasets.train, convert) for p, convert in zip(parts, converters)]
        mix = [mixing.Source(p.spec.name, p.spec.weight, opener) for p, opener in zip(parts, self.openers)]
        self.mixture = mixing.Mixture(mix, unit, exhausted)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.mixture)

    @property
    def examples(self) -> int:
        return self.mixture.examples

    rows_read = examples  # rows the mix has given so far (or where a resumed one starts): train.callbacks.DataPosition

    def state_at(self, n: int) -> dict:
        """JSON-able: the mixture's state after n rows, and where each source's next row starts in its stream."""
        state = self.mixture.state_at(n)
        positions = {}
        for source, opener in zip(state["sources"], self.openers):
            at = opener.known.get((source["pass"], source["position"]))
            positions[source["name"]] = asdict(at) if at is not None else None
        return {"mixture": state, "positions": positions}

    resume_problem = ("--streaming with several sources: the checkpoint has no position of the mix (it was written by "
                      "another kind of run). Resume it with the options it was written with, or start in a new --output_dir.")  # fmt: skip

    def load_state(self, saved: dict) -> None:
        if "mixture" not in saved:
            raise UsageError(self.resume_problem)
        self.mixture.load_state_dict(saved["mixture"])
        for source, opener in zip(saved["mixture"]["sources"], self.openers):
            at = saved["positions"].get(source["name"])
            if at is not None:
                opener.known[(source["pass"], source["position"])] = Position(**at)
        logger.info("Resuming the mix after %d rows: %s", saved["mixture"]["examples"],
                    ", ".join(f"{s['name']} pass {s['pass']} row {s['position']}" for s in saved["mixture"]["sources"]))  # fmt: skip

    def forget_before(self, n: int) -> None:
        self.mixture.forget_before(n)

    def tokens_per_source(self, n: int) -> dict[str, int]:
        return mixing.tokens_per_source(self.mixture.state_at(min(n, self.mixture.examples)))
