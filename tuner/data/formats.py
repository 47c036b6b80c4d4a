"""SFT data formats: detect from the columns, normalise and validate rows, tokenise with the trained-token mask.

Formats (`--data_format`; `auto` picks from the columns in this order):
- `messages`: a list of {role, content}, roles system/user/assistant. ShareGPT rows (a
  `conversations` column of {from, value}) are converted: human -> user, gpt -> assistant,
  system -> system. A column holding JSON text (a CSV cell) is parsed.
- `prompt_completion`: `prompt` and `completion`. Two strings are plain text, no template:
  `<bos>` prompt completion `<eos>`, joined as given (no separator added, as TRL does: put the
  space or newline you want in the data), loss on the completion and the EOS. If either is a list of
  messages the pair is a conversation through the chat template (a string prompt becomes one user
  turn, a string completion one assistant turn); only the completion's assistant turns are trained,
  never an assistant turn inside the prompt (a few-shot example).
- `alpaca`: `instruction`, optional `input`, `output` -> a user turn "instruction\\n\\ninput" (just
  the instruction when input is empty or missing) and an assistant turn `output`.
- `text`: running text, handled by grouping.py; nothing here.

Validation (UsageError naming the source and the 0-based row, collected over all rows, raised once):
an empty conversation, an unknown role, a system message anywhere but first, roles that do not
alternate user/assistant starting with user, no assistant turn, an empty (all-whitespace) answer,
content that is not text. An empty user or system message is allowed. A trailing user turn after the
last answer is allowed (context, never trained).

Tokenising (`tokenize_examples`): conversations are rendered through the tokenizer's chat template and
plain pairs concatenated, then tokenised once in a batch (add_special_tokens=False); character spans
of the answers map to tokens through the offsets, so any template that renders prefixes consistently
works. A token is trained when its characters overlap an answer span. Exactly one BOS starts each
sequence (leading BOS tokens collapsed to one, one added when missing), never trained; position 0 is
never trained, so in a packed row no example is predicted from the previous one. `train_on_prompt`
trains every token but the first. Over-long rows (`overlong`): `truncate` (default, as TRL) keeps the
first max_seq_length tokens; `drop` drops the row. Rows left with no trained token are dropped. Every
case is counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import NoReturn

import numpy as np

from tuner.common import IGNORE_INDEX
from tuner.data import chat_template
from tuner.errors import UsageError

FORMATS = ("text", "messages", "prompt_completion", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_COLUMN = "conversations"
OVERLONG = ("truncate", "drop")

TOKEN_DTYPE = np.int32
MAX_LISTED = 10  # bad rows named in one error; the rest are counted


@dataclass(frozen=True)
class Columns:
    """Column names (--*_column options); `messages` falls back to ShareGPT's `conversations` in auto."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


@dataclass(frozen=True)
class FormatChoice:
    format: str
    reason: str  # one line for the log: what was picked and why
    columns: Columns  # as resolved (messages -> 'conversations' for ShareGPT data)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {role, content}, roles in ROLES, validated
    context_turns: int = 0  # leading messages never trained, whatever their role (a message-list prompt)

    def answer_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant" and i >= self.context_turns]


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str  # plain text: <bos> prompt completion <eos>, loss on completion + <eos>


Example = Conversation | PromptCompletion


