#!/usr/bin/env bash
# Worker node (machine rank 1; for a third machine MACHINE_RANK=2, and so on) of a
# multi-machine run. Start run_node0.sh on the main node first; this script waits up to
# WAIT_FOR_MAIN_SECONDS for the main node's port, then fails with the reason instead of hanging.
#   MASTER_ADDR=<main node's address> bash run_node1.sh [extra main.py flags]
# Both scripts exec multinode_train.sh, which holds the one list of training arguments, so the
# nodes cannot drift apart; pass the same extra flags on every node. See multinode_train.sh for
# the common configurations, the shared-storage requirement and troubleshooting.
set -euo pipefail

# ---- settings: the same on every node, except MACHINE_RANK and GPUS; empty: the default ----
export MASTER_ADDR="${MASTER_ADDR:-}"        # the main node's address as this machine reaches it; required
export MASTER_PORT="${MASTER_PORT:-}"        # rendezvous port on the main node (29500)
export GPUS="${GPUS:-}"                      # GPUs to use on this machine: all (default), or indices such as 0,1
export NUM_MACHINES="${NUM_MACHINES:-}"      # machines in the run (2)
export NUM_PROCESSES="${NUM_PROCESSES:-}"    # total processes; default NUM_MACHINES x GPUs per machine
export NPROC_PER_NODE="${NPROC_PER_NODE:-}"  # CPU-only machines: processes per machine (gloo)
export MACHINE_RANK="${MACHINE_RANK:-1}"     # 1..NUM_MACHINES-1
export WAIT_FOR_MAIN_SECONDS="${WAIT_FOR_MAIN_SECONDS:-}"  # wait this long for the main node (90 s), then fail
# ----------------------------------------------------------------------------------------------

exec bash "$(dirname "${BASH_SOURCE[0]}")/multinode_train.sh" "$@"
