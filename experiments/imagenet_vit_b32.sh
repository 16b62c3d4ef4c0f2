#!/usr/bin/env bash
# A paper-style random sweep: ViT-B/32 (AugReg .npz) on ImageNet, K ingredients, then every soup.
# Usage: experiments/imagenet_vit_b32.sh /path/B_32.npz TFDS_DATA_DIR [K=32] [WORKDIR]
# On a Cloud TPU pod slice run the same command on every host with SOUPJAX_MULTIHOST=1.
set -euo pipefail
init=${1:?path of the ViT-B/32 .npz}
data_dir=${2:?TFDS data dir with imagenet2012 (and imagenet_v2, imagenet_r, imagenet_a, imagenet_sketch)}
count=${3:-32}
workdir=${4:-runs/imagenet_vit_b32}
exec python -m soupjax.experiment --sweep_config "configs/imagenet_vit_b32.py:init=${init},sweep=${count}" \
    --data_dir "$data_dir" --workdir "$workdir"
