"""Reading fedtune's TOML files: one way to read them and one wording for every mistake.

Three kinds of file are written by people — the run configuration, a hospital's node file and
an experiment file — and each must refuse a typo instead of falling back to a default. They
share this reader so that "file not found", "not valid TOML", an unknown section or key (named,
with the allowed ones) and a value of the wrong type read the same in all three.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedtune.core.errors import ConfigError


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The file's tables; `what` names the kind of file in the errors ("node file", ...)."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def unknown(what: str, allowed: Iterable[str]) -> str:
    """"unknown key 'x' in [train]; allowed: a, b." — one wording for every typo."""
    return f"unknown {what}; allowed: {', '.join(sorted(allowed))}."


def check_tables(
    origin: str, raw: Mapping[str, Any], allowed: Mapping[str, Collection[str] | None]
) -> None:
    """Refuse sections not in `allowed`, sections that are not tables, and keys a section
    does not know (a section mapped to None has its keys checked elsewhere)."""
    for section, values in raw.items():
        if section not in allowed:
            raise ConfigError(f"{origin}: " + unknown(f"section [{section}]", allowed))
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table of settings.")
        keys = allowed[section]
        if keys is None:
            continue
        for key in values:
            if key not in keys:
                raise ConfigError(f"{origin}: " + unknown(f"key {key!r} in [{section}]", keys))


def scalar(origin: str, where: str, key: str, value: Any, kind: type) -> Any:
    """`value` checked as a `kind` (str, int, float or bool); a whole number passes for a float,
    true/false never passes for a number."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{origin}: [{where}] {key} must be a {kind.__name__}, got {value!r}.")
    return value
