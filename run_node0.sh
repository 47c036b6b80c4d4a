#!/usr/bin/env bash
# Main node (machine rank 0) of a multi-machine run. Start it first, then run_node1.sh on the
# other machine(s). Edit the settings below or override them from the environment:
#   MASTER_ADDR=<this machine's address> bash run_node0.sh [extra main.py flags]
# Both scripts exec multinode_train.sh, which holds the one list of training arguments, so the
# nodes cannot drift apart; pass the same extra flags on every node. See multinode_train.sh for
# the common configurations, the shared-storage requirement and troubleshooting.
set -euo pipefail

# ---- settings: the same on every node, except MACHINE_RANK and GPUS; empty: the default ----
export MASTER_ADDR="${MASTER_ADDR:-}"        # this machine's address as the others reach it (hostname -I); required
export MASTER_PORT="${MASTER_PORT:-}"        # rendezvous port on this machine (29500); open it in the firewall
export GPUS="${GPUS:-}"                      # GPUs to use on this machine: all (default), or indices such as 0,1
export NUM_MACHINES="${NUM_MACHINES:-}"      # machines in the run (2)
export NUM_PROCESSES="${NUM_PROCESSES:-}"    # total processes; default NUM_MACHINES x GPUs per machine
export NPROC_PER_NODE="${NPROC_PER_NODE:-}"  # CPU-only machines: processes per machine (gloo)
export MACHINE_RANK="${MACHINE_RANK:-0}"     # 0: this is the main node
# ----------------------------------------------------------------------------------------------

exec bash "$(dirname "${BASH_SOURCE[0]}")/multinode_train.sh" "$@"
