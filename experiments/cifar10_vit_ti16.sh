#!/usr/bin/env bash
# Reference run: ViT-Ti/16 (AugReg ImageNet-21k .npz) fine-tuned on CIFAR-10, seeds 0-5, then every soup.
# Usage: experiments/cifar10_vit_ti16.sh /path/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz \
#            [TFDS_DATA_DIR] [WORKDIR]
# Needs CIFAR-10 prepared in TFDS_DATA_DIR (or download=True where the machine has network).
# Expected cost: 6 ingredients x 2,000 steps x 512 images at 224 px; see experiments/README.md.
set -euo pipefail
init=${1:?path of the ViT-Ti/16 .npz}
data_dir=${2:-}
workdir=${3:-runs/cifar10_vit_ti16}
args=(--sweep_config "configs/cifar10_vit_ti16.py:init=${init}" --workdir "$workdir")
[ -n "$data_dir" ] && args+=(--data_dir "$data_dir")
exec python -m soupjax.experiment "${args[@]}"
