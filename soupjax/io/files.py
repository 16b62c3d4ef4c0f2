"""Writing files so that a crash, a full disk or a kill leaves the old version or the new one, never a mix.

The helpers every module that writes results shares (checkpoints, reports, training state, learning
curves): atomic writes of one file or of a set of files (``write_files_atomic``), the one conversion of
configs, arrays and paths to plain JSON values (``plain``), the JSON text soupjax writes (``json_text``),
swapping a complete directory in for an old one (``replace_directory``) and checking that a directory
can be written before any work starts (``writable_problem``).

What is *not* written through here: append-only logs (``metrics.jsonl``, whose last line a kill may cut
and ``train.read_metrics`` drops) and TensorBoard's event files, and orbax's checkpoints (orbax renames
its own temporary directories into place).

Nothing here imports JAX, orbax or TensorFlow: reports and the command lines use it cheaply.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def write_files_atomic(writers: Mapping[str | os.PathLike, Callable[[Path], None]]) -> list[Path]:
    """Call each ``write(tmp)`` on a temporary file beside its target, then rename them all into place.

    Nothing is renamed until every file was written, so a failure while writing (a full disk, an
    interrupt) leaves every target as it was; the temporary files are removed and the error propagates.
    Each rename within one directory is atomic on POSIX, but the set is not: a failure or a kill among
    the renames (rare: they do not write data) leaves the files renamed so far new and the others old.
    The temporary name keeps the target's suffix, so writers that add or guess one (``np.savez``,
    ``savefig``) write where told.
    """
    targets = [Path(p) for p in writers]
    written: list[tuple[Path, Path]] = []
    try:
        for target, write in zip(targets, writers.values()):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
            os.close(fd)
            written.append((Path(name), target))
            write(Path(name))
            # mkstemp makes the file private (0600); every output is meant to be read like any other.
            os.chmod(name, 0o644)
        for tmp, target in written:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    return targets


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` on a temporary file beside ``path``, renamed into place when it succeeded."""
    return write_files_atomic({path: write})[0]


def _encode(value: Any, strict: bool) -> Any:
    """What ``json.dumps`` cannot write itself, as something it can (``plain``'s rules)."""
    # Duck-typed, so that nothing here imports ml_collections, numpy or JAX.
    if hasattr(value, "to_dict"):  # ml_collections' ConfigDict and FrozenConfigDict
        return value.to_dict()
    if hasattr(value, "tolist"):  # numpy and JAX arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):  # e.g. flax's FrozenDict, which is not a dict
        return dict(value)
    if strict:
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")
    return str(value)


def plain(value: Any, *, strict: bool = False) -> Any:
    """``value`` as plain JSON values (dicts, lists, str, int, float, bool, None), the one conversion
    soupjax makes before comparing, hashing or writing what it was given.

    ConfigDicts become dicts (field references resolved), numpy and JAX arrays and scalars lists and
    Python numbers, paths strings, tuples lists, mapping keys strings (as JSON writes them); the order
    of mapping keys is kept. So a live config and the same config read back from a JSON file are equal.
    Any other object becomes its ``str`` (a dtype class in a config, say), or with ``strict`` raises
    ``TypeError``: what is written to a results file should never be stringified by accident.
    """
    return json.loads(json.dumps(value, default=lambda v: _encode(v, strict)))


def json_text(obj: Any, *, sort_keys: bool = True) -> str:
    """``obj`` (``plain(obj, strict=True)``) as the indented JSON soupjax writes (keys sorted unless
    ``sort_keys=False``, which keeps a report's sections in the order they are read)."""
    return json.dumps(plain(obj, strict=True), indent=2, sort_keys=sort_keys) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (``json_text``) to a temporary file beside ``path`` and rename it into place."""
    text = json_text(obj)  # serialised first: an unserialisable value must not leave a temporary file
    write_atomic(path, lambda tmp: tmp.write_text(text))


def replaced_name(old: Path) -> Path:
    """Where ``replace_directory`` keeps ``old`` while the new version is renamed in."""
    return old.parent / f".{old.name}.replaced"


def replace_directory(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """Put the complete directory ``new`` at ``old``'s path, never deleting ``old`` first.

    A directory cannot be renamed over a non-empty one, so ``old`` is moved aside (``replaced_name``),
    ``new`` renamed in, and only then is the old one deleted: at every instant a complete version exists
    under one of the names. Nothing happens when ``new`` does not exist. ``new``'s parent is removed
    when this leaves it empty (a staging folder).
    """
    new, old = Path(new), Path(old)
    if not new.exists():
        return
    aside = replaced_name(old)
    if aside.exists():
        shutil.rmtree(aside)
    if old.exists():
        os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        new.parent.rmdir()  # the staging folder, once empty
    except OSError:
        pass


def writable_problem(directory: str | os.PathLike, *, create: bool = False) -> str | None:
    """Why files cannot be made in ``directory`` (``None`` when they can), found by making one.

    A probe file is created and removed, because permission bits do not tell (root writes anywhere
    ``os.access`` says it may not; a read-only mount refuses what they allow). With ``create`` the
    directory and its parents are made first; otherwise nothing is created and the probe is made in
    ``directory`` or, when it does not exist yet, in its nearest existing parent.
    """
    directory = Path(os.path.abspath(directory))
    where = directory  # what the error names: the directory being made, or the one probed
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            return f"{where} is not a directory"
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{e.strerror or e} ({where})"
    return None
