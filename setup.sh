#!/usr/bin/env bash
# Create a virtual environment with everything main.py needs (add --dev for the tests too).
#   bash setup.sh          # .venv for training
#   bash setup.sh --dev    # plus pytest, shellcheck, wandb
# torch comes first, so that pip never drags PyPI's multi-GB CUDA build onto a machine without
# an NVIDIA GPU. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" for the CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
REQUIREMENTS=requirements.txt
[[ "${1:-}" == "--dev" ]] && REQUIREMENTS=requirements-dev.txt

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif [[ -n "${TORCH_SPEC:-}" ]]; then
  "${pip[@]}" "$TORCH_SPEC"
elif has_nvidia_gpu || [[ "$(uname -s)" == "Darwin" ]]; then
  echo "setup: installing torch==$TORCH_VERSION (PyPI's default build: CUDA on Linux, MPS/CPU on macOS)"
  "${pip[@]}" "torch==$TORCH_VERSION"
else
  echo "setup: no NVIDIA GPU found; installing the CPU build torch==$TORCH_VERSION+cpu"
  # A local wheel or a mirror that carries the +cpu build is tried first, then PyTorch's CPU index.
  "${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || "${pip[@]}" "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX"
fi

echo "setup: installing $REQUIREMENTS"
"${pip[@]}" -r "$REQUIREMENTS"
echo "setup: done. Use $VENV/bin/python, or: source $VENV/bin/activate"
