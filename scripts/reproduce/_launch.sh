# Sourced by the reproduce scripts: run from the project root, print each command, then run it.
#   NETWORKS=2         networks per grafted run (--nproc_per_node)
#   RUNS=runs          where the run directories go (one per run, named after the experiment)
#   DRY_RUN=1          print the commands without running them
#   TORCHRUN=torchrun  the launcher (e.g. "python -m torch.distributed.run")
# Extra arguments to a reproduce script are config overrides (key=value) added to every run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
NETWORKS="${NETWORKS:-2}"
RUNS="${RUNS:-runs}"
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"

# launch NPROC CONFIG OUTPUT_DIR [key=value ...]
launch() {
    local nproc="$1" config="$2" out="$3"
    shift 3
    local cmd=("${TORCHRUN_CMD[@]}" --standalone --nproc_per_node="$nproc" -m graft.train
               --config "$config" "output_dir=$out" "$@")
    echo "+ ${cmd[*]}"
    if [ -z "${DRY_RUN:-}" ]; then
        "${cmd[@]}"
    fi
}