def detect_format(column_names: Iterable[str], requested: str = "auto", columns: Columns = Columns()) -> FormatChoice:
    """The format to use for data with these columns; UsageError if the columns do not fit it."""
    names = list(column_names)
    present = set(names)
    if columns.messages not in present and SHAREGPT_COLUMN in present and requested in ("auto", "messages"):
        columns = replace(columns, messages=SHAREGPT_COLUMN)
    needs = {
        "messages": [columns.messages],
        "prompt_completion": [columns.prompt, columns.completion],
        "alpaca": [columns.instruction, columns.output],
        "text": [columns.text],
    }
    if requested == "auto":
        for fmt in ("messages", "prompt_completion", "alpaca", "text"):
            if all(c in present for c in needs[fmt]):
                what = _WHAT[fmt] + (", ShareGPT {from, value} converted" if columns.messages == SHAREGPT_COLUMN else "")
                return FormatChoice(fmt, f"auto: the data has {' and '.join(map(repr, needs[fmt]))} ({what})", columns)
        raise UsageError(
            f"--data_format auto: no known format in the columns {names}. Name the columns: --messages_column, "
            "--prompt_column/--completion_column, --instruction_column/--output_column or --text_column, "
            f"or choose --data_format from {', '.join(FORMATS)}."
        )
    if requested not in FORMATS:
        raise UsageError(f"--data_format {requested}: unknown. Choose auto or one of {', '.join(FORMATS)}.")
    missing = [c for c in needs[requested] if c not in present]
    if missing:
        raise UsageError(
            f"--data_format {requested} needs the column(s) {missing}; the data has {names}. Point "
            f"{_FLAGS[requested]} at your column(s), or choose another --data_format."
        )
    return FormatChoice(requested, f"--data_format {requested}", columns)


_FLAGS = {
    "messages": "--messages_column",
    "prompt_completion": "--prompt_column/--completion_column",
    "alpaca": "--instruction_column/--output_column",
    "text": "--text_column",
}
_WHAT = {
    "messages": "a list of {role, content} messages",
    "prompt_completion": "prompt/completion pairs",
    "alpaca": "alpaca instruction/input/output records",
    "text": "running text",
}


def normalise_rows(rows: Iterable[Mapping], choice: FormatChoice, source: str, first_index: int = 0) -> list[Example]:
    """Every row normalised; the problems of all bad rows raised once (the first MAX_LISTED named)."""
    examples: list[Example] = []
    problems: list[str] = []
    bad = 0
    for index, row in enumerate(rows, start=first_index):
        try:
            examples.append(normalise_row(row, choice, source, index))
        except UsageError as error:
            bad += 1
            problems.extend(error.problems if len(problems) < MAX_LISTED else [])
    if bad:
        more = [f"... and {bad - len(problems)} more bad rows in {source}."] if bad > len(problems) else []
        raise UsageError(problems + more)
    return examples


def normalise_row(row: Mapping, choice: FormatChoice, source: str, index: int) -> Example:
    """One row as a validated Conversation or PromptCompletion. `index` is the 0-based row number."""
    where = f"{source} row {index} (0-based)"
    cols = choice.columns
    if choice.format == "messages":
        return Conversation(_messages(row.get(cols.messages), where, cols.messages))
    if choice.format == "alpaca":
        instruction = _text(row.get(cols.instruction), where, cols.instruction)
        extra = _text(row.get(cols.input), where, cols.input) if cols.input in row else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        answer = _text(row.get(cols.output), where, cols.output)
        return Conversation(_validated([_msg("user", user), _msg("assistant", answer)], where, cols.output))
    if choice.format == "prompt_completion":
        return _prompt_completion(row.get(cols.prompt), row.get(cols.completion), where, cols)
    raise ValueError(f"normalise_row: format {choice.format!r} has no rows to normalise")


