"""Running the launchers from tests: a clean environment, free ports, and launches whose every
process can be found, timed and killed.

A launch's processes are the launcher (bash, exec'd into accelerate), torchrun's agent, and the
workers the agent starts, each in its own session (torch's elastic agent uses start_new_session),
so neither the parent-child tree nor a process group reaches them all. Each launch therefore sets
a unique marker variable that every process inherits, and `Launch.processes()` finds them by it
in /proc (Linux).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MARKER = "TUNER_TEST_LAUNCH"
TIMEOUT = 240  # seconds per launch: a tiny-model run takes ~25 s here, but CI machines can be slow

# Settings the caller's shell may hold that would change what a launcher does.
LAUNCHER_VARS = (
    "MASTER_ADDR", "MASTER_PORT", "MACHINE_RANK", "NUM_MACHINES", "NUM_PROCESSES", "NPROC_PER_NODE", "GPUS",
    "GPU", "CONFIG", "ACCELERATE_CONFIG", "DRY_RUN", "WAIT_FOR_MAIN_SECONDS", "RENDEZVOUS_TIMEOUT",
    "TRAIN_FILE", "VALIDATION_FILE", "TEXT_COLUMN", "CHECKPOINT", "CORPUS", "CUDA_VISIBLE_DEVICES", "MODEL",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "CHECK_TIMEOUT",
    MARKER,
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**settings: str) -> dict[str, str]:
    """os.environ (offline flags, caches) without launcher settings; PYTHON is this interpreter
    unless `settings` names another."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **settings})
    return env


def process_environ(pid: int) -> dict[str, str] | None:
    """The environment `pid` started with; None once it has exited (a zombie's is empty)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item) or None


class Launch:
    """A command started in its own session, its output in files under `cwd`."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]):
        cwd.mkdir(parents=True, exist_ok=True)
        self.name, self.cwd, self.started, self.marker = name, cwd, time.monotonic(), uuid.uuid4().hex
        self.out, self.err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env={**env, MARKER: self.marker}, stdout=out, stderr=err, start_new_session=True
            )  # fmt: skip

    def processes(self) -> dict[int, dict[str, str]]:
        """{pid: environment} of every live process of this launch: launcher, agent, workers."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (env := process_environ(int(entry.name))) and env.get(MARKER) == self.marker:
                found[int(entry.name)] = env
        return found

    def worker_pid(self, rank: int) -> int | None:
        """The training process of global rank `rank`, once the agent has started it."""
        return next((pid for pid, env in self.processes().items() if env.get("RANK") == str(rank)), None)

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{self.name} still running after {timeout} s:\n{self.tail()}")
        self.elapsed = time.monotonic() - self.started
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} stdout\n{self.stdout[-chars:]}\n--- {self.name} stderr\n{self.stderr[-chars:]}"

    def assert_clean_exit(self) -> None:
        """Exit 0, and no abort or stack trace at teardown in any process's output."""
        code = self.wait()
        assert code not in (-6, 134), f"{self.name} aborted (SIGABRT):\n{self.tail()}"
        assert code == 0, f"{self.name} exited {code}:\n{self.tail()}"
        for marker in ("Traceback", "terminate called", "core dumped", "Fatal Python error"):
            assert marker not in self.stderr + self.stdout, f"{self.name} printed {marker!r}:\n{self.tail()}"


def tiny_run_config(directory: Path, model: str, docs: list[str], **settings) -> Path:
    """A main.py YAML that trains the tiny model on `docs` on CPU (output_dir "out", relative to the
    cwd); `settings` add or override keys."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    options = {
        "model_name_or_path": model, "train_file": str(corpus), "output_dir": "out",
        "max_seq_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "logging_steps": 1, "learning_rate": 1e-3, "warmup_steps": 0, "max_eval_samples": 8,
        "per_device_eval_batch_size": 2, "report_to": "none", "max_new_tokens": 0, "eval_before_training": False,
        **settings,
    }  # fmt: skip
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return path
