"""Files from elsewhere are read as data: a checkpoint, an .npz, a meta.json or an option string
never runs code, and a file that would is refused with one error naming it.

Every payload here is a pickle whose unpickling creates a marker file (``open(path, 'w')``, no shell).
Each test first shows that the payload does create its marker when unpickled the unsafe way, so the
absence of the marker afterwards means something.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soupjax.io import checkpoints
from soupjax.cli.errors import InputError
from soupjax.config.base import parse_options, refuse_changed
from soupjax.importers.dispatch import load_pretrained
from soupjax.importers.sources.npz import load_npz
from soupjax.importers.sources.timm import load_timm_state_dict
from test_bad_input_training import assert_refused

ROOT = Path(__file__).resolve().parents[1]


class _CreatesFile:
    """Unpickling this object calls ``open(path, 'w')``: a file appears if the loader runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(marker: Path) -> dict:
    """A state dict whose one 'tensor' is the file-creating object."""
    return {"patch_embed.proj.weight": _CreatesFile(marker)}


def _check_payload_works(tmp_path: Path) -> None:
    # Control: the same payload, unpickled by plain pickle, does create its file.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_payload(control)))
    assert control.exists()
    os.remove(control)


def _write_raw_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(_payload(marker), f, protocol=2)  # torch's own protocol: no warning, same refusal


def _write_torch_zip(path: Path, marker: Path, wrapper: str | None = None) -> None:
    torch = pytest.importorskip("torch")
    obj = _payload(marker)
    torch.save({wrapper: obj} if wrapper else obj, path)


@pytest.mark.parametrize("suffix,writer", [
    (".pth", "raw_pickle"),    # a bare pickle, torch's legacy format
    (".bin", "torch_zip"),     # torch.save's zip format, as Hugging Face pytorch_model.bin
    (".pt", "torch_zip_wrapped"),  # a training checkpoint {'state_dict': ...}
])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, suffix, writer):
    pytest.importorskip("torch")
    _check_payload_works(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if writer == "raw_pickle":
        _write_raw_pickle(path, marker)
    else:
        _write_torch_zip(path, marker, "state_dict" if writer == "torch_zip_wrapped" else None)

    for load in (lambda: load_timm_state_dict(path), lambda: load_pretrained(path, {"params": {}})):
        with pytest.raises(InputError) as info:
            load()
        message = str(info.value)
        assert str(path) in message
        assert "not a plain tensor state dict" in message and "weights_only=True" in message
        assert "Unsupported global: GLOBAL io.open" in message, "the refused global is named"
        assert "\n" not in message, "one line, not torch's dozen"
        assert not marker.exists(), "unpickling ran code"


def test_a_pickled_model_instead_of_a_state_dict_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 3), path)  # the whole module, a class weights_only does not allow
    with pytest.raises(InputError, match=r"whole_model\.pt: not a plain tensor state dict"):
        load_timm_state_dict(path)


def test_a_checkpoint_holding_no_mapping_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)  # allowed by weights_only, but not a state dict
    with pytest.raises(InputError, match=r"list\.pth: holds a list, not a state dict"):
        load_timm_state_dict(path)


def test_an_npz_with_a_pickled_object_array_is_refused_without_unpickling(tmp_path):
    _check_payload_works(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    good = np.zeros((2, 3), np.float32)
    bad = np.empty(1, dtype=object)
    bad[0] = _CreatesFile(marker)
    np.savez(path, **{"embedding/bias": good, "embedding/kernel": bad})  # np.savez pickles object arrays
    for load in (lambda: load_npz(path), lambda: load_pretrained(path, {"params": {}})):
        with pytest.raises(InputError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "'embedding/kernel'" in message
        assert "pickled object array" in message and "allow_pickle=False" in message
        assert not marker.exists()


def test_a_pickle_saved_as_npz_is_refused_without_unpickling(tmp_path):
    _check_payload_works(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    _write_raw_pickle(path, marker)
    with pytest.raises(InputError, match=r"evil\.npz: not a readable \.npz archive of arrays \(.*pickled"):
        load_npz(path)
    assert not marker.exists()


@pytest.mark.parametrize("header,what", [
    (struct.pack("<Q", 1 << 40) + b"{}", "a header longer than the file"),
    (struct.pack("<Q", 12) + b"not json !!!" + b"\0" * 8, "a header that is not JSON"),
    (b"\x00\x01", "a file too short to hold a header"),
])
def test_a_safetensors_file_with_a_bogus_header_is_named(tmp_path, header, what):
    path = tmp_path / "bogus.safetensors"
    path.write_bytes(header)
    with pytest.raises(InputError, match=r"bogus\.safetensors: not a readable safetensors file"):
        load_timm_state_dict(path)


def test_meta_json_strings_are_data(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    ingredient = tmp_path / "ingredient"
    ingredient.mkdir()
    (ingredient / checkpoints.META_FILE).write_text(json.dumps(
        {"name": code, "config": {"name": code, "init_from": {"path": code}}, "hparams": {"seed": code}}))
    meta = checkpoints.load_meta(ingredient)
    assert meta["name"] == code and meta["config"]["init_from"]["path"] == code
    # The sweep compares a stored config with the requested one; the strings are compared, not run.
    with pytest.raises(ValueError, match="differing fields: name"):
        refuse_changed(meta["config"], {"name": "x", "init_from": {"path": code}}, "the ingredient")
    assert not marker.exists()


def test_option_strings_are_literals_or_strings_never_code(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    assert parse_options(f"foo={code},n=8,lr=1e-3,xs=[1]") == {"foo": code, "n": 8, "lr": 1e-3, "xs": [1]}
    # The same through a real config file's option, which lands in init_from.path as a string.
    spec = importlib.util.spec_from_file_location("cfg_untrusted", ROOT / "configs" / "fashion_mnist_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config(f"testing,init={code}").init_from.path == code
    assert not marker.exists()


@pytest.mark.slow
def test_finetune_cli_refuses_a_code_running_checkpoint(tmp_path, fashion_mnist_data_dir):
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_raw_pickle(path, marker)
    cmd = [sys.executable, "-m", "soupjax.finetune", "--config", "configs/fashion_mnist_vit.py:testing",
           f"--config.init_from.path={path}", f"--config.data.data_dir={fashion_mnist_data_dir}",
           f"--workdir={tmp_path}/w"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    # Exit status 2 and one error line naming the file (after TensorFlow's start-up logs).
    assert_refused(out, "finetune", f"{path}: not a plain tensor state dict", imports_tf=True)
    assert not marker.exists()
    assert not (tmp_path / "w" / "ingredients" / "ingredient").exists()