def _prompt_completion(prompt, completion, where: str, cols: Columns) -> Example:
    prompt, completion = _maybe_json(prompt), _maybe_json(completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            _bad(where, f"empty answer (column '{cols.completion}')", "Give a non-empty completion or drop the row.")
        return PromptCompletion(prompt, completion)
    head = [_msg("user", prompt)] if isinstance(prompt, str) else _raw_messages(prompt, where, cols.prompt)
    tail = (
        [_msg("assistant", completion)] if isinstance(completion, str) else _raw_messages(completion, where, cols.completion)
    )
    messages = _validated(head + tail, where, f"{cols.prompt}+{cols.completion}")
    if not any(m["role"] == "assistant" for m in messages[len(head) :]):
        _bad(where, "the completion has no assistant message", f"Put the answer in '{cols.completion}'.")
    return Conversation(messages, context_turns=len(head))


def _messages(value, where: str, column: str) -> tuple[dict, ...]:
    return _validated(_raw_messages(value, where, column), where, column)


def _raw_messages(value, where: str, column: str) -> list[dict]:
    """A list of {role, content} (ShareGPT {from, value} converted); content checked to be text."""
    value = _maybe_json(value)
    if not isinstance(value, (list, tuple)):
        _bad(where, f"column '{column}' holds {type(value).__name__}, not a list of messages", "Give a list of {role, content}.")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            _bad(where, f"message {i} of '{column}' is {type(message).__name__}", "Give {role, content} or drop the row.")
        if "from" in message and "role" not in message:  # ShareGPT
            sharegpt = message.get("from")
            if sharegpt not in SHAREGPT_ROLES:
                known = "ShareGPT roles are human, gpt, system"
                _bad(where, f"message {i} has 'from': {sharegpt!r}; {known}", "Rename it or drop the row.")
            out.append(_msg(SHAREGPT_ROLES[sharegpt], _text(message.get("value"), where, f"{column}[{i}].value")))
        else:
            out.append(_msg(message.get("role"), _text(message.get("content"), where, f"{column}[{i}].content")))
    return out


def _validated(messages: list[dict], where: str, column: str) -> tuple[dict, ...]:
    """Roles known; system only first; then user/assistant alternating from user; an answer, none empty."""
    if not messages:
        _bad(where, f"empty conversation in '{column}'", "Give at least a user and an assistant message, or drop the row.")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            _bad(where, f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}", "Rename it or drop the row.")
    offset = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[offset:], start=offset):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if m["role"] != expected:
            order = "roles must go: an optional system message, then user, assistant, user, ..."
            _bad(where, f"message {i} is {m['role']!r} where {expected!r} was due; {order}", "Fix the order or drop the row.")
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        _bad(where, "no assistant message, nothing to learn", "Add the answer or drop the row.")
    for i in answers:
        if not messages[i]["content"].strip():
            _bad(where, f"message {i} of '{column}' is an empty answer", "Give the assistant text or drop the row.")
    return tuple(messages)


def _bad(where: str, problem: str, fix: str) -> NoReturn:
    raise UsageError(f"{where}: {problem}. {fix}")


def _msg(role, content: str) -> dict:
    return {"role": role, "content": content}


