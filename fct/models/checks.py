"""Argument checks shared by the model constructors."""

from __future__ import annotations

from typing import Any

from fct.errors import FCTError


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (not a bool), else an FCTError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FCTError(f"{name} must be a positive integer, got {value!r}")
    return value
