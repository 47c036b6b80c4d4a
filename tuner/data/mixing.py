"""Several training sources mixed in exact proportions of trained tokens (or of examples).

Why not `datasets.interleave_datasets`: given probabilities it draws each example's source at
random, so the proportions hold only in expectation (a 3:1 mix of 400 examples is 3:1 +- 2.5 %
at one standard deviation), and it knows nothing of tokens, only of examples. The one case where
it is exact, equal weights counted in examples (round robin), is exactly what the schedule below
produces (tests/test_mixing.py compares the two), so it would add a second code path, with a
different resume mechanism, for nothing. It also has no position to save and restore.

The schedule. Let u_i be what source i has given so far (trained tokens, or examples), U their sum,
w_i its weight (W the sum of weights) and l_i the size of its next example. Source i may take the
next turn only while it would still not be ahead of its share with that example counted:
u_i * W < w_i * (U + l_i). (Some source always may: these differences sum to the sum of w_i * l_i,
which is positive.) Among those, the source whose next example is due first, the smallest
(u_i + l_i) / w_i, takes the turn; ties go to the lower index. Integers throughout, so nothing
depends on floating-point rounding.
- Counted in examples this is Balinski and Young's quota method (1975): after every prefix of n
  examples each source has floor(n * p_i) or ceil(n * p_i) of them, p_i = w_i / W, so it is less
  than one example from its exact share, at every step of the run and at its end.
- Counted in tokens, a source is never ahead of its share by a whole example of its own (it takes
  one only while it would otherwise not be ahead). That it is never behind by as much as the
  longest example of the run is checked by the tests, and held in 8,000 random runs with adversarial
  lengths, but is not proved here.
Trained tokens are what the loss counts: labels != -100 after the causal shift, as Trainer's
`num_items_in_batch` (see `trained_tokens`).

Running out. A source whose pass ends either restarts (its next pass, which it may shuffle
differently) or, under "stop", stays in the schedule until it is due again (in tokens, as if its
next example were as long as its average), and then the mix ends: every source has had its share,
as `interleave_datasets(..., stopping_strategy="first_exhausted")` does on a map-style Dataset (on
an IterableDataset it stops as soon as a source runs out instead). The default is "restart": the mix never ends, so the run's length is
--max_steps, as with --streaming, and the proportions the user asked for hold over the whole run; a
source smaller than its share is repeated, which is what giving it that weight asks for. "stop" is
for a run that must not repeat any example.

Resume. `state_dict()` is a small JSON-able dict (per source: pass, position in the pass, examples
and tokens taken); a Mixture given it by `load_state_dict` continues with exactly the examples the
first one would have yielded next. A DataLoader reads ahead of the optimizer, so `state_at(n)`
gives the state after the n-th example of the run (the last ones are kept; `forget_before(n)`
drops older ones). Sources reopen at their position: an in-memory source indexes straight there, a
streamed one reads and drops the examples before it. As with --streaming, use no DataLoader worker
processes (each would run its own copy of the mix).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from itertools import islice

import numpy as np
import torch

from tuner.common import IGNORE_INDEX

logger = logging.getLogger(__name__)

TOKENS, EXAMPLES = "tokens", "examples"
UNITS = (TOKENS, EXAMPLES)
STOP, RESTART = "stop", "restart"
POLICIES = (STOP, RESTART)
STATE_VERSION = 1
KEEP_STATES = 65_536  # states of the last examples yielded, for state_at: far more than any read-ahead
_END = object()  # a source's look-ahead once its pass has ended under "stop"


@dataclass(frozen=True)
class Source:
    """One training source: `open(pass_index, start)` yields that pass's examples from number `start` on.

    The same (pass_index, start) must give the same examples each time: resuming depends on it.
    """

    name: str
    weight: float
    open: Callable[[int, int], Iterable]


def in_memory(name: str, weight: float, examples: Sequence, seed: int | None = None) -> Source:
    """A source over a sequence (list, datasets.Dataset, ...); with `seed`, each pass in its own order."""
    return Source(name, weight, partial(_in_memory_pass, examples, seed))


def _in_memory_pass(examples: Sequence, seed: int | None, pass_index: int, start: int) -> Iterator:
    order = range(len(examples)) if seed is None else np.random.default_rng([seed, pass_index]).permutation(len(examples))
    for index in order[start:]:
        yield examples[int(index)]


def streamed(name: str, weight: float, open_pass: Callable[[int], Iterable]) -> Source:
    """A source read as a stream: `open_pass(pass_index)` returns a fresh iterable over one pass.

    Starting mid-pass reads and drops the examples before the start, the only way into a generic
    stream.
    """
    return Source(name, weight, partial(_streamed_pass, open_pass))


def _streamed_pass(open_pass: Callable[[int], Iterable], pass_index: int, start: int) -> Iterator:
    return islice(iter(open_pass(pass_index)), start, None)


def trained_tokens(example) -> int:
    """Tokens of one example that the loss counts, as Trainer's num_items_in_batch does.

    A dict's `shift_labels` != -100, else its `labels[1:]` != -100 (position 0 is never a target),
    else len(input_ids) - 1; a bare token chunk (list, array, tensor) counts len - 1.
    """
    if isinstance(example, Mapping):
        if "shift_labels" in example:
            return int((np.asarray(example["shift_labels"]) != IGNORE_INDEX).sum())
        if "labels" in example:
            return int((np.asarray(example["labels"])[1:] != IGNORE_INDEX).sum())
        example = example["input_ids"]
    return max(0, len(example) - 1)


def tokens_per_source(state: dict) -> dict[str, int]:
    """Trained tokens taken from each source, by name, in a state from state_dict() or state_at()."""
    return {source["name"]: source["tokens"] for source in state["sources"]}


@dataclass
class _Taken:
    """What one source has given: the part of the state that belongs to it."""

    pass_index: int = 0
    position: int = 0  # examples taken in this pass
    examples: int = 0  # in the whole run
    tokens: int = 0  # trained tokens, in the whole run

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.pass_index, self.position, self.examples, self.tokens


class _Cursor:
    """An open pass of one source and its next example (the look-ahead the schedule needs)."""

    def __init__(self, iterator: Iterator):
        self.iterator = iterator
        self.ahead, self.ahead_tokens = _END, 0


class Mixture(torch.utils.data.IterableDataset):
    """The examples of several sources, interleaved in exact proportions (see the module docstring).

    unit: TOKENS (trained tokens, the default) or EXAMPLES; on_exhausted: RESTART (the default) or
    STOP; count_tokens(example) -> trained tokens, for the proportions and for tokens_per_source.
    Each iteration continues from the current state; one iteration at a time.
    """

    def __init__(self, sources: Sequence[Source], unit: str = TOKENS, on_exhausted: str = RESTART,
                 count_tokens: Callable[[object], int] = trained_tokens):  # fmt: skip
        _check(sources, unit, on_exhausted)
        self.sources, self.unit, self.on_exhausted, self.count_tokens = list(sources), unit, on_exhausted, count_tokens
        self.weights = integer_weights([source.weight for source in sources])
        self.taken = [_Taken() for _ in sources]
        self.finished = False
        self.history: dict[int, tuple] = {}  # examples yielded -> the state then, for state_at
        self._remember()
        logger.info(
            "Mixing %s in proportions of %s; a source that runs out %s", ", ".join(f"{s.name} ({_plain(s.weight)})" for s in sources),
            "trained tokens" if unit == TOKENS else "examples", "restarts" if on_exhausted == RESTART else "ends the mix",
        )  # fmt: skip

    @property
    def examples(self) -> int:
        """Examples yielded in the whole run (all passes, all iterations, before and after resuming)."""
        return sum(taken.examples for taken in self.taken)

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Trained tokens yielded from each source, by name; state_at(n) gives them for a prefix."""
        return {source.name: taken.tokens for source, taken in zip(self.sources, self.taken)}

    def __iter__(self) -> Iterator:
        if self.finished:
            return
        cursors = [self._open(i) for i in range(len(self.sources))]
        while not self.finished:
            i = schedule_next(self._used(), [self._next_size(i, cursor) for i, cursor in enumerate(cursors)], self.weights)
            cursor, taken = cursors[i], self.taken[i]
            if cursor.ahead is _END:  # "stop": the source that ran out is due again
                self.finished = True
                self._remember()
                logger.info("Mixing: %s ran out and is due again; the mix ends after %d examples", self.sources[i].name, self.examples)
                return
            example = cursor.ahead
            taken.position, taken.examples, taken.tokens = taken.position + 1, taken.examples + 1, taken.tokens + cursor.ahead_tokens
            self._fetch(i, cursor)
            self._remember()
            yield example

    def _used(self) -> list[int]:
        return [taken.tokens if self.unit == TOKENS else taken.examples for taken in self.taken]

    def _next_size(self, i: int, cursor: _Cursor):
        if self.unit == EXAMPLES:
            return 1
        if cursor.ahead is _END:  # it is due when an example as long as its average would be
            return Fraction(self.taken[i].tokens, self.taken[i].examples)
        return cursor.ahead_tokens

    def _open(self, i: int) -> _Cursor:
        taken = self.taken[i]
        cursor = _Cursor(iter(self.sources[i].open(taken.pass_index, taken.position)))
        self._fetch(i, cursor)
        return cursor

    def _fetch(self, i: int, cursor: _Cursor) -> None:
        """The source's next example into the look-ahead; at the end of its pass, restart or mark _END."""
        try:
            cursor.ahead = next(cursor.iterator)
        except StopIteration:
            source, taken = self.sources[i], self.taken[i]
            if taken.examples == 0 or taken.position == 0:
                raise ValueError(f"source {source.name!r}: pass {taken.pass_index} has no examples") from None
            if self.unit == TOKENS and taken.tokens == 0:
                raise ValueError(f"source {source.name!r}: no trained tokens in a whole pass (every label is -100?)") from None
            if self.on_exhausted == STOP:
                cursor.ahead = _END
                return
            taken.pass_index, taken.position = taken.pass_index + 1, 0
            # A small source may restart thousands of times in a long run: its first restart is news, the rest detail.
            logger.log(logging.INFO if taken.pass_index == 1 else logging.DEBUG, "Mixing: %s ran out after %d examples "
                       "in all; starting its pass %d", source.name, taken.examples, taken.pass_index)  # fmt: skip
            cursor.iterator = iter(source.open(taken.pass_index, 0))
            return self._fetch(i, cursor)
        cursor.ahead_tokens = self.count_tokens(cursor.ahead)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The state after every example yielded so far."""
        return self._as_dict(self._snapshot())

    def state_at(self, examples: int) -> dict:
        """The state after the first `examples` examples of the run (one of the last KEEP_STATES)."""
        if examples not in self.history:
            known = f"{min(self.history)}..{max(self.history)}" if self.history else "none"
            raise KeyError(f"the mix does not know its state after {examples} examples (it knows {known})")
        return self._as_dict(self.history[examples])

    def forget_before(self, examples: int) -> None:
        for old in [n for n in self.history if n < examples]:
            del self.history[old]

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the Mixture that saved `state` was, with the same sources."""
        saved = [(source["name"], source["weight"]) for source in state["sources"]]
        ours = [(source.name, _plain(source.weight)) for source in self.sources]
        if state.get("version") != STATE_VERSION or saved != ours:
            raise ValueError(f"the saved mix has sources (name, weight) {saved}, this one {ours}: a mix resumes only with the same ones")
        if (state["unit"], state["on_exhausted"]) != (self.unit, self.on_exhausted):
            raise ValueError(
                f"the saved mix counts {state['unit']} and, when a source runs out, does {state['on_exhausted']!r}; "
                f"this one counts {self.unit} and does {self.on_exhausted!r}: a mix resumes only with the same ones"
            )
        self.taken = [_Taken(s["pass"], s["position"], s["examples"], s["tokens"]) for s in state["sources"]]
        self.finished = state["finished"]
        self.history = {}
        self._remember()

    def _snapshot(self) -> tuple:
        return self.finished, tuple(taken.as_tuple() for taken in self.taken)

    def _remember(self) -> None:
        self.history[self.examples] = self._snapshot()
        if len(self.history) > KEEP_STATES:
            del self.history[next(iter(self.history))]  # the oldest: dicts keep insertion order

    def _as_dict(self, snapshot: tuple) -> dict:
        finished, taken = snapshot
        sources = [
            {"name": source.name, "weight": _plain(source.weight), "pass": p, "position": position, "examples": examples, "tokens": tokens}
            for source, (p, position, examples, tokens) in zip(self.sources, taken)
        ]  # fmt: skip
        return {"version": STATE_VERSION, "unit": self.unit, "on_exhausted": self.on_exhausted, "finished": finished,
                "examples": sum(s["examples"] for s in sources), "sources": sources}  # fmt: skip


