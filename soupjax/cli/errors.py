"""Bad input ends a command with one line that names the problem and a non-zero exit, not a traceback.

Library code raises ``InputError`` (or a subclass) with a message that names the file, the
parameter path or the option and what was expected; the command lines (``soupjax.finetune``,
``soupjax.soup``, ``soupjax.experiment``) run their ``main`` through ``exit_on_input_error`` so the
user sees ``soupjax.soup: error: <message>`` and exit status 2. A bug (any other exception) still
shows its traceback: hiding it would make it harder to report.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_INPUT_ERROR = 2  # the status argparse and absl use for a usage error


class InputError(ValueError):
    """The user's input (a flag, a config, a file, a directory) cannot be used; the message says why.

    A ``ValueError`` so that library callers who already catch ``ValueError`` keep working.
    """


def fail(program: str, message: str) -> NoReturn:
    """Print ``program: error: message`` on one line of stderr and exit with status 2."""
    one_line = " ".join(str(message).split())
    print(f"{program}: error: {one_line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INPUT_ERROR)


def exit_on_input_error(program: str, main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap an absl ``main`` so that an ``InputError`` (or an unreadable/unwritable path) ends the
    command through ``fail`` instead of a traceback."""
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as e:
            fail(program, str(e))
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            fail(program, f"cannot use {e.filename!r}: {e.strerror}")
        except OSError as e:
            if e.errno == 28:  # ENOSPC: the message must say the disk is full, not only "errno 28"
                fail(program, f"no space left on the device while writing {e.filename or 'output'}; "
                              "nothing half-written was kept: free space and rerun to resume")
            raise
    return wrapped
