"""Writing files so that a crash, a full disk or a kill leaves the old version or the new one, never a mix.

The helpers every module that writes results shares (checkpoints, reports, training state, learning
curves): atomic writes of one file or of a set of files (``write_files_atomic``), the one conversion of
configs, arrays and paths to plain JSON values (``plain``), the JSON text soupjax writes (``json_text``),
swapping a complete directory in for an old one (``replace_directory``) and checking that a directory
can be written before any work starts (``writable_problem``), and the paths that may be object-store URLs
(``is_url``, ``as_path``, ``absolute``).

Every path may be local or an object-store URL (``gs://bucket/...``). URLs go through ``etils.epath``
with its fsspec backend (``gcsfs`` for ``gs://``), which honours ``STORAGE_EMULATOR_HOST``; epath would
otherwise pick TensorFlow's GCS file system whenever TensorFlow is installed, and that one always talks
to www.googleapis.com (no emulator can stand in for it): ``EPATH_USE_TF=true`` in the environment keeps
TensorFlow's. An object store has no rename of a directory, and an upload is all-or-nothing per object:
``write_files_atomic`` uploads each finished file whole, and a result directory on a URL is finished when
its commit marker (``MARKER``, written last) exists (``replace_directory``, ``is_committed``).

What is *not* written through here: append-only logs on local disk (``metrics.jsonl``, whose last line a
kill may cut and ``train.read_metrics`` drops, and TensorBoard's event files; on an object store, which
cannot append, training uploads both whole at each checkpoint) and orbax's checkpoints (orbax renames its
own temporary directories into place, and on ``gs://`` writes its own commit file). A pretrained init on
a URL is read through a local copy (``local_copy``).

Nothing here imports JAX, orbax or TensorFlow: reports and the command lines use it cheaply.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Union

if TYPE_CHECKING:
    from etils import epath

# gs:// through gcsfs (module docstring), set on import: etils caches whether to use TensorFlow's file
# system at its first path operation, local ones included, so setting it at the first URL is too late.
os.environ.setdefault("EPATH_USE_TF", "false")

# What a result directory on an object store holds once complete, written last (``commit``).
MARKER = "COMMITTED"

AnyPath = Union[Path, "epath.Path"]


def is_url(path: str | os.PathLike) -> bool:
    """True for an object-store URL (``gs://bucket/x``, ``s3://...``, ``memory://...``), not a local path."""
    return "://" in os.fspath(path)


def as_path(p: str | os.PathLike) -> AnyPath:
    """``p`` as a path object: ``pathlib.Path`` for a local path, ``etils.epath.Path`` for a URL
    (``pathlib.Path("gs://b/x")`` would be the local folder ``gs:/b/x``)."""
    if not is_url(p):
        return Path(p)
    from etils import epath
    return epath.Path(os.fspath(p))


def absolute(p: str | os.PathLike) -> AnyPath:
    """``p`` made absolute against the current directory when local (``Path.absolute``, no symlinks
    resolved); a URL is already absolute and is returned as an ``epath.Path``, never as a local folder."""
    return as_path(p) if is_url(p) else Path(p).absolute()


def resolve(p: str | os.PathLike) -> AnyPath:
    """``Path.resolve`` (absolute, symlinks followed) for a local path; a URL as it is (``as_path``)."""
    return as_path(p) if is_url(p) else Path(p).resolve()


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself when local; for a URL, the object (or the folder of objects) downloaded into a
    temporary folder under its own name, and removed when the block ends. For readers that take only
    local files (``np.load``, torch, safetensors) of files they read whole anyway: a pretrained init."""
    if not is_url(path):
        yield Path(path)
        return
    remote = as_path(path)
    with tempfile.TemporaryDirectory(prefix=".soupjax-download-") as scratch:
        local = Path(scratch) / remote.name
        fs, key = object_store(path)
        if remote.is_dir():
            for obj in fs.find(key):
                target = local / obj[len(key.rstrip("/")) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(obj, str(target))
        else:
            fs.get_file(key, str(local))
        yield local


def is_committed(directory: str | os.PathLike) -> bool:
    """True when the result at ``directory`` is finished: always for a local directory (complete ones are
    renamed into place), and on an object store when its ``MARKER`` object exists."""
    return not is_url(directory) or (as_path(directory) / MARKER).exists()


def commit(directory: str | os.PathLike) -> None:
    """Writes ``directory``'s commit marker (a URL's only; a local result is committed by its rename)."""
    if is_url(directory):
        (as_path(directory) / MARKER).write_text("")


def uncommit(directory: str | os.PathLike) -> None:
    """Removes ``directory``'s commit marker, so readers ignore it from here on (URLs only)."""
    if is_url(directory):
        marker = as_path(directory) / MARKER
        if marker.exists():
            marker.unlink()


