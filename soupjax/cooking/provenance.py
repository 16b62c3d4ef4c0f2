"""Provenance and resume: what each dish is made from (its key), what differs from what an output in
``out`` was made from, refusing to replace a different output, and finding a dish cooked earlier.

A dish's key holds the ingredients by name and meta.json fingerprint (a retrained ingredient of the same
name is another ingredient), the shared init, the evaluation data, BatchNorm recalibration, the
evaluation batch size, the shared start θ0 for methods that need it, and its method's options
(``Method.key_of``). It is stored in the soup's meta.json (``options``) and compared on a rerun.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from soupjax.cli.errors import InputError
from soupjax.io.files import plain

def what_differs(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The options that differ between what an output was made from and what is asked now.

    Fields the stored record lacks were added to soupjax since it was written: they are not compared,
    so outputs of an older soupjax resume. Ingredients are compared by name and meta fingerprint
    (``ingredient_meta``) where both have it, so a moved ingredients directory is the same one; per-recipe
    options only for the recipes both cooked.
    """
    from soupjax.config.base import differences
    stored, wanted = dict(stored), {k: v for k, v in wanted.items() if k in stored}
    out = []
    if "ingredient_meta" in wanted:
        old, new = stored.pop("ingredient_meta") or {}, wanted.pop("ingredient_meta") or {}
        stored.pop("ingredients", None), wanted.pop("ingredients", None)
        for what, names in (("ingredients no longer there", sorted(set(old) - set(new))),
                            ("new ingredients", sorted(set(new) - set(old))),
                            ("ingredients changed since (another meta.json)",
                             sorted(n for n in set(old) & set(new) if old[n] != new[n]))):
            if names:
                out.append(f"{what}: {', '.join(names)}")
    if isinstance(stored.get("options"), dict) and isinstance(wanted.get("options"), dict):
        common = set(stored["options"]) & set(wanted["options"])
        stored["options"] = {k: v for k, v in stored["options"].items() if k in common}
        wanted["options"] = {k: v for k, v in wanted["options"].items() if k in common}
    for line in differences(stored, wanted):
        key, _, rest = line.partition(":")
        out.append(f"{key}:{rest.replace(' != ', ' -> ')}")
    return out


def _refuse_different(what: str, differing: list[str]) -> None:
    shown = "; ".join(differing[:6]) + (f" (and {len(differing) - 6} more)" if len(differing) > 6 else "")
    raise InputError(f"{what} was cooked from other ingredients or options ({shown}); pass --overwrite to "
                     "replace it, or choose another --out")


def check_wise_ft_bases(options: Mapping[str, Any], wanted: Sequence[Any], method_of: Mapping[str, Any],
                         cooked_now: set[str], out: Path, key_of: Callable[[str], dict]) -> None:
    """``InputError`` for a ``--wise_ft_of`` name that is no model, one that will not be there to start
    from, or one in ``out`` cooked from other ingredients or options than those given now (WiSE-FT's
    result is keyed by its base's options, so the base must be what they describe)."""
    if not any(m.name == "wise_ft" for m in wanted):
        return
    from soupjax.io import checkpoints
    from soupjax.methods import wise_ft
    if not wise_ft.bases(options):
        raise InputError(f"--wise_ft_of={options['wise_ft_of']!r}: name at least one model (best_ingredient or a soup)")
    for base in wise_ft.bases(options):
        if base == "best_ingredient":
            continue
        method = method_of.get(base)
        if method is None or not method.saves_model or method.name == "wise_ft":
            models = [d for d, m in method_of.items() if m.saves_model and m.name != "wise_ft"]
            raise InputError(f"--wise_ft_of={options['wise_ft_of']!r}: {base!r} is not a model soupjax cooks with "
                             f"these options; choose from best_ingredient, {', '.join(models)}")
        if base in cooked_now:
            continue
        if not checkpoints.is_ingredient(out / base):
            raise InputError(f"--wise_ft_of: the {base} soup is not in {out}: cook it first (--recipe "
                             f"{method.name}) or use --recipe all")
        differing = what_differs(checkpoints.load_meta(out / base).get("options") or {}, key_of(base))
        if differing:
            raise InputError(f"--wise_ft_of: the {base} soup in {out} was cooked from other ingredients or options "
                             f"({'; '.join(differing[:4])}); cook it again first (--recipe {method.name} --overwrite) "
                             "or give the options it was cooked with")


