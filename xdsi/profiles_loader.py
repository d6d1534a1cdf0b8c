"""Load a declarative IHE table from ``profiles/`` (package ``xdsi.profiles``).

Every profile fact the code uses lives in one of these TOML tables; this
module only finds and parses them.
"""

import logging
import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import xdsi

logger = logging.getLogger(__name__)


def _table_file(name: str) -> Traversable:
    """Return the file of table ``name``, installed or in a source checkout.

    An installed node has ``profiles/`` as the package ``xdsi.profiles``; a
    source checkout (tests run with ``PYTHONPATH``) has it next to ``xdsi/``.
    """
    filename = f"{name}.toml"
    try:
        installed = resources.files("xdsi.profiles") / filename
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.is_file():
        return installed
    return Path(xdsi.__file__).resolve().parent.parent / "profiles" / filename


def load_profile_table(name: str) -> dict[str, Any]:
    """Parse ``profiles/<name>.toml`` and return it as a fresh dict.

    Parameters
    ----------
    name
        The table's file name without ``.toml``, e.g. ``"transactions"``.

    Raises
    ------
    FileNotFoundError
        No such table.
    tomllib.TOMLDecodeError
        The table is not valid TOML.
    """
    table_file = _table_file(name)
    logger.debug("loading profile table %s from %s", name, table_file)
    return tomllib.loads(table_file.read_text(encoding="utf-8"))
