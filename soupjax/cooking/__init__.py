"""Cooking: gather and check the ingredients, evaluate them, run the registered methods, save each
dish and write the report, resumably.

    orchestrate.py   the run: checks (``plan``), the loop over methods and dishes, the report (``cook``)
    interface.py     what a method may use (``Cooking``) and what it returns (``Dish``)
    evaluations.py   the model's evaluations on every split, cached under ``out/cache`` (``Evaluations``)
    provenance.py    what each dish is made from, refusing changed outputs, finding what was cooked
    rows.py          the report's rows (``Row``)
    preflight.py     the ingredients' checks before anything is cooked
"""
from soupjax.cooking.orchestrate import check_recipe_options, cook, ingredients_config

__all__ = ["check_recipe_options", "cook", "ingredients_config"]