def wise_ft_base_key(dish: str, key_of: Callable[[str], dict], common: Mapping[str, Any]) -> Any:
    """What a WiSE-FT dish's base is: its recipe and options (what it shares with every dish, the
    ingredients and data, is in the WiSE-FT dish's own key already)."""
    base = dish.removeprefix("wise_ft_")
    if base == "best_ingredient":
        return base
    return {k: v for k, v in key_of(base).items() if k not in common}


# What a report in ``out`` and a new run into it must share: what every soup is cooked from and evaluated
# on. The recipe and its options are left out: cooking another recipe into the same ``out`` (uniform,
# then greedy) writes a report of that recipe, and each soup's own options are compared per soup.
REPORT_PROVENANCE = ("ingredients", "ingredient_meta", "init", "data", "model", "shifts", "recalibrate_bn")


def refuse_changed_outputs(out: Path, provenance: Mapping[str, Any], soup_keys: Mapping[str, Any]) -> None:
    """``InputError`` when ``out`` holds a report made from other ingredients or data
    (``REPORT_PROVENANCE``), or a soup made from other ingredients or options.

    A report or soup written by a soupjax that did not record its provenance is not compared.
    """
    from soupjax.io import checkpoints
    report_file = out / "report.json"
    if report_file.is_file():
        try:
            stored = json.loads(report_file.read_text()).get("meta", {}).get("provenance")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise InputError(f"{report_file} is not a soupjax report ({e}); pass --overwrite to replace it, "
                             "or choose another --out") from e
        if isinstance(stored, dict):
            differing = what_differs({k: v for k, v in stored.items() if k in REPORT_PROVENANCE},
                                      {k: v for k, v in provenance.items() if k in REPORT_PROVENANCE})
            if differing:
                _refuse_different(f"the report in {out}", differing)
    for name, key in soup_keys.items():
        if checkpoints.is_ingredient(out / name):
            stored = checkpoints.load_meta(out / name).get("options") or {}
            differing = what_differs(stored, key)
            if differing:
                _refuse_different(f"the {name} soup in {out / name}", differing)


class DishKeys:
    """What every dish of a run is made from (``key``), and that of the whole run (``provenance``).

    ``common`` is what every dish shares (the ingredients, their meta fingerprints, the init, the data,
    recalibration and the evaluation batch); ``method_of`` maps every dish name of the registry to its
    method (WiSE-FT may start from any of them); ``theta0`` names the shared start.
    """

    def __init__(self, options: Mapping[str, Any], method_of: Mapping[str, Any], common: Mapping[str, Any],
                 theta0: str):
        self.options = dict(options)
        self.method_of = dict(method_of)
        self.common = dict(common)
        self.theta0 = theta0

    def key(self, dish: str) -> dict[str, Any]:
        """What ``dish`` depends on: stored in its meta.json and compared on a rerun."""
        method = self.method_of[dish]
        after = {} if method.name != "wise_ft" else {"base": wise_ft_base_key(dish, self.key, self.common)}
        theta0 = {"theta0": self.theta0} if method.needs_init else {}
        return plain({**self.common, **method.key_of(self.options, dish), **after, **theta0, "recipe": dish})

    def fingerprint(self, dish: str) -> str:
        """The key's fingerprint: what names the dish's cached evaluation."""
        from soupjax.config.base import fingerprint
        return fingerprint(self.key(dish))

    def point_fingerprint(self, dish: str, point: Mapping[str, Any]) -> str:
        """What names the cached evaluation of one point of ``dish``'s curve (WiSE-FT's α)."""
        from soupjax.config.base import fingerprint
        return fingerprint({"dish": self.key(dish), **point})

    def own_options(self, dish: str) -> dict[str, Any]:
        """The part of ``dish``'s key that is not shared with every dish (the report's provenance)."""
        return {k: v for k, v in self.key(dish).items() if k not in self.common and k != "recipe"}


def cooked_earlier(out: Path, dish: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The meta.json of ``dish`` saved in ``out`` when it was cooked from what ``key`` says, else None
    (none there, or one made from other ingredients or options: cooked again, as ``--overwrite`` asked;
    without it ``refuse_changed_outputs`` refused before any work)."""
    from soupjax.io import checkpoints
    soup_dir = out / dish
    if not checkpoints.is_ingredient(soup_dir):
        return None
    meta = checkpoints.load_meta(soup_dir)
    differing = what_differs(meta.get("options") or {}, key)
    if differing:
        print(f"{dish}: the soup in {soup_dir} was cooked from other ingredients or options "
              f"({'; '.join(differing[:3])}); cooking it again (overwrite)", flush=True)
        return None
    return meta
