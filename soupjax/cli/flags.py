"""absl flag parsing for soupjax's command lines: a bad flag or config ends in one line, exit status 2.

absl reports a bad flag over several lines ('FATAL Flags parsing error', a hint) with exit status 1,
and ml_collections' config flag loads the config file *inside* that parsing, where a missing file, a
failing ``get_config`` or an unknown ``--config.FIELD`` ends in a traceback. Here the config file is
loaded through ``config_base.load_config`` (errors that name the file and the problem), and every
parsing error is reported as ``PROGRAM: error: MESSAGE`` before ``main`` runs, before anything is
imported, started or written.
"""
from __future__ import annotations

import re
from typing import Callable

from absl import flags
from ml_collections import config_flags

from soupjax.config import base as config_base
from soupjax.cli.errors import InputError, fail

FLAGS = flags.FLAGS


class _ConfigFileParser(flags.ArgumentParser):
    """``FILE[:options]`` -> the locked ConfigDict, loaded by ``config_base.load_config``."""

    def __init__(self):
        self.loaded = None  # the last config loaded: overrides are checked against it

    def parse(self, argument):
        config = config_base.load_config(argument)
        config.lock()  # an override must name an existing field; a typo must not add one
        self.loaded = config
        return config

    def flag_type(self) -> str:
        return "config object"


def define_config_file(name: str, help_string: str) -> flags.FlagHolder:
    """``config_flags.DEFINE_config_file`` (``--NAME FILE[:options]`` and ``--NAME.FIELD=value``
    overrides), loading the file through ``config_base.load_config``."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    FLAGS[name].parser = _ConfigFileParser()
    return holder


def _input_error_in(error: BaseException) -> InputError | None:
    """The ``InputError`` absl wrapped into a flag error (raised while parsing a flag's value), if any."""
    while error is not None:
        if isinstance(error, InputError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _override_paths(argv: list[str], name: str) -> list[str]:
    """The FIELD of every ``--NAME.FIELD[=value]`` in ``argv`` (``--noNAME.FIELD`` too)."""
    paths = []
    for arg in argv[1:]:
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if m:
            paths.append(m.group(1))
    return paths


# What ml_collections raises while applying a --config.FIELD[INDEX]=value override it cannot apply.
_OVERRIDE_ERRORS = (KeyError, IndexError, AttributeError, ValueError, TypeError)


def flags_parser(program: str, config_flag: str | None = None) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run`` that ends any bad flag with ``fail(program, ...)``.

    With ``config_flag``, that flag (defined by ``define_config_file``) is required, its overrides
    must name existing fields, and the resulting config must pass ``config_base.check_config``.
    """
    def parse(argv: list[str]) -> list[str]:
        try:
            rest = FLAGS(argv)
        except flags.Error as e:
            cause = _input_error_in(e)
            fail(program, str(cause) if cause is not None else str(e))
        except InputError as e:
            fail(program, str(e))
        except _OVERRIDE_ERRORS as e:
            # ml_collections applies --config.FIELD overrides while absl parses --config, and reports a
            # FIELD that is not in the config as a bare KeyError (in an AttributeError), an index out of
            # range as an IndexError, an index into None as a ValueError. Only then is it bad input:
            # without overrides, or once the loaded config was never reached, it is a bug (traceback).
            overrides = _override_paths(argv, config_flag) if config_flag else []
            loaded = FLAGS[config_flag].parser.loaded if config_flag else None
            if not overrides or loaded is None:
                raise
            try:
                config_base.check_override_paths(loaded, overrides)
            except InputError as named:
                fail(program, str(named))
            message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            shown = ", ".join(f"--{config_flag}.{path}" for path in overrides)
            fail(program, f"bad override ({shown}): {message}")
        if len(rest) > 1:
            fail(program, f"unexpected arguments {rest[1:]}: every option is a --flag")
        if config_flag:
            if FLAGS[config_flag].value is None:
                fail(program, f"--{config_flag} is required, e.g. --{config_flag} configs/fashion_mnist_vit.py")
            try:
                config_base.check_config(FLAGS[config_flag].value)  # again: overrides may have changed it
            except InputError as e:
                fail(program, str(e))
        return rest
    return parse
