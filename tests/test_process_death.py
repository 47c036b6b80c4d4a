"""A dead process ends the whole run, and rerunning the same command resumes it.

One process of a two-process CPU (gloo) run is killed with SIGKILL after the first checkpoint; every
other process (workers, torchrun's agents, the launchers) must be gone within BOUND seconds, the
launchers must exit non-zero, and the same command run again must resume from the latest complete
checkpoint and finish.

What ends the others (measured on this machine: 1-2 s on one machine, 2-8 s over two loopback
machines; see the README, "Several GPUs, several machines"):
- on the machine where the process died, torchrun's agent (inside `accelerate launch`, which
  checks its workers every 0.1 s and does not restart them: --max_restarts 0) sends the other
  workers SIGTERM, SIGKILL after 30 s, and exits 1;
- a process on another machine gets gloo's "Connection closed by peer" at its next collective
  (every training step has one) and exits with an error, and then its own agent exits 1.
Every process joins the process group when its options are parsed (Config is a TrainingArguments,
whose __post_init__ sets up the device), before the data is prepared, so a process that dies while
the others tokenize is also a closed connection, found at the first collective after the data
phase: test_a_process_killed_while_preparing_data_ends_the_other_machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from launch import ROOT, Launch, free_port, launcher_env, tiny_run_config

STEPS = 40  # ~10 steps/s here: after checkpoint-5 the run has ~3 s to go, ample time to kill it mid-training
SAVE_STEPS = 5
BOUND = 45  # seconds from the kill until no process is left: the agent's 30 s SIGTERM grace + margin

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")


@pytest.fixture(scope="module")
def run_config(tiny_model, corpus_docs, tmp_path_factory) -> Path:
    return tiny_run_config(
        tmp_path_factory.mktemp("process-death"), tiny_model, corpus_docs,
        max_steps=STEPS, save_steps=SAVE_STEPS, eval_steps=1000,
    )  # fmt: skip


@pytest.fixture
def launches():
    """Launches started by a test; whatever still runs at its end is killed."""
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill_all()


def complete_checkpoints(output_dir: Path) -> list[int]:
    """Steps of the checkpoints whose trainer_state.json (the Trainer writes it last) parses."""
    steps = []
    for path in output_dir.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        steps.append(int(path.name.split("-")[1]))
    return sorted(steps)


def kill_after_first_checkpoint(runs: list[Launch], rank: int, output_dir: Path) -> float:
    """SIGKILL the worker of global rank `rank` once a checkpoint is complete; returns the kill's time."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pid = next((p for run in runs if (p := run.worker_pid(rank))), None)
        if pid and complete_checkpoints(output_dir):
            os.kill(pid, signal.SIGKILL)
            return time.monotonic()
        finished = [run for run in runs if run.proc.poll() is not None]
        assert not finished, "a launch ended before the kill:\n" + "\n".join(r.tail() for r in finished)
        time.sleep(0.05)
    pytest.fail("no checkpoint within 180 s:\n" + "\n".join(r.tail() for r in runs))


def seconds_until_all_gone(runs: list[Launch], killed_at: float, limit: float = 3 * BOUND) -> float:
    while time.monotonic() - killed_at < limit:
        if not any(run.processes() for run in runs):
            return time.monotonic() - killed_at
        time.sleep(0.1)
    alive = {run.name: sorted(run.processes()) for run in runs}
    pytest.fail(f"processes still alive {limit:.0f} s after the kill: {alive}\n" + "\n".join(r.tail() for r in runs))


def assert_resumed_and_finished(rerun: Launch, output_dir: Path, latest: int) -> None:
    assert f"Resuming from {output_dir / f'checkpoint-{latest}'}" in rerun.stdout, rerun.tail()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged == list(range(1, STEPS + 1)), "the resumed run's loss history has gaps or repeats"
    assert (output_dir / "model.safetensors").exists()


