#!/usr/bin/env bash
# Train on N machines with any number of GPUs each: one `accelerate launch` per machine.
#
# Usually started through run_node0.sh (the main node) and run_node1.sh (every other node),
# which only set the per-machine settings and exec this script. This file holds the ONE list
# of main.py arguments (TRAIN_ARGS below), so every node trains with identical arguments.
#
#   MASTER_ADDR=<node0-address> MACHINE_RANK=0 bash multinode_train.sh [main.py flags...]  # on node 0
#   MASTER_ADDR=<node0-address> MACHINE_RANK=1 bash multinode_train.sh [main.py flags...]  # on node 1
#
# Settings (environment variables; run_node0.sh / run_node1.sh set them at their top):
#   MASTER_ADDR          required: node 0's address as the OTHER machines reach it (hostname -I on node 0)
#   MASTER_PORT          rendezvous port on node 0 (default 29500); open it in node 0's firewall
#   MACHINE_RANK         required: 0 on the main node, 1..NUM_MACHINES-1 on the others
#   NUM_MACHINES         number of machines (default 2)
#   GPUS                 GPUs to use on THIS machine: "all" (default) or indices such as 0,1
#   NPROC_PER_NODE       CPU-only machines: processes on this machine (gloo backend); required there
#   NUM_PROCESSES        total processes over all machines; default NUM_MACHINES x processes here,
#                        and refused when it differs (every machine must run the same number)
#   WAIT_FOR_MAIN_SECONDS  a worker waits this long for node 0's port, then fails (default 90)
#   RENDEZVOUS_TIMEOUT   seconds node 0 waits for all workers to join before failing (default 600)
#   ACCELERATE_CONFIG    optional accelerate config, e.g. configs/accelerate/fsdp.yaml; the topology
#                        settings above override the machine/process counts written in it
#   CONFIG               main.py YAML (default configs/multi-gpu-gc.yaml, as example_run.sh multi-gpu;
#                        empty: none, only your flags)
#   PYTHON               interpreter with torch/transformers/accelerate (default: the active venv, else .venv, else python)
#   DRY_RUN=1            check the settings and print the command without running it
# Extra arguments are passed to main.py. Pass the SAME extra arguments on every node.
#
# Common configurations (run the same command on each machine, changing only MACHINE_RANK):
#   2 machines x 2 GPUs:  NUM_MACHINES=2 GPUS=0,1                  -> 4 processes
#   2 machines x 4 GPUs:  NUM_MACHINES=2 GPUS=all (4 GPUs each)    -> 8 processes
#   3 machines x 2 GPUs:  NUM_MACHINES=3 GPUS=0,1, MACHINE_RANK=0,1,2 -> 6 processes
#                         (node 2: MACHINE_RANK=2 bash run_node1.sh)
#   2 machines, CPU only: NUM_MACHINES=2 NPROC_PER_NODE=2          -> 4 processes (gloo); with a
#                         CPU recipe, e.g. CONFIG=configs/quickstart-cpu.yaml --train_file <shared path>
#
# Shared storage: --output_dir must be a directory every machine sees at the same path (NFS,
# Lustre, ...). Only the global main process writes checkpoints, logs and the final model, but
# every process reads the checkpoint on resume and looks for the latest one in output_dir; on
# machine-local disks the workers find no checkpoint, start from scratch and the run hangs or
# diverges. Keep --train_file/--validation_file on shared storage too (or copied to the same path).
#
# Troubleshooting:
#   - Worker fails with "main node ... not reachable": start run_node0.sh first; check MASTER_ADDR
#     is node 0's address as seen from the worker (ping it, `nc -vz MASTER_ADDR MASTER_PORT`);
#     "Connection refused" = host up, nothing listening yet; "timed out" = firewall or wrong address.
#   - Firewall and port: MASTER_PORT (TCP) must be open on node 0, and NCCL also opens random
#     ports between the nodes: allow all TCP traffic between the machines on the cluster network
#     (e.g. `sudo ufw allow from <other-node>`), or pick a free MASTER_PORT (ss -ltn).
#   - Hangs at initialisation (after "waiting for the main node" succeeded): NUM_MACHINES or
#     NUM_PROCESSES differ between nodes, a node was not started, or NCCL picked an interface the
#     other node cannot reach (docker0, a VPN). Diagnose with NCCL_DEBUG=INFO and
#     TORCH_DISTRIBUTED_DEBUG=DETAIL; pin the interface with NCCL_SOCKET_IFNAME=eth0 (see `ip addr`;
#     for CPU/gloo runs GLOO_SOCKET_IFNAME=eth0); without InfiniBand try NCCL_IB_DISABLE=1.
#   - Node 0 gives up after RENDEZVOUS_TIMEOUT seconds when a worker never joins.
#   - Long data preparation: on each machine the local main process tokenizes into the token cache
#     while the machine's other processes poll the file system for it; no collective runs, so no
#     timeout applies. The processes join the process group before that (when main.py parses its
#     options), and the first collective after it waits for the slowest machine, at most
#     --ddp_timeout seconds (default 7200). If one machine reuses its cache while another tokenizes
#     a big corpus from scratch, raise --ddp_timeout, or build the cache on every machine first:
#     the same command with --dry_run tokenizes and exits.
#   - A process that dies (killed, out of memory, a crash) ends the run on every machine: its own
#     machine's launcher stops the other processes there at once (SIGTERM, SIGKILL after 30 s) and
#     exits 1; the processes on the other machines fail at their next collective (gloo: "Connection
#     closed by peer"; every training step has one) and their launchers exit 1 too. Rerun the same
#     commands on every machine: the run resumes from the latest complete checkpoint in output_dir.
#     A process that hangs, or a machine that vanishes (power, network), closes no connection: the
#     others then wait --ddp_timeout seconds. On GPUs, NCCL reports a broken connection to another
#     machine as an error and torch then ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by
#     default); where NCCL sees no error, the bound is again --ddp_timeout (not measured here).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/launch_common.sh
source "$REPO/scripts/launch_common.sh"

MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the main node (node 0) address as the other machines reach it; run 'hostname -I' on node 0, then e.g. MASTER_ADDR=<that address> bash run_node1.sh}"
MACHINE_RANK="${MACHINE_RANK:?set MACHINE_RANK: 0 on the main node, 1..NUM_MACHINES-1 on the others (run_node0.sh and run_node1.sh set it)}"
MASTER_PORT="${MASTER_PORT:-$DEFAULT_MASTER_PORT}"
NUM_MACHINES="${NUM_MACHINES:-2}"
GPUS="${GPUS:-$DEFAULT_GPUS}"
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
NUM_PROCESSES="${NUM_PROCESSES:-}"
WAIT_FOR_MAIN_SECONDS="${WAIT_FOR_MAIN_SECONDS:-90}"
RENDEZVOUS_TIMEOUT="${RENDEZVOUS_TIMEOUT:-600}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"
CONFIG="${CONFIG-$DEFAULT_CONFIG}"

# What to train: the one list of main.py arguments every node uses. Hyperparameters belong in
# the YAML (CONFIG) or in the extra flags, which must be the same on every node.
TRAIN_ARGS=()
[[ -n "$CONFIG" ]] && TRAIN_ARGS+=(--config "$CONFIG")
TRAIN_ARGS+=("$@")

# --- check the settings before anything starts --------------------------------------------
for var in MASTER_PORT NUM_MACHINES MACHINE_RANK WAIT_FOR_MAIN_SECONDS RENDEZVOUS_TIMEOUT; do
    is_uint "${!var}" || die "$var=${!var}: expected a whole number."
done
((NUM_MACHINES >= 1)) || die "NUM_MACHINES=$NUM_MACHINES: need at least 1 machine."
((MACHINE_RANK < NUM_MACHINES)) ||
    die "MACHINE_RANK=$MACHINE_RANK with NUM_MACHINES=$NUM_MACHINES: ranks run from 0 to $((NUM_MACHINES - 1)); set MACHINE_RANK or NUM_MACHINES accordingly."
((MASTER_PORT >= 1 && MASTER_PORT <= 65535)) || die "MASTER_PORT=$MASTER_PORT: expected a TCP port, 1-65535."
[[ -z "$ACCELERATE_CONFIG" || -f "$ACCELERATE_CONFIG" ]] ||
    die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file; see configs/accelerate/ for the provided ones."
[[ -z "$CONFIG" || -f "$CONFIG" ]] ||
    die "CONFIG=$CONFIG: no such file; give a main.py YAML from configs/, or CONFIG= to pass only your own flags."

