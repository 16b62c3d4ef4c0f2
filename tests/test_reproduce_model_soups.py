"""experiments/reproduce_model_soups.sh, shrunk: the paper's reproduction from the released ingredients run
end to end on three random-weight files in the official format (tests/test_import_ingredients.py's writer:
open_clip's CLIP in the official ModelWrapper), a tiny base CLIP, official results files of the official
format with made-up numbers, and ``tfds.testing.mock_data``.

The script runs as users run it; only ``python`` on its PATH is a stand-in that changes two things for
``python -m soupjax.*`` (the import and every cook): the data are ``tfds.testing.mock_data``, and the
config the script names gets its ``testing`` option (the tiny CLIP of tests/clip_files.py on 32 px
images). Everything else (the class names and templates written from open_clip, the comparison script)
runs with the real interpreter. The full run finds a templates file of 2 templates where the script
writes open_clip's 80 (it keeps a file it finds, as on a rerun): the tiny text tower's 80,000 texts
would take two minutes of the test; that the script writes the 80 is checked on its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from test_experiment import python_stand_in  # noqa: E402
from test_import_ingredients import write_model_soups_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "reproduce_model_soups.sh"
SHIFTS = "imagenet_v2,imagenet_r"
RECIPES = ("uniform", "greedy", "learned", "ensemble", "wise_ft")
# Options a user adds to the cook (SOUP_OPTIONS): here fewer WiSE-FT points and learned epochs, for time.
SOUP_OPTIONS = "--wise_ft_alphas=0,0.5,1 --learned_epochs=1"

# The stand-in for `python`. A `-m soupjax.X` command runs the real module's command line under mock data
# (tests/conftest.py's mock_data: the pipeline's memory cleared, mocked builders count as prepared), the
# config file the script names shrunk to its `testing` option; anything else is the real interpreter.
_FAKE_PYTHON = r"""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["SOUPJAX_TEST_RECORD"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[:2] == ["-m", os.environ.get("SOUPJAX_TEST_STOP_AT")]:
    sys.exit(3)
if args[:1] != ["-m"] or not args[1].startswith("soupjax."):
    os.execv(os.environ["SOUPJAX_TEST_PYTHON"], [os.environ["SOUPJAX_TEST_PYTHON"], *args])
shrunk = [a.replace("imagenet_clip_vit_b32.py:", "imagenet_clip_vit_b32.py:testing,") for a in args[2:]]
sys.path.insert(0, os.environ["SOUPJAX_TEST_DIR"])
import conftest  # noqa: F401  (installs soupjax's mock_data)
import runpy
import tensorflow_datasets as tfds
sys.argv = [args[1], *shrunk]
with tfds.testing.mock_data(num_examples=16):
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
"""

# Official results files in the official format (mlfoundations/model-soups: one JSON object a line, accuracies
# as fractions), with made-up numbers.
_KEYS = ("ImageNet2p", "ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetR", "ObjectNet", "ImageNetA")


def write_official_results(directory: Path, count: int) -> Path:
    """A stand-in checkout of mlfoundations/model-soups with its four results files."""
    directory.mkdir(parents=True)

    def result(name: str, base: float) -> str:
        return json.dumps({"model_name": name, **{k: round(base - 0.05 * i, 4) for i, k in enumerate(_KEYS)}})

    (directory / "individual_model_results.jsonl").write_text(
        "".join(result(f"model_{i}", 0.7 + 0.01 * i) + "\n" for i in range(count)))
    (directory / "uniform_soup_results.jsonl").write_text(result("uniform_soup", 0.8) + "\n")
    (directory / "greedy_soup_results.jsonl").write_text(result("greedy_soup", 0.81) + "\n")
    (directory / "ensemble_results.jsonl").write_text(result("ensemble", 0.82) + "\n")
    return directory


def run_script(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=python_stand_in(tmp_path, _FAKE_PYTHON), JAX_PLATFORMS="cpu",
               SOUPJAX_TEST_RECORD=str(tmp_path / "commands.jsonl"), SOUPJAX_TEST_PYTHON=sys.executable,
               SOUPJAX_TEST_DIR=str(ROOT / "tests"), PYTHONPATH=str(ROOT), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)


def commands(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "commands.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_the_script_imports_cooks_and_prints_both_columns(tmp_path):
    base, files = write_model_soups_files(tmp_path / "files", 3)
    official = write_official_results(tmp_path / "model-soups", 3)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    workdir = tmp_path / "work"
    (workdir / "zeroshot").mkdir(parents=True)
    (workdir / "zeroshot" / "templates.txt").write_text("a bad photo of a {}.\na photo of many {}.\n")
    args = [str(files[0].parent), str(base), str(official), str(data_dir), str(workdir)]
    out = run_script(args, tmp_path, SHIFTS=SHIFTS, SOUP_OPTIONS=SOUP_OPTIONS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # The import got the files, the base, open_clip's class names and the templates file it found.
    assert len((workdir / "zeroshot" / "classnames.txt").read_text().splitlines()) == 1000
    assert len((workdir / "zeroshot" / "templates.txt").read_text().splitlines()) == 2
    soupjax_commands = [c for c in commands(tmp_path) if c[:1] == ["-m"]]
    imports = [c for c in soupjax_commands if c[1] == "soupjax.import_ingredients"]
    assert len(imports) == 1
    assert imports[0][-3:] == [str(f) for f in files]
    assert "--base" in imports[0] and imports[0][imports[0].index("--base") + 1] == str(base)
    assert "3 ingredients in" in out.stdout and "with their start" in out.stdout
    assert (workdir / "ingredients" / "start").is_dir()

    # The recipes cooked by one command into one directory and one report.
    cooks = [c for c in soupjax_commands if c[1] == "soupjax.soup"]
    assert [c[c.index("--recipe") + 1] for c in cooks] == [",".join(RECIPES)]
    assert all(option in cooks[0] for option in SOUP_OPTIONS.split()), "SOUP_OPTIONS reach the cook"
    report = json.loads((workdir / "soups" / "report.json").read_text())
    assert report["meta"]["recipes"] == list(RECIPES)
    assert report["meta"]["splits"]["shifts"] == SHIFTS.split(",")
    for soup in ("uniform", "greedy", "learned_global", "learned_layer", "wise_ft_best_ingredient",
                 "wise_ft_uniform", "wise_ft_greedy"):
        assert (workdir / "soups" / soup / "meta.json").is_file(), soup

    # The table: ours and the official side by side, the differences, and what cannot be compared.
    table = (workdir / "comparison.md").read_text()
    assert table in out.stdout
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| | held-out"))
    assert header == "| | held-out | ImageNet | ImageNet-V2 | ImageNet-R | mean of 2 shifts | ObjectNet |"
    for ours, theirs in (("soupjax uniform", "official uniform_soup"), ("soupjax greedy", "official greedy_soup"),
                         ("soupjax ensemble", "official ensemble"),
                         ("soupjax best_ingredient (model_", "official best on ImageNet2p (model_2")):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"| {ours}"))
        assert lines[at + 1].startswith(f"| {theirs}"), (ours, lines[at + 1])
        assert lines[at + 2].startswith("| difference (soupjax − official)")
        # ObjectNet: ours n/a, theirs published; no difference for it nor for the held-out split.
        assert lines[at].rstrip(" |").endswith("n/a") and not lines[at + 1].rstrip(" |").endswith("n/a")
    uniform_official = next(line for line in lines if line.startswith("| official uniform_soup"))
    assert "| 80.00 | 75.00 | 70.00 | 60.00 | 65.00 | 55.00 |" in uniform_official  # V2, R (not Sketch), mean
    for name in ("learned_global", "learned_layer", "wise_ft_uniform"):
        assert any(line.startswith(f"| soupjax {name}") for line in lines), name
    assert "No official numbers are published for learned_global, learned_layer" in table
    assert all(f"| model_{i} |" in table for i in range(3)) and "over 3 ingredients" in table
    assert "ObjectNet, the paper's fifth shift, is not in TFDS" in table

    # A rerun continues: nothing imported or cooked again, the same table.
    again = run_script(args, tmp_path, SHIFTS=SHIFTS, SOUP_OPTIONS=SOUP_OPTIONS)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stderr.count("skipped=already imported") == 3
    for soup in ("uniform", "greedy", "learned_global", "learned_layer", "wise_ft_uniform"):
        assert f"{soup}: cooked earlier, reused" in again.stdout, soup


@pytest.mark.slow
def test_the_script_writes_open_clips_class_names_and_templates_for_the_import(tmp_path):
    """Step 1 alone (the stand-in stops the script at the import): OpenAI's class names and 80 templates as
    the installed open_clip ships them, and the import command that reads them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    base, files = write_model_soups_files(tmp_path / "files", 1)
    official = write_official_results(tmp_path / "model-soups", 1)
    workdir = tmp_path / "work"
    out = run_script([str(files[0].parent), str(base), str(official), str(tmp_path), str(workdir)], tmp_path,
                     SOUPJAX_TEST_STOP_AT="soupjax.import_ingredients")
    assert out.returncode == 3, out.stderr[-3000:]
    zeroshot = workdir / "zeroshot"
    assert (zeroshot / "classnames.txt").read_text().splitlines() == list(IMAGENET_CLASSNAMES)
    assert (zeroshot / "templates.txt").read_text().splitlines() == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert not list(zeroshot.glob("*.tmp"))
    command = commands(tmp_path)[-1]
    assert command[:2] == ["-m", "soupjax.import_ingredients"]
    flags = dict(zip(command[2:-1:2], command[3:-1:2]))
    assert flags["--format"] == "model-soups" and flags["--base"] == str(base)
    assert flags["--config"].endswith(f"configs/imagenet_clip_vit_b32.py:data_dir={tmp_path}")
    assert flags["--classnames"] == str(zeroshot / "classnames.txt")
    assert flags["--templates"] == str(zeroshot / "templates.txt")
    assert flags["--tokenizer"].endswith("open_clip/bpe_simple_vocab_16e6.txt.gz")
    assert command[-1] == str(files[0])


def test_the_script_refuses_to_start_without_its_inputs(tmp_path):
    out = run_script([], tmp_path)
    assert out.returncode != 0 and "path of the directory of the released model_N.pt files" in out.stderr
    assert "usage:" in out.stderr
    files = tmp_path / "files"
    files.mkdir()
    out = run_script([str(files), str(tmp_path / "clip.pt"), str(tmp_path), str(tmp_path)], tmp_path)
    assert out.returncode == 2 and "no model_*.pt files in" in out.stderr
    (files / "model_0.pt").write_bytes(b"")
    (tmp_path / "clip.pt").write_bytes(b"")
    out = run_script([str(files), str(tmp_path / "clip.pt"), str(tmp_path), str(tmp_path)], tmp_path)
    assert out.returncode == 2 and "individual_model_results.jsonl: no such file" in out.stderr
    assert not commands(tmp_path), "nothing started"


def _compare_official():
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_official", ROOT / "experiments" / "compare_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name: str, accuracy: float, **more) -> dict:
    return {"name": name, "heldout": accuracy + 0.1, "test": {"accuracy": accuracy, "loss": 1.0},
            "shifts": {"imagenet_v2": accuracy - 0.1, "imagenet_a": accuracy - 0.3}, **more}


