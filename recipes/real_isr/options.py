"""Settings dataclasses as YAML presets and command lines: the machinery the recipe scripts share.

A script declares its options as one dataclass (with a ``validate()`` method); values come from the defaults, then a
YAML preset (``--config``, a flat mapping; an unknown key names itself and the closest valid names), then one flag
per field (dict fields take JSON, list fields several words, booleans ``true`` / ``false``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "field_names", "load_preset", "parse", "unknown_key_error"]


def field_names(cls: type) -> list[str]:
    """Names of the dataclass ``cls``'s fields, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_error(keys: list[str], where: str, cls: type) -> ValueError:
    """A ``ValueError`` naming each unknown key, the closest field names, and every valid name."""
    names = field_names(cls)
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ValueError(f"unknown option(s) in {where}: {'; '.join(hints)}. Valid options: {', '.join(names)}")


# ------------------------------------------------------------------------------------------------ presets


def load_preset(path: str | os.PathLike[str], cls: type) -> dict[str, Any]:
    """Read a YAML preset: a flat mapping of the dataclass ``cls``'s field names to values.

    Args:
        path: The ``.yaml`` file.
        cls: The settings dataclass whose fields are the valid keys.

    Returns:
        The mapping (only the keys the file sets).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a mapping or has a key that is not an option (the message names it and suggests
            the closest names).
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"preset {file} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {file} must be a mapping of option names to values, got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in field_names(cls)]
    if unknown:
        raise unknown_key_error(unknown, f"preset {file}", cls)
    return {key: _coerce_number(cls, key, value) for key, value in data.items()}


def _coerce_number(cls: type, name: str, value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string: turn numeric strings of float fields into floats."""
    if isinstance(value, str) and typing.get_type_hints(cls)[name] in (float, float | None):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ------------------------------------------------------------------------------------------------ command line


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_or_null(text: str) -> Any:
    if text.lower() in ("null", "none"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"expected JSON (e.g. '{{\"r\": 4}}') or null, got {text!r}: {error}"
        ) from None


def _optional(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("null", "none") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _argument_spec(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field's type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"type": _bool, "metavar": "true|false"}
    if origin is dict:
        return {"type": _json_or_null, "metavar": "JSON"}
    if origin is list:
        return {"nargs": "*", "type": str, "metavar": "PATH"}
    kind = {int: int, float: float, str: str}[annotation]
    return {"type": _optional(kind) if optional else kind}


def build_parser(cls: type, prog: str, description: str, presets: str = "") -> argparse.ArgumentParser:
    """An argument parser with ``--config`` plus one flag per field of the dataclass ``cls``.

    Flags default to ``argparse.SUPPRESS``, so only the flags actually given override the preset.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML preset ({presets})" if presets else "YAML preset")
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for item in dataclasses.fields(cls):
        spec = _argument_spec(hints[item.name])
        default = getattr(defaults, item.name)
        shown = json.dumps(default) if isinstance(default, dict) else default
        parser.add_argument(f"--{item.name}", dest=item.name, default=argparse.SUPPRESS, help=f"(default: {shown})",
                            **spec)
    return parser


def parse(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    """Defaults, then the ``--config`` preset, then the flags; returns ``cls(**merged).validate()``.

    Args:
        cls: The settings dataclass (with a ``validate()`` method returning the instance).
        parser: From :func:`build_parser`.
        argv: Command-line words (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: For a malformed flag (argparse's usage message).
        ValueError: For an unknown flag or preset key (naming it, with the closest valid names) or a bad value.
        FileNotFoundError: For a missing preset file.
    """
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [word.lstrip("-").split("=")[0] for word in unknown if word.startswith("--")]
        if flags:
            raise unknown_key_error(flags, "the command line", cls)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    preset = values.pop("config")
    merged = load_preset(preset, cls) if preset else {}
    merged.update(values)
    return cls(**merged).validate()
