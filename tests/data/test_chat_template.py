"""The shipped Gemma 3 template renders what Google's published one renders; installing, saving and chatting;
stop tokens; answer spans with templates that do and do not render BOS."""

from __future__ import annotations

import pytest
from tiny import build_tokenizer

from tuner.data import chat_template
from tuner.data.chat_template import GEMMA3_CHAT_TEMPLATE
from tuner.errors import UsageError

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture
def tokenizer():
    tok = build_tokenizer()
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


# Expected strings written from Google's published Gemma 3 template (google/gemma-3-*-it, tokenizer_config.json):
# bos, then per turn "<start_of_turn>{user|model}\n{text, trimmed}<end_of_turn>\n", the system text (untrimmed)
# + "\n\n" at the start of the first user turn, "<start_of_turn>model\n" as the generation prompt.
CASES = [
    ("single turn", [msg(U, "Hi"), msg(A, "Hello!")], "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"),
    (
        "system folded, text trimmed, system not",
        [msg(S, " Be brief. "), msg(U, "  Hi \n"), msg(A, "\nHello!\n\n")],
        "<bos><start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    ),
    (
        "multi turn, unicode",
        [msg(U, "naïve café"), msg(A, "日本語 🤖"), msg(U, "Ελληνικά?"), msg(A, "עברית")],
        "<bos><start_of_turn>user\nnaïve café<end_of_turn>\n<start_of_turn>model\n日本語 🤖<end_of_turn>\n"
        "<start_of_turn>user\nΕλληνικά?<end_of_turn>\n<start_of_turn>model\nעברית<end_of_turn>\n",
    ),
    ("empty user content", [msg(U, "")], "<bos><start_of_turn>user\n<end_of_turn>\n"),
    (
        "text parts",
        [msg(S, [{"type": "text", "text": "S"}]), msg(U, [{"type": "text", "text": " a "}, {"type": "text", "text": "b"}])],
        "<bos><start_of_turn>user\nS\n\nab<end_of_turn>\n",
    ),
]


@pytest.mark.parametrize("name,messages,expected", CASES, ids=[c[0] for c in CASES])
def test_renders_as_google_gemma3(tokenizer, name, messages, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<start_of_turn>model\n"


@pytest.mark.parametrize(
    "messages", [[msg(A, "x")], [msg(U, "x"), msg(U, "y")], [msg(S, "s"), msg(A, "x")], [msg(U, "x"), msg(A, "y"), msg(A, "z")]]
)
def test_roles_that_do_not_alternate_raise(tokenizer, messages):
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_rendered_then_tokenized_has_one_bos(tokenizer):
    ids = tokenizer.apply_chat_template([msg(U, "Hi"), msg(A, "Yo")], tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("<start_of_turn>")) == 2
    assert ids.count(tokenizer.convert_tokens_to_ids("<end_of_turn>")) == 2


# ---------------------------------------------------------------- installing


def test_install_picks_file_then_own_then_shipped(tmp_path):
    tok = build_tokenizer()
    assert chat_template.install_chat_template(tok) == chat_template.SHIPPED
    assert tok.chat_template == GEMMA3_CHAT_TEMPLATE
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.chat_template = own
    assert chat_template.install_chat_template(tok) == "the tokenizer's own chat template"
    assert tok.chat_template == own
    file = tmp_path / "t.jinja"
    file.write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        encoding="utf-8",
    )
    assert chat_template.install_chat_template(tok, str(file)) == f"--chat_template {file}"
    assert tok.apply_chat_template([msg(U, "q")], tokenize=False) == "<bos>[user]q"


def test_a_tokenizer_without_turn_tokens_needs_a_template_file(monkeypatch):
    import tiny

    monkeypatch.setattr(tiny, "SPECIALS", ["<pad>", "<eos>", "<bos>", "<unk>"])
    with pytest.raises(UsageError, match="--chat_template FILE") as error:
        chat_template.install_chat_template(tiny.build_tokenizer())
    assert "<start_of_turn> and <end_of_turn>" in str(error.value)


def test_template_file_problems(tmp_path):
    assert chat_template.template_file_problems(None) == []
    assert "no such file" in chat_template.template_file_problems(str(tmp_path / "missing.jinja"))[0]
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n", encoding="utf-8")
    assert "empty" in chat_template.template_file_problems(str(empty))[0]
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m }}", encoding="utf-8")
    problem = chat_template.template_file_problems(str(broken))[0]
    assert problem.startswith(f"--chat_template {broken}: not valid Jinja") and "line 1" in problem
    with pytest.raises(UsageError, match="not valid Jinja"):
        chat_template.install_chat_template(build_tokenizer(), str(broken))
    no_prompt = tmp_path / "no_prompt.jinja"
    no_prompt.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert "ignores add_generation_prompt" in chat_template.template_file_problems(str(no_prompt))[0]