def test_compare_official_puts_each_official_row_under_ours(tmp_path, capsys):
    """The comparison alone, on reports as soupjax writes them (two recipes, ImageNet-V2 and -A reported) and
    an official checkout without ensemble_results.jsonl: the differences, and nothing where none can be."""
    compare = _compare_official()
    official = write_official_results(tmp_path / "model-soups", 2)
    (official / "ensemble_results.jsonl").unlink()
    meta = {"splits": {"shifts": ["imagenet_v2", "imagenet_a"]}}
    ingredients = [_row("model_0", 0.5), _row("model_1", 0.6), _row("model_9", 0.1)]
    reports = []
    for recipe, soups in (("uniform", [_row("best_ingredient", 0.6, ingredient="model_1"), _row("uniform", 0.7)]),
                          ("ensemble", [_row("best_ingredient", 0.0, ingredient="model_0"), _row("ensemble", 0.8)])):
        reports.append(tmp_path / f"{recipe}.json")
        reports[-1].write_text(json.dumps({"meta": meta, "soups": soups, "ingredients": ingredients}))
    assert compare.main(["--official", str(official), "--out", str(tmp_path / "table.md"), *map(str, reports)]) == 0
    table = capsys.readouterr().out
    assert (tmp_path / "table.md").read_text() == table
    lines = table.splitlines()
    assert "| | held-out | ImageNet | ImageNet-V2 | ImageNet-A | mean of 2 shifts | ObjectNet |" in lines
    at = lines.index("| soupjax uniform | 80.00 | 70.00 | 60.00 | 40.00 | 50.00 | n/a |")
    # Official uniform: held-out 80, ImageNet 75, V2 70, A 50 (mean 60), ObjectNet 55.
    assert lines[at + 1] == "| official uniform_soup (uniform_soup_results.jsonl) | 80.00 | 75.00 | 70.00 | 50.00 | 60.00 | 55.00 |"
    assert lines[at + 2] == "| difference (soupjax − official), points |  | -5.00 | -10.00 | -10.00 | -10.00 |  |"
    # The first report's best ingredient; the official best is model_1 on ImageNet2p (0.71).
    at = lines.index("| soupjax best_ingredient (model_1) | 70.00 | 60.00 | 50.00 | 30.00 | 40.00 | n/a |")
    assert lines[at + 1].startswith("| official best on ImageNet2p (model_1, individual_model_results.jsonl) |")
    assert "| soupjax ensemble |" in table and "official ensemble" not in table
    assert "No official numbers are published for ensemble" in table
    assert "| model_1 | 60.00 | 66.00 | -6.00 |" in table and "over 2 ingredients: mean -10.50 points, largest -15.00 (model_0)" in table
    assert "Not in individual_model_results.jsonl: model_9." in table


def test_compare_official_refuses_bad_input_in_one_line(tmp_path, capsys):
    compare = _compare_official()
    official = write_official_results(tmp_path / "model-soups", 1)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"soups": []}))
    (official / "greedy_soup_results.jsonl").unlink()
    assert compare.main(["--official", str(official), str(report)]) == 2
    assert "greedy_soup_results.jsonl: no such file" in capsys.readouterr().err
    (official / "greedy_soup_results.jsonl").write_text('{"model_name": "greedy_soup", "ImageNet": 0.8}\n')
    assert compare.main(["--official", str(official), str(report)]) == 2
    assert "has no ImageNet2p accuracy (not the official results format)" in capsys.readouterr().err
    (official / "greedy_soup_results.jsonl").write_text("not json\n")
    assert compare.main(["--official", str(official), str(report)]) == 2
    assert "greedy_soup_results.jsonl, line 1: not JSON" in capsys.readouterr().err
    report.write_text("[]")
    write_official_results(tmp_path / "other", 1)
    assert compare.main(["--official", str(tmp_path / "other"), str(report)]) == 2
    assert "not a soupjax report.json" in capsys.readouterr().err
