"""Checks of the arguments the bundle configs pass to the inference and evaluation components."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def require_booleans(**flags) -> None:
    """Refuse any flag that is not a bool, naming it.

    A config value given on the command line as ``false`` can arrive as the string "false", which is truthy:
    taken as is, it would silently turn the option ON.

    Raises:
        ValueError: ``<name> must be true or false (a boolean), got <value>``.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false (a boolean), got {value!r}")


def overrides_mapping(overrides: Mapping | str | os.PathLike | None) -> dict:
    """Config overrides (config id -> value) from a mapping or a YAML/JSON file, for the command-line tools.

    Raises:
        FileNotFoundError: the file does not exist (named). TypeError: its content is not a mapping.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    import yaml

    path = Path(str(overrides))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: overrides file not found")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise TypeError(f"{path}: overrides must be a mapping of config id -> value, got {type(content).__name__}")
    return content
