#!/usr/bin/env bash
# Reference run: timm resnet50d (ImageNet weights) fine-tuned on CIFAR-10, seeds 0-5, then every soup,
# once with the averaged BatchNorm statistics and once with statistics recomputed on 200 batches.
# Usage: experiments/cifar10_resnet50d.sh /path/resnet50d.safetensors [TFDS_DATA_DIR] [WORKDIR]
set -euo pipefail
init=${1:?path of the timm resnet50d weights}
data_dir=${2:-}
workdir=${3:-runs/cifar10_resnet50d}
args=(--sweep_config "configs/cifar10_resnet50d.py:init=${init}" --workdir "$workdir" --recalibrate_bn 200)
[ -n "$data_dir" ] && args+=(--data_dir "$data_dir")
exec python -m soupjax.experiment "${args[@]}"
