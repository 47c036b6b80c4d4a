# shellcheck shell=bash
# Helpers shared by the launchers (example_run.sh, multinode_train.sh, verify_setup.sh).
# Sourced, never run. The caller sets `set -euo pipefail` and REPO (the repository root).
#
# Conventions every launcher follows:
#   - the command is built in an array and printed shell-quoted before it runs;
#   - DRY_RUN=1 validates the settings and prints the exact command on stdout, then exits 0;
#   - otherwise the command replaces the shell (`exec`), so Ctrl-C and SIGTERM reach Python;
#   - a bad setting stops the launcher with exit code 2 and a message naming the variable,
#     the value received and the fix.

# The interpreter of the environment that has torch and transformers: PYTHON if set, else the
# active virtual environment's python, else the .venv that setup.sh made, else python.
_setup_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
if [[ -z "${PYTHON:-}" && -z "${VIRTUAL_ENV:-}" && -x "$_setup_venv" ]]; then
    PYTHON="$_setup_venv"
fi
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"      # 1: print the command instead of running it

# The one default of each setting the launchers share (example_run.sh, multinode_train.sh,
# run_node0.sh, run_node1.sh, verify_setup.sh), used by the scripts that source this file:
# shellcheck disable=SC2034
DEFAULT_GPUS=all             # GPUS: every GPU on the machine, as accelerate's --gpu_ids all
# shellcheck disable=SC2034
DEFAULT_MASTER_PORT=29500    # MASTER_PORT: torch's and accelerate's default rendezvous port
# CONFIG of every run with several GPU processes (example_run.sh multi-gpu and fsdp, multinode_train.sh):
# gradient checkpointing, and the effective batch of the one-GPU recipe with 2 processes.
# shellcheck disable=SC2034
DEFAULT_CONFIG="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/multi-gpu-gc.yaml"

# die MESSAGE [MORE...]: print the message (further arguments as indented lines), exit 2.
die() {
    printf 'error: %s\n' "$1" >&2
    shift
    (($# == 0)) || printf '       %s\n' "$@" >&2
    exit 2
}

note() {
    printf '%s\n' "$*" >&2
}

is_true() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

# Print "$@" as one shell-quoted line: pasted into a shell it runs exactly this command.
quote_cmd() {
    local out="" word
    for word in "$@"; do
        out+="$(printf '%q' "$word") "
    done
    printf '%s\n' "${out% }"
}

# DRY_RUN=1: print the command on stdout and stop. Otherwise print it on stderr and exec it.
run_cmd() {
    if is_true "$DRY_RUN"; then
        quote_cmd "$@"
        exit 0
    fi
    note "+ $(quote_cmd "$@")"
    exec "$@"
}

# Number of CUDA GPUs physically on this machine: nvidia-smi when installed (it ignores
# CUDA_VISIBLE_DEVICES, like accelerate's --gpu_ids), else torch where a GPU driver's device
# files exist (NVIDIA without nvidia-smi, or ROCm), else 0 without the slow torch import.
gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    elif compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/kfd ]]; then
        env -u CUDA_VISIBLE_DEVICES "$PYTHON" -c \
            'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null ||
            echo 0
    else
        echo 0
    fi
}

# die_no_gpus VAR VALUE: the refusal of a GPU setting on a machine without GPUs.
die_no_gpus() {
    die "$1=$2 asks for GPUs, but this machine has no CUDA GPU (no NVIDIA driver, or nvidia-smi lists none)." \
        "Make nvidia-smi list the GPUs (bash verify_setup.sh), or train on CPU: bash example_run.sh cpu-ddp," \
        "or for several machines unset $1 and set NPROC_PER_NODE."
}

# check_gpu_ids VAR LIST COUNT: LIST is "all" or comma-separated indices below COUNT.
check_gpu_ids() {
    local var="$1" list="$2" count="$3" id seen=","
    [[ "$list" == all ]] && return 0
    [[ "$list" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
        die "$var=$list: expected 'all' or GPU indices separated by commas, e.g. $var=0,1."
    ((count > 0)) || die_no_gpus "$var" "$list"
    for id in ${list//,/ }; do
        ((id < count)) || die "$var=$list: GPU $id does not exist; this machine has $count GPU(s), indices 0-$((count - 1)) (see nvidia-smi -L)."
        [[ "$seen" != *",$id,"* ]] || die "$var=$list lists GPU $id twice; list each GPU once."
        seen+="$id,"
    done
}

# Number of entries in a comma-separated list.
count_ids() {
    local -a ids
    IFS=, read -r -a ids <<<"$1"
    echo "${#ids[@]}"
}

# wait_for_port HOST PORT SECONDS: return 0 once HOST:PORT accepts a TCP connection; after SECONDS
# print why it did not (refused, timed out, unknown host) and return 1. Never hangs longer.
wait_for_port() {
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import socket, sys, time

host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, last, next_note = time.monotonic() + limit, "no attempt made", 0.0
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    try:
        with socket.create_connection((host, port), timeout=min(3.0, left)):
            sys.exit(0)
    except OSError as exc:  # refused: host up, nothing listening yet; timeout: firewall or wrong host
        last = exc.strerror or type(exc).__name__
    waited = limit - (deadline - time.monotonic())
    if waited >= next_note:
        print(f"waiting for the main node at {host}:{port} ({waited:.0f}/{limit:.0f} s; {last})", file=sys.stderr)
        next_note += 10
    time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
print(last)
sys.exit(1)
PY
}

# port_in_use PORT: true when something on this machine already listens on PORT.
port_in_use() {
    "$PYTHON" - "$1" <<'PY'
import socket, sys

with socket.socket() as s:
    s.settimeout(1)
    sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}
