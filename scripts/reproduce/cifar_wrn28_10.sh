#!/usr/bin/env bash
# CIFAR-10 and CIFAR-100, WRN-28-10: baseline vs filter grafting (the paper's CIFAR comparison;
# for its WRN numbers see the paper). WRN-28-10 (36.5M parameters) is by far the heaviest model
# here: one GPU per network. DATASETS and VARIANTS pick the runs.
#   scripts/reproduce/cifar_wrn28_10.sh [key=value ...]
source "$(dirname "$0")/_launch.sh"
for dataset in ${DATASETS:-cifar10 cifar100}; do
    for variant in ${VARIANTS:-baseline graft_samelr graft_difflr}; do
        launch "$NETWORKS" "configs/$dataset/wrn28_10_${variant}.yaml" \
            "$RUNS/$dataset/wrn28_10_${variant}" "$@"
    done
done
