"""User-facing errors: one sentence, exit code 2, no traceback unless HYDRA_FULL_ERROR=1."""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value, what is allowed."""


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one sentence naming the file."""


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what is kept and how to continue (exit code 130)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError)
# Set (with HYDRA_FULL_ERROR) by tasks.cli.run, which asks Hydra to raise so it can word Hydra's errors itself.
HYDRA_RAISES_FOR_CLI = "MOBILEVISION_HYDRA_RAISES"
# A path the user chose that cannot be written: no permission, a file where a folder should be, read-only.
UNWRITABLE = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def full_errors_wanted() -> bool:
    """The user asked for tracebacks with HYDRA_FULL_ERROR=1 (not tasks.cli.run on their behalf)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(HYDRA_RAISES_FOR_CLI) != "1"


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one line on stderr and exit code 2 (130 for Ctrl-C)."""
    from omegaconf.errors import MissingMandatoryValue

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, MissingMandatoryValue, *UNWRITABLE, Interrupted, KeyboardInterrupt) as err:
            if full_errors_wanted():
                raise
            print(f"error: {user_sentence(err)}", file=sys.stderr)
            sys.exit(130 if isinstance(err, (Interrupted, KeyboardInterrupt)) else 2)
    return wrapper


def user_sentence(err: BaseException) -> str:
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or str(err).split(":")[-1].split()[0]
        return f"{key} is required but was not given; expected {key}=<value> on the command line."
    if isinstance(err, UNWRITABLE):
        where = err.filename or "a file"
        return f"cannot write {where} ({err.strerror or type(err).__name__}); expected a folder you can write to."
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C); the files already written are kept."
    return str(err)