def test_saved_model_chats_and_stops_at_end_of_turn(tmp_path):
    """save_pretrained keeps the template; generation_config stops at <end_of_turn>; plain transformers reloads both."""
    from tiny import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

    tok = build_tokenizer()
    chat_template.install_chat_template(tok)
    model = build_model(len(tok))
    model.generation_config.eos_token_id = chat_template.stop_token_ids(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [1, 5]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    chat = [msg(U, "What does json.dumps do?")]
    assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nWhat does json.dumps do?<end_of_turn>\n<start_of_turn>model\n"
    )
    inputs = reloaded.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    end_of_turn = reloaded.convert_tokens_to_ids("<end_of_turn>")

    class EndTurnAtThird(LogitsProcessor):
        """A random tiny model never ends a turn by itself: force <end_of_turn> as the third new token."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - inputs["input_ids"].shape[1] == 2:
                scores[:] = -float("inf")
                scores[:, end_of_turn] = 0
            return scores

    reloaded_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = reloaded_model.generate(
        **inputs, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([EndTurnAtThird()])
    )
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) == 3 and new[-1].item() == end_of_turn


# ---------------------------------------------------------------- stop tokens


def test_stop_tokens(tokenizer):
    assert chat_template.stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert chat_template.stop_token_ids(tokenizer) == [1, 5]
    plain = build_tokenizer()  # no template: EOS only
    assert chat_template.stop_token_ids(plain) == [1]
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert chat_template.stop_token_ids(plain) == [1]  # the turn ends with EOS: listed once


# ---------------------------------------------------------------- answer spans

NO_BOS = (  # a ChatML-like template in plain text markers, rendering no BOS
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def spans_text(text, spans):
    return [text[s:e] for s, e in spans]


def test_answer_spans_gemma(tokenizer):
    conv = [msg(S, "Sys"), msg(U, "Q1"), msg(A, " A1 🤖 "), msg(U, "Q2"), msg(A, "A2")]
    texts, spans = chat_template.answer_spans(tokenizer, [conv], [[2, 4]])
    assert spans_text(texts[0], spans[0]) == ["A1 🤖<end_of_turn>", "A2<end_of_turn>"]
    assert texts[0].index("A1") == spans[0][0][0]


def test_answer_spans_without_bos_and_with_a_trailing_user_turn(tokenizer):
    tokenizer.chat_template = NO_BOS
    conv = [msg(U, "Q1"), msg(A, "A1"), msg(U, "Q2")]
    texts, spans = chat_template.answer_spans(tokenizer, [conv, conv[:2]], [[1], [1]])
    assert texts[1] == "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n"
    assert spans_text(texts[0], spans[0]) == spans_text(texts[1], spans[1]) == ["A1<|end|>"]


def test_a_template_that_does_not_render_prefixes_consistently_is_refused(tokenizer):
    # the last message is rendered differently from the others: its prefix rendering is not a prefix of the whole
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(UsageError, match="prefix of the whole"):
        chat_template.answer_spans(tokenizer, [[msg(U, "q"), msg(A, "a")]], [[1]])


def test_render_of_nothing_is_nothing(tokenizer):
    assert chat_template.render(tokenizer, []) == []
    assert chat_template.answer_spans(tokenizer, [], []) == ([], [])
