"""Checks of the arguments the bundle configs pass to the inference and evaluation components."""

from __future__ import annotations


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
