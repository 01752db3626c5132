# Sourced by the sbatch scripts, from the submit directory (the project root): what a job needs
# before it starts torchrun, and its preemption handling. Set by the submitting shell (sbatch
# passes the environment on):
#   NPROC=N   processes per node (torchrun --nproc_per_node); default: the GPUs Slurm allocated
#             on the node, so a CPU-only cluster needs it
#   RUN_DIR   where checkpoints and metrics go; default $HOME/graft-runs/<config path without
#             configs/ and .yaml>, e.g. ~/graft-runs/cifar10/resnet32_graft_difflr
#   OMP_NUM_THREADS   default: the task's CPUs (--cpus-per-task) divided among the NPROC processes
# Expects CONFIG (the config file) to be set.

# The project's virtualenv, when there is one (scripts/run.sh makes it); else the PATH's torchrun.
if [ -x .venv/bin/torchrun ]; then export PATH="$PWD/.venv/bin:$PATH"; fi

NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-0}}"
if ! [ "$NPROC" -ge 1 ] 2>/dev/null; then
    echo "graft: error: NPROC=$NPROC is not a process count (without NPROC: the GPUs allocated on the node);" \
         "submit with NPROC=N (processes per node), e.g. NPROC=4 sbatch --gpus-per-node=0 ... on a CPU-only cluster" >&2
    exit 2
fi
EXPERIMENT="${CONFIG#configs/}"
RUN_DIR="${RUN_DIR:-$HOME/graft-runs/${EXPERIMENT%.yaml}}"
mkdir -p "$RUN_DIR"
# One srun task per node holds the node's NPROC processes: they share its CPUs.
THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC} / NPROC ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}"
echo "[graft] job ${SLURM_JOB_ID:-?}: $NPROC processes per node, $OMP_NUM_THREADS threads each; run directory $RUN_DIR"
# Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch; without this the
# workers and their data loaders could all share one CPU.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

# The scripts ask for --signal=B:USR1@120: 120 s (up to a minute more) before the time limit
# Slurm sends USR1 to this shell alone. SIGTERM then goes to the job's steps, i.e. the training,
# which stops between steps keeping its last complete epoch checkpoint; once it has stopped the
# job requeues itself and resumes from there. (Killing srun instead would make srun SIGKILL its
# tasks.) A plain `scancel` sends SIGTERM, which this shell does not trap: the training stops
# the same way and the job ends as CANCELLED.
STEP_PID=""
on_warning() {
    echo "[graft] time limit near: stopping the training, then requeueing job $SLURM_JOB_ID"
    scancel --signal=TERM "$SLURM_JOB_ID" || true
    local rc=0
    if [ -n "$STEP_PID" ]; then wait "$STEP_PID" || rc=$?; fi
    if [ "$rc" -eq 0 ] && [ -n "$STEP_PID" ]; then
        echo "[graft] the training had finished; not requeueing"
        exit 0
    fi
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_warning USR1

# wait_step PID: wait for the srun started in the background (a trap runs only between commands,
# so srun must not run in the foreground).
wait_step() {
    STEP_PID="$1"
    wait "$STEP_PID"
}
