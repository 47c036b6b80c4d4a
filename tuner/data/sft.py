"""Chat and instruction data (every --data_format but text), in memory: rows -> validated examples ->
token ids with the trained-token mask (formats.py) -> token cache -> packed rows (packing.py), or one
example a row padded per batch with --packing false. sft_stream.py does the same on the fly, with the
functions here.

Choices made here, and why:
- --max_train_samples / --max_eval_samples count examples (not rows or chunks): the first N examples
  kept after tokenising, in the source's order, so packed and padded runs, in memory or streamed, train
  and evaluate on the same examples.
- The chat template is installed only when some example is a conversation: plain prompt/completion
  pairs are text, and their tokenizer is saved as it came.
- Bad rows are all reported at once (the first formats.MAX_LISTED named); the dropped and truncated
  ones are counted, per split, in the dry run and in run_summary.json.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tuner.common import IGNORE_INDEX, save_json
from tuner.data import cache as token_cache
from tuner.data import chat_template, describe, formats, grouping, packing, sources
from tuner.data.datasets import Datasets, ExampleDataset, PackedDataset
from tuner.data.formats import Conversation, Example, FormatChoice, SftCounts
from tuner.data.sources import Opened, OpenSource
from tuner.errors import UsageError

logger = logging.getLogger(__name__)

PREVIEW_EXAMPLES = 2  # examples the dry run shows with their trained tokens marked
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class SftSettings:
    """Everything that decides an example's token ids and labels (the token cache keys on all of it but packing)."""

    choice: FormatChoice
    max_seq_length: int
    train_on_prompt: bool
    overlong: str
    packing: bool
    template: str | None  # the chat template conversations are rendered with (chat_template.choose_template)
    template_file: str | None = None

    @classmethod
    def from_options(cls, cfg, choice: FormatChoice, tokenizer) -> SftSettings:
        template, _ = chat_template.choose_template(tokenizer, cfg.chat_template)
        return cls(choice, cfg.max_seq_length, cfg.train_on_prompt, cfg.overlong, cfg.packing, template, cfg.chat_template)

    def key_parts(self) -> list:
        return [
            self.choice.format, sorted(asdict(self.choice.columns).items()), self.max_seq_length, self.train_on_prompt,
            self.overlong, token_cache.key([self.template]),
        ]  # fmt: skip


def needed_columns(choice: FormatChoice) -> list[str]:
    columns = choice.columns
    return {
        "messages": [columns.messages],
        "prompt_completion": [columns.prompt, columns.completion],
        "alpaca": [columns.instruction, columns.input, columns.output],
    }[choice.format]


def is_chat(examples: Sequence[Example]) -> bool:
    return any(isinstance(e, Conversation) for e in examples)


def ensure_template(tokenizer, settings: SftSettings) -> None:
    """Install the chat template (once): conversations are rendered through it, and it is saved with the model."""
    if settings.template is None or tokenizer.chat_template != settings.template:
        logger.info("Chat template: %s", chat_template.install_chat_template(tokenizer, settings.template_file))


def example_chars(example: Example) -> int:
    if isinstance(example, Conversation):
        return sum(len(m["content"]) for m in example.messages)
    return len(example.prompt) + len(example.completion)


def tokenize(tokenizer, examples: Sequence[Example], settings: SftSettings) -> formats.SftExamples:
    """formats.tokenize_examples over the same batches of characters as text (grouping.by_size)."""
    out = formats.SftExamples([], [], [], SftCounts())
    done = 0
    for batch in grouping.by_size(examples, grouping.BATCH_CHARS, size=example_chars):
        if is_chat(batch):
            ensure_template(tokenizer, settings)
        part = formats.tokenize_examples(
            tokenizer, batch, settings.max_seq_length, settings.train_on_prompt, settings.overlong, batch_size=len(batch)
        )
        out.input_ids += part.input_ids
        out.labels += part.labels
        out.rows += [done + row for row in part.rows]
        out.counts = out.counts + part.counts
        done += len(batch)
    return out


