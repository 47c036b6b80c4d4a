"""What both benchmarks share: the machine description, and running one variant in a fresh process.

Each variant runs in its own subprocess so that memory peaks, allocator caches, warmed tokenizer
state and thread pools never carry from one variant into the next.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "


def machine() -> str:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0))
    ram = int(next(line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    return (
        f"{cpu}, {cores} cores, {ram:.0f} GiB RAM; Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )


def load_average() -> str:
    return " ".join(_lines("/proc/loadavg")[0].split()[:3])


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def report(result: dict) -> None:
    """The worker's last stdout line, read back by run_isolated."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_isolated(args: list[str], env: dict | None = None, rss_limit_gib: float | None = None) -> dict:
    """Run `python <args>` in a fresh process; its reported dict plus wall and CPU seconds.

    With rss_limit_gib, the process is killed when its resident memory passes that many GiB, so a
    variant that does not fit is reported as such instead of waking the kernel's OOM killer.
    """
    started, cpu_before = time.perf_counter(), _children_cpu()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
    killed = threading.Event()
    if rss_limit_gib:
        threading.Thread(target=_watch_rss, args=(process, rss_limit_gib, killed), daemon=True).start()
    stdout, _ = process.communicate()
    result = next((json.loads(line[len(RESULT_PREFIX) :]) for line in reversed(stdout.splitlines()) if line.startswith(RESULT_PREFIX)), {})
    if killed.is_set():
        result["error"] = f"killed: resident memory passed {rss_limit_gib:.1f} GiB"
    elif process.returncode != 0 and "error" not in result:
        result["error"] = f"exit code {process.returncode}"
    result["process_wall_s"] = time.perf_counter() - started
    result["process_cpu_s"] = _children_cpu() - cpu_before
    return result


def available_gib() -> float:
    return int(next(line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemAvailable"))) / 2**20


def rss_gib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident memory in GiB; field VmHWM gives the peak since start or the last reset_peak_rss()."""
    line = next(line for line in _lines(f"/proc/{pid}/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _watch_rss(process: subprocess.Popen, limit_gib: float, killed: threading.Event) -> None:
    while process.poll() is None:
        try:
            if rss_gib(process.pid) > limit_gib:
                killed.set()
                process.kill()
                return
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            return
        time.sleep(0.05)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def add_step_options(parser, variants) -> None:
    """The options every one-training-step benchmark takes: the warm-up, the memory cap, the worker."""
    import argparse

    parser.add_argument("--warmup_seq_len", type=int, default=64, help="tokens per row of the untimed first step")
    parser.add_argument("--rss_limit_gib", type=float, default=None, help="kill a variant above this RSS; default: free RAM - 1 GiB")
    parser.add_argument("--worker", choices=variants, help=argparse.SUPPRESS)


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int) -> dict:
    """Random token ids, the same for every variant (seeded): timing does not depend on the text."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