def test_a_killed_process_ends_a_one_machine_run_and_the_same_command_resumes(run_config, tmp_path, launches):
    """example_run.sh cpu-ddp (accelerate launch, 2 processes); the main process (rank 0) is killed."""
    out = tmp_path / "out"
    command = ["bash", str(ROOT / "example_run.sh"), "cpu-ddp", "--output_dir", str(out)]
    env = launcher_env(CONFIG=str(run_config), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    launches.append(run := Launch("ddp", command, tmp_path, env))

    killed_at = kill_after_first_checkpoint([run], 0, out)
    gone = seconds_until_all_gone([run], killed_at)
    print(f"one machine, rank 0 killed: all processes gone {gone:.1f} s later")
    assert gone < BOUND, f"the run took {gone:.1f} s to end"
    assert run.wait() != 0, run.tail()

    latest = complete_checkpoints(out)[-1]
    launches.append(rerun := Launch("rerun", command, tmp_path, env))
    rerun.assert_clean_exit()
    assert_resumed_and_finished(rerun, out, latest)


def two_nodes(tmp_path: Path, run_config: Path, port: int, name: str, *extra: str) -> list[Launch]:
    """run_node0.sh and run_node1.sh on 127.0.0.1, one CPU process each, with the same extra flags;
    each machine has its own token cache, tmp_path/tokens0 and tokens1 (each local main process
    builds one, and a rerun reuses it)."""
    env = launcher_env(CONFIG=str(run_config), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1")
    nodes = []
    for rank in (0, 1):
        command = ["bash", str(ROOT / f"run_node{rank}.sh"), *extra]
        machine = {**env, "TUNER_TOKEN_CACHE": str(tmp_path / f"tokens{rank}")}
        nodes.append(Launch(f"{name}{rank}", command, tmp_path / f"node{rank}", machine))
    return nodes


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["worker-machine", "main-machine"])
def test_a_killed_process_ends_a_two_machine_run_and_the_same_commands_resume(victim, run_config, tmp_path, launches):
    """run_node0.sh + run_node1.sh, one process each; one is killed. Its machine's agent ends at once;
    the other machine's process finds the closed connection at its next all-reduce. Killing the
    main machine's process (slow variant, 2.2 s measured) also takes away the rendezvous store its
    agent holds. output_dir is shared, as on machines with shared storage."""
    out, port = tmp_path / "out", free_port()
    launches.extend(nodes := two_nodes(tmp_path, run_config, port, "node", "--output_dir", str(out)))

    killed_at = kill_after_first_checkpoint(nodes, victim, out)
    gone = seconds_until_all_gone(nodes, killed_at)
    print(f"two machines, rank {victim} killed in training: all processes gone {gone:.1f} s later")
    assert gone < BOUND, f"the run took {gone:.1f} s to end"
    assert [node.wait() != 0 for node in nodes] == [True, True], "\n".join(n.tail() for n in nodes)
    survivor = nodes[1 - victim]
    assert "by peer" in survivor.stderr, survivor.tail()  # gloo: "Connection closed/reset by peer"

    latest = complete_checkpoints(out)[-1]
    launches.extend(reruns := two_nodes(tmp_path, run_config, port, "rerun", "--output_dir", str(out)))
    for node in reruns:
        node.assert_clean_exit()
    assert_resumed_and_finished(reruns[0], out, latest)


def test_a_process_killed_while_preparing_data_ends_the_other_machine(tiny_model, corpus_docs, tmp_path, launches):
    """The worker machine's process dies while it tokenizes.
    Had the processes not joined the process group yet, the main machine's process would wait for
    it at the join for --ddp_timeout (7200 s); joined, it finds the closed connection at the first
    collective after its own data phase."""
    config = tiny_run_config(tmp_path, tiny_model, corpus_docs * 10, max_steps=STEPS)  # ~2 s of tokenizing
    launches.extend(nodes := two_nodes(tmp_path, config, free_port(), "node"))

    deadline, cache = time.monotonic() + 180, tmp_path / "tokens1"
    while not ((pid := nodes[1].worker_pid(1)) and cache.is_dir() and any(cache.iterdir())):
        assert time.monotonic() < deadline and nodes[1].proc.poll() is None, nodes[1].tail()
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    gone = seconds_until_all_gone(nodes, time.monotonic())
    print(f"two machines, rank 1 killed while tokenizing: all processes gone {gone:.1f} s later")
    assert gone < BOUND, f"the run took {gone:.1f} s to end"
    assert [node.wait() != 0 for node in nodes] == [True, True], "\n".join(n.tail() for n in nodes)
    assert "by peer" in nodes[0].stderr, nodes[0].tail()
