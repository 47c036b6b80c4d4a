#!/usr/bin/env bash
# One command, on a machine with only Python 3.10+ and pip: set up .venv, then fine-tune the
# bundled Gemma 3 270M (no hub access needed) on CPU.
#   bash quickstart.sh              # running text: CPython's own reference docs
#   bash quickstart.sh sft          # chat: "What does `json.dumps` do?" -> the docstring's first paragraph
# Extra arguments go to main.py, e.g. `bash quickstart.sh --max_steps 20` or `bash quickstart.sh sft --max_steps 10`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${VENV:-.venv}"
MODE=text
if [[ "${1:-}" == "sft" ]]; then
  MODE=sft
  shift
fi

bash setup.sh
if [[ "$MODE" == "sft" ]]; then
  DATA="${DATA:-data/stdlib_sft}"
  CONFIG="${CONFIG:-configs/quickstart-sft-cpu.yaml}"
  "$VENV/bin/python" scripts/stdlib_sft.py "$DATA"
  data_args=(--train_file "$DATA/train.jsonl" --validation_file "$DATA/validation.jsonl")
else
  CORPUS="${CORPUS:-data/pydoc_topics.jsonl}"
  CONFIG="${CONFIG:-configs/quickstart-cpu.yaml}"
  "$VENV/bin/python" scripts/pydoc_corpus.py "$CORPUS"
  data_args=(--train_file "$CORPUS")
fi
cmd=("$VENV/bin/python" main.py --config "$CONFIG" "${data_args[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
