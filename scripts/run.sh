#!/usr/bin/env bash
# Set everything up (first call only) and run the quick start: 2 grafted ResNet-20s on the
# committed real CIFAR-10 sample, under a minute on a 2-core CPU, ending with the summary table
# and a picture of the run (graft-report). Extra arguments are config overrides. A run with other
# settings needs its own output_dir (runs/quickstart holds the quick start's, which a rerun
# resumes), e.g. the baseline:
#   scripts/run.sh epochs=2 grafting.enabled=false output_dir=runs/quickstart-baseline
source "$(dirname "$0")/_env.sh"
graft-run --standalone --nproc_per_node="${NPROC:-2}" --config configs/quickstart.yaml "$@"
RUN_DIR=runs/quickstart
for arg in "$@"; do
    case "$arg" in output_dir=*) RUN_DIR="${arg#output_dir=}" ;; esac
done
echo "[graft] the run as a picture: $(graft-report "$RUN_DIR")"
