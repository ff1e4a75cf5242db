"""Building objects from config nodes (Hydra's `instantiate`) with a user's error kept as itself."""
from __future__ import annotations

import contextlib
import io
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def instantiate_node(node: Any) -> Any:
    """hydra's instantiate, but a loader's own error (a missing file, a bad value) comes out as itself
    rather than wrapped in hydra's InstantiationException, so user_errors_exit can report it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it loads
            return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, OSError)):
            raise err.__cause__ from None
        raise

