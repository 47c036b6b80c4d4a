#!/usr/bin/env bash
# Runnable recipes, one per way of launching main.py.
#
#   bash example_run.sh                        list the recipes
#   bash example_run.sh NAME [main.py flags]   run one; extra flags override the recipe's YAML
#   DRY_RUN=1 bash example_run.sh NAME         print the exact command instead of running it
#
# A recipe decides how to run (which GPUs, how many processes, which machines); what to train
# lives in the YAML under configs/ (CONFIG=... picks another) and in the flags you add.
#
# Settings (environment variables):
#   CONFIG           main.py YAML. multi-gpu, fsdp (and multinode_train.sh): configs/multi-gpu-gc.yaml;
#                    single-gpu: configs/gemma3-270m-wikitext.yaml; quickstart, cpu-ddp, resume:
#                    configs/quickstart-cpu.yaml; jsonl, csv: configs/own-files.yaml
#   GPU              single-gpu: the GPU index to use (default 0)
#   GPUS             multi-gpu / fsdp: GPU indices, comma-separated, or all (default all, as multinode_train.sh)
#   NPROC_PER_NODE   cpu-ddp: CPU processes (default 2)
#   MASTER_PORT      rendezvous port for the multi-process recipes (default 29500)
#   TRAIN_FILE, VALIDATION_FILE, TEXT_COLUMN   jsonl / csv: your files and their text column
#                    (VALIDATION_FILE defaults to the one in configs/own-files.yaml)
#   CHECKPOINT       resume: a checkpoint directory (default: the latest complete one in output_dir)
#   CORPUS           quickstart / cpu-ddp / resume: the training file (default data/pydoc_topics.jsonl
#                    in the repository, CPython's reference docs, written on first use)
#   PYTHON           interpreter with torch/transformers/accelerate (default: the active venv, else .venv, else python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/launch_common.sh
source "$REPO/scripts/launch_common.sh"

MAIN="$REPO/main.py"
LAUNCH=("$PYTHON" -m accelerate.commands.launch)  # `accelerate launch`, from the same interpreter
MASTER_PORT="${MASTER_PORT:-$DEFAULT_MASTER_PORT}"
CORPUS="${CORPUS:-$REPO/data/pydoc_topics.jsonl}"

RECIPES=(quickstart single-gpu multi-gpu cpu-ddp fsdp jsonl csv resume multinode)
declare -A ABOUT=(
    [quickstart]="CPU, no network: the bundled Gemma 3 270M (offline:gemma-3-270m) on CPython's docs, 8 steps"
    [single-gpu]="one GPU (GPU=0): Gemma 3 270M on wikitext-2"
    [multi-gpu]="DDP on every GPU, or those in GPUS=0,1, with gradient checkpointing"
    [cpu-ddp]="the quickstart in 2 CPU processes with gloo (NPROC_PER_NODE=2): DDP without a GPU"
    [fsdp]="fully sharded data parallel on every GPU, or those in GPUS=0,1: configs/accelerate/fsdp.yaml"
    [jsonl]="your own JSON Lines file: TRAIN_FILE=train.jsonl [VALIDATION_FILE=val.jsonl]"
    [csv]="your own CSV file: TRAIN_FILE=train.csv [TEXT_COLUMN=text]"
    [resume]="continue the quickstart from its latest checkpoint, e.g. resume --max_steps 16 (or CHECKPOINT=dir)"
    [multinode]="several machines: MACHINE_RANK=0|1 MASTER_ADDR=<node0-address> (see run_node0.sh)"
)

usage() {
    echo "usage: bash example_run.sh NAME [main.py flags...]   (DRY_RUN=1 prints the command)"
    echo
    echo "recipes:"
    local name
    for name in "${RECIPES[@]}"; do
        printf '  %-11s %s\n' "$name" "${ABOUT[$name]}"
    done
}

use_config() {  # use_config DEFAULT: conf=(--config CONFIG-or-DEFAULT), checked to exist
    local config="${CONFIG:-$1}"
    [[ -f "$config" ]] || die "CONFIG=$config: no such file; choose a YAML under configs/."
    conf=(--config "$config")
}

# The quickstart YAML with its corpus, CPython's reference docs, written on first use; a CONFIG
# of your own names its own data.
use_quickstart_config() {
    if [[ -n "${CONFIG:-}" ]]; then
        use_config "$CONFIG"
        return
    fi
    use_config "$REPO/configs/quickstart-cpu.yaml"
    conf+=(--train_file "$CORPUS")
    [[ ! -f "$CORPUS" ]] || return 0
    if is_true "$DRY_RUN"; then
        note "(first writes the corpus: $PYTHON $REPO/scripts/pydoc_corpus.py $CORPUS)"
    else
        "$PYTHON" "$REPO/scripts/pydoc_corpus.py" "$CORPUS" >&2
    fi
}

# Each recipe fills the array `cmd` with the command, without the user's extra flags.
recipe_quickstart() {
    use_quickstart_config
    cmd=("$PYTHON" "$MAIN" "${conf[@]}")
}

