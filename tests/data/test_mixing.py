"""Mixing: the proportions are exact after every prefix (counted here by brute force), each exhaustion
policy does what it says, and a saved state resumes the very same continuation."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch

from tuner.data.mixing import (
    EXAMPLES,
    RESTART,
    STOP,
    TOKENS,
    Mixture,
    in_memory,
    integer_weights,
    streamed,
    tokens_per_source,
    trained_tokens,
)


def examples_of(name: str, lengths: list[int], masked: int = 0) -> list[dict]:
    """Examples tagged with their source and index; `masked` leading labels are -100 (a prompt)."""
    out = []
    for index, length in enumerate(lengths):
        labels = [-100] * min(masked, length) + list(range(max(0, length - masked)))
        out.append({"source": name, "index": index, "input_ids": list(range(length)), "labels": labels})
    return out


def counts(sequence, names, unit):
    """Tokens (or examples) per source after each prefix: a list of dicts, brute force."""
    running, out = dict.fromkeys(names, 0), []
    for example in sequence:
        running[example["source"]] += trained_tokens(example) if unit == TOKENS else 1
        out.append(dict(running))
    return out


def take(mixture, n):
    return [example for _, example in zip(range(n), mixture)]


# ---------------------------------------------------------------- what counts as a trained token


def test_trained_tokens_are_what_the_loss_counts():
    # Hand-counted: the loss predicts labels[1:]; -100 is not trained.
    assert trained_tokens({"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}) == 3
    assert trained_tokens({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}) == 2
    assert trained_tokens({"input_ids": [5, 6, 7, 8], "labels": [5, -100, -100, 8]}) == 1
    assert trained_tokens({"input_ids": [5, 6, 7], "shift_labels": [6, -100, -100]}) == 1
    assert trained_tokens({"input_ids": torch.arange(6)}) == 5
    assert trained_tokens(np.arange(10)) == 9
    assert trained_tokens({"input_ids": [1], "labels": torch.tensor([1])}) == 0


def test_integer_weights_keep_the_ratios_as_written():
    assert integer_weights([3, 1]) == [3, 1]
    assert integer_weights([0.1, 0.2, 0.3]) == [1, 2, 3]
    assert integer_weights([1.5, 3, np.float32(0.5)]) == [3, 6, 1]


# ---------------------------------------------------------------- the library's round robin as reference


def test_equal_weights_in_examples_with_stop_are_interleave_datasets_first_exhausted():
    from datasets import Dataset, interleave_datasets

    sizes = {"a": 3, "b": 5, "c": 4}
    lists = {name: examples_of(name, [2] * size) for name, size in sizes.items()}
    expected = interleave_datasets([Dataset.from_list(lists[n]) for n in sizes], stopping_strategy="first_exhausted")
    mix = Mixture([in_memory(n, 1, lists[n]) for n in sizes], unit=EXAMPLES, on_exhausted=STOP)
    assert [(e["source"], e["index"]) for e in mix] == [(e["source"], e["index"]) for e in expected]


def test_equal_weights_with_restart_begin_as_interleave_datasets_all_exhausted():
    from datasets import Dataset, interleave_datasets

    sizes = {"a": 3, "b": 5, "c": 4}
    lists = {name: examples_of(name, [2] * size) for name, size in sizes.items()}
    expected = interleave_datasets([Dataset.from_list(lists[n]) for n in sizes], stopping_strategy="all_exhausted")
    mix = Mixture([in_memory(n, 1, lists[n]) for n in sizes], unit=EXAMPLES, on_exhausted=RESTART)
    assert [(e["source"], e["index"]) for e in take(mix, len(expected))] == [(e["source"], e["index"]) for e in expected]


# ---------------------------------------------------------------- exact proportions after every prefix


WEIGHTS = [[3, 1], [1, 1, 1], [5, 3, 2], [91] + [1] * 9, [1, 2, 4, 8, 16], [0.7, 0.2, 0.1], [97, 1, 1, 1]]


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_examples_are_within_one_of_their_share_after_every_prefix(weights):
    names = [f"s{i}" for i in range(len(weights))]
    mix = Mixture([in_memory(n, w, examples_of(n, [3] * 50)) for n, w in zip(names, weights)], unit=EXAMPLES)
    sequence = take(mix, 400)
    total = sum(Fraction(str(w)) for w in weights)
    for n, prefix in enumerate(counts(sequence, names, EXAMPLES), start=1):
        for name, w in zip(names, weights):
            share = n * Fraction(str(w)) / total
            assert math.floor(share) <= prefix[name] <= math.ceil(share), (n, name, prefix)


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_are_within_one_example_of_their_share_after_every_prefix(weights, seed):
    rng = random.Random(seed)
    names = [f"s{i}" for i in range(len(weights))]
    longest = {n: rng.choice([2, 8, 40]) for n in names}  # sources of short and of long examples
    lists = {n: examples_of(n, [rng.choice([1, longest[n], rng.randint(1, longest[n])]) + 1 for _ in range(60)]) for n in names}
    mix = Mixture([in_memory(n, w, lists[n]) for n, w in zip(names, weights)], unit=TOKENS)
    sequence = take(mix, 500)
    total = sum(Fraction(str(w)) for w in weights)
    longest_run = max(trained_tokens(e) for e in sequence)
    for prefix in counts(sequence, names, TOKENS):
        tokens = sum(prefix.values())
        for name, w in zip(names, weights):
            behind = tokens * Fraction(str(w)) / total - prefix[name]
            assert -longest[name] < behind < longest_run, (name, prefix)


def test_tokens_per_source_match_a_recount_over_prefixes_and_the_whole_run():
    lists = {"docs": examples_of("docs", [30, 50, 20] * 10, masked=4), "chat": examples_of("chat", [5, 9] * 20, masked=3)}
    mix = Mixture([in_memory("docs", 3, lists["docs"]), in_memory("chat", 1, lists["chat"])], on_exhausted=STOP)
    sequence = list(mix)
    recount = counts(sequence, ["docs", "chat"], TOKENS)
    for n in (1, 7, len(sequence) // 2, len(sequence)):
        assert tokens_per_source(mix.state_at(n)) == recount[n - 1]
    assert mix.tokens_per_source == recount[-1]
    docs, chat = recount[-1]["docs"], recount[-1]["chat"]
    assert abs(docs - 3 * chat) <= 4 * 46  # within one example of 3:1 at the end (docs' longest has 46 trained)


# ---------------------------------------------------------------- running out


def test_stop_ends_the_mix_when_the_source_that_ran_out_is_due():
    lists = {"big": examples_of("big", [4] * 100), "small": examples_of("small", [4] * 5)}
    mix = Mixture([in_memory("big", 1, lists["big"]), in_memory("small", 1, lists["small"])], unit=EXAMPLES, on_exhausted=STOP)
    sequence = list(mix)
    picked = [(e["source"], e["index"]) for e in sequence]
    assert len(set(picked)) == len(picked)  # nothing repeated
    assert sorted(i for s, i in picked if s == "small") == list(range(5))  # all of the small source
    # Round robin: b0 s0 ... b4 s4 b5, and then the small source is due with nothing left.
    assert sum(s == "big" for s, _ in picked) == 6
    assert mix.finished and list(mix) == []  # iterating again gives nothing more
    assert mix.state_dict()["finished"]


def test_restart_repeats_a_small_source_pass_after_pass():
    lists = {"big": examples_of("big", [4] * 100), "small": examples_of("small", [4] * 3)}
    mix = Mixture([in_memory("big", 1, lists["big"]), in_memory("small", 2, lists["small"], seed=5)], unit=EXAMPLES)
    sequence = take(mix, 90)
    small = [e["index"] for e in sequence if e["source"] == "small"]
    assert len(small) == 60
    passes = [small[i : i + 3] for i in range(0, 60, 3)]
    assert all(sorted(p) == [0, 1, 2] for p in passes)  # each pass is the whole source
    assert len({tuple(p) for p in passes}) > 1  # in its own seeded order
    assert mix.state_dict()["sources"][1]["pass"] == 20


def test_an_empty_source_is_refused():
    mix = Mixture([in_memory("a", 1, examples_of("a", [3] * 4)), in_memory("empty", 1, [])])
    with pytest.raises(ValueError, match="'empty': pass 0 has no examples"):
        list(mix)


def test_a_source_without_trained_tokens_is_refused_in_tokens():
    mix = Mixture([in_memory("a", 1, examples_of("a", [3] * 4)), in_memory("prompts", 1, examples_of("p", [3] * 2, masked=3))])
    with pytest.raises(ValueError, match="'prompts': no trained tokens"):
        take(mix, 50)


def test_bad_weights_and_options_are_refused():
    source = in_memory("a", 1, [])
    for weight in (0, -1, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="weight"):
            Mixture([in_memory("a", weight, [])])
    with pytest.raises(ValueError, match="distinct"):
        Mixture([source, source])
    with pytest.raises(ValueError, match="unit"):
        Mixture([source], unit="bytes")
    with pytest.raises(ValueError, match="on_exhausted"):
        Mixture([source], on_exhausted="loop")


# ---------------------------------------------------------------- resume


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({k: v for k, v in e.items()}) + "\n" for e in examples), encoding="utf-8")
    return str(path)


def open_json_stream(path: str, pass_index: int):
    from datasets import load_dataset

    return load_dataset("json", data_files=path, split="train", streaming=True)


def generated(lengths: list[int], name: str, pass_index: int):
    """A generator-backed stream whose passes differ (each pass reversed on odd passes)."""
    order = lengths if pass_index % 2 == 0 else lengths[::-1]
    yield from examples_of(name, order)


def sources(kind: str, tmp_path) -> list:
    rng = random.Random(3)
    lists = {n: examples_of(n, [rng.randint(2, 30) for _ in range(size)]) for n, size in (("docs", 40), ("chat", 7), ("code", 13))}
    weights = {"docs": 5, "chat": 2, "code": 1.5}
    if kind == "memory":
        return [in_memory(n, weights[n], lists[n], seed=11) for n in lists]
    if kind == "datasets":
        return [streamed(n, weights[n], partial(open_json_stream, write_jsonl(tmp_path / f"{n}.jsonl", lists[n]))) for n in lists]
    return [streamed(n, weights[n], partial(generated, [len(e["input_ids"]) for e in lists[n]], n)) for n in lists]


def key(example):
    return example["source"], example["index"], len(example["input_ids"])


@pytest.mark.parametrize("kind", ["memory", "generator", "datasets"])
@pytest.mark.parametrize("unit, policy", [(TOKENS, RESTART), (EXAMPLES, RESTART), (TOKENS, STOP)])
def test_a_saved_state_resumes_the_same_continuation(kind, unit, policy, tmp_path):
    first = Mixture(sources(kind, tmp_path), unit=unit, on_exhausted=policy)
    run = [key(e) for e in take(first, 300)]
    points = [n for n in (0, 1, 17, 45, 120, 240) if n + 60 <= len(run)]
    if first.finished:  # "stop" ended the run: resuming at its end, or just before, must end it too
        points += [len(run) - 1, len(run)]
    for n in points:
        state = json.loads(json.dumps(first.state_at(n)))  # as it would travel through a checkpoint
        resumed = Mixture(sources(kind, tmp_path), unit=unit, on_exhausted=policy)
        resumed.load_state_dict(state)
        continuation = [key(e) for e in take(resumed, 60)]
        assert continuation == run[n : n + 60], n
        assert resumed.tokens_per_source == counts_after(run[: n + len(continuation)])


def counts_after(keys):
    totals = {"docs": 0, "chat": 0, "code": 0}
    for source, _, length in keys:
        totals[source] += length - 1
    return totals


def test_an_interrupted_iteration_resumes_from_its_state_dict():
    mix = Mixture(sources("memory", None))
    iterator = iter(mix)
    head = [key(next(iterator)) for _ in range(33)]
    resumed = Mixture(sources("memory", None))
    resumed.load_state_dict(mix.state_dict())
    assert [key(e) for e in take(resumed, 50)] == [key(e) for e in take(Mixture(sources("memory", None)), 83)][33:]
    assert len(head) == 33


def test_a_different_mix_does_not_resume():
    state = Mixture(sources("memory", None)).state_dict()
    changed = sources("memory", None)
    changed[0] = in_memory("docs", 4, [])
    with pytest.raises(ValueError, match="same ones"):
        Mixture(changed).load_state_dict(state)
    with pytest.raises(ValueError, match="same ones"):
        Mixture(sources("memory", None), unit=EXAMPLES).load_state_dict(state)


def test_state_at_forgets_what_it_was_told_to():
    mix = Mixture(sources("memory", None))
    take(mix, 20)
    mix.forget_before(10)
    assert mix.state_at(10)["examples"] == 10
    with pytest.raises(KeyError, match="knows 10..20"):
        mix.state_at(9)


def test_a_dataloader_reads_the_mix():
    mix = Mixture(sources("memory", None), unit=EXAMPLES)
    loader = torch.utils.data.DataLoader(mix, batch_size=4, collate_fn=list)
    batches = [batch for _, batch in zip(range(5), loader)]
    assert [key(e) for b in batches for e in b] == [key(e) for e in take(Mixture(sources("memory", None), unit=EXAMPLES), 20)]
