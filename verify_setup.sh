#!/usr/bin/env bash
# Check that this machine can run main.py: Python and the packages requirements.txt asks for, GPUs,
# access to the model, and the network for multi-machine runs. Every check prints PASS, WARN or
# FAIL; WARN and FAIL come with a one-line fix. Exit status 1 exactly when something FAILs.
# The checks are tuner/environment.py (python -m tuner.environment); this script sets the defaults.
#
#   bash verify_setup.sh
#   GPUS=0,1 bash verify_setup.sh                      # also require these GPUs
#   MASTER_ADDR=<node0-address> bash verify_setup.sh   # also check the multi-node network
#
# Settings (environment variables):
#   GPUS             GPUs you mean to use (indices such as 0,1, or all); without it and without
#                    CUDA_VISIBLE_DEVICES, a machine with no GPU is a WARN (CPU runs), not a FAIL
#   MODEL            the model you mean to train (default: main.py's --model_name_or_path default)
#   MASTER_ADDR      the main node's address; checked for reachability when set
#   MASTER_PORT      rendezvous port (default 29500, as the launchers); must be free on the main node
#   CHECK_TIMEOUT    seconds to wait for the main node to answer (default 3)
#   TUNER_CACHE      where the offline Gemma 3 270M is converted (default ~/.cache/tuner)
#   PYTHON           interpreter with torch/transformers/accelerate (default: the active venv, else .venv, else python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/launch_common.sh
source "$REPO/scripts/launch_common.sh"

export MASTER_PORT="${MASTER_PORT:-$DEFAULT_MASTER_PORT}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "FAIL  python         '$PYTHON' not found"
    echo "      fix: activate your environment (source .venv/bin/activate) or set PYTHON=/path/to/python"
    exit 1
fi

# The package from this checkout, whatever the working directory (MODEL may be a relative path).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m tuner.environment
