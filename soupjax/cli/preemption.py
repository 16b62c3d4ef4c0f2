"""Preemption: SIGTERM and Ctrl-C stop a command at its next step boundary, with its work saved.

A spot or preemptible Cloud TPU VM, Slurm and ``docker stop`` announce the end with SIGTERM (SIGKILL
follows after a grace period); a user presses Ctrl-C (SIGINT). The command lines (``soupjax.finetune``,
``soupjax.soup``, ``soupjax.experiment``) run their ``main`` through ``exit_on_preemption``, which
installs the handlers here. Then:

- Inside a loop that checks at its step boundaries (``boundaries()``: training after each step, cooking
  after each ingredient evaluation and each dish), the first signal only sets a flag; the loop asks
  ``StopVote`` at its next boundary, saves what it has (a training checkpoint of that step; cooked
  soups are already written) and raises ``Preempted``.
- Anywhere else (start-up, evaluation after training, the report), and for a second signal, the
  command stops at once with ``Preempted``: every result is written under a temporary name and renamed
  into place (orbax commits checkpoints the same way), so what was not finished is never visible.
  A signal while the stop's own checkpoint or a soup is being written (``saving()``) waits for it.
- ``exit_on_preemption`` prints one line, ``PROGRAM: preempted by SIGTERM at step N ...; rerun the same
  command to resume``, and exits with status 128 + the signal's number, as shells report a process
  ended by a signal: ``EXIT_SIGTERM`` (143) and ``EXIT_SIGINT`` (130).

With several processes (``jax.distributed``) every process must stop at the same step, or the others
would wait forever in the next step's collectives. ``StopVote`` takes the maximum of every process's
flag with an all-reduce at each boundary, so all of them see the same answer at the same call. JAX's
own preemption sync point (``multihost_utils.reached_preemption_sync_point``, which orbax's
``CheckpointManager.reached_preemption`` calls) hears only SIGTERM, through a handler of its own in C++
that replaces Python's; the all-reduce serves both signals and works wherever the training step's
collectives do (gloo on CPU included). ``boundaries()`` takes SIGTERM back from JAX's handler each time
it is entered. A stop at once (outside the boundaries, or a second signal) is one process's own: the
others then fail at their next collective, as they would if it had been killed. On a preempted pod
slice every host gets the notice.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESUME = "rerun the same command to resume"


def exit_status(signum: int) -> int:
    """The exit status after a stop on signal ``signum``: 128 + its number, as shells report it."""
    return 128 + int(signum)


EXIT_SIGTERM = exit_status(signal.SIGTERM)  # 143
EXIT_SIGINT = exit_status(signal.SIGINT)    # 130


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Preempted(BaseException):
    """The command stopped on a signal. ``where`` says what was saved, e.g. 'at step 12 of 40 (...)'.

    A ``BaseException``, like ``KeyboardInterrupt``: code that handles ``Exception`` must not take a
    stop for an error and carry on.
    """

    def __init__(self, signum: int, where: str):
        super().__init__(signum, where)
        self.signum, self.where = int(signum), where

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)

    def line(self, program: str) -> str:
        return f"{program}: preempted by {signal_name(self.signum)} {self.where}; {RESUME}"

    def __str__(self) -> str:
        return f"preempted by {signal_name(self.signum)} {self.where}"


# The state the handler shares with the loops. Handlers run in the main thread, between two Python
# bytecodes of it, so plain module variables are enough.
_installed = False
_requested = 0     # the first signal received inside boundaries(), not yet acted on (0: none)
_watching = 0      # depth of boundaries(): > 0 while a loop checks at its step boundaries
_saving = 0        # depth of saving(): > 0 while the stop's own checkpoint is being written
_AT_ONCE = "at once (not at a step boundary: only what was finished is kept)"


def _note(message: str) -> None:
    # os.write, not print: the signal may have interrupted a print to stderr (a progress line), and
    # writing to the same buffered stream from the handler would raise 'reentrant call'.
    os.write(2, f"soupjax: {message}\n".encode())


def _handle(signum: int, frame: Any) -> None:
    global _requested
    del frame
    name = signal_name(signum)
    if _saving:
        _requested = _requested or signum
        _note(f"{name} received while saving: the command stops as soon as the save is complete")
        return
    if _watching and not _requested:
        _requested = signum
        _note(f"{name} received: stopping after the current step, with its work saved (a second signal "
              "stops at once, keeping only what is finished)")
        return
    raise Preempted(_requested or signum, _AT_ONCE)


_previous: dict[int, Any] = {}  # the handlers install() replaced, for uninstall()


def install() -> None:
    """Handle SIGTERM and SIGINT as this module says (main thread only). Until it is called (a library
    caller, a test) nothing changes: no flag is ever set and ``StopVote`` makes no collective."""
    global _installed
    for signum in SIGNALS:
        previous = signal.signal(signum, _handle)
        if previous is not _handle:
            _previous.setdefault(signum, previous)
    _installed = True


def uninstall() -> None:
    """Put back the handlers ``install`` replaced and forget any request (a library caller that wanted
    this behaviour for one block; tests)."""
    global _installed
    for signum, previous in _previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _previous.clear()
    _installed = False
    reset()


def _reclaim() -> None:
    """Put the handlers back, in case something replaced them since ``install``: ``jax.distributed.
    initialize`` installs JAX's own SIGTERM handler (its preemption service) in C++, which
    ``signal.getsignal`` cannot see (it returns what Python last installed), so it is done every time."""
    if _installed:
        for signum in SIGNALS:
            signal.signal(signum, _handle)


def installed() -> bool:
    return _installed


def requested() -> int:
    """The signal received inside ``boundaries()`` and not yet acted on (0: none)."""
    return _requested


def reset() -> None:
    """Forget a request (after the stop it asked for, or in tests)."""
    global _requested
    _requested = 0


@contextlib.contextmanager
def boundaries(after: str) -> Iterator[None]:
    """While inside, a first signal only sets the flag that ``StopVote`` reads at the loop's boundaries.
    A request still pending when the block ends (it came after the last boundary) stops the command
    there: ``Preempted`` with ``after`` as where, e.g. 'after the last step (its checkpoint is saved)'."""
    global _watching
    _reclaim()
    _watching += 1
    try:
        yield
    finally:
        _watching -= 1
    pending = _requested
    if pending and _installed:
        reset()
        raise Preempted(pending, after)


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """A signal inside waits until the block is done: the checkpoint the stop writes is never cut off."""
    global _saving
    _saving += 1
    try:
        yield
    finally:
        _saving -= 1
    if _requested and not _watching and not _saving:
        pending = _requested
        reset()
        raise Preempted(pending, "after saving (stopped once the save was complete)")


class StopVote:
    """Whether to stop at this step boundary, agreed by every process: call it once per boundary, in
    every process the same number of times. Returns the signal to stop on (0: go on).

    One process: the flag as it is now. Several: the maximum over the processes of their flags (SIGTERM
    outranks SIGINT), by an all-reduce over every device. ``lagged`` (training) reads the vote cast at
    the previous boundary and casts this one, so the host never waits for the step just dispatched
    (the stop comes one step later); ``settle()`` reads the last one cast, at the loop's end. Unlagged
    (cooking: a dish takes long, a vote is nothing beside it) waits for this boundary's vote.
    """

    def __init__(self, *, lagged: bool):
        import jax
        self._lagged = lagged
        self._multi = _installed and jax.process_count() > 1
        self._pending = None
        if self._multi:
            import jax.numpy as jnp
            import numpy as np
            from jax.sharding import NamedSharding, PartitionSpec

            from soupjax.devices import sharding
            mesh = sharding.data_mesh()
            self._np, self._jax = np, jax
            self._spread = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
            self._devices = mesh.size
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def _cast(self) -> Any:
        flag = self._np.full((1,), _requested, self._np.int32)
        votes = self._jax.make_array_from_callback((self._devices,), self._spread, lambda index: flag)
        return self._max(votes)

    def _read(self, vote: Any) -> int:
        return int(self._np.asarray(vote))

    def __call__(self) -> int:
        if not self._multi:
            return _requested
        vote = self._cast()
        if not self._lagged:
            return self._read(vote)
        previous, self._pending = self._pending, vote
        return self._read(previous) if previous is not None else 0

    def settle(self) -> int:
        """At the loop's end: the vote still in flight (lagged), read; or the flag, for one process."""
        if not self._multi:
            return _requested
        pending, self._pending = self._pending, None
        return self._read(pending) if pending is not None else 0


def stop(signum: int, where: str) -> Preempted:
    """The exception a loop raises once it has saved its work, the request now acted on."""
    reset()
    return Preempted(signum, where)


def exit_on_preemption(program: str, main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap an absl ``main``: install the handlers first, and end a ``Preempted`` stop with its one line
    (stderr) and ``exit_status``."""
    def wrapped(*args, **kwargs):
        install()
        try:
            return main(*args, **kwargs)
        except Preempted as e:
            print(e.line(program), file=sys.stderr, flush=True)
            raise SystemExit(e.exit_status) from None
    return wrapped
