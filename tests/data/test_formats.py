"""SFT formats: detection, normalisation, validation errors, and token ids + labels against independent
references (transformers' own assistant mask from a {% generation %} template, and hand-built sequences)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import build_tokenizer

from tuner.common import IGNORE_INDEX as IGNORE
from tuner.data import chat_template, formats
from tuner.data.formats import Columns, Conversation, PromptCompletion
from tuner.errors import UsageError

SRC = "--train_file data.jsonl"
U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer()


@pytest.fixture
def tokenizer(base_tokenizer):
    base_tokenizer.chat_template = chat_template.GEMMA3_CHAT_TEMPLATE
    return base_tokenizer


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "columns,expected,resolved_messages",
    [
        (["messages", "text"], "messages", "messages"),
        (["conversations", "id"], "messages", "conversations"),
        (["prompt", "completion", "text"], "prompt_completion", "messages"),
        (["instruction", "input", "output"], "alpaca", "messages"),
        (["instruction", "output"], "alpaca", "messages"),
        (["text", "prompt"], "text", "messages"),
    ],
)
def test_auto_detection(columns, expected, resolved_messages):
    choice = formats.detect_format(columns)
    assert choice.format == expected and choice.columns.messages == resolved_messages
    assert choice.reason.startswith("auto: the data has")


def test_sharegpt_reason():
    reason = formats.detect_format(["conversations"]).reason
    assert reason == "auto: the data has 'conversations' (a list of {role, content} messages, ShareGPT {from, value} converted)"


def test_detection_with_custom_column_names():
    choice = formats.detect_format(["q", "a"], columns=Columns(prompt="q", completion="a"))
    assert choice.format == "prompt_completion"
    assert choice.reason == "auto: the data has 'q' and 'a' (prompt/completion pairs)"
    assert formats.detect_format(["chat"], columns=Columns(messages="chat")).format == "messages"


def test_requested_format_needs_its_columns():
    assert formats.detect_format(["messages"], "messages").reason == "--data_format messages"
    with pytest.raises(UsageError, match=r"--data_format alpaca needs the column\(s\) \['instruction', 'output'\]"):
        formats.detect_format(["messages"], "alpaca")
    with pytest.raises(UsageError, match="--data_format chat: unknown"):
        formats.detect_format(["messages"], "chat")
    with pytest.raises(UsageError, match=r"no known format in the columns \['question', 'answer'\]") as error:
        formats.detect_format(["question", "answer"])
    assert "--prompt_column" in str(error.value)


# ---------------------------------------------------------------- normalisation


def normalise(row, columns=None, fmt="auto"):
    choice = formats.detect_format(columns or list(row), fmt)
    return formats.normalise_row(row, choice, SRC, 7)


def test_messages_pass_through():
    conv = [msg(S, "s"), msg(U, "q"), msg(A, "a")]
    assert normalise({"messages": conv}) == Conversation(tuple(conv))


def test_sharegpt_is_converted():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalise(row) == Conversation((msg(S, "s"), msg(U, "q"), msg(A, "a")))


@pytest.mark.parametrize(
    "row,user",
    [
        ({"instruction": "Sort.", "input": "3 1 2", "output": "1 2 3"}, "Sort.\n\n3 1 2"),
        ({"instruction": "Sort.", "input": "", "output": "1 2 3"}, "Sort."),
        ({"instruction": "Sort.", "input": None, "output": "1 2 3"}, "Sort."),
        ({"instruction": "Sort.", "output": "1 2 3"}, "Sort."),
    ],
)
def test_alpaca(row, user):
    assert normalise(row) == Conversation((msg(U, user), msg(A, "1 2 3")))


def test_prompt_completion_strings_are_plain_text():
    assert normalise({"prompt": "2+2=", "completion": " 4"}) == PromptCompletion("2+2=", " 4")


def test_prompt_completion_messages_keep_the_prompt_untrained():
    prompt = [msg(S, "s"), msg(U, "few-shot q"), msg(A, "few-shot a"), msg(U, "q")]
    example = normalise({"prompt": prompt, "completion": [msg(A, "a")]})
    assert example == Conversation(tuple(prompt + [msg(A, "a")]), context_turns=4)
    assert example.answer_indices() == [4]
    # a string on one side becomes one user / assistant turn
    assert normalise({"prompt": "q", "completion": [msg(A, "a")]}) == Conversation((msg(U, "q"), msg(A, "a")), 1)
    assert normalise({"prompt": [msg(U, "q")], "completion": "a"}) == Conversation((msg(U, "q"), msg(A, "a")), 1)


def test_messages_as_json_text_in_a_csv_cell():
    cell = ' [ {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"} ]'
    assert normalise({"messages": cell}) == Conversation((msg(U, "q"), msg(A, "a")))
    # text that merely starts with a bracket stays text
    assert normalise({"prompt": "[INST] q", "completion": "a"}) == PromptCompletion("[INST] q", "a")


BAD = [
    ("empty conversation", {"messages": []}, "empty conversation"),
    ("unknown role", {"messages": [msg(U, "q"), msg("bot", "a")]}, "message 1 has role 'bot'"),
    ("unknown sharegpt role", {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]}, "'from': 'tool'"),
    ("two users", {"messages": [msg(U, "q"), msg(U, "q2"), msg(A, "a")]}, "message 1 is 'user' where 'assistant' was due"),
    ("assistant first", {"messages": [msg(A, "a"), msg(U, "q")]}, "message 0 is 'assistant' where 'user' was due"),
    ("system later", {"messages": [msg(U, "q"), msg(S, "s"), msg(A, "a")]}, "message 1 is 'system'"),
    ("no answer", {"messages": [msg(U, "q")]}, "no assistant message"),
    ("empty answer", {"messages": [msg(U, "q"), msg(A, " \n ")]}, "message 1 of 'messages' is an empty answer"),
    ("empty alpaca output", {"instruction": "i", "output": ""}, "empty answer"),
    ("empty completion", {"prompt": "p", "completion": "  "}, "empty answer (column 'completion')"),
    ("completion without answer", {"prompt": [msg(U, "q")], "completion": [msg(U, "q2")]}, "is 'user' where 'assistant'"),
    ("not text", {"messages": [msg(U, 3), msg(A, "a")]}, "'messages[0].content' is int, not text"),
    ("not a list", {"messages": "hello"}, "holds str, not a list of messages"),
]


@pytest.mark.parametrize("name,row,problem", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_the_source_row_and_fix(name, row, problem):
    with pytest.raises(UsageError) as error:
        normalise(row)
    text = str(error.value)
    assert text.startswith(f"{SRC} row 7 (0-based): ") and problem in text
    assert any(fix in text for fix in ("drop the row", "Give", "Put the answer", "Rename"))


def test_all_bad_rows_are_reported_at_once():
    choice = formats.detect_format(["messages"])
    rows = [{"messages": [msg(U, "q"), msg(A, "a")]}] + [{"messages": []}] * 12
    with pytest.raises(UsageError) as error:
        formats.normalise_rows(rows, choice, SRC)
    problems = error.value.problems
    assert len(problems) == formats.MAX_LISTED + 1
    assert problems[0].startswith(f"{SRC} row 1 (0-based)") and problems[-1] == f"... and 2 more bad rows in {SRC}."
    assert len(formats.normalise_rows(rows[:1] * 3, choice, SRC)) == 3


# ---------------------------------------------------------------- tokenising: against transformers' assistant mask

# The shipped template with {% generation %} around what is trained (answer text + <end_of_turn>): transformers'
# apply_chat_template(return_assistant_tokens_mask=True) then computes the trained tokens by its own code.
GENERATION_TEMPLATE = chat_template.GEMMA3_CHAT_TEMPLATE.replace(
    "{{- text(message['content'], true) ~ '<end_of_turn>\\n' -}}",
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- text(message['content'], true) ~ '<end_of_turn>' -}}"
    "{%- endgeneration -%}{{- '\\n' -}}{%- else -%}{{- text(message['content'], true) ~ '<end_of_turn>\\n' -}}{%- endif -%}",
)

CONVERSATIONS = [
    [msg(U, "Hi"), msg(A, "Hello!")],
    [msg(S, "Be brief."), msg(U, "naïve café?"), msg(A, "日本語 🤖 ok"), msg(U, "And Ελληνικά?"), msg(A, " עברית ")],
    [msg(U, ""), msg(A, "x")],
    [msg(U, "def f(a, b):\n    return a + b"), msg(A, "It adds.\n\nTwo lines."), msg(U, "trailing question")],
]


def test_labels_equal_transformers_assistant_mask(tokenizer):
    assert GENERATION_TEMPLATE != chat_template.GEMMA3_CHAT_TEMPLATE
    examples = [Conversation(tuple(c)) for c in CONVERSATIONS]
    out = formats.tokenize_examples(tokenizer, examples, max_seq_length=1000)
    for conv, ids, labels in zip(CONVERSATIONS, out.input_ids, out.labels):
        ref = tokenizer.apply_chat_template(
            conv, chat_template=GENERATION_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ids.tolist() == ref["input_ids"]
        assert labels.tolist() == [t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"])]


def test_trained_text_by_hand(tokenizer):
    out = formats.tokenize_examples(tokenizer, [Conversation(tuple(CONVERSATIONS[1]))], max_seq_length=1000)
    shown = formats.show_trained(tokenizer, out.input_ids[0], out.labels[0])
    assert shown == (
        "<bos><start_of_turn>user\nBe brief.\n\nnaïve café?<end_of_turn>\n<start_of_turn>model\n"
        "[[日本語 🤖 ok<end_of_turn>]]\n<start_of_turn>user\nAnd Ελληνικά?<end_of_turn>\n<start_of_turn>model\n"
        "[[עברית<end_of_turn>]]\n"
    )
    assert out.rows == [0] and out.counts.kept == 1


def test_a_few_shot_answer_in_the_prompt_is_not_trained(tokenizer):
    few_shot = Conversation((msg(U, "q1"), msg(A, "shot"), msg(U, "q2"), msg(A, "real")), context_turns=3)
    out = formats.tokenize_examples(tokenizer, [few_shot], max_seq_length=1000)
    assert formats.show_trained(tokenizer, out.input_ids[0], out.labels[0]).count("[[") == 1
    assert "[[real<end_of_turn>]]" in formats.show_trained(tokenizer, out.input_ids[0], out.labels[0])


def test_train_on_prompt_trains_all_but_the_first_token(tokenizer):
    out = formats.tokenize_examples(tokenizer, [Conversation(tuple(CONVERSATIONS[0]))], 1000, train_on_prompt=True)
    ids, labels = out.input_ids[0], out.labels[0]
    assert labels[0] == IGNORE and labels[1:].tolist() == ids[1:].tolist()


# ---------------------------------------------------------------- BOS


PLAIN = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def bos_count(ids, tokenizer):
    return int((np.asarray(ids) == tokenizer.bos_token_id).sum())


@pytest.mark.parametrize(
    "template",
    [
        chat_template.GEMMA3_CHAT_TEMPLATE,  # renders <bos>
        PLAIN,  # renders none
        "{{ bos_token }}{{ bos_token }}" + PLAIN,
    ],
    ids=["renders-bos", "no-bos", "two-bos"],
)
def test_exactly_one_bos_whatever_the_template(base_tokenizer, template):
    base_tokenizer.chat_template = template
    out = formats.tokenize_examples(base_tokenizer, [Conversation((msg(U, "q"), msg(A, "a")))], 1000)
    ids = out.input_ids[0]
    assert ids[0] == base_tokenizer.bos_token_id and bos_count(ids, base_tokenizer) == 1
    trained = [i for i, label in zip(ids.tolist(), out.labels[0].tolist()) if label != IGNORE]
    assert base_tokenizer.decode(trained) in ("a<end_of_turn>", "a<eos>")


# ---------------------------------------------------------------- plain prompt/completion


@pytest.mark.parametrize("prompt,completion", [("Q: 2+2=", " 4"), ("Translate: naïve", " 日本語 🤖"), ("", "all of it")])
def test_plain_pair_by_hand(tokenizer, prompt, completion):
    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = formats.tokenize_examples(tokenizer, [PromptCompletion(prompt, completion)], 1000)
    # the boundary is a pre-token boundary (a space), so the pieces tokenise the same apart and together
    assert out.input_ids[0].tolist() == [tokenizer.bos_token_id] + tok(prompt) + tok(completion) + [tokenizer.eos_token_id]
    assert out.labels[0].tolist() == [IGNORE] * (1 + len(tok(prompt))) + tok(completion) + [tokenizer.eos_token_id]


def test_a_prompt_that_starts_with_bos_keeps_one(tokenizer):
    out = formats.tokenize_examples(tokenizer, [PromptCompletion("<bos><bos>Q:", " A")], 1000)
    assert bos_count(out.input_ids[0], tokenizer) == 1


def test_mixed_batch_keeps_order(tokenizer):
    examples = [PromptCompletion("p", " c"), Conversation((msg(U, "q"), msg(A, "a"))), PromptCompletion("p2", " c2")]
    out = formats.tokenize_examples(tokenizer, examples, 1000, batch_size=2)
    shown = [formats.show_trained(tokenizer, i, label) for i, label in zip(out.input_ids, out.labels)]
    assert shown == [
        "<bos>p[[ c<eos>]]",
        "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n[[a<end_of_turn>]]\n",
        "<bos>p2[[ c2<eos>]]",
    ]
    assert out.rows == [0, 1, 2]


# ---------------------------------------------------------------- length policy and counts


def test_overlong_rows_truncate_or_drop_and_are_counted(tokenizer):
    short = Conversation((msg(U, "q"), msg(A, "a")))  # 12 tokens, the answer at 9..10
    long_answer = Conversation((msg(U, "q"), msg(A, "a " * 40)))
    long_prompt = Conversation((msg(U, "q " * 40), msg(A, "a")))
    full = formats.tokenize_examples(tokenizer, [short, long_answer, long_prompt], 1000)
    n_short = len(full.input_ids[0])
    cut = 20
    assert n_short < cut < min(len(ids) for ids in full.input_ids[1:])

    kept = formats.tokenize_examples(tokenizer, [short, long_answer, long_prompt], cut)
    assert kept.rows == [0, 1]  # the long prompt's answer is cut away: dropped
    assert kept.input_ids[1].tolist() == full.input_ids[1][:cut].tolist()
    assert kept.labels[1].tolist() == full.labels[1][:cut].tolist()
    c = kept.counts
    assert (c.rows, c.kept, c.truncated, c.dropped_too_long, c.dropped_untrained) == (3, 2, 2, 0, 1)
    assert c.tokens == n_short + cut
    assert c.trained_tokens == int((full.labels[0] != IGNORE).sum() + (full.labels[1][:cut] != IGNORE).sum())

    dropped = formats.tokenize_examples(tokenizer, [short, long_answer, long_prompt], cut, overlong="drop")
    d = dropped.counts
    assert dropped.rows == [0] and (d.kept, d.truncated, d.dropped_too_long, d.dropped_untrained) == (1, 0, 2, 0)
    assert (c + d).rows == 6 and "dropped 2 too long" in d.summary()


def test_a_one_token_row_has_nothing_to_train(base_tokenizer):
    base_tokenizer.chat_template = "{% for m in messages %}{% endfor %}"  # renders nothing at all
    out = formats.tokenize_examples(base_tokenizer, [Conversation((msg(U, "q"), msg(A, "a")))], 1000)
    assert out.counts.dropped_untrained == 1 and out.input_ids == []
