#!/usr/bin/env bash
# CIFAR-100, ResNet-32/56/110: baseline vs filter grafting (the paper's CIFAR comparison of
# baseline and grafted networks; see the paper for the table number). Paper, CIFAR-100 top-1 %:
#   ResNet-32   baseline 69.82   grafted 71.28
#   ResNet-56, ResNet-110: see the paper (figures not quoted here until checked)
# Each config runs NETWORKS (default 2) networks; the baseline trains as many independent ones,
# so summary.json's mean compares like with like. VARIANTS picks the runs (default: all three).
#   scripts/reproduce/cifar100_resnet.sh [key=value ...]
source "$(dirname "$0")/_launch.sh"
for model in ${MODELS:-resnet32 resnet56 resnet110}; do
    for variant in ${VARIANTS:-baseline graft_samelr graft_difflr}; do
        launch "$NETWORKS" "configs/cifar100/${model}_${variant}.yaml" \
            "$RUNS/cifar100/${model}_${variant}" "$@"
    done
done
