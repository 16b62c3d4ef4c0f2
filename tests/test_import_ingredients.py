"""The released model-soups ingredients imported (``python -m soupjax.import_ingredients``, ``api.import_ingredients``)
and checked against the official code on tiny random-weight stand-ins written the way the official code wrote
its ``model_{i}.pt``: a ModelWrapper around an open_clip CLIP, its text transformer deleted, and a head on the
normalised image features. Each imported ingredient must give the wrapper's logits, and their uniform soup the
logits of the official main.py's averaged state dict, within 1e-4."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import jax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from clip_files import EMBED, IMAGE, tiny_open_clip, write_open_clip_file  # noqa: E402
from soupjax import api  # noqa: E402
from soupjax.cli.errors import InputError  # noqa: E402
from soupjax.importers.fingerprint import weights_fingerprint  # noqa: E402
from soupjax.io import checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'imagenet_clip_vit_b32.py'}:testing"
CLASSES = 1000  # the testing config's data set is imagenet2012
TEMPLATES = ("a photo of a {}.", "a sketch of the {}.")


class OfficialWrapper(torch.nn.Module):
    """What the official ``ModelWrapper(normalize=True)`` is: a CLIP whose text transformer is deleted, and
    a linear head on the L2-normalised image features."""

    def __init__(self, clip, num_classes: int):
        super().__init__()
        self.model = clip
        self.classification_head = torch.nn.Linear(EMBED, num_classes)
        del self.model.transformer  # the language part goes, as in the official wrapper

    def forward(self, images):
        features = self.model.encode_image(images)
        return self.classification_head(features / features.norm(dim=-1, keepdim=True))


def official_model(state_dict) -> OfficialWrapper:
    """The official ``get_model_from_sd``: a wrapper of the right size with the state dict loaded (strict)."""
    wrapper = OfficialWrapper(tiny_open_clip(), state_dict["classification_head.weight"].shape[0])
    wrapper.load_state_dict(state_dict)
    return wrapper.float().eval()


def write_model_soups_files(directory: Path, count: int = 3, *, seed: int = 0, num_classes: int = CLASSES,
                            base=None) -> tuple[Path, list[Path]]:
    """The CLIP the ingredients start from (``directory/base/clip.pt``, tokenizer beside it) and ``count``
    files in the official format (``directory/released/model_{i}.pt``): the base's image tower moved as
    fine-tuning moves it and a head of its own each."""
    base = base if base is not None else tiny_open_clip(seed=seed)
    base_file = write_open_clip_file(base, directory / "base")
    (directory / "released").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        wrapper = OfficialWrapper(copy.deepcopy(base), num_classes)
        gen = torch.Generator().manual_seed(1000 * seed + i)
        with torch.no_grad():
            for p in wrapper.model.visual.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
            wrapper.classification_head.weight.copy_(torch.randn(num_classes, EMBED, generator=gen))
            wrapper.classification_head.bias.copy_(0.1 * torch.randn(num_classes, generator=gen))
        path = directory / "released" / f"model_{i}.pt"
        torch.save(wrapper.state_dict(), path)
        files.append(path)
    return base_file, files


def write_classnames(path: Path, count: int = CLASSES) -> Path:
    path.write_text("".join(f"thing number {i}\n" for i in range(count)))
    return path


def images(count: int = 4, seed: int = 0) -> np.ndarray:
    """NHWC float32 images, as preprocessed ones (roughly CLIP's normalised range)."""
    return np.random.default_rng(seed).normal(size=(count, IMAGE, IMAGE, 3)).astype(np.float32)


def torch_logits(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_soups")
    base, files = write_model_soups_files(root)
    classnames = write_classnames(root / "classnames.txt")
    templates = root / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    return {"root": root, "base": base, "files": files, "classnames": classnames, "templates": templates}


@pytest.fixture(scope="module")
def imported(released):
    """The three files imported with the base (the start written) by the API."""
    out = released["root"] / "ingredients"
    made = api.import_ingredients(released["files"], out, base=released["base"], config=CONFIG,
                                  classnames=released["classnames"], templates=released["templates"])
    return out, made


def test_imported_ingredients_give_the_official_wrappers_logits(released, imported):
    _, made = imported
    assert [p.name for p in made] == ["model_0", "model_1", "model_2"]
    batch = images()
    worst = 0.0
    for path, directory in zip(released["files"], made):
        want = torch_logits(official_model(torch.load(path, weights_only=True)), batch)
        with jax.default_matmul_precision("highest"):
            got = api.predict(directory, batch)
        assert got.shape == want.shape == (4, CLASSES)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"imported ingredient vs the official wrapper: max |logit difference| {worst:.2e}")
    assert worst < 1e-4


def test_uniform_soup_is_the_official_averaging(released, imported):
    """main.py's uniform soup: every state dict times 1/N, summed, loaded into the wrapper."""
    out, _ = imported
    states = [torch.load(path, weights_only=True) for path in released["files"]]
    averaged = {k: sum(s[k] * (1.0 / len(states)) for s in states) for k in states[0]}
    batch = images(seed=1)
    want = torch_logits(official_model(averaged), batch)
    ingredients = api.load_ingredients(out)
    soup = api.merge("uniform", ingredients)
    with jax.default_matmul_precision("highest"):
        got = api.predict(soup, batch, ingredients=ingredients)
    print(f"uniform soup vs main.py's averaging: max |logit difference| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 1e-4


def test_meta_json_records_the_source_and_the_start(released, imported):
    out, made = imported
    start_meta = checkpoints.load_meta(out / "start")
    start = checkpoints.load_variables(out / "start")
    assert weights_fingerprint(start) == start_meta["start_fingerprint"]
    for path, directory in zip(released["files"], made):
        meta = checkpoints.load_meta(directory)
        assert meta["name"] == directory.name and meta["format"] == "model-soups"
        assert meta["source"]["file"] == str(path) and meta["source"]["bytes"] == path.stat().st_size
        import hashlib
        assert meta["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["activation"] == "quick_gelu"
        assert meta["init_fingerprint"] == start_meta["init_fingerprint"]
        assert meta["start_fingerprint"] == start_meta["start_fingerprint"]
        assert meta["config"]["model"]["name"] == "clip-testing" and meta["config"]["head_init"] == "zeroshot"
        assert meta["config"]["init_from"]["path"] == str(released["base"])
        assert "start_note" not in meta
    # The start: the base's image tower and 100 x the zero-shot classifier of the class names in the templates.
    names = released["classnames"].read_text().splitlines()
    with jax.default_matmul_precision("highest"):
        head = api.zeroshot_head(released["base"], names, TEMPLATES)
    np.testing.assert_allclose(start["params"]["head"]["kernel"], 100 * head, atol=1e-4)
    assert not np.asarray(start["params"]["head"]["bias"]).any()
    from soupjax.importers.clip_checkpoint import read_clip
    from soupjax.io.trees import flatten
    want = flatten(read_clip(released["base"]).image_params)
    got = flatten(start["params"]["visual"])
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_second_import_skips_what_is_imported(released, imported, capsys):
    out, made = imported
    before = {p.name: (p / "meta.json").read_text() for p in made}
    again = api.import_ingredients(released["files"], out, base=released["base"], config=CONFIG,
                                   classnames=released["classnames"], templates=released["templates"])
    assert again == made
    assert {p.name: (p / "meta.json").read_text() for p in made} == before, "nothing written again"
    assert capsys.readouterr().err.count("skipped=already imported") == 3


def test_another_file_of_the_same_name_is_refused_unless_overwrite(released, tmp_path):
    out = tmp_path / "ingredients"
    first = api.import_ingredients(released["files"][:1], out, config=CONFIG)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = other_dir / "model_0.pt"
    other.write_bytes(released["files"][1].read_bytes())
    with pytest.raises(InputError, match=r"holds an ingredient imported from another file .*--overwrite"):
        api.import_ingredients([other], out, config=CONFIG)
    api.import_ingredients([other], out, config=CONFIG, overwrite=True)
    assert checkpoints.load_meta(first[0])["source"]["file"] == str(other)


def test_without_a_base_there_is_no_start_and_the_merges_say_why(released, tmp_path):
    out = tmp_path / "ingredients"
    made = api.import_ingredients(released["files"], out, config=CONFIG)
    assert not (out / "start").exists()
    meta = checkpoints.load_meta(made[0])
    assert "init_fingerprint" not in meta and "import again with --base" in meta["start_note"]
    ingredients = api.load_ingredients(out)  # the soups' pre-flight checks pass
    assert len(ingredients) == 3
    # What shared_init.start_problem says of ingredients without init_fingerprint (or, where it reads the
    # start_note they record, that note).
    with pytest.raises(InputError, match="does not record the init|import again with --base"):
        api.merge("task_arithmetic", ingredients, lam=0.5)
    # The ingredients are the same models as with a base: only the provenance differs.
    batch = images(seed=2)
    want = torch_logits(official_model(torch.load(released["files"][0], weights_only=True)), batch)
    with jax.default_matmul_precision("highest"):
        assert np.abs(api.predict(made[0], batch) - want).max() < 1e-4


def _refused(match: str, files, tmp_path, **kwargs) -> None:
    out = tmp_path / "refused"
    with pytest.raises(InputError, match=match):
        api.import_ingredients(files, out, **{"config": CONFIG, **kwargs})
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"


def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(released, tmp_path):
    files = released["files"]
    _refused(r"missing_7\.pt: no such file", [*files, tmp_path / "missing_7.pt"], tmp_path)
    _refused(r"clip\.pt: not a model-soups file \(a CLIP checkpoint without the ModelWrapper's classification head",
             [*files, released["base"]], tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    _refused(r"junk\.pt: not a model-soups file", [junk], tmp_path)
    # A file of another size: another head (10 classes), then another width.
    _, small_head = write_model_soups_files(tmp_path / "ten", 1, num_classes=10, base=tiny_open_clip())
    renamed = small_head[0].with_name("model_9.pt")
    small_head[0].rename(renamed)
    _refused(r"model_9\.pt: tensor classification_head\.bias is of shape \(10,\), but .*model_0\.pt has \(1000,\): "
             r"the files are of different sizes", [*files, renamed], tmp_path)
    # One file alone that is not the config's model: 10 classes where the data set has 1000.
    _refused(r"model_9\.pt: tensor classification_head\.weight has shape \(10, 16\), but the config's model "
             r"clip-testing at 32 px with 1000 classes needs \(1000, 16\)", [renamed], tmp_path)
    _refused(r"would both be the ingredient 'model_0'", [files[0], files[0]], tmp_path)
    _refused(r"--base .*nowhere\.pt: no such file", files, tmp_path, base=tmp_path / "nowhere.pt")
    # What the zero-shot start needs, checked before the first write: words for class names, a tokenizer.
    _refused(r"label names are WordNet ids", files, tmp_path, base=released["base"])
    bare = tmp_path / "bare" / "clip.pt"
    bare.parent.mkdir()
    bare.write_bytes(released["base"].read_bytes())
    _refused(r"tokenizer", files, tmp_path, base=bare, classnames=released["classnames"])
    _refused(r"model 'vit-testing' is not a CLIP", files, tmp_path,
             config=f"{ROOT / 'configs' / 'fashion_mnist_vit.py'}:testing")


def _as_numpy(tensor) -> np.ndarray:
    return (tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor).numpy()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_per_tensor_reader_gives_what_torch_reads(tmp_path, suffix):
    """Each tensor read alone from the file's records is the tensor torch.load (or safetensors) gives: every
    dtype soupjax meets, and for torch.save's zips the tensors that are a part of a storage (an offset, a
    transpose, two tensors sharing one) or a training checkpoint's wrapper."""
    from soupjax.importers.clip_torch_archive import safetensors_tensors, state_dict_tensors
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 5, generator=gen)
    state = {"w": torch.randn(7, 3, generator=gen), "half": torch.randn(4, 2, generator=gen).half(),
             "bf16": torch.randn(3, 5, generator=gen).bfloat16(), "ids": torch.arange(9).reshape(3, 3),
             "scalar": torch.tensor(4.6052), "empty": torch.zeros(0, 4), "mask": torch.rand(5, generator=gen) > 0.5}
    if suffix == ".pt":
        state.update({"transposed": shared.t(), "rows": shared[2:5], "column": shared[:, 1]})
        path = tmp_path / "state.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
        lazy = state_dict_tensors(path)
        want = {k: _as_numpy(v) for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
        want = {k.removeprefix("module."): v for k, v in want.items()}
    else:
        from safetensors.torch import save_file
        path = tmp_path / "state.safetensors"
        save_file(state, str(path))
        lazy = safetensors_tensors(path)
        want = {k: _as_numpy(v) for k, v in state.items()}
    assert set(lazy) == set(want)
    for name, tensor in lazy.items():
        assert tuple(tensor.shape) == want[name].shape, name
        got = tensor.numpy()
        assert got.dtype == want[name].dtype, (name, got.dtype, want[name].dtype)
        np.testing.assert_array_equal(got, want[name], err_msg=name)


def _tiny_import_parts(files):
    """What import_model_soups builds before it reads a file: the surveyed files, the model, its shapes."""
    from soupjax import data
    from soupjax.config.base import load_config
    from soupjax.importers import model_soups
    from soupjax.models import build_model_from_run_config
    from soupjax.training.shared_init import input_shape
    config, _ = model_soups.import_config(load_config(CONFIG))
    model = build_model_from_run_config(config, "quick_gelu")
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros(input_shape(config)),
                                                 train=False))
    assert data.num_classes(config.data) == CLASSES
    return model_soups.survey(files), model, abstract


def test_an_import_holds_one_source_tensor_at_a_time(released, tmp_path, monkeypatch):
    """Reading a model-soups file (torch.save's zip, or the same tensors as safetensors) keeps the converted
    tree and one source tensor: the traced peak stays under 1.5 x the tree (+ 1 MiB for the pickle's
    objects), though the file also holds the text tower's 12.6 MB token embedding and the tree is ~0.5 MB.
    Torch is not needed to read it. Both files give the same arrays."""
    import tracemalloc

    from safetensors.torch import save_file

    from soupjax.importers import model_soups
    from soupjax.io.trees import flatten
    pt = released["files"][0]
    as_safetensors = tmp_path / "model_0_st.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(pt, weights_only=True).items()}, str(as_safetensors))
    surveyed, model, abstract = _tiny_import_parts([pt, as_safetensors])
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
    read = []
    for released_file in surveyed:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            variables = model_soups.read_ingredient(released_file, model, abstract, "quick_gelu")
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        tree = sum(np.asarray(v).nbytes for v in flatten(variables).values())
        print(f"{released_file.path.name}: file {released_file.size / 2**20:.1f} MiB, tree {tree / 2**20:.2f} MiB, "
              f"traced peak while reading {peak / 2**20:.2f} MiB")
        assert peak < 1.5 * tree + 2**20, (peak, tree)
        read.append(flatten(variables))
    assert set(read[0]) == set(read[1])
    for key in read[0]:
        np.testing.assert_array_equal(read[0][key], read[1][key], err_msg=key)


def test_read_clip_without_the_image_tower_reads_the_text_tower_alone(released, monkeypatch):
    """read_clip(image=False), for a zero-shot head: the text tower as a full read gives it, the image tower's
    size known, and none of its tensors read."""
    from soupjax.importers import clip_torch_archive
    from soupjax.importers.clip_checkpoint import read_clip
    from soupjax.io.trees import flatten
    full = read_clip(released["base"])
    read = []
    numpy = clip_torch_archive.ArchiveTensor.numpy
    monkeypatch.setattr(clip_torch_archive.ArchiveTensor, "numpy",
                        lambda self: read.append(self.storage.key) or numpy(self))
    text_only = read_clip(released["base"], image=False)
    assert text_only.image_params is None and text_only.vision == full.vision
    visual = {t.storage.key for k, t in clip_torch_archive.state_dict_tensors(released["base"]).items()
              if k.startswith("visual.")}
    assert read and not visual & set(read), "an image-tower tensor was read"
    want, got = flatten(full.text_params), flatten(text_only.text_params)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soupjax.import_ingredients", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_the_command_feeds_soup(released, tmp_path):
    """The command end to end (in a process of its own), then the cook: the uniform soup it saves is the
    official averaging, and a merge and WiSE-FT cook from the start the command wrote."""
    out = tmp_path / "ingredients"
    done = _command("--format", "model-soups", "--out", out, "--config", CONFIG, "--base", released["base"],
                    "--classnames", released["classnames"], "--templates", released["templates"], *released["files"])
    assert done.returncode == 0, done.stderr
    assert "3 ingredients in" in done.stdout and "with their start" in done.stdout
    assert done.stderr.count("[import] ") == 3 and "files/s" in done.stderr and "eta" in done.stderr
    with tfds.testing.mock_data(num_examples=16):
        # A soup, a merge and WiSE-FT in one cook (a --recipe list).
        cooked = api.cook("uniform,task_arithmetic,wise_ft", out, tmp_path / "soups", shifts=[],
                          task_arithmetic_scales="0.5", wise_ft_of="best_ingredient", wise_ft_alphas="0,0.5,1")
    names = {r["name"] for r in cooked["soups"]}
    assert {"uniform", "task_arithmetic"} <= names and any(n.startswith("wise_ft") for n in names), names
    states = [torch.load(path, weights_only=True) for path in released["files"]]
    averaged = {k: sum(s[k] * (1.0 / len(states)) for s in states) for k in states[0]}
    batch = images(seed=3)
    want = torch_logits(official_model(averaged), batch)
    with jax.default_matmul_precision("highest"):
        got = api.predict(tmp_path / "soups" / "uniform", batch)
    print(f"cooked uniform soup vs main.py's averaging: max |logit difference| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_without_a_base_the_cook_leaves_the_merges_out_saying_why(released, tmp_path, capsys):
    out = tmp_path / "ingredients"
    api.import_ingredients(released["files"], out, config=CONFIG)
    with tfds.testing.mock_data(num_examples=16):
        with pytest.raises(InputError, match="--recipe=ties works on the displacements from the shared init, which "
                                             "is unknown"):
            api.cook("ties", out, tmp_path / "ties", shifts=[])
        results = api.cook("uniform", out, tmp_path / "soups", shifts=[])
    assert [r["name"] for r in results["soups"]] == ["best_ingredient", "uniform"]


@pytest.mark.slow
def test_the_command_refuses_bad_input_in_one_line(released, tmp_path):
    out = tmp_path / "ingredients"
    done = _command("--format", "model-soups", "--out", out, "--config", CONFIG, released["files"][0],
                    tmp_path / "model_5.pt")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("soupjax.import_ingredients: error: ") and "model_5.pt: no such file" in lines[-1]
    assert not [line for line in lines if "Traceback" in line]
    assert not out.exists()
    for args, said in ((["--out", out, released["files"][0]], "--format is required"),
                       (["--format", "model-soups", released["files"][0]], "--out is required"),
                       (["--format", "model-soups", "--out", out], "no files to import"),
                       (["--format", "npz", "--out", out, released["files"][0]], "--format")):
        done = _command(*args)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
