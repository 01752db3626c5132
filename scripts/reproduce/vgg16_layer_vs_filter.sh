#!/usr/bin/env bash
# CIFAR-10, VGG-16 (BN): grafting whole layers (one alpha per layer, from weight entropies) vs
# single filters (one alpha per filter, from BN scales): the paper's layer vs filter level
# comparison; for its numbers and table see the paper.
#   scripts/reproduce/vgg16_layer_vs_filter.sh [key=value ...]
source "$(dirname "$0")/_launch.sh"
for level in layer filter; do
    launch "$NETWORKS" "configs/ablations/vgg16_$level.yaml" "$RUNS/ablations/vgg16_$level" "$@"
done
