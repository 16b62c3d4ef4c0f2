#!/usr/bin/env bash
# The regime map's held-out phase (issue 20, experiments/RESULTS.md "The regime map"): each arm's upstream
# model and 8 ingredients, no soup cooked; then the strong_upstream arm's candidates (ii) and (iii), the
# upstream model alone, judged on its held-out curve. Run from a clean checkout (git worktree add): it
# takes hours, and edits must not change the code under it. Arms share one upstream model: the first
# arm trains it, the others link to it (the same config, so the study takes it as finished).
#   bash experiments/regime_map.sh [WORKROOT]    # default runs/
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs}
PY=${PYTHON:-.venv/bin/python}
ARMS=(small_data narrow_lr today)
mkdir -p "$ROOT"
for arm in "${ARMS[@]}"; do
  if [ "$arm" != "${ARMS[0]}" ] && [ ! -e "$ROOT/map-$arm/upstream" ]; then
    mkdir -p "$ROOT/map-$arm" && ln -s "../map-${ARMS[0]}/upstream" "$ROOT/map-$arm/upstream"
  fi
  "$PY" -m soupjax.experiment --config "configs/fashion_mnist_vit.py:regime=$arm" --workdir "$ROOT/map-$arm" \
    --seed 0 --ingredients_only
  "$PY" -m soupjax.soup --recipe inspect --ingredients "$ROOT/map-$arm/ingredients-seed0" \
    --out "$ROOT/map-$arm/inspect-seed0" --inspect_pairs 1
done
"$PY" experiments/regime_map.py "${ARMS[@]/#/$ROOT/map-}"
LONGER=(--config.plateau.patience=4 --config.plateau.min_delta=0.001)
AUG=(--config.data.randaugment_ops=2 --config.data.randaugment_magnitude=9 --config.data.mixup_alpha=0.2)
"$PY" -m soupjax.finetune --config configs/fashion_mnist_vit.py:stage=upstream "${LONGER[@]}" --workdir "$ROOT/upstream-ii"
"$PY" -m soupjax.finetune --config configs/fashion_mnist_vit.py:stage=upstream "${LONGER[@]}" "${AUG[@]}" \
  --workdir "$ROOT/upstream-iii"
