"""Hydra entry points whose ordinary mistakes end in one sentence and exit code 2.

Hydra parses the command line and composes the config itself, so every Hydra feature (-m/--multirun,
--cfg/-c, --info, --config-dir/-cd, --config-name, hydra.* overrides, hydra.searchpath, sweepers)
behaves as in a plain Hydra app. We only ask Hydra to raise rather than print (HYDRA_FULL_ERROR) and
turn what it raised into one sentence naming the key or option, the value, and what is allowed.
With HYDRA_FULL_ERROR=1 set by the user, everything is raised unchanged.

The configs are found by file path (CONFIG_DIR), never as the Python module `conf`, so a working
directory with its own `conf/` folder cannot hide them.
"""
from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from tasks.errors import HYDRA_RAISES_FOR_CLI, USER_ERRORS, full_errors_wanted

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def launch_id() -> int:
    """The process that launched this run (torchrun's agent for its ranks, so they share a run folder):
    in the default run folder names beside the time, so runs started in the same second never collide."""
    return os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()


OmegaConf.register_new_resolver("launch_id", launch_id, replace=True)


def _user_overrides(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]


def _group_sentence(err: MissingConfigException) -> str:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    options = list(getattr(err, "options", None) or [])
    if group and options:
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option} is not an option{hint}; expected one of {', '.join(options)}."
    return " ".join(str(err).split("\n")[0].split()).rstrip(".") + "."


def _key_sentence(override: str, base: DictConfig) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    parent_path, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(base, parent_path) if parent_path else base
    if not isinstance(parent, DictConfig):
        return f"{key} is not a key of this config (there is no '{parent_path}' section)."
    keys = [str(k) for k in parent.keys()]
    close = difflib.get_close_matches(leaf, keys, n=1)
    hint = f" (did you mean {parent_path + '.' if parent_path else ''}{close[0]}?)" if close else ""
    where = f"'{parent_path}'" if parent_path else "the top level"
    return (f"{key}={value} names a key that does not exist{hint}; the keys of {where} are "
            f"{', '.join(keys)} (prefix with + to add a new key on purpose).")


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected(cause: ValidationError, leaf: str) -> str:
    """'an integer', 'a number or null', ... from the structured config's annotation of the key."""
    import dataclasses
    import typing

    owner = getattr(cause, "object_type", None)
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return "a value of the declared type"
    hint = typing.get_type_hints(owner).get(leaf)
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    words = " or ".join(TYPE_WORDS.get(a, getattr(a, "__name__", str(a))) for a in args)
    return words + (" or null" if type(None) in typing.get_args(hint) else "")


def _type_sentence(cause: ValidationError, overrides: Sequence[str]) -> str:
    key = str(getattr(cause, "full_key", "") or "")
    override = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), None)
    shown = override.lstrip("+~") if override else key
    detail = str(cause).split("\n")[0].strip().rstrip(".")
    return f"{shown} is not allowed ({detail}); expected {_expected(cause, key.rpartition('.')[2])}."


def error_sentence(err: BaseException, config_name: str, overrides: Sequence[str]) -> str:
    """The one sentence for an error Hydra raised while composing `config_name` with `overrides`.
    Needs Hydra initialised with the same search path (inside hydra.main or initialize_config_dir)."""
    if isinstance(err, MissingConfigException):
        return _group_sentence(err)
    if isinstance(err, OverrideParseException):
        bad = str(err).split("'")[1] if "'" in str(err) else str(err)
        return f"cannot read the override {bad!r}; expected key=value (e.g. backbone.width_mult=0.5)."
    if isinstance(err.__cause__, ValidationError) and getattr(err.__cause__, "full_key", None):
        return _type_sentence(err.__cause__, overrides)
    message = str(err)
    if isinstance(err, ConfigCompositionException) and message.startswith("Could not override '"):
        key = message.split("'")[1]
        override = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
        remaining = [o for o in overrides if o != override]
        try:
            base = compose(config_name, overrides=remaining)
        except Exception:  # noqa: BLE001 - the first error is the one worth reporting (e.g. sweep values)
            base = compose(config_name)
        return _key_sentence(override, base)
    return " ".join(message.split("\n")[0].split())


def composition_error(config_name: str, argv: Sequence[str], config_dir: str = CONFIG_DIR) -> str | None:
    """None when the overrides compose as a single run; otherwise the one sentence to show."""
    overrides = _user_overrides(argv)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose(config_name, overrides=overrides)
            return None
        except (HydraException, OmegaConfBaseException) as err:
            return error_sentence(err, config_name, overrides)


def _parsed_command_line(argv: Sequence[str], config_name: str) -> tuple[str, list[str]]:
    """(config name, overrides) exactly as hydra.main reads them from `argv`."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    return args.config_name or config_name, list(args.overrides or [])


def _stop(sentence: str) -> None:
    print(f"error: {sentence}", file=sys.stderr)
    sys.exit(2)


def run(hydra_main: Callable[[], object], config_name: str) -> None:
    """Hand over to the @hydra.main function; what it raises that a user can fix becomes one sentence."""
    if full_errors_wanted():
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own report
    os.environ[HYDRA_RAISES_FOR_CLI] = "1"  # ... and user_errors_exit still prints its one sentence
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        name, overrides = _parsed_command_line(sys.argv[1:], config_name)
        try:
            if not GlobalHydra.instance().is_initialized():
                with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                    sentence = error_sentence(err, name, overrides)
            else:
                sentence = error_sentence(err, name, overrides)
        except Exception:  # noqa: BLE001 - never hide the original error behind a failing explanation
            sentence = " ".join(str(err).split("\n")[0].split())
        _stop(sentence)
    except USER_ERRORS as err:
        _stop(str(err))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(HYDRA_RAISES_FOR_CLI, None)
