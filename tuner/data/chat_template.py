"""Gemma 3's turn format for tokenizers that lack a chat template; where each answer lies in a rendering;
the tokens that end a turn.

The shipped template renders what Google's published Gemma 3 template renders (the `chat_template` of
`google/gemma-3-*-it`, tokenizer_config.json) for text content:

    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

a system message folded into the first user turn (its text, then a blank line), the assistant role
rendered as `model`, each turn's text trimmed of surrounding whitespace (the system text is not, as
in Google's), roles alternating user/assistant (else the template raises), and
`add_generation_prompt` appending `<start_of_turn>model\\n`. Content given as a list of parts keeps
the text parts, as Google's does; images are not rendered (a text-only model).

Which template a run uses: a `--chat_template` file, else the tokenizer's own, else ours. It is set
as `tokenizer.chat_template`, so `tokenizer.save_pretrained` writes it next to the model and plain
transformers chats with the fine-tuned model through `apply_chat_template`.

Answer spans work with any template that renders the beginning of a conversation as a prefix of the
whole: answer i starts where `messages[:i]` rendered with the generation prompt ends, and ends where
`messages[:i+1]` rendered without it ends, less trailing whitespace (the `\\n` after `<end_of_turn>`
is never generated: generation stops at `<end_of_turn>`). The closing turn marker is inside the span.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tuner.errors import UsageError

logger = logging.getLogger(__name__)

TURN_START = "<start_of_turn>"
TURN_END = "<end_of_turn>"

# Written for this project to reproduce Google's rendering; the Jinja text lives in its own file.
GEMMA3_CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "gemma3.jinja").read_text(encoding="utf-8")

SHIPPED = "Gemma 3 turn format (shipped with tuner)"


def read_template_file(path: str) -> str:
    """The Jinja text of a --chat_template file; UsageError when it cannot be read or does not parse."""
    problems = template_file_problems(path)
    if problems:
        raise UsageError(problems)
    return Path(path).read_text(encoding="utf-8")


def template_file_problems(path: str | None) -> list[str]:
    """Checks for validate(): the file exists, is UTF-8 and parses as Jinja. No weights needed."""
    if not path:
        return []
    file = Path(path)
    if not file.is_file():
        return [f"--chat_template {path}: no such file. Give a Jinja chat template file (e.g. chat_template.jinja)."]
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [f"--chat_template {path}: cannot be read as UTF-8 text ({error}). Give a Jinja text file."]
    if not source.strip():
        return [f"--chat_template {path}: the file is empty. Give a Jinja chat template."]
    import jinja2

    try:
        jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as error:
        return [f"--chat_template {path}: not valid Jinja (line {error.lineno}: {error.message}). Fix the template."]
    if "add_generation_prompt" not in source:
        # without it the answer's role header would count as the answer (trained), and chat could not prompt a reply
        return [
            f"--chat_template {path}: the template ignores add_generation_prompt. Render the assistant turn's header "
            "under {% if add_generation_prompt %}...{% endif %} at the end, as transformers' chat templates do."
        ]
    return []


def install_chat_template(tokenizer, template_file: str | None = None) -> str:
    """Set `tokenizer.chat_template` (a file wins, then the tokenizer's own, then ours) and say which one."""
    template, which = choose_template(tokenizer, template_file)
    if template is None:
        raise UsageError(which)
    tokenizer.chat_template = template
    return which


def choose_template(tokenizer, template_file: str | None = None) -> tuple[str | None, str]:
    """(the template install_chat_template would set, which one it is), without setting it; (None, why not)
    when there is none to use. The token cache keys on the text."""
    if template_file:
        return read_template_file(template_file), f"--chat_template {template_file}"
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, "the tokenizer's own chat template"
    missing = [token for token in (TURN_START, TURN_END) if not is_single_token(tokenizer, token)]
    if missing:
        return None, (
            f"The tokenizer has no chat template, and the shipped Gemma 3 one needs {' and '.join(missing)} as single "
            "tokens, which this tokenizer lacks. Give --chat_template FILE with a template for this model."
        )
    return GEMMA3_CHAT_TEMPLATE, SHIPPED


def is_single_token(tokenizer, token: str) -> bool:
    """The text encodes to exactly one id (an added or special token), so the template's markers survive."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def render(tokenizer, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Each conversation rendered to text through the tokenizer's chat template, in one batched call."""
    if not conversations:
        return []
    batch = [list(messages) for messages in conversations]
    return tokenizer.apply_chat_template(batch, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(
    tokenizer, conversations: Sequence[Sequence[dict]], answers: Sequence[Sequence[int]]
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render each conversation; for message indices `answers[k]` of conversation k, the character span
    [start, end) of that message in the rendering, closing turn marker included, trailing whitespace not."""
    texts = render(tokenizer, conversations)
    requests = [(k, i) for k, indices in enumerate(answers) for i in indices]
    befores = render(tokenizer, [conversations[k][:i] for k, i in requests], add_generation_prompt=True)
    # Rendering is most of the time spent here (Jinja, in Python): an answer that ends its conversation
    # (the usual case) ends where the whole rendering ends, so only the others are rendered again.
    inner = [(k, i) for k, i in requests if i + 1 < len(conversations[k])]
    rendered_inner = dict(zip(inner, render(tokenizer, [conversations[k][: i + 1] for k, i in inner])))
    throughs = [rendered_inner.get((k, i), texts[k]) for k, i in requests]
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (k, i), before, through in zip(requests, befores, throughs):
        text = texts[k]
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise UsageError(prefix_problem(before, through, text, i))
        end = len(through.rstrip())
        spans[k].append((len(before), max(end, len(before))))
    return texts, spans


def prefix_problem(before: str, through: str, text: str, index: int) -> str:
    return (
        f"The chat template does not render the start of a conversation as a prefix of the whole (message {index}), "
        f"so the answer tokens cannot be located. Rendered up to the answer: {before[-80:]!r}; through it: "
        f"{through[-80:]!r}; whole: {text[:160]!r}. Give --chat_template FILE with a template whose rendering only "
        "appends as messages are added (no special case for the last message)."
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: EOS, and the token that closes an assistant turn in the installed template
    (`<end_of_turn>` for Gemma), for `generation_config.eos_token_id`."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    closing = turn_end_token_id(tokenizer)
    if closing is not None and closing not in ids:
        ids.append(closing)
    return ids


def turn_end_token_id(tokenizer) -> int | None:
    """The first token after the answer text in a probe rendering, when it is a special (added) token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answer = "Fine."
    probe = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": answer}]
    texts, spans = answer_spans(tokenizer, [probe], [[1]])
    start, end = spans[0][0]
    after = texts[0][start:end].split(answer, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
        return ids[0]
    return None

def set_stop_tokens(model, tokenizer) -> None:
    """generate() stops at the end of an assistant turn (`<end_of_turn>` for Gemma) as well as at EOS: the
    model was trained to close each answer with it, and generation_config.json carries both ids."""
    ids = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Generation stops at %s", ", ".join(tokenizer.convert_ids_to_tokens(ids)))
