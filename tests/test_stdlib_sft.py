"""scripts/stdlib_sft.py: a few thousand docstring Q&A pairs, split by module, deterministic, valid SFT rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tuner.data import formats

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "stdlib_sft.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("stdlib_sft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib_sft")
    train, validation = script.main([str(out)])
    return train, validation


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_a_few_thousand_examples_split_by_module(written):
    train, validation = map(read, written)
    assert 1500 <= len(train) and 100 <= len(validation) and len(train) + len(validation) <= 10_000
    train_modules = {r["module"] for r in train}
    validation_modules = {r["module"] for r in validation}
    assert validation_modules and not train_modules & validation_modules
    for row in train + validation:
        assert row["name"].startswith(row["module"] + ".")
    names = [r["name"] for r in train + validation]
    assert len(names) == len(set(names))


def test_rows_are_valid_messages(written):
    for path in written:
        rows = read(path)
        choice = formats.detect_format(rows[0].keys())
        assert choice.format == "messages"
        examples = formats.normalise_rows(rows, choice, str(path))
        assert all(len(e.messages) == 2 for e in examples)


def test_known_answers(written):
    rows = {r["name"]: r for r in read(written[0]) + read(written[1])}
    assert rows["json.dumps"]["messages"] == [
        {"role": "user", "content": "What does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize `obj` to a JSON formatted `str`."},
    ]
    assert rows["re.compile"]["messages"][1]["content"] == "Compile a regular expression pattern, returning a Pattern object."
    # an old C-style head "S.append(value) -- ..." is cut off
    assert rows["collections.abc.MutableSequence.append"]["messages"][1]["content"] == "Append value to the end of the sequence"


def test_deterministic(script, written, tmp_path):
    again = script.main([str(tmp_path)])
    for first, second in zip(written, again):
        assert Path(first).read_bytes() == Path(second).read_bytes()


def test_fraction_moves_modules(script):
    train, validation = script.build(["json", "re", "os.path", "textwrap", "string"], validation_fraction=1.0)
    assert not train and {r["module"] for r in validation} == {"json", "re", "os.path", "textwrap", "string"}
    train, validation = script.build(["json"], validation_fraction=0.0)
    assert not validation and train


@pytest.mark.parametrize(
    "doc,expected",
    [
        (None, None),
        ("", None),
        ("Too short.", None),
        ("Initialize self.  See help(type(self)) for accurate signature.", None),
        ("f(a, b) -> int\n\nAdd two numbers and return the sum.", "Add two numbers and return the sum."),
        ("f(a, b)", None),
        ("S.append(value) -- append value to the end", "Append value to the end"),
        ("int, int -> Construct a thing from two ints.", "Construct a thing from two ints."),
        ("  Return the\n  ``naïve`` café value 🤖.\n\n  More detail here.", "Return the `naïve` café value 🤖."),
        ("x.__contains__(y) <==> y in x for sure.", None),
    ],
)
def test_first_paragraph(script, doc, expected):
    assert script.first_paragraph(doc) == expected


def test_long_paragraphs_keep_whole_sentences(script):
    sentence = "This sentence has exactly ten words in it, you see."
    assert script.shorten(" ".join([sentence] * 20), 120) == " ".join([sentence] * 2)
    assert script.shorten("x" * 500 + ".", 400) is None
