#!/usr/bin/env bash
# The model-soups paper's CLIP ViT-B/32 table from its 72 released ingredients, beside the official numbers.
# Usage: experiments/reproduce_model_soups.sh MODELS_DIR CLIP_FILE MODEL_SOUPS_CHECKOUT TFDS_DATA_DIR [WORKDIR]
#   MODELS_DIR            the released model_{i}.pt files (github.com/mlfoundations/model-soups, release v0.0.2)
#   CLIP_FILE             OpenAI's ViT-B-32.pt, the CLIP they were fine-tuned from (the zero-shot start, θ0)
#   MODEL_SOUPS_CHECKOUT  a checkout of mlfoundations/model-soups: its individual_model_results.jsonl,
#                         uniform_soup_results.jsonl, greedy_soup_results.jsonl (and ensemble_results.jsonl
#                         where it has it) are the official numbers, read there, never copied
#   TFDS_DATA_DIR         imagenet2012 (and imagenet_v2, imagenet_r, imagenet_a, imagenet_sketch) prepared in TFDS
#   WORKDIR               default runs/model_soups: ingredients/, soups/ (with report.json),
#                         comparison.md (the table printed at the end)
# SHIFTS=imagenet_v2,imagenet_r (say) reports only those shift sets, when not all four are prepared.
# SOUP_OPTIONS="--memory_budget_mb=20000 ..." adds options of python -m soupjax.soup to the cook.
# See experiments/reference_runs.md for what is compared, and what cannot be.
# Needs soupjax and open_clip installed (open_clip ships OpenAI's ImageNet class names, its 80 templates and
# CLIP's tokenizer file). Rerunning the same command continues: imported files are skipped, cooked soups reused.
set -euo pipefail
usage="usage: $0 MODELS_DIR CLIP_FILE MODEL_SOUPS_CHECKOUT TFDS_DATA_DIR [WORKDIR]"
models_dir=${1:?path of the directory of the released model_N.pt files; $usage}
clip=${2:?path of the CLIP file they were fine-tuned from, OpenAI ViT-B-32.pt; $usage}
official=${3:?path of a checkout of mlfoundations/model-soups, for its results files; $usage}
data_dir=${4:?path of the TFDS data directory with imagenet2012 and its shifts; $usage}
workdir=${5:-runs/model_soups}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config="$(dirname "$here")/configs/imagenet_clip_vit_b32.py"

fail() { echo "$0: error: $*" >&2; exit 2; }
# Every input is looked at before hours of work: a missing results file must not end the run at the table.
shopt -s nullglob
files=("$models_dir"/model_*.pt)
shopt -u nullglob
[ ${#files[@]} -gt 0 ] || fail "no model_*.pt files in $models_dir (the 72 released ingredients)"
[ -e "$clip" ] || fail "$clip: no such file (OpenAI's ViT-B-32.pt)"
for f in individual_model_results.jsonl uniform_soup_results.jsonl greedy_soup_results.jsonl; do
    [ -f "$official/$f" ] || fail "$official/$f: no such file (give a checkout of mlfoundations/model-soups)"
done
[ -d "$data_dir" ] || case $data_dir in gs://*) ;; *) fail "$data_dir: no such directory (TFDS_DATA_DIR)" ;; esac
# model_0 .. model_71 in numeric order (the ingredients are named after the files).
mapfile -t files < <(printf '%s\n' "${files[@]}" | sort -V)
echo "$0: ${#files[@]} files from $models_dir; work directory $workdir"

# 1. OpenAI's ImageNet class names and 80 templates (what the official zeroshot.py uses) from the installed
#    open_clip, which ships them (soupjax does not copy them): each file written once, renamed into place,
#    kept on a rerun. The tokenizer is the bpe_simple_vocab_16e6.txt.gz that open_clip ships.
zeroshot="$workdir/zeroshot"
mkdir -p "$zeroshot"
tokenizer=$(python - "$zeroshot" <<'EOF'
import os
import sys

import open_clip
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES


def write_once(name, lines):
    path = os.path.join(sys.argv[1], name)
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(path + ".tmp", path)


write_once("classnames.txt", IMAGENET_CLASSNAMES)
write_once("templates.txt", [template("{}") for template in OPENAI_IMAGENET_TEMPLATES])
print(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"))
EOF
)

# 2. The files as soupjax ingredients, with the zero-shot start from the base (θ0 of the merges and WiSE-FT).
python -m soupjax.import_ingredients --format model-soups --out "$workdir/ingredients" \
    --config "$config:data_dir=$data_dir" --base "$clip" --tokenizer "$tokenizer" \
    --classnames "$zeroshot/classnames.txt" --templates "$zeroshot/templates.txt" "${files[@]}"

# 3. The recipes cooked in one command, into one directory and one report (the ingredients' evaluations
#    are made once and shared; WiSE-FT starts from the soups cooked before it).
#    --greedy_ties official: ingredients of equal held-out accuracy in reverse index order, as the official code
#    visits them (our index is the name's place in string order, model_10 before model_2; exact ties only).
#    --learned_mode both: the paper's learned soup and learned soup by layer.
soups="$workdir/soups"
options=(--greedy_ties official --learned_mode both --wise_ft_of best_ingredient,uniform,greedy)
[ -n "${SHIFTS:-}" ] && options+=(--shifts "$SHIFTS")
# shellcheck disable=SC2206  # words on purpose: one option each
[ -n "${SOUP_OPTIONS:-}" ] && options+=($SOUP_OPTIONS)
python -m soupjax.soup --recipe uniform,greedy,learned,ensemble,wise_ft --ingredients "$workdir/ingredients" \
    --out "$soups" --data_dir "$data_dir" "${options[@]}"

# 4. Our table beside the official numbers.
python "$here/compare_official.py" --official "$official" --out "$workdir/comparison.md" "$soups/report.json"
