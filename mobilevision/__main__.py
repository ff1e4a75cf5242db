"""`python -m mobilevision <command> [Hydra arguments]`: every entry point, from any working directory.

`python -m tasks.train` puts the working directory first on sys.path, so a `tasks.py` there hides this
project's `tasks` package; here the folder that holds the installed packages goes first instead.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = ("train", "evaluate", "predict", "export", "quantize", "profile", "check_data", "demo")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tasks/, conf/, backbones/ live beside us
    command = sys.argv[1].replace("-", "_") if len(sys.argv) > 1 else ""
    if command not in COMMANDS:
        print(f"error: python -m mobilevision needs a command first; expected one of {', '.join(COMMANDS)} "
              f"(e.g. python -m mobilevision train experiment=demo_ssdlite_shapes).", file=sys.stderr)
        sys.exit(2)
    del sys.argv[1]
    module = importlib.import_module(f"tasks.{command}")
    entry = getattr(module, "cli", None) or module.main
    sys.exit(entry())


if __name__ == "__main__":
    main()
