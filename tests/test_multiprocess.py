"""Real multi-process training on CPU with the gloo backend, through the launchers users run.

- 2 processes on one machine (example_run.sh cpu-ddp) reach the same losses as 1 process with
  the same global batch (2 x 2 sequences vs 1 x 4);
- two "machines" (run_node0.sh and run_node1.sh on 127.0.0.1, each in its own directory as if
  on its own disk) train together, and only the main process writes checkpoints, logs, model;
- a worker whose main node never comes up, and a main node whose worker never comes, give up
  within their bounded waits;
- no process aborts at teardown (SIGABRT, "terminate called", a traceback).

Why the losses agree to ~1e-6 and not exactly: DDP all-reduces (sums, then averages) the two
processes' gradients, and each process averages the loss over its own tokens; one process sums
the same numbers in another order. float32 rounding differs by an ulp or two (measured: at most
9.5e-7 on a loss of 6.2 over 20 steps, i.e. 2 ulp). TOLERANCE is 100x that: it still catches
the errors that matter (a loss scaled by the world size, a shard of the data seen twice or never:
differences of 1e-2 and more).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from launch import ROOT, Launch, free_port, launcher_env, tiny_run_config

TOLERANCE = 1e-4  # absolute, on a loss of about 6.2
STEPS = 6


def losses(output_dir: Path) -> tuple[list[float], list[float]]:
    """(training loss per step, eval losses) from the trainer_state.json of a finished run."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_config(tiny_model, corpus_docs, tmp_path_factory) -> Path:
    """A main.py YAML for a 6-step run of the tiny model; output_dir is relative to the cwd.
    max_eval_samples 8 = 2 processes x 2 x 2: no padding."""
    return tiny_run_config(
        tmp_path_factory.mktemp("multiprocess"), tiny_model, corpus_docs, max_steps=STEPS, save_steps=3, eval_steps=3
    )  # fmt: skip


def test_two_processes_match_one_process(run_config, tmp_path):
    single = Launch(
        "single", [sys.executable, str(ROOT / "main.py"), "--config", str(run_config), "--per_device_train_batch_size", "4"],
        tmp_path / "single", launcher_env(),
    )  # fmt: skip
    single.assert_clean_exit()
    ddp = Launch(
        "ddp", ["bash", str(ROOT / "example_run.sh"), "cpu-ddp"], tmp_path / "ddp",
        launcher_env(CONFIG=str(run_config), NPROC_PER_NODE="2", MASTER_PORT=str(free_port())),
    )  # fmt: skip
    ddp.assert_clean_exit()
    # The command users type, with no launcher and no ACCELERATE_USE_CPU: main.py itself makes the
    # processes join with gloo when there is no GPU.
    plain = Launch(
        "plain", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", str(free_port()), str(ROOT / "main.py"), "--config", str(run_config)],
        tmp_path / "plain", launcher_env(),
    )  # fmt: skip
    plain.assert_clean_exit()

    (train_1, eval_1), (train_2, eval_2) = losses(tmp_path / "single/out"), losses(tmp_path / "ddp/out")
    train_3, eval_3 = losses(tmp_path / "plain/out")
    assert len(train_1) == len(train_2) == len(train_3) == STEPS and len(eval_1) == len(eval_2) == 2
    worst = max(max(abs(a - b), abs(a - c)) for a, b, c in zip(train_1 + eval_1, train_2 + eval_2, train_3 + eval_3))
    assert worst <= TOLERANCE, f"1 process: {train_1} {eval_1}\n2 processes: {train_2} {eval_2}\nplain: {train_3}"
    assert train_2[-1] < train_2[0], "the loss did not go down"
    # Two processes really trained together: each saved its RNG state into the shared checkpoint.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(tmp_path / "ddp/out/checkpoint-6"))


