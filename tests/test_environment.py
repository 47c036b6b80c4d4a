"""tuner/environment.py, the checks verify_setup.sh runs, piece by piece: versions against
requirements.txt, GPU selection, model access, network. Each check is run with its inputs given
(a fake torch, a fake offline module, a port held busy) and judged by the report lines it prints.
verify_setup.sh itself is run end to end in test_launchers.py."""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuner import environment
from tuner.environment import Report

ROOT = Path(__file__).resolve().parent.parent


def lines(report: Report) -> list[tuple[str, str, str]]:
    """(status, name, detail) of each report line; names are single words or "gpu 0"-like pairs."""
    found = []
    for line in report.out.getvalue().splitlines():
        if m := re.match(r"^(PASS|WARN|FAIL)\s+(offline model|model access|this host|main node|rdzv port|selected gpus|"
                         r"gpu selection|gpu \d+|\S+)\s+(.*)$", line):  # fmt: skip
            found.append(m.groups())
    return found


@pytest.fixture
def report() -> Report:
    return Report(io.StringIO())


def test_report_prints_a_fix_under_warn_and_fail_only_and_fails_exactly_on_fail(report):
    report.add("PASS", "a", "fine", "never shown")
    report.add("WARN", "b", "hmm", "do this")
    assert not report.failed
    report.add("FAIL", "c", "broken", "do that")
    assert report.failed
    assert report.out.getvalue().splitlines() == [
        "PASS  a              fine", "WARN  b              hmm", "      fix: do this", "FAIL  c              broken",
        "      fix: do that",
    ]  # fmt: skip
    assert report.summary() == "1 passed, 1 warning(s), 1 failed"


# ---------------------------------------------------------------- packages, from requirements.txt


def test_the_requirements_are_requirements_txt_lines():
    """Independent reading: each non-comment line's name, up to its first version operator."""
    expected = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            expected.append((re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0], line))
    parsed = environment.read_requirements()
    assert [r.name for r in parsed] == [name for name, _ in expected]
    for requirement, (name, line) in zip(parsed, expected):
        assert set(str(requirement.specifier).split(",")) == set(line[len(name) :].replace(" ", "").split(",")), line
    assert {"torch", "transformers", "accelerate", "datasets"} <= {r.name for r in parsed}