recipe_single_gpu() {
    local gpu="${GPU:-0}"
    [[ "$gpu" =~ ^[0-9]+$ ]] || die "GPU=$gpu: expected one GPU index, e.g. GPU=0 (for several use the multi-gpu recipe)."
    check_gpu_ids GPU "$gpu" "$(gpu_count)"
    use_config "$REPO/configs/gemma3-270m-wikitext.yaml"
    cmd=(env "CUDA_VISIBLE_DEVICES=$gpu" "$PYTHON" "$MAIN" "${conf[@]}")
}

gpu_launch() {  # gpu_launch ACCELERATE_FLAGS...: accelerate on the GPUs in GPUS, at least two
    local gpus="${GPUS:-$DEFAULT_GPUS}" available n
    available="$(gpu_count)"
    ((available > 0)) || die_no_gpus GPUS "$gpus"
    check_gpu_ids GPUS "$gpus" "$available"
    if [[ "$gpus" == all ]]; then n="$available"; else n="$(count_ids "$gpus")"; fi
    ((n >= 2)) || die "GPUS=$gpus gives $n GPU; this recipe needs at least 2 (for one GPU: bash example_run.sh single-gpu)."
    cmd=("${LAUNCH[@]}" "$@" --num_processes "$n" --main_process_port "$MASTER_PORT")
    [[ "$gpus" == all ]] || cmd+=(--gpu_ids "$gpus")
}

recipe_multi_gpu() {
    gpu_launch --multi_gpu --mixed_precision no --dynamo_backend no  # precision: the YAML's bf16
    use_config "$DEFAULT_CONFIG"
    cmd+=("$MAIN" "${conf[@]}")
}

recipe_fsdp() {
    gpu_launch --config_file "$REPO/configs/accelerate/fsdp.yaml"
    use_config "$DEFAULT_CONFIG"
    cmd+=("$MAIN" "${conf[@]}")
}

recipe_cpu_ddp() {
    local n="${NPROC_PER_NODE:-2}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$n: expected a number of processes, e.g. NPROC_PER_NODE=2."
    use_quickstart_config
    # ACCELERATE_USE_CPU makes transformers join the processes with gloo even where GPUs exist;
    # accelerate's --cpu flag alone would start a single process.
    cmd=(env ACCELERATE_USE_CPU=true "${LAUNCH[@]}" --multi_gpu --mixed_precision no --dynamo_backend no
        --num_processes "$n" --main_process_port "$MASTER_PORT" "$MAIN" "${conf[@]}")
}

own_file() {  # own_file EXTENSION: --train_file (and --validation_file, --text_column) from the environment
    local ext="$1" train="${TRAIN_FILE:?set TRAIN_FILE to your training file, e.g. TRAIN_FILE=data/train.$1}"
    [[ "${train,,}" == *."$ext" ]] || die "TRAIN_FILE=$train: this recipe reads .$ext files; for other formats use the matching recipe (jsonl, csv)."
    [[ -f "$train" ]] || die "TRAIN_FILE=$train: no such file."
    use_config "$REPO/configs/own-files.yaml"
    cmd=("$PYTHON" "$MAIN" "${conf[@]}" --train_file "$train")
    [[ -z "${VALIDATION_FILE:-}" ]] || cmd+=(--validation_file "$VALIDATION_FILE")
    [[ -z "${TEXT_COLUMN:-}" ]] || cmd+=(--text_column "$TEXT_COLUMN")
}

recipe_jsonl() { own_file jsonl; }
recipe_csv() { own_file csv; }

recipe_resume() {
    # main.py resumes from the latest complete checkpoint in output_dir by itself: rerunning the
    # same command continues an interrupted run (Ctrl-C the quickstart after its step-4
    # checkpoint, then run this), and a larger --max_steps extends a finished one.
    # CHECKPOINT picks a specific checkpoint.
    use_quickstart_config
    cmd=("$PYTHON" "$MAIN" "${conf[@]}")
    if [[ -n "${CHECKPOINT:-}" ]]; then
        [[ -d "$CHECKPOINT" ]] || die "CHECKPOINT=$CHECKPOINT: no such directory; use a checkpoint-N directory inside output_dir."
        cmd+=(--resume_from_checkpoint "$CHECKPOINT")
    fi
}

name="${1:-}"
if [[ -z "$name" || "$name" == -h || "$name" == --help || "$name" == list ]]; then
    usage
    exit 0
fi
shift
[[ -v "ABOUT[$name]" ]] || {
    usage >&2
    die "unknown recipe '$name'; choose one of the recipes listed above."
}
if [[ "$name" == multinode ]]; then
    # The general launcher prints (DRY_RUN) or runs its own accelerate command.
    exec bash "$REPO/multinode_train.sh" "$@"
fi
cmd=()
conf=()
"recipe_${name//-/_}"
run_cmd "${cmd[@]}" "$@"