def _text(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        _bad(where, f"'{column}' is {type(value).__name__}, not text", "Give a string.")
    return value


def _maybe_json(value):
    """A list of messages stored as JSON text (a CSV cell) is parsed; anything else is returned as is."""
    if isinstance(value, str) and re.match(r"\s*\[\s*\{", value):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else value
    return value


@dataclass
class SftCounts:
    """What tokenising did to the rows; summable over batches (`a + b`)."""

    rows: int = 0  # examples given
    kept: int = 0
    truncated: int = 0  # kept, cut to max_seq_length (overlong='truncate')
    dropped_too_long: int = 0  # overlong='drop'
    dropped_untrained: int = 0  # no trained token left: all masked, or cut away by truncation
    tokens: int = 0  # in kept examples
    trained_tokens: int = 0  # labels != -100 in kept examples

    def __add__(self, other: SftCounts) -> SftCounts:
        return SftCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> str:
        return (
            f"{self.rows:,} rows -> {self.kept:,} examples ({self.truncated:,} truncated to --max_seq_length); dropped "
            f"{self.dropped_too_long:,} too long and {self.dropped_untrained:,} with no trained token left; "
            f"{self.trained_tokens:,} of {self.tokens:,} tokens trained"
        )


@dataclass
class SftExamples:
    input_ids: list[np.ndarray]  # each (L,) int32, L <= max_seq_length, starting with one BOS
    labels: list[np.ndarray]  # each (L,) int32: the token id where trained, -100 elsewhere; labels[0] is -100
    rows: list[int]  # for each kept example, its index in the examples given (0-based)
    counts: SftCounts


def tokenize_examples(
    tokenizer,
    examples: Sequence[Example],
    max_seq_length: int,
    train_on_prompt: bool = False,
    overlong: str = "truncate",
    batch_size: int = 1024,
) -> SftExamples:
    """Token ids and labels of each example (see the module docstring for the policy). The tokenizer must be
    fast (offsets) and, for conversations, have a chat template (chat_template.install_chat_template)."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    out = SftExamples([], [], [], SftCounts(rows=len(examples)))
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts, spans = render_examples(tokenizer, batch)
        for k, (ids, offsets) in enumerate(encode_with_offsets(tokenizer, texts)):
            plain = isinstance(batch[k], PromptCompletion)
            ids, trained = _trained_tokens(tokenizer, ids, offsets, spans[k], plain, train_on_prompt)
            _keep(out, start + k, ids, trained, max_seq_length, overlong)
    return out


def render_examples(tokenizer, examples: Sequence[Example]) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each example's text and the character spans [start, end) of what it trains."""
    conversations = [k for k, e in enumerate(examples) if isinstance(e, Conversation)]
    texts: list[str] = [""] * len(examples)
    spans: list[list[tuple[int, int]]] = [[] for _ in examples]
    for k, example in enumerate(examples):
        if isinstance(example, PromptCompletion):
            texts[k] = example.prompt + example.completion
            spans[k] = [(len(example.prompt), len(texts[k]))]
    if conversations:
        messages = [examples[k].messages for k in conversations]
        answers = [examples[k].answer_indices() for k in conversations]
        rendered, answer_spans = chat_template.answer_spans(tokenizer, messages, answers)
        for k, text, found in zip(conversations, rendered, answer_spans):
            texts[k], spans[k] = text, found
    return texts, spans


def encode_with_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """(ids, (L, 2) character offsets) per text, no special tokens added, in one batched Rust call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, np.array(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encodings]
    # A tokenizer without a Rust backend gives offsets only if it is fast; otherwise this raises, by design.
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(batch["input_ids"], batch["offset_mapping"])
    return [(ids, np.array(offsets, dtype=np.int64).reshape(-1, 2)) for ids, offsets in pairs]


def _trained_tokens(tokenizer, ids, offsets: np.ndarray, spans, plain: bool, train_on_prompt: bool):
    """(ids, trained mask) with exactly one leading BOS, the EOS of a plain pair appended and trained."""
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        # a token overlapping the span by at least one character (zero-width tokens never do)
        trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    ids = np.asarray(ids, dtype=TOKEN_DTYPE)
    if plain:
        if tokenizer.eos_token_id is None:
            raise UsageError(
                "Plain prompt/completion data needs an EOS token to learn to stop, and this tokenizer has none. "
                "Give prompt and completion as message lists, rendered through a chat template."
            )
        ids, trained = np.append(ids, tokenizer.eos_token_id), np.append(trained, True)
    bos = tokenizer.bos_token_id
    if bos is not None:
        lead = int(np.argmax(ids != bos)) if (ids != bos).any() else len(ids)  # leading BOS tokens, 0 or more
        ids = np.concatenate([[bos], ids[lead:]]).astype(TOKEN_DTYPE)
        trained = np.concatenate([[False], trained[lead:]])
    if train_on_prompt:
        trained[:] = True
    if len(ids):
        trained[0] = False  # never a target: in a packed row it would be predicted from the previous example
    return ids, trained


def _keep(out: SftExamples, row: int, ids: np.ndarray, trained: np.ndarray, max_seq_length: int, overlong: str) -> None:
    counts = out.counts
    if len(ids) > max_seq_length:
        if overlong == "drop":
            counts.dropped_too_long += 1
            return
        ids, trained = ids[:max_seq_length], trained[:max_seq_length]
        counts.truncated += 1
    if not trained.any():
        counts.dropped_untrained += 1
        return
    out.input_ids.append(ids)
    out.labels.append(np.where(trained, ids, IGNORE_INDEX).astype(TOKEN_DTYPE))
    out.rows.append(row)
    counts.kept += 1
    counts.tokens += len(ids)
    counts.trained_tokens += int(trained.sum())


def show_trained(tokenizer, input_ids: Sequence[int], labels: Sequence[int], start: str = "[[", end: str = "]]") -> str:
    """The example as text with each run of trained tokens between `start` and `end` (the dry run's view)."""
    ids = list(map(int, input_ids))
    trained = [int(label) != IGNORE_INDEX for label in labels]
    pieces, run_start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[run_start]:
            text = tokenizer.decode(ids[run_start:i], skip_special_tokens=False)
            pieces.append(f"{start}{text}{end}" if trained[run_start] else text)
            run_start = i
    return "".join(pieces)