def schedule_next(used: Sequence, sizes: Sequence, weights: Sequence[int]) -> int:
    """The source that takes the next turn: the quota rule of the module docstring.

    used[i]: tokens (or examples) source i has given; sizes[i]: its next example's; weights: integers.
    """
    total, weight_sum = sum(used), sum(weights)
    indices = range(len(used))
    # Below its share even with its next example counted; nobody is only when every size is 0.
    eligible = [i for i in indices if used[i] * weight_sum < weights[i] * (total + sizes[i])] or list(indices)
    best = eligible[0]
    for i in eligible[1:]:  # earliest due: smallest (used + size) / weight, by cross-multiplying
        if (used[i] + sizes[i]) * weights[best] < (used[best] + sizes[best]) * weights[i]:
            best = i
    return best


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Weights scaled to integers in the same ratios, exactly (0.1 is read as 1/10, as written)."""
    fractions = [Fraction(w) if isinstance(w, numbers.Rational) else Fraction(str(float(w))) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    return [int(f * scale) for f in fractions]


def _check(sources: Sequence[Source], unit: str, on_exhausted: str) -> None:
    names = [source.name for source in sources]
    if not sources:
        raise ValueError("a mix needs at least one source")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"source names must be distinct and non-empty: {names}")
    for source in sources:
        weight = source.weight
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"source {source.name!r}: weight {weight!r} must be a positive number")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
    if on_exhausted not in POLICIES:
        raise ValueError(f"on_exhausted must be one of {POLICIES}, not {on_exhausted!r}")


def _plain(weight):
    """A Python int or float, so the state stays JSON-able when a weight is a numpy number."""
    return weight.item() if hasattr(weight, "item") else weight