def test_requirements_skip_comments_blank_lines_and_trailing_comments(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# a comment\n\npyyaml>=6.0  # the YAML reader\ntransformers>=5.0,<6\n")
    assert [str(r) for r in environment.read_requirements(path)] == ["pyyaml>=6.0", "transformers<6,>=5.0"]


def test_module_of_a_distribution():
    assert environment.module_of("PyYAML") == environment.module_of("pyyaml") == "yaml"
    assert environment.module_of("torch") == "torch"
    assert environment.module_of("no-such-distribution-here") is None


@pytest.mark.parametrize(
    "spec, status, detail, fix",
    [
        ("pyyaml>=1.0", "PASS", None, None),
        ("pyyaml>=999", "WARN", "but requirements.txt asks for >=999", "pip install -U 'pyyaml>=999'"),
        ("pyyaml<1", "WARN", "but requirements.txt asks for <1", "pip install -U 'pyyaml<1'"),
        (
            "no-such-distribution-here>=1",
            "FAIL",
            "cannot import (PackageNotFoundError",
            "pip install 'no-such-distribution-here>=1'",
        ),
    ],
    ids=["in-range", "too-old", "too-new", "missing"],
)
def test_a_requirement_passes_warns_or_fails(report, spec, status, detail, fix):
    import yaml
    from packaging.requirements import Requirement

    environment.check_requirement(report, Requirement(spec))
    (got_status, name, got_detail), = lines(report)  # fmt: skip
    assert (got_status, name) == (status, Requirement(spec).name)
    assert got_detail.startswith(yaml.__version__) if status != "FAIL" else True
    if detail:
        assert detail in got_detail
        assert f"fix: {fix}" in report.out.getvalue()


def test_an_installed_but_broken_package_fails(report, monkeypatch):
    from packaging.requirements import Requirement

    def broken(name):
        raise OSError("libtorch_cpu.so: cannot open shared object file")

    monkeypatch.setattr(environment.importlib, "import_module", broken)
    environment.check_requirement(report, Requirement("pyyaml>=6.0"))
    assert lines(report) == [
        ("FAIL", "pyyaml", "cannot import (OSError: libtorch_cpu.so: cannot open shared object file)")
    ]


def test_every_requirement_gets_a_line_and_an_unreadable_file_fails(report, tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("pyyaml>=1\nno-such-distribution-here\n")
    environment.check_packages(report, path)
    assert [(s, n) for s, n, _ in lines(report)] == [("PASS", "pyyaml"), ("FAIL", "no-such-distribution-here")]
    other = Report(io.StringIO())
    environment.check_packages(other, tmp_path / "missing.txt")
    assert [(s, n) for s, n, _ in lines(other)] == [("FAIL", "requirements")]


# ---------------------------------------------------------------- GPUs


@pytest.mark.parametrize(
    "env, wanted",
    [({}, None), ({"GPUS": "all"}, []), ({"GPUS": "0,2"}, [0, 2]), ({"CUDA_VISIBLE_DEVICES": "1"}, [1]),
     ({"GPUS": "3", "CUDA_VISIBLE_DEVICES": "1"}, [3]), ({"GPUS": " "}, None)],
)  # fmt: skip
def test_requested_gpus(report, env, wanted):
    assert environment.requested_gpus(env, report) == wanted
    assert lines(report) == []


def test_requested_gpus_that_are_not_indices_fail(report):
    assert environment.requested_gpus({"GPUS": "first,second"}, report) == []
    assert lines(report)[0][:2] == ("FAIL", "gpu selection")


def fake_torch(cuda: str | None):
    return SimpleNamespace(__version__="2.13.0", version=SimpleNamespace(cuda=cuda))


@pytest.mark.parametrize(
    "env, smi, cuda, status, fix_part",
    [
        ({}, None, None, "WARN", "CPU-only build"),
        ({"GPUS": "0"}, None, None, "FAIL", "CPU-only build"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, ["GPU 0: X"], "12.4", "FAIL", "driver is too old"),
        ({}, [], "12.4", "WARN", "install the NVIDIA driver"),
    ],
    ids=["cpu-build", "cpu-build-gpus-asked", "driver-mismatch", "no-driver"],
)
def test_no_cuda_is_a_warning_unless_gpus_were_asked_for(report, env, smi, cuda, status, fix_part):
    environment.no_cuda(report, env, fake_torch(cuda), environment.requested_gpus(env, report), smi)
    assert lines(report)[0][:2] == (status, "cuda")
    assert fix_part in report.out.getvalue()


@pytest.mark.parametrize(
    "env, count, physical, tried, status, detail",
    [
        ({"GPUS": "0,1"}, 2, 2, [0, 1], "PASS", "GPUS=0,1: 2 GPU(s) accept work"),
        ({"GPUS": "0,5"}, 2, 2, [], "FAIL", "GPU(s) [5] do not exist; this machine has 2"),
        # CUDA_VISIBLE_DEVICES=3,1 renumbers: physical GPU 1 is torch's cuda:1, physical 3 is cuda:0
        ({"GPUS": "1", "CUDA_VISIBLE_DEVICES": "3,1"}, 2, 4, [1], "PASS", "GPUS=1: 1 GPU(s)"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 2, 2, [], "FAIL", "GPU(s) [2] do not exist"),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2, 2, [0, 1], "PASS", "CUDA_VISIBLE_DEVICES=0,1: 2 GPU(s)"),
    ],
    ids=["both", "missing", "renumbered", "visible-missing", "visible"],
)
def test_selected_gpus_exist_and_accept_work(report, env, count, physical, tried, status, detail):
    used = []
    wanted = environment.requested_gpus(env, report)
    environment.check_selected(report, env, wanted, count, physical, used.append)
    assert used == tried
    (got_status, name, got_detail), = lines(report)  # fmt: skip
    assert (got_status, name) == (status, "selected gpus") and detail in got_detail


def test_a_selected_gpu_that_refuses_work_fails(report):
    def busy(index):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore")

    environment.check_selected(report, {"GPUS": "0"}, [0], 1, 1, busy)
    assert lines(report) == [
        ("FAIL", "selected gpus", "cuda:0 cannot be used: CUDA error: all CUDA-capable devices are busy or unavailable")
    ]


# ---------------------------------------------------------------- the model


def fake_offline(missing: list[str], converted: bool = False):
    return SimpleNamespace(
        OFFLINE_MODEL="offline:gemma-3-270m", missing_packages=lambda: missing, is_converted=lambda: converted,
        checkpoint_dir=lambda: Path("/cache/gemma"), is_offline_reference=lambda name: name.startswith("offline:"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "missing, converted, status, detail",
    [(["gguf"], False, "WARN", "gguf not installed"), ([], True, "PASS", "installed and converted"),
     ([], False, "PASS", "converted on first use")],
)  # fmt: skip
def test_offline_model(report, missing, converted, status, detail):
    assert environment.check_offline_model(report, fake_offline(missing, converted)) == missing
    assert lines(report)[0][0] == status and detail in lines(report)[0][2]


@pytest.fixture
def no_token_file(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    return tmp_path / "token"


def test_hub_token_from_the_environment_or_the_login_file(no_token_file):
    assert environment.hub_token({}) == (None, "")
    assert environment.hub_token({"HUGGING_FACE_HUB_TOKEN": "hf_b"}) == ("hf_b", "$HUGGING_FACE_HUB_TOKEN")
    assert environment.hub_token({"HF_TOKEN": "hf_a", "HUGGING_FACE_HUB_TOKEN": "hf_b"}) == ("hf_a", "$HF_TOKEN")
    no_token_file.write_text("hf_c\n")
    assert environment.hub_token({}) == ("file", str(no_token_file))


@pytest.mark.parametrize(
    "model, env, missing, status, detail",
    [
        ("offline:gemma-3-270m", {}, [], None, None),
        ("offline:gemma-3-270m", {}, ["gguf"], "FAIL", "needs gguf"),
        ("google/gemma-3-270m", {"HF_TOKEN": "hf_secret_value"}, [], "PASS", "hub token found ($HF_TOKEN)"),
        ("google/gemma-3-270m", {}, [], "WARN", "no hub token"),
        ("google/gemma-3-270m", {}, ["gguf"], "FAIL", "offline copy is not installed"),
    ],
    ids=["offline", "offline-missing", "token", "no-token", "no-token-no-offline"],
)
def test_model_access(report, no_token_file, model, env, missing, status, detail):
    environment.check_model_access(report, model, env, fake_offline(missing), missing)
    if status is None:
        assert lines(report) == []
        return
    (got_status, name, got_detail), = lines(report)  # fmt: skip
    assert (got_status, name) == (status, "model access") and detail in got_detail
    assert "hf_secret_value" not in report.out.getvalue()


def test_model_access_to_a_local_directory(report, tmp_path):
    environment.check_model_access(report, str(tmp_path), {}, fake_offline([]), [])
    (tmp_path / "config.json").write_text("{}")
    environment.check_model_access(report, str(tmp_path), {}, fake_offline([]), [])
    assert [line[0] for line in lines(report)] == ["FAIL", "PASS"]
    assert "has no config.json" in lines(report)[0][2]


def test_the_default_model_is_main_py_s():
    from tuner.config import parse_args

    assert environment.default_model() == parse_args([]).model_name_or_path


# ---------------------------------------------------------------- network


def test_main_node_unset_local_or_unresolvable(report):
    assert environment.check_main_node(report, "", 29500, 1.0, set()) is True
    assert environment.check_main_node(report, "127.0.0.1", 29500, 1.0, set()) is True
    assert environment.check_main_node(report, "no-such-host.invalid", 29500, 1.0, set()) is False
    assert [(s, d.split(" (")[0].split(":")[0]) for s, _, d in lines(report)] == [
        ("PASS", "MASTER_ADDR not set"), ("PASS", "MASTER_ADDR=127.0.0.1 is this machine"),
        ("FAIL", "MASTER_ADDR=no-such-host.invalid does not resolve"),
    ]  # fmt: skip


def routable_address() -> str:
    found = sorted(
        a for a in environment.local_addresses() if environment.is_ip(a) and ":" not in a and not a.startswith("127.")
    )
    if not found:
        pytest.skip("no non-loopback IPv4 address on this machine")
    return found[0]


def test_main_node_on_another_machine_answers_or_not(report):
    """This machine's own routable address stands for another machine (`mine` is given empty)."""
    address = routable_address()
    with socket.socket() as listening:
        listening.bind((address, 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert environment.check_main_node(report, address, port, 2.0, set()) is False
    assert environment.check_main_node(report, address, port, 2.0, set()) is False  # now nothing listens
    assert [s for s, _, _ in lines(report)] == ["PASS", "WARN"]
    assert "accepts connections" in lines(report)[0][2] and f"nothing listens on port {port}" in lines(report)[1][2]


def test_rdzv_port_in_use_fails_on_the_main_node_only(report):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        environment.check_port(report, port, main_node=True)
        environment.check_port(report, port, main_node=False)
    environment.check_port(report, port, main_node=True)
    assert [s for s, _, _ in lines(report)] == ["FAIL", "WARN", "PASS"]
    assert f"{port} is in use" in lines(report)[0][2]


def test_main_exits_1_exactly_when_a_check_fails(monkeypatch):
    def checks(report, env):
        for status in env["statuses"]:
            report.add(status, "x", "y", "z")

    monkeypatch.setattr(environment, "run_checks", checks)
    for statuses, code in [(["PASS", "WARN"], 0), (["PASS", "FAIL", "WARN"], 1), ([], 0)]:
        out = io.StringIO()
        assert environment.main({"statuses": statuses}, out) == code
        assert out.getvalue().rstrip().endswith(f"{statuses.count('FAIL')} failed")


def test_one_broken_check_does_not_hide_the_others(report, monkeypatch):
    def explode(report, env):
        raise KeyError("oops")

    monkeypatch.setattr(environment, "check_gpus", explode)
    monkeypatch.setattr(environment, "check_packages", lambda report: report.add("PASS", "packages", "fine"))
    monkeypatch.setattr(environment, "check_model", lambda report, env: report.add("PASS", "model", "fine"))
    monkeypatch.setattr(environment, "check_network", lambda report, env: report.add("PASS", "network", "fine"))
    environment.run_checks(report, {})
    assert [(s, n) for s, n, _ in lines(report)] == [
        ("PASS", "python"), ("PASS", "packages"), ("FAIL", "gpus"), ("PASS", "model"), ("PASS", "network"),
    ]  # fmt: skip
    assert "the check itself failed: KeyError: 'oops'" in report.out.getvalue()
