#!/usr/bin/env bash
# MobileNetV2 with 1 (baseline) and 2, 3, 4, 6, 8 grafted networks (the paper's experiment on
# the number of networks; see the paper for the table number). Paper, top-1 % CIFAR-10 / CIFAR-100:
#   baseline      92.42 / 71.44
#   2 networks    94.20 / 74.15
#   6 networks    95.33 / 78.32
#   3, 4, 8 networks: see the paper.
# The network count is --nproc_per_node, not a config key: one config serves every N, and difflr
# spreads the initial lrs over whatever N is. One process per network: N GPUs for N networks.
#   scripts/reproduce/mobilenetv2_networks.sh [key=value ...]
#   DATASET=cifar100 COUNTS="2 6" scripts/reproduce/mobilenetv2_networks.sh
source "$(dirname "$0")/_launch.sh"
dataset="${DATASET:-cifar10}"
launch 1 "configs/$dataset/mobilenetv2_baseline.yaml" "$RUNS/$dataset/mobilenetv2_baseline" "$@"
for n in ${COUNTS:-2 3 4 6 8}; do
    launch "$n" "configs/$dataset/mobilenetv2_graft_difflr.yaml" \
        "$RUNS/$dataset/mobilenetv2_graft_difflr_n$n" "$@"
done
