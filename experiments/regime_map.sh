#!/usr/bin/env bash
# The regime map (issue 20, experiments/RESULTS.md "The regime map"), in the order it was run:
#  1. each arm's upstream model and 8 ingredients, no soup cooked, and their held-out figures;
#  2. the strong_upstream arm's candidates (ii) and (iii), the upstream model alone, judged on its held-out
#     accuracy; the chosen one, (ii), is regime=strong_upstream's upstream model (linked, same config);
#  3. every arm cooked (the study again: its upstream model and ingredients are found finished);
#  4. small_data's sweep seeds 1 and 2 (added after seed 0's test table, as RESULTS.md says);
#  5. the figure across arms and the predictor correlations.
# Run from a clean checkout (git worktree add): it takes hours, and edits must not change the code under
# it. Arms share today's upstream model: the first arm trains it, the others link to it.
#   bash experiments/regime_map.sh [WORKROOT]    # default runs/
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs}
PY=${PYTHON:-.venv/bin/python}
CONFIG=configs/fashion_mnist_vit.py
mkdir -p "$ROOT"

held_out_phase() {  # ARM SEED: ingredients, geometry, held-out figures
  "$PY" -m soupjax.experiment --config "$CONFIG:regime=$1" --workdir "$ROOT/map-$1" --seed "$2" --ingredients_only
  "$PY" -m soupjax.soup --recipe inspect --ingredients "$ROOT/map-$1/ingredients-seed$2" \
    --out "$ROOT/map-$1/inspect-seed$2" --inspect_pairs 1
  "$PY" experiments/regime_map.py "$ROOT/map-$1" --seed "$2"
}

link_upstream() {  # ARM FROM: FROM's upstream model (upstream/{ingredient,start,train}) as ARM's
  mkdir -p "$ROOT/map-$1"
  [ -e "$ROOT/map-$1/upstream" ] || ln -s "$(realpath -m "$2")" "$ROOT/map-$1/upstream"
}

# 1.
for arm in small_data narrow_lr today; do
  [ "$arm" = small_data ] || link_upstream "$arm" "$ROOT/map-small_data/upstream"
  held_out_phase "$arm" 0
done
# 2.
LONGER=(--config.plateau.patience=4 --config.plateau.min_delta=0.001)
AUG=(--config.data.randaugment_ops=2 --config.data.randaugment_magnitude=9 --config.data.mixup_alpha=0.2)
"$PY" -m soupjax.finetune --config "$CONFIG:stage=upstream" "${LONGER[@]}" --workdir "$ROOT/upstream-ii"
"$PY" -m soupjax.finetune --config "$CONFIG:stage=upstream" "${LONGER[@]}" "${AUG[@]}" --workdir "$ROOT/upstream-iii"
mkdir -p "$ROOT/map-strong_upstream/upstream"
for part in ingredient start; do
  ln -sfn "$(realpath -m "$ROOT/upstream-ii/ingredients/$part")" "$ROOT/map-strong_upstream/upstream/$part"
done
ln -sfn "$(realpath -m "$ROOT/upstream-ii/train/ingredient")" "$ROOT/map-strong_upstream/upstream/train"
held_out_phase strong_upstream 0
# 3.
for arm in small_data narrow_lr today strong_upstream; do
  "$PY" -m soupjax.experiment --config "$CONFIG:regime=$arm" --workdir "$ROOT/map-$arm" --seed 0
done
# 4.
for seed in 1 2; do
  held_out_phase small_data "$seed"
  "$PY" -m soupjax.experiment --config "$CONFIG:regime=small_data" --workdir "$ROOT/map-small_data" --seed "$seed"
done
# 5. Today's seeds 1 and 2 are the reports of RESULTS.md's (a): held-out ensemble gain, no geometry.
R=experiments/results
"$PY" experiments/regime_figure.py today:0:"$ROOT/map-today" today:1:$R/study-merges-seed1-report.md \
  today:2:$R/study-merges-seed2-report.md narrow_lr:0:"$ROOT/map-narrow_lr" \
  strong_upstream:0:"$ROOT/map-strong_upstream" small_data:0:"$ROOT/map-small_data" \
  small_data:1:"$ROOT/map-small_data" small_data:2:"$ROOT/map-small_data" --out "$ROOT/regime-figure"