def write_files_atomic(writers: Mapping[str | os.PathLike, Callable[[Path], None]]) -> list[Path]:
    """Call each ``write(tmp)`` on a temporary file beside its target, then rename them all into place.

    Nothing is renamed until every file was written, so a failure while writing (a full disk, an
    interrupt) leaves every target as it was; the temporary files are removed and the error propagates.
    Each rename within one directory is atomic on POSIX, but the set is not: a failure or a kill among
    the renames (rare: they do not write data) leaves the files renamed so far new and the others old.
    The temporary name keeps the target's suffix, so writers that add or guess one (``np.savez``,
    ``savefig``) write where told.
    """
    if any(is_url(p) for p in writers):
        return _upload_files(writers)
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


def _upload_files(writers: Mapping[str | os.PathLike, Callable[[Path], None]]) -> list[AnyPath]:
    """``write_files_atomic`` for targets that may be URLs: each ``write(tmp)`` on a local temporary
    file, then, once all were written, each uploaded whole (an object store shows an object whole or not
    at all; as with local renames, the set is not atomic) and local ones renamed into place."""
    targets = [as_path(p) for p in writers]
    with tempfile.TemporaryDirectory(prefix=".soupjax-upload-") as scratch:
        locals_ = [Path(scratch) / f"{i}{Path(t.name).suffix}" for i, t in enumerate(targets)]
        for local, write in zip(locals_, writers.values()):
            write(local)
        for local, target in zip(locals_, targets):
            if is_url(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(local.read_bytes())
            else:
                write_atomic(target, lambda tmp, local=local: shutil.copyfile(local, tmp))
    return targets


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> AnyPath:
    """``write(tmp)`` on a temporary file beside ``path``, renamed into place when it succeeded (on an
    object store: written locally, then uploaded whole)."""
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
    if is_url(new) or is_url(old):
        _replace_url_directory(new, old)
        return
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


def remove_tree(directory: str | os.PathLike) -> None:
    """Deletes ``directory`` and everything under it, local or on an object store; nothing if absent."""
    if is_url(directory):
        fs, key = object_store(directory)
        if fs.exists(key):
            fs.rm(key, recursive=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def umask() -> int:
    """The process's umask. Read from /proc where Linux shows it: the only other way is to set it and set
    it back, and in between a file another thread creates (orbax writes from threads) gets the wrong mode."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_umask(directory: str | os.PathLike) -> None:
    """Gives a directory made private by ``tempfile.mkdtemp`` (0700) the mode ``mkdir`` would have given
    it (0777 less the umask), so that a result renamed from staging is readable like any other."""
    os.chmod(directory, 0o777 & ~umask())


def object_store(url: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path in it (``as_path`` sets up which backend)."""
    as_path(url)
    import fsspec
    return fsspec.core.url_to_fs(os.fspath(url))


def _replace_url_directory(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """``replace_directory`` on an object store, which has no rename of a directory: ``new`` (complete,
    committed) stays where it is while ``old`` is uncommitted (readers ignore it from then on), emptied,
    filled with a copy of ``new`` and committed; only then is ``new`` deleted. A kill on the way leaves
    ``old`` uncommitted and ``new`` complete. Nothing happens when ``new`` is not committed."""
    if not (as_path(new) / MARKER).exists():
        return
    uncommit(old)
    fs, old_key = object_store(old)
    _, new_key = object_store(new)
    if fs.exists(old_key):
        fs.rm(old_key, recursive=True)
    files_ = [f for f in fs.find(new_key) if f.rsplit("/", 1)[-1] != MARKER]
    for f in files_:
        fs.copy(f, old_key + f[len(new_key):])
    commit(old)
    fs.rm(new_key, recursive=True)


def url_problem(directory: str | os.PathLike) -> str | None:
    """Why objects cannot be written under the URL ``directory`` (``None`` when they can): no such
    bucket, or a probe object that cannot be made and removed (credentials, permissions)."""
    try:
        fs, key = object_store(directory)
        bucket = key.split("/", 1)[0]
        if not fs.exists(bucket):
            return f"no such bucket: {os.fspath(directory).split('://')[0]}://{bucket}"
        probe = f"{key.rstrip('/')}/.write-test-{os.getpid()}-{os.urandom(4).hex()}"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except (OSError, ValueError) as e:  # gcsfs' HttpError is an OSError
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]} ({os.fspath(directory)})"
    return None


def writable_problem(directory: str | os.PathLike, *, create: bool = False) -> str | None:
    """Why files cannot be made in ``directory`` (``None`` when they can), found by making one.

    A probe file is created and removed, because permission bits do not tell (root writes anywhere
    ``os.access`` says it may not; a read-only mount refuses what they allow). With ``create`` the
    directory and its parents are made first; otherwise nothing is created and the probe is made in
    ``directory`` or, when it does not exist yet, in its nearest existing parent.
    """
    if is_url(directory):
        return url_problem(directory)  # an object store has no directories to create
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
