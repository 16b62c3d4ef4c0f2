"""The stages of the model-soups study that ``python -m soupjax.experiment`` runs: the upstream model,
the sweep of ingredients, every recipe; and the reference-scale studies (a config's sweep, then cooking).

Every stage is resumable and refuses, before any work, what was made with another config.
"""
from __future__ import annotations

import sys
import time
from soupjax.cli.errors import InputError
from soupjax.config import base as config_base
from soupjax.io.files import AnyPath  # a local path, or a gs:// URL as an etils.epath.Path


# --quick is a smoke test of the whole job: the merge methods try two or three points of each grid
# (the full grids, methods.all_options()'s defaults, are the study's).
QUICK_GRIDS = {"task_arithmetic_scales": "0.5,1,2", "ties_densities": "0.2,1", "ties_lambdas": "1",
               "dare_drop_rates": "0.5", "dare_scales": "1", "slerp_ts": "0,0.5,1", "wise_ft_alphas": "0,0.5,1"}

def run_sweep_study(config, workdir: AnyPath, *, recipe: str = "all", recalibrate_bn: int = 0,
                    learned_epochs: int = 5, overwrite: bool = False, **cook_options) -> dict:
    """A reference-scale study: the config's sweep, then ``recipe`` (and, for BatchNorm models, the
    same again with recalibrated statistics, so the two can be compared); ``cook_options`` (the
    methods' grids, as ``QUICK_GRIDS``) go to every cook."""
    from soupjax.training import planning, sweep
    ingredients_dir = workdir / "ingredients"
    plan = planning.plan_runs(sweep.ingredient_configs(config), ingredients_dir, workdir / "train", overwrite=overwrite)
    planning.run_plan(plan)
    results = {"plain": cook_into(recipe, ingredients_dir, workdir / "soups", overwrite, learned_epochs=learned_epochs,
                                  **cook_options)}
    if recalibrate_bn:
        results["recalibrated"] = cook_into(recipe, ingredients_dir, workdir / "soups-recalibrated", overwrite,
                                            recalibrate_bn=recalibrate_bn, learned_epochs=learned_epochs,
                                            **cook_options)
    return results


def study_configs(config_path: str, workdir: AnyPath, *, quick: bool, seed: int, count: int,
                  data_dir: str | None = None):
    """The (upstream, downstream) configs of the default study, checked: bad options fail here, before
    anything is imported or written. ``config_path`` may carry options of its own (``FILE:regime=NAME``),
    given to both stages."""
    config_path, _, given = config_path.partition(":")
    owned = sorted({o.split("=", 1)[0] for o in given.split(",") if o} & {"stage", "sweep", "seed", "init", "quick"})
    if owned:
        raise InputError(f"--config {config_path}:{given}: {', '.join(owned)} are set by the study (use --quick, "
                         "--seed, --ingredients), not in the config's options")
    module = config_base.load_config_module(config_path)
    extra = (",quick" if quick else "") + (f",{given}" if given else "")
    configs = []
    for options in (f"stage=upstream{extra}",
                    f"stage=downstream,sweep={count},seed={seed},init={workdir / 'upstream' / 'ingredient'}{extra}"):
        config = config_base.config_from_module(module, config_path, options)
        if data_dir:
            config.data.data_dir = data_dir
        config_base.check_config(config)
        configs.append(config)
    return tuple(configs)


def run_study(configs, workdir: AnyPath, *, seed: int, quick: bool, ingredients_only: bool = False,
              overwrite: bool = False) -> dict:
    """Upstream run, sweep, every recipe, from the ``(upstream, downstream)`` configs of
    ``study_configs``; returns the soup results (also written as a report), or ``{}`` with
    ``ingredients_only``."""
    from soupjax.training import planning, sweep

    upstream, downstream = configs
    start = time.time()
    upstream_dir = workdir / "upstream" / "ingredient"
    ingredients_dir = workdir / f"ingredients-seed{seed}"
    runs = sweep.ingredient_configs(downstream)
    # Everything that can be refused is refused before the upstream model trains: work made with another
    # config, unwritable directories, data not there. (Whether the ingredients' init was replaced since
    # is known only once the upstream model exists: the sweep's own plan below checks it.)
    up = [planning.plan_run("ingredient", upstream, {}, upstream_dir, workdir / "upstream" / "train", overwrite=overwrite)]
    planning.check_plan(up)
    planning.check_plan([planning.plan_run(name, config, hparams, ingredients_dir / name, workdir / "train" / name,
                                     overwrite=overwrite, check_init=False) for name, config, hparams in runs],
                     check_init=False)

    if up[0].meta is not None:
        print(f"[1/3] upstream: finished earlier ({upstream_dir})", flush=True)
    else:
        print(f"[1/3] upstream: training the shared init on classes {list(upstream.data.classes)}", flush=True)
        meta = planning.run_plan(up, "1/3 upstream")[0]
        print(f"[1/3] upstream: test accuracy {meta['metrics']['test']['accuracy']:.4f} "
              f"({meta['train_seconds']:.0f}s)", flush=True)

    planning.finetune_all(runs, workdir, ingredients_dir, label="2/3 ingredient", overwrite=overwrite)
    if downstream.eval_every_steps > 0:
        from soupjax.report import learning_curves
        out = workdir / f"learning-curves-seed{seed}"
        print(learning_curves.write(workdir, [seed], out), flush=True)
        print(f"learning curves: {out}.png", flush=True)
    if ingredients_only:
        print(f"ingredients finished in {time.time() - start:.0f}s: {ingredients_dir}", flush=True)
        return {}

    print(f"[3/3] cooking every recipe ({time.time() - start:.0f}s so far)", flush=True)
    out = workdir / f"soups-seed{seed}"
    results = cook_into("all", ingredients_dir, out, overwrite, learned_epochs=2 if quick else 3, **(QUICK_GRIDS if quick else {}))
    print(f"study finished in {time.time() - start:.0f}s; report in {out}", flush=True)
    return results


def cook_into(recipe: str, ingredients_dir: AnyPath, out: AnyPath, overwrite: bool, **kwargs) -> dict:
    """Cook ``recipe`` into ``out``: soups there cooked from other ingredients (some were replaced with
    --overwrite) are refused by the kitchen, or with ``overwrite`` cooked again."""
    from soupjax import cooking
    return cooking.cook(recipe, ingredients_dir, out, command=" ".join(sys.argv), overwrite=overwrite, **kwargs)
