#!/usr/bin/env bash
# ImageNet, ResNet-18/34/50: baseline vs filter grafting (the paper's ImageNet experiment; for
# its numbers and table see the paper). The data layout is described in configs/imagenet/*.yaml
# (train/ and test/ ImageFolder trees under data/imagenet; the validation set goes in test/).
# One GPU per network by default: NETWORKS GPUs per run. DATA_PARALLEL=G gives every network G
# GPUs (hybrid mode: NETWORKS x G processes, batch_size per replica). MODELS picks the configs
# (resnet50_cosine is the cosine-schedule variant). For several nodes use scripts/slurm/.
#   scripts/reproduce/imagenet.sh [key=value ...]
#   NETWORKS=2 DATA_PARALLEL=4 MODELS=resnet50 scripts/reproduce/imagenet.sh   # one 8-GPU node
source "$(dirname "$0")/_launch.sh"
dp="${DATA_PARALLEL:-1}"
nproc=$((NETWORKS * dp))
for model in ${MODELS:-resnet18 resnet34 resnet50}; do
    launch "$nproc" "configs/imagenet/$model.yaml" "$RUNS/imagenet/${model}_baseline" \
        data_parallel="$dp" grafting.enabled=false "$@"
    launch "$nproc" "configs/imagenet/$model.yaml" "$RUNS/imagenet/${model}_graft" \
        data_parallel="$dp" "$@"
done