def arrange(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], settings: SftSettings):
    """A torch dataset of the examples: packed rows, or one example a row."""
    if settings.packing:
        return PackedDataset(packing.pack_examples(input_ids, labels, settings.max_seq_length))
    return ExampleDataset(input_ids, labels)


def collator(settings: SftSettings, tokenizer, pad_to: int | None = None):
    """Packed rows or padded examples -> batches; pad_to: every batch padded to a multiple of it (None: to its
    longest row)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return packing.PackedCollator(pad, pad_to) if settings.packing else packing.PaddingCollator(pad, pad_to)


# ---------------------------------------------------------------- reading rows in memory


def read_examples(source: OpenSource, choice: FormatChoice) -> list[Example]:
    """Every row of an in-memory source as a validated example; all bad rows reported at once."""
    rows = sources.records(source.rows, needed_columns(choice))
    return formats.normalise_rows(rows, choice, source.source.name)


def split_examples(opened: Opened, choice: FormatChoice) -> dict[str, tuple[list[Example], list[int]]]:
    """{'train': (examples, their source rows), 'validation': ...}: the validation source's examples, else the
    held-out rows'. A row is one example (formats.normalise_rows)."""
    examples = read_examples(opened.train[0], choice)
    if opened.validation is not None:
        val_choice = formats.detect_format(opened.validation.columns, choice.format, choice.columns)
        val = read_examples(opened.validation, val_choice)
        return {"train": (examples, list(range(len(examples)))), "validation": (val, list(range(len(val))))}
    mask = opened.hold_out.mask(len(examples))
    train = [e for e, held in zip(examples, mask) if not held]
    held_out = [e for e, held in zip(examples, mask) if held]
    rows = {"train": np.flatnonzero(~mask).tolist(), "validation": np.flatnonzero(mask).tolist()}
    if opened.held_out_percent and (not train or not held_out):
        raise UsageError(
            f"--validation_split_percentage {opened.held_out_percent}: {opened.train[0].source.name} has only "
            f"{len(examples)} row(s), too few to hold some out and train on the rest. Pass --validation_file, or "
            "--validation_split_percentage 0 to skip evaluation."
        )
    return {"train": (train, rows["train"]), "validation": (held_out, rows["validation"])}


def _build(work: Path, tokenizer, opened: Opened, settings: SftSettings) -> None:
    """Read, validate and tokenise both splits into `work` (token_cache.build_once's build step)."""
    splits = split_examples(opened, settings.choice)
    meta = {"chat": is_chat(splits["train"][0]) or is_chat(splits["validation"][0]), "counts": {}}
    for split, (examples, rows) in splits.items():
        if not examples:
            continue
        logger.info("Tokenizing %d %s examples (%s)", len(examples), split, settings.choice.format)
        tokenized = tokenize(tokenizer, examples, settings)
        token_cache.save_ragged(work, f"{split}.input_ids", tokenized.input_ids)
        token_cache.save_ragged(work, f"{split}.labels", tokenized.labels)
        np.save(work / f"{split}.rows.npy", np.asarray(rows, dtype=np.int64)[tokenized.rows])  # each kept example's row
        meta["counts"][split] = asdict(tokenized.counts)
        logger.info("  %s: %s", split, tokenized.counts.summary())
    save_json(work / "meta.json", meta)


def cache_directory(cfg, tokenizer, opened: Opened, settings: SftSettings) -> Path:
    held_out = opened.held_out_percent if opened.validation is None else "given"
    fingerprints = [o.fingerprint for o in opened.train] + ([opened.validation.fingerprint] if opened.validation else [])
    parts = ["sft", *fingerprints, token_cache.tokenizer_fingerprint(tokenizer), *settings.key_parts(), held_out, opened.seed]
    return token_cache.root(cfg.cache_dir) / token_cache.key(parts)


