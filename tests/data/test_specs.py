"""Naming several sources: YAML datasets lists and several --train_file, their checks, and the weights
--mixture_from_influence derives (hand-computed cases)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tuner.config import parse_args, parse_namespace, to_yaml
from tuner.data import specs as source_specs
from tuner.errors import UsageError
from tuner.influence import mixture as influence_mixture


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("docs", "code", "chat"):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text('{"text": "hello"}\n', encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def test_one_train_file_stays_a_string_on_the_command_line_and_in_yaml(tmp_path, files):
    assert parse_args(["--train_file", files["docs"]]).train_file == files["docs"]
    config = tmp_path / "c.yaml"
    config.write_text(f"train_file: {files['docs']}\n", encoding="utf-8")
    cfg = parse_args(["--config", str(config)])
    assert cfg.train_file == files["docs"]
    assert source_specs.specs_from_options(cfg) == [
        source_specs.SourceSpec(name="docs", flag="--train_file", path=files["docs"], validation_flag="--validation_file")
    ]  # a run of one source: a list of one
    assert yaml.safe_load(to_yaml(cfg))["train_file"] == files["docs"]


def test_several_files_with_weights_are_named_by_their_stems(files):
    cfg = parse_args(["--train_file", files["docs"], files["code"], "--mix_weights", "3", "1"])
    specs = source_specs.specs_from_options(cfg)
    assert [(s.name, s.path, s.weight) for s in specs] == [("docs", files["docs"], 3.0), ("code", files["code"], 1.0)]
    equal = source_specs.specs_from_options(parse_args(["--train_file", files["docs"], files["code"]]))
    assert [s.weight for s in equal] == [1.0, 1.0]


def test_yaml_datasets_list_and_command_line_json_give_the_same_sources(tmp_path, files):
    entries = [
        {"name": "docs", "path": files["docs"], "text_column": "body", "weight": 3},
        {"name": "chat", "path": files["chat"], "data_format": "messages", "validation_path": files["code"]},
    ]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"datasets": entries}), encoding="utf-8")
    from_yaml = parse_args(["--config", str(config)])
    from_json = parse_args(["--datasets", json.dumps(entries)])
    assert from_yaml.dataset_name is None  # no default wikitext when datasets names the data
    specs = source_specs.specs_from_options(from_yaml)
    assert specs == source_specs.specs_from_options(from_json)
    assert [(s.name, s.weight, s.options, s.validation_path) for s in specs] == [
        ("docs", 3, {"text_column": "body"}, None), ("chat", 1, {"data_format": "messages"}, files["code"])
    ]
    # The resolved config reproduces the run: run_config.yaml holds the list as YAML, and reads back.
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(from_yaml), encoding="utf-8")
    assert source_specs.specs_from_options(parse_args(["--config", str(again)])) == specs
    assert specs[0].as_entry() == entries[0]  # what mixture.yaml writes back


def test_a_view_gives_each_source_its_own_columns_over_the_run_options(files):
    cfg = parse_args(["--datasets", json.dumps([{"path": files["docs"], "text_column": "body"}]), "--max_seq_length", "77"])
    view = source_specs.SourceView(cfg, source_specs.specs_from_options(cfg)[0])
    assert (view.text_column, view.max_seq_length, view.data_format, view.train_file) == ("body", 77, "auto", files["docs"])


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (lambda f: ["--train_file", f["docs"], f["code"], "--mix_weights", "3"], ["--mix_weights 3", "1 weight(s) for 2", "--mix_weights 1 1"]),
        (lambda f: ["--train_file", f["docs"], f["code"], "--mix_weights", "3", "0"], ["--train_file", "code.jsonl is 0.0", "positive"]),
        (lambda f: ["--train_file", f["docs"], f["code"], "--mix_weights", "3", "-1"], ["code.jsonl is -1.0", "positive"]),
        (lambda f: ["--datasets", json.dumps([{"path": f["docs"], "wieght": 2}])], ["unknown key 'wieght'", "Did you mean 'weight'"]),
        (lambda f: ["--datasets", json.dumps([{"name": "x", "path": "nope/missing.jsonl"}])], ["datasets[x] path nope/missing.jsonl", "no such file"]),
        (lambda f: ["--datasets", json.dumps([{"name": "a", "path": f["docs"]}, {"name": "a", "path": f["code"]}])], ["two sources are named 'a'", "own name"]),
        (lambda f: ["--datasets", json.dumps([{"name": "my docs", "path": f["docs"]}])], ["name 'my docs'", "letters, digits"]),
        (lambda f: ["--datasets", json.dumps([{"name": "a"}])], ["neither path nor dataset_name"]),
        (lambda f: ["--datasets", "[{oops"], ["--datasets", "not valid JSON"]),
        (lambda f: ["--datasets", json.dumps([{"path": f["docs"]}]), "--train_file", f["code"]], ["--datasets and --train_file", "under datasets"]),
        (lambda f: ["--train_file", f["docs"], f["code"], "--validation_file", f["chat"]], ["--validation_file", "validation_path"]),
        (lambda f: ["--train_file", f["docs"], f["code"], "--mixture_from_influence"], ["--mixture_from_influence: needs --influence"]),
        (lambda f: ["--train_file", f["docs"], "--influence", "--mixture_from_influence"], ["one training source", "no mixture"]),
        (lambda f: ["--train_file", f["docs"], "--mix_weights", "1", "2"], ["--mix_weights 1 2", "one training source"]),
    ],
    ids=["weights count", "zero weight", "negative weight", "unknown key", "missing path", "duplicate names", "bad name",
         "no location", "bad json", "datasets and train_file", "validation_file with a mix", "mixture without influence",
         "mixture of one", "weights for one file"],
)  # fmt: skip
def test_bad_specs_are_named_with_the_fix(files, argv, fragments):
    namespace = parse_namespace(argv(files))
    found = source_specs.problems(namespace)
    text = "\n".join(found)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} missing from:\n{text}"
    with pytest.raises(UsageError):
        source_specs.specs_from_options(namespace)


def test_file_stems_that_collide_are_refused(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "train.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    namespace = parse_namespace(["--train_file", str(tmp_path / "a" / "train.jsonl"), str(tmp_path / "b" / "train.jsonl")])
    assert any("two sources are named 'train'" in p and "rename one file" in p for p in source_specs.problems(namespace))


# ---------------------------------------------------------------- weights from influence


def test_weights_are_proportional_to_positive_summed_influence_with_a_floor():
    old = {"docs": 1.0, "code": 1.0, "noise": 1.0}
    # hand-computed: 3 and 1 of 4; noise (negative) gets the 5 % floor and the others share 95 % as 3:1
    weights, how = influence_mixture.new_weights({"docs": 3.0, "code": 1.0, "noise": -2.0}, old)
    assert weights == pytest.approx({"docs": 0.95 * 0.75, "code": 0.95 * 0.25, "noise": 0.05})
    assert how == "proportional to summed influence"
    # a source just under the floor is raised to it, then another falls under it in turn
    shares = influence_mixture.with_floor({"a": 0.9, "b": 0.06, "c": 0.04}, 0.05)
    assert shares["c"] == 0.05 and math.isclose(sum(shares.values()), 1.0)
    assert shares["a"] / shares["b"] == pytest.approx(0.9 / 0.06)


def test_no_positive_influence_keeps_the_run_weights():
    weights, how = influence_mixture.new_weights({"a": -1.0, "b": 0.0}, {"a": 3.0, "b": 1.0})
    assert weights == pytest.approx({"a": 0.75, "b": 0.25}) and "unchanged" in how


def test_floor_shrinks_with_many_sources():
    assert influence_mixture.floor_for(3) == 0.05 and influence_mixture.floor_for(20) == 0.025
