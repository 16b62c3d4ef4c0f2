"""Leases: which process is fine-tuning an ingredient, so that two processes on one work directory
never train the same one at once.

A lease is a small JSON record at a path beside the ingredient (``training.planning`` puts it at
``ingredients/.NAME.lease``), naming its holder: host, boot, pid and that process's start, when it
took the lease and when it last renewed it. It is taken by an *exclusive create*, the one operation
every store makes atomic:

- local disk and NFS (v3 and later): ``open(O_CREAT | O_EXCL)``;
- ``gs://`` (and other fsspec stores that support it): an upload that succeeds only if no object has
  the name (``mode="create"``, which gcsfs sends as the precondition ``ifGenerationMatch=0``).

The holder renews the lease while it trains (``Lease.keep_alive``: a heartbeat thread) and removes it
when done, whether training ended or failed. A lease whose holder died is abandoned and taken over:

- holder on this host (same hostname and boot id): at once, when its pid is gone or belongs to a
  process started since (a reused pid);
- same hostname, another boot id: at once (the machine restarted since);
- another host: once its last renewal is older than its ``expires_after`` seconds. Hosts' clocks are
  assumed to agree to well within that (NTP), as every lease on a shared store does.

Taking over removes exactly the abandoned record, not one created since by a third process: on
``gs://`` by deleting that object generation only (``ifGenerationMatch``); on a file system by
renaming it aside (one rename wins) and putting it back if it turns out to be another record. Renewal
on a file system is a compare-then-replace, not atomic; the only window is a lease stolen because its
holder failed to renew for ``expires_after`` seconds, which the heartbeat then reports (``Lease.lost``).

Nothing here imports JAX: with several processes, ``training.planning`` has process 0 take the lease
and tells the others.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

EXPIRES_AFTER = 300.0  # seconds without a renewal after which a holder on another host counts as dead
HEARTBEAT = 30.0       # seconds between renewals


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its record says."""
    host: str
    pid: int
    boot_id: str = ""        # /proc/sys/kernel/random/boot_id: a restarted host has another
    process_start: str = ""  # field 22 of /proc/PID/stat: tells a reused pid from the holder
    started: float = 0.0     # when it took the lease (seconds since the epoch)
    renewed: float = 0.0     # its last heartbeat
    expires_after: float = EXPIRES_AFTER
    token: str = ""          # this lease, as opposed to an earlier or later one of the same process

    def describe(self) -> str:
        """``host H pid P since 2026-01-02 03:04:05``, for the one line that says who holds what."""
        since = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S") if self.started else "?"
        return f"host {self.host} pid {self.pid} since {since}"

    def record(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode()


def this_process(expires_after: float = EXPIRES_AFTER) -> Holder:
    """A record naming the calling process, with a fresh token."""
    now = time.time()
    return Holder(host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(), process_start=_process_start(os.getpid()),
                  started=now, renewed=now, expires_after=float(expires_after), token=uuid.uuid4().hex)


def holder_alive(holder: Holder, now: float | None = None) -> bool:
    """Whether ``holder`` may still be working (``module docstring`` for the rules)."""
    now = time.time() if now is None else now
    me = this_process()
    if holder.host == me.host and holder.pid > 0:
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return False  # the host restarted since the lease was taken
        if not _pid_running(holder.pid):
            return False
        started = _process_start(holder.pid)
        return not (holder.process_start and started and started != holder.process_start)
    return now - holder.renewed <= holder.expires_after


def parse(data: bytes, modified: float | None) -> Holder:
    """The holder a lease record names. A record cut short (its holder died between creating the file and
    writing it) names nobody: it counts as renewed when last modified, so it expires like any other."""
    try:
        fields = json.loads(data.decode())
        known = {f.name for f in dataclasses.fields(Holder)}
        holder = Holder(**{k: v for k, v in fields.items() if k in known})
        if not isinstance(holder.host, str) or not isinstance(holder.pid, int):
            raise TypeError("not a lease record")
        return holder
    except (ValueError, TypeError, AttributeError):
        when = modified if modified is not None else time.time()
        return Holder(host="(unknown: a lease record cut short)", pid=0, started=when, renewed=when)


class Lease:
    """The lease at ``path`` (a local or NFS path, or a URL such as ``gs://bucket/dir/.NAME.lease``).

    ``acquire()`` takes it (``None``) or says who holds it (a live ``Holder``); ``keep_alive()`` starts
    the heartbeat; ``release()`` stops it and removes the record (only if it is still ours).
    """

    def __init__(self, path: str | os.PathLike, *, expires_after: float = EXPIRES_AFTER,
                 heartbeat: float = HEARTBEAT):
        self.path = os.fspath(path)
        self.expires_after, self.heartbeat = float(expires_after), float(heartbeat)
        self._store = store_for(self.path)
        self._mine: Holder | None = None
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False                    # set when a renewal found the lease taken by another process
        self.took_over: Holder | None = None  # the dead holder whose lease acquire() took over, if any

    @property
    def held(self) -> bool:
        return self._mine is not None

    def acquire(self) -> Holder | None:
        """Take the lease: ``None`` when taken (also when taken over from a dead holder, then named by
        ``took_over``), else the live holder."""
        if self._mine is not None:
            return None
        holder = None
        for _ in range(5):  # each round: create, or find a live holder, or clear a dead one and retry
            mine = this_process(self.expires_after)
            if self._store.create(self.path, mine.record()):
                seen = self._store.read(self.path)
                if seen is not None and parse(seen[0], seen[2]).token == mine.token:
                    self._mine, self._version = mine, seen[1]
                    return None
                # Overwritten at once: a store that does not honour the exclusive create (an
                # unpatched gcp-storage-emulator ignores ifGenerationMatch). The last writer has it.
                if seen is not None:
                    return parse(seen[0], seen[2])
                continue
            seen = self._store.read(self.path)
            if seen is None:
                continue  # released in between
            data, version, modified = seen
            holder = parse(data, modified)
            if holder_alive(holder):
                return holder
            if self._store.delete(self.path, version):
                self.took_over = holder
        return holder  # others kept winning the race: one of them holds it

    def holder(self) -> Holder | None:
        """The live holder now (``None``: free, or its holder is dead)."""
        seen = self._store.read(self.path)
        if seen is None:
            return None
        holder = parse(seen[0], seen[2])
        return holder if holder_alive(holder) else None

    def renew(self) -> bool:
        """Record a heartbeat; False (and ``lost``) when the record is no longer ours."""
        if self._mine is None:
            return False
        mine = dataclasses.replace(self._mine, renewed=time.time())
        version = self._store.replace(self.path, mine.record(), self._version)
        if version is None:
            self.lost = True
            logging.warning("the lease %s was taken by another process (no heartbeat for %.0fs?)", self.path,
                            self.expires_after)
            return False
        self._mine, self._version = mine, version
        return True

    def keep_alive(self) -> "Lease":
        """Renew every ``heartbeat`` seconds in a daemon thread until ``release``."""
        if self._thread is None and self._mine is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if not self.renew():
                    return
            except OSError as e:  # a store briefly unreachable: the next beat tries again
                logging.warning("renewing the lease %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the record, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._mine is not None and not self.lost:
            self._store.delete(self.path, self._version)
        self._mine = self._version = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def store_for(path: str) -> "LocalStore | FsspecStore":
    """The store holding ``path``: a file system for plain paths, fsspec for URLs (``gs://``...)."""
    return FsspecStore() if "://" in path and not path.startswith("file://") else LocalStore()


class LocalStore:
    """Lease records as files: local disk and NFS (v3 and later, where ``O_EXCL`` is atomic)."""

    def create(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; True when this call created it."""
        path = path.removeprefix("file://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self, path: str) -> tuple[bytes, bytes, float] | None:
        """``(data, version, modified)``, or None when there is no record. The version is the data:
        each record carries its token and renewal time."""
        path = path.removeprefix("file://")
        try:
            with open(path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, data, modified

    def replace(self, path: str, data: bytes, version: bytes) -> bytes | None:
        """Write ``data`` at ``path`` if it still holds ``version``; the new version, or None."""
        seen = self.read(path)
        if seen is None or seen[1] != version:
            return None
        tmp = f"{path.removeprefix('file://')}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path.removeprefix("file://"))
        return data

    def delete(self, path: str, version: bytes) -> bool:
        """Remove ``path`` if it holds ``version``. Renamed aside first (one rename wins), then checked:
        a record that another process created meanwhile is put back."""
        path = path.removeprefix("file://")
        aside = f"{path}.{uuid.uuid4().hex}.removed"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            ours = f.read() == version
        if not ours:
            try:
                os.link(aside, path)  # fails if yet another record was created: that one stays
            except OSError:
                pass
        os.unlink(aside)
        return ours


class FsspecStore:
    """Lease records as objects (``gs://`` through gcsfs; any fsspec store with exclusive create)."""

    def object_store(self, path: str):
        import fsspec
        fs, key = fsspec.core.url_to_fs(path)
        fs.invalidate_cache(key)  # listings are cached: another host's record must be seen at once
        return fs, key

    def create(self, path: str, data: bytes) -> bool:
        fs, key = self.object_store(path)
        try:
            fs.pipe_file(key, data, mode="create")  # gcsfs: ifGenerationMatch=0
        except FileExistsError:
            return False
        return True

    def read(self, path: str) -> tuple[bytes, Any, float | None] | None:
        fs, key = self.object_store(path)
        try:
            info = fs.info(key)
            generation = info.get("generation")
            data = fs.cat_file(key, generation=generation) if generation else fs.cat_file(key)
        except FileNotFoundError:
            return None
        return data, (generation, data), _modified(info)

    def replace(self, path: str, data: bytes, version: Any) -> Any | None:
        seen = self.read(path)
        if seen is None or seen[0] != version[1]:
            return None
        fs, key = self.object_store(path)
        fs.pipe_file(key, data)
        seen = self.read(path)
        return seen[1] if seen is not None and seen[0] == data else None

    def delete(self, path: str, version: Any) -> bool:
        fs, key = self.object_store(path)
        generation, data = version
        try:
            if generation and hasattr(fs, "call") and hasattr(fs, "split_path"):
                # GCS: delete that generation only if it is still the live one.
                bucket, name, _ = fs.split_path(key)
                fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(generation))
                return True
            seen = self.read(path)
            if seen is None or seen[0] != data:
                return False
            fs.rm_file(key)
            return True
        except (FileNotFoundError, FileExistsError):  # gone already, or another generation (412)
            return False


def _modified(info: dict) -> float | None:
    value = info.get("mtime") or info.get("updated") or info.get("created")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' where /proc does not say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return ""


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True