# ---------------------------------------------------------------- datasets


def build_in_memory(cfg, tokenizer, opened: Opened, choice: FormatChoice) -> Datasets:
    """Tokenised once (cached), then packed or padded; see the module docstring for the choices."""
    settings = SftSettings.from_options(cfg, choice, tokenizer)
    directory = cache_directory(cfg, tokenizer, opened, settings)
    token_cache.build_once(directory, lambda work: _build(work, tokenizer, opened, settings))
    meta = token_cache.load_json(directory / "meta.json")
    if meta["chat"]:
        ensure_template(tokenizer, settings)  # on a cache hit too: the model is saved with it
    figures, sets, shown, describer = {"data_format": choice.format}, {}, [], None
    for split, limit in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples)):
        if split not in meta["counts"]:
            continue
        counts = SftCounts(**meta["counts"][split])
        ids = token_cache.Ragged.load(directory, f"{split}.input_ids")
        labels = token_cache.Ragged.load(directory, f"{split}.labels")
        if not len(ids):
            raise no_examples_left(split, counts, settings)
        n = min(limit or len(ids), len(ids))
        ids, labels = [ids[i] for i in range(n)], [labels[i] for i in range(n)]
        sets[split] = arrange(ids, labels, settings)
        figures.update(split_figures(split, counts, ids, labels, len(sets[split]), settings))
        shown = shown or preview(tokenizer, ids, labels)
        if split == "train":  # example k is example_index k of the packed rows, or row k of the padded ones
            rows = np.load(directory / "train.rows.npy")[:n]
            describer = partial(describe.examples, ids, rows, tokenizer, source=opened.train[0].source.name)
    return Datasets(
        train=sets["train"], eval=sets.get("validation"),
        train_tokens=figures["train_tokens_used"], eval_tokens=figures.get("validation_tokens_used", 0),
        format=choice.format, collator=collator(settings, tokenizer), packed=settings.packing, chat=meta["chat"],
        figures=figures, preview=shown, describer=describer,
    )  # fmt: skip


def no_examples_left(split: str, counts: SftCounts, settings: SftSettings) -> UsageError:
    return UsageError(
        f"--max_seq_length {settings.max_seq_length}: no {split} example has a trained token left ({counts.summary()}). "
        "Raise --max_seq_length, use --overlong truncate, or check that the answers are not empty."
    )


def split_figures(split: str, counts: SftCounts | None, ids, labels, rows: int, settings: SftSettings) -> dict:
    """What the dry run and run_summary.json report for one split (flat keys, `{split}_...`): the counts of
    tokenising the whole split (None for a stream: unknown), then of the examples used (--max_*_samples)
    and the rows they fill."""
    tokens = sum(len(x) for x in ids)
    trained = sum(int((np.asarray(x) != IGNORE_INDEX).sum()) for x in labels)
    # SftCounts.rows are the rows given (not the rows trained on); its token totals are those of the used
    # examples when all are used, and the *_used figures say the rest.
    renamed = {"rows": "rows_read", "kept": "examples"}
    shown = {k: v for k, v in asdict(counts).items() if k not in ("tokens", "trained_tokens")} if counts is not None else {}
    figures = {f"{split}_{renamed.get(k, k)}": v for k, v in shown.items()}
    figures.update({f"{split}_examples_used": len(ids), f"{split}_tokens_used": tokens, f"{split}_trained_tokens_used": trained})
    figures[f"{split}_rows_used"] = rows
    if settings.packing:
        figures[f"{split}_fill_ratio"] = round(tokens / (rows * settings.max_seq_length), 4) if rows else 0.0
    return figures


def preview(tokenizer, ids, labels, n: int = PREVIEW_EXAMPLES) -> list[str]:
    """The first examples as text, trained tokens between [[ and ]] (formats.show_trained)."""
    return [formats.show_trained(tokenizer, i, x) for i, x in zip(ids[:n], labels[:n])]