def test_two_nodes_train_together_and_only_the_main_process_writes(run_config, tmp_path):
    # Each node runs in its own directory with the relative output_dir "out": as on two machines
    # without shared storage, whatever a node writes lands in its own directory.
    settings = dict(CONFIG=str(run_config), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NPROC_PER_NODE="1")
    # the same extra flags on both nodes; evaluation before training on, as by default
    extra = ["--report_to", "tensorboard", "--eval_before_training", "true"]
    nodes = [
        Launch(
            f"node{rank}",
            ["bash", str(ROOT / f"run_node{rank}.sh"), *extra],
            tmp_path / f"node{rank}",
            launcher_env(**settings, TUNER_TOKEN_CACHE=str(tmp_path / f"tokens{rank}")),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        node.assert_clean_exit()

    main_files, worker_files = files_under(tmp_path / "node0/out"), files_under(tmp_path / "node1/out")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "train_results.json",
                 "eval_results.json", "run_config.yaml", "checkpoint-3/model.safetensors", "checkpoint-6/optimizer.pt"):  # fmt: skip
        assert name in main_files, f"node 0 did not write {name}: {sorted(main_files)}"
    assert any(f.startswith("runs/") for f in main_files), "node 0 wrote no tensorboard log"
    for rank in (0, 1):  # nothing beside output_dir in the working directory (TensorBoard's ./runs once)
        assert not (tmp_path / f"node{rank}" / "runs").exists(), f"node {rank} wrote ./runs"
    assert len(losses(tmp_path / "node0/out")[0]) == STEPS
    # The worker writes only its own RNG state into each checkpoint (Trainer does this on every
    # process, so a resumed run restores each process's random stream); nothing else.
    assert worker_files == {"checkpoint-3/rng_state_1.pth", "checkpoint-6/rng_state_1.pth"}, sorted(worker_files)
    assert {"rng_state_0.pth"} <= set(os.listdir(tmp_path / "node0/out/checkpoint-6"))

    fingerprints = [re.search(r"training-arguments fingerprint (\d+)", n.stderr).group(1) for n in nodes]
    assert fingerprints[0] == fingerprints[1], "the nodes trained with different arguments"


def test_worker_whose_main_node_never_comes_up_fails_in_bounded_time(run_config, tmp_path):
    port = free_port()  # nothing listens there
    worker = Launch(
        "node1", ["bash", str(ROOT / "run_node1.sh")], tmp_path,
        launcher_env(CONFIG=str(run_config), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1",
                     WAIT_FOR_MAIN_SECONDS="3"),
    )  # fmt: skip
    assert worker.wait() == 2, worker.tail()
    assert worker.elapsed < 30, f"took {worker.elapsed:.0f} s to give up"
    assert f"main node 127.0.0.1:{port} not reachable after 3 s" in worker.stderr
    assert "Start run_node0.sh" in worker.stderr
    assert "Traceback" not in worker.stderr


def test_main_node_whose_worker_never_comes_gives_up(run_config, tmp_path):
    main = Launch(
        "node0", ["bash", str(ROOT / "run_node0.sh")], tmp_path,
        launcher_env(CONFIG=str(run_config), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NPROC_PER_NODE="1",
                     RENDEZVOUS_TIMEOUT="5"),
    )  # fmt: skip
    assert main.wait() != 0, main.tail()
    assert main.elapsed < 60, f"took {main.elapsed:.0f} s to give up"
    assert "waiting for clients" in main.stderr, main.tail()


@pytest.mark.gpu
def test_fsdp_trains_on_gpus(run_config, tmp_path):
    """configs/accelerate/fsdp.yaml with main.py. GPUs only: accelerate enables FSDP only for GPU
    devices (on CPU it silently runs DDP, which the launchers refuse)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: accelerate runs FSDP only on GPUs")
    processes = min(2, torch.cuda.device_count())
    run = Launch(
        "fsdp",
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
         "--num_processes", str(processes), "--main_process_port", str(free_port()),
         str(ROOT / "main.py"), "--config", str(run_config), "--per_device_train_batch_size", str(4 // processes)],
        tmp_path, launcher_env(),
    )  # fmt: skip
    run.assert_clean_exit()
    out = tmp_path / "out"
    train, _ = losses(out)
    assert len(train) == STEPS and train[-1] < train[0]
    assert (out / "checkpoint-6/optimizer.bin").exists(), "no FSDP optimizer state: FSDP was not used"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "tied weights came apart"
