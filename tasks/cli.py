"""Hydra entry points that stop a bad command line with one sentence and exit code 2.

Hydra composes the config before our code runs and reports its own errors in several lines; we
compose the same overrides once up front and turn those errors into one sentence naming the
key or option, the value, and what is allowed.
"""
from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable

from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf


def launch_id() -> int:
    """The process that launched this run (torchrun's agent for its ranks, so they share a run folder):
    in the default run folder names beside the time, so runs started in the same second never collide."""
    return os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()


OmegaConf.register_new_resolver("launch_id", launch_id, replace=True)


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]


def _group_sentence(err: MissingConfigException, overrides: list[str]) -> str:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    options = list(getattr(err, "options", None) or [])
    if group and options:
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option} is not an option{hint}; expected one of {', '.join(options)}."
    return " ".join(str(err).split("\n")[0].split()) + "."


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


def composition_error(config_name: str, argv: list[str]) -> str | None:
    """None when the overrides compose; otherwise the one sentence to show."""
    overrides = _user_overrides(argv)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        try:
            compose(config_name, overrides=overrides)
            return None
        except MissingConfigException as err:
            return _group_sentence(err, overrides)
        except OverrideParseException as err:
            bad = str(err).split("'")[1] if "'" in str(err) else str(err)
            return f"cannot read the override {bad!r}; expected key=value (e.g. backbone.width_mult=0.5)."
        except ConfigCompositionException as err:
            message = str(err)
            if message.startswith("Could not override '"):
                key = message.split("'")[1]
                override = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key), key)
                remaining = [o for o in overrides if o != override]
                try:
                    base = compose(config_name, overrides=remaining)
                except Exception:  # noqa: BLE001 - the first error is the one worth reporting
                    base = compose(config_name)
                return _key_sentence(override, base)
            return " ".join(message.split("\n")[0].split())


def run(hydra_main: Callable[[], object], config_name: str) -> None:
    """Check the command line, then hand over to the @hydra.main function."""
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        sentence = composition_error(config_name, sys.argv[1:])
        if sentence is not None:
            print(f"error: {sentence}", file=sys.stderr)
            sys.exit(2)
    hydra_main()
