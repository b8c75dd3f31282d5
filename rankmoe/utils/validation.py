"""Argument checks that raise ``ValueError`` naming the argument, the value and what would be valid."""

from __future__ import annotations

import json
import math
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Require an ``int`` (not a ``bool``) that is at least ``minimum``.

    Raises:
        ValueError: Naming ``name`` and ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    """Require a finite real number > 0 (>= 0 with ``allow_zero``).

    Raises:
        ValueError: Naming ``name`` and ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """Require a number in ``[0, 1)``.

    Raises:
        ValueError: Naming ``name`` and ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Require a ``bool``.

    Raises:
        ValueError: Naming ``name`` and ``value``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_json_object(name: str, value: Any) -> dict[str, Any]:
    """Require a ``dict`` with string keys that survives a JSON round trip unchanged.

    Raises:
        ValueError: Naming ``name`` and ``value`` (for example a tensor, a set or a non-finite float inside).
    """
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (JSON object), got {value!r} ({type(value).__name__})")
    try:
        restored = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be plain JSON (str keys; str/int/float/bool/None/list/dict values): {error}"
        ) from error
    if restored != value:
        raise ValueError(
            f"{name} does not survive a JSON round trip unchanged (tuples or non-str keys?): {value!r} -> {restored!r}"
        )
    return value
