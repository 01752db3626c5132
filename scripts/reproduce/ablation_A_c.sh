#!/usr/bin/env bash
# CIFAR-10, ResNet-32, grafting with difflr + cosine: the sweeps of the adaptive weight's
# constants, alpha = (A/pi) * arctan(c * (H_self - H_peer)) + 0.5. A in 0.2 ... 1.0 (c = 500),
# then c in 1 ... 1000 (A = 0.4): the paper's hyperparameter study; for its numbers see the paper.
# SWEEPS="A" or "c" runs one sweep only.
#   scripts/reproduce/ablation_A_c.sh [key=value ...]
source "$(dirname "$0")/_launch.sh"
for sweep in ${SWEEPS:-A c}; do
    case "$sweep" in
        A) values="0.2 0.4 0.6 0.8 1.0" ;;
        c) values="1 10 100 500 1000" ;;
        *) echo "unknown sweep '$sweep' (A or c)" >&2; exit 2 ;;
    esac
    for value in $values; do
        launch "$NETWORKS" "configs/ablations/resnet32_$sweep$value.yaml" \
            "$RUNS/ablations/resnet32_$sweep$value" "$@"
    done
done
