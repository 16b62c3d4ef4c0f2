"""Cook soups from the command line.

    python -m soupjax.soup --recipe all                          # every method, the ensembles, the report
    python -m soupjax.soup --recipe greedy --ingredients DIR --out DIR
    python -m soupjax.soup --recipe ties --ties_densities=0.1,0.2 # one merge method, its grid
    python -m soupjax.soup --recipe inspect                      # angles, distances, interpolation

The recipes are the methods registered in ``soupjax.methods`` (one file each); their options are
defined from the registry, so ``--help`` lists every method's flags.

Without ``--ingredients`` it looks in ``WORKDIR/ingredients`` (the default work directory of
``python -m soupjax.finetune``, printed at start). The model and data come from the ingredients'
meta.json; ``--config FILE`` replaces them. Greedy, pruned and learned soups see only the held-out
split; the test split and the shift sets are evaluated for the report only.

Every evaluation of an ingredient and every cooked soup is kept under ``OUT`` (``cache/`` and one
directory per soup), so an interrupted run resumes where it stopped. Rerunning into the same ``OUT``
with other ingredients or options is refused, naming what differs, unless ``--overwrite``. With a
single ingredient every recipe gives that ingredient (a note says so). The work is done by
``soupjax.cooking.cook``; this file only reads the flags.

Bad input (an unknown flag or recipe, an option out of range, unusable ingredients, an unwritable
``OUT``) ends the command with one line, ``soupjax.soup: error: ...``, and exit status 2, before
anything is written; option values are checked before JAX is even imported.

SIGTERM (a preempted VM) or Ctrl-C stops cooking after the evaluation or dish under way, which is kept
whole: one line ``soupjax.soup: preempted by SIGTERM after dish N ...; rerun the same command to resume``
and exit status 143 (SIGTERM) or 130 (Ctrl-C); the rerun reuses every finished soup
(``soupjax.cli.preemption``).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from absl import app, flags

from soupjax import methods
from soupjax.cli import flags as command_line
from soupjax.cli import preemption
from soupjax.cli.errors import exit_on_input_error
from soupjax.cli.startup import compilation_cache_in, prepare_process
from soupjax.io import files
from soupjax.io.workdirs import default_workdir

PROGRAM = "soupjax.soup"
FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "all",
                    f"Which recipe to cook: one of {', '.join(methods.names())}, several comma-separated (one cook, "
                    "one report), 'all' (every method in soupjax.methods) or 'inspect' (the ingredients' geometry).")
flags.DEFINE_string("workdir", None, "Work directory (default: $SOUPJAX_WORKDIR or ./runs/soupjax).")
flags.DEFINE_string("ingredients", None, "Directory of ingredients (default: WORKDIR/ingredients).")
flags.DEFINE_string("out", None, "Output directory for soups and the report (default: WORKDIR/soups).")
command_line.define_config_file("config", "Optional config file whose data/model replace the ingredients'.")
flags.DEFINE_string("data_dir", None, "TFDS data directory, replacing the one in the ingredients' config.")
flags.DEFINE_bool("allow_mixed_init", False, "Cook ingredients fine-tuned from different inits anyway.")
# Every method's options, and the shared ones, come from the registry: a new method's flags appear here.
methods.define_flags(flags)
flags.adopt_module_key_flags(methods)
flags.DEFINE_list("shifts", None, "Shift splits to report (default: those of the data set).")
flags.DEFINE_integer("inspect_pairs", 3, "Inspect: interpolate between this many pairs of the best ingredients.")
flags.DEFINE_integer("inspect_points", 11, "Inspect: points along each interpolation line.")
flags.DEFINE_bool("overwrite", False, "Replace soups and the report in --out that were cooked from other "
                  "ingredients or options (refused otherwise; the same ones are always resumed).")


def main(argv) -> int:
    del argv  # command_line.flags_parser refused any positional argument
    # Before JAX loads: a bad value is refused at once, not after seconds of imports.
    from soupjax.cooking import check_recipe_options
    options = {name: FLAGS[name].value for name in methods.all_options()}
    check_recipe_options(recipe=None if FLAGS.recipe == "inspect" else FLAGS.recipe, **options)
    from soupjax.devices import sharding
    sharding.initialize_multihost()  # a pod slice's processes cook together, as finetune's train
    workdir = files.absolute(FLAGS.workdir or default_workdir())  # a gs:// URL stays one
    ingredients_dir = files.absolute(FLAGS.ingredients) if FLAGS.ingredients else workdir / "ingredients"
    out = files.absolute(FLAGS.out) if FLAGS.out else workdir / "soups"
    print(f"{PROGRAM}: work directory {workdir}", flush=True)
    compilation_cache_in(workdir)
    if FLAGS.recipe == "inspect":
        from soupjax.inspect_soup import inspect
        inspect(ingredients_dir, out, config=FLAGS.config, data_dir=FLAGS.data_dir,
                allow_mixed_init=FLAGS.allow_mixed_init,
                pairs=FLAGS.inspect_pairs, points=FLAGS.inspect_points, eval_batch_size=FLAGS.eval_batch_size,
                recalibrate_bn=FLAGS.recalibrate_bn)
        return 0
    from soupjax.cooking import cook
    cook(FLAGS.recipe, ingredients_dir, out, config=FLAGS.config, allow_mixed_init=FLAGS.allow_mixed_init,
         shifts=FLAGS.shifts, data_dir=FLAGS.data_dir, command=" ".join(sys.argv), overwrite=FLAGS.overwrite,
         **options)
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """An ingredient left out is news for the user, not a developer's warning with a source line."""
    if category.__name__ == "IngredientWarning":
        return f"{PROGRAM}: warning: {' '.join(str(message).split())}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def run() -> None:
    prepare_process()
    warnings.formatwarning = _one_line_warning
    # An unknown flag or bad value: one line and exit 2 (absl's own parser says 'FATAL' and exits 1).
    # SIGTERM or Ctrl-C: stop at the next step boundary with the work saved, one line, exit 143 or 130.
    main_ = preemption.exit_on_preemption(PROGRAM, exit_on_input_error(PROGRAM, main))
    app.run(main_, flags_parser=command_line.flags_parser(PROGRAM))


if __name__ == "__main__":
    run()