gpus_here="$(gpu_count)"
check_gpu_ids GPUS "$GPUS" "$gpus_here"
launch_env=()
if ((gpus_here > 0)); then
    if [[ "$GPUS" == all ]]; then per_node="$gpus_here"; else per_node="$(count_ids "$GPUS")"; fi
    [[ -z "$NPROC_PER_NODE" || "$NPROC_PER_NODE" == "$per_node" ]] ||
        die "NPROC_PER_NODE=$NPROC_PER_NODE, but GPUS=$GPUS gives $per_node GPU process(es) on this machine; choose the GPUs with GPUS (e.g. GPUS=0,1) and unset NPROC_PER_NODE."
    device="GPU"
else
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
        die "no CUDA GPU found on this machine (NPROC_PER_NODE='$NPROC_PER_NODE')." \
            "To train on CPU with the gloo backend set NPROC_PER_NODE=<processes on this machine>, e.g. NPROC_PER_NODE=2;" \
            "to use GPUs, make nvidia-smi list them first (bash verify_setup.sh)."
    per_node="$NPROC_PER_NODE"
    device="CPU"
    # accelerate (1.15) enables FSDP only for GPU-like devices: on CPU it would silently run DDP.
    ! grep -Eq '^distributed_type:[[:space:]]*FSDP' "${ACCELERATE_CONFIG:-/dev/null}" ||
        die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG asks for FSDP, which accelerate runs only on GPUs; on this CPU-only machine it would silently fall back to DDP." \
            "Unset ACCELERATE_CONFIG to train with DDP on CPU, or run on GPU machines."
    # Without this, accelerate's torchrun path on a GPU-less machine starts unconnected
    # single processes; with it, transformers joins them into one gloo process group.
    launch_env=(env ACCELERATE_USE_CPU=true)
fi
expected=$((NUM_MACHINES * per_node))
NUM_PROCESSES="${NUM_PROCESSES:-$expected}"
is_uint "$NUM_PROCESSES" || die "NUM_PROCESSES=$NUM_PROCESSES: expected a whole number."
((NUM_PROCESSES == expected)) ||
    die "NUM_PROCESSES=$NUM_PROCESSES, but NUM_MACHINES=$NUM_MACHINES x $per_node $device process(es) on this machine = $expected." \
        "Every machine runs the same number of processes: set NUM_PROCESSES=$expected, or change GPUS / NPROC_PER_NODE / NUM_MACHINES."

# --- the command ----------------------------------------------------------------------------
cmd=("${launch_env[@]}" "$PYTHON" -m accelerate.commands.launch)
if [[ -n "$ACCELERATE_CONFIG" ]]; then
    cmd+=(--config_file "$ACCELERATE_CONFIG")    # distributed type (DDP, FSDP) and precision
elif ((NUM_PROCESSES > 1)); then
    cmd+=(--multi_gpu --mixed_precision no --dynamo_backend no)  # precision comes from main.py --bf16
fi
cmd+=(--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --num_processes "$NUM_PROCESSES"
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
    --rdzv_conf "timeout=$RENDEZVOUS_TIMEOUT")
[[ "$device" == GPU && "$GPUS" != all ]] && cmd+=(--gpu_ids "$GPUS")
cmd+=("$REPO/main.py" "${TRAIN_ARGS[@]}")

# Identical on every node when the training arguments and the YAML's contents agree: compare
# it across the machines.
fingerprint="$({
    printf '%s\0' "${TRAIN_ARGS[@]}"
    [[ -z "$CONFIG" ]] || cat "$CONFIG"
} | cksum | cut -d' ' -f1)"
note "node $MACHINE_RANK of $NUM_MACHINES: $per_node $device process(es) here, $NUM_PROCESSES in all;" \
    "main node $MASTER_ADDR:$MASTER_PORT; training-arguments fingerprint $fingerprint"

if ! is_true "$DRY_RUN"; then
    if ((MACHINE_RANK == 0)); then
        ! port_in_use "$MASTER_PORT" ||
            die "MASTER_PORT=$MASTER_PORT is already in use on this machine (see: ss -ltnp | grep :$MASTER_PORT); stop that process or choose another MASTER_PORT on every node."
    elif ! reason="$(wait_for_port "$MASTER_ADDR" "$MASTER_PORT" "$WAIT_FOR_MAIN_SECONDS")"; then
        die "main node $MASTER_ADDR:$MASTER_PORT not reachable after $WAIT_FOR_MAIN_SECONDS s ($reason)." \
            "Start run_node0.sh on the main node first; check that MASTER_ADDR is its address as seen from here and that TCP port $MASTER_PORT is open in its firewall;" \
            "or wait longer with WAIT_FOR_MAIN_SECONDS."
    fi
fi
run_cmd "${cmd[@]}"
