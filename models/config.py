"""Parse a family's typed ``Config`` once, at the edge, from a plain mapping (YAML/JSON/CLI).

Flat configs only: every field is a scalar (int, float, bool, str), an optional scalar,
or a tuple of scalars (MLP widths). Unknown fields and wrong types fail loudly with the
family, the field and what is allowed, because a typo silently falling back to a default
is the most expensive kind of config bug.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config mapping does not fit the family's Config dataclass."""


def config_family(cls: type) -> str:
    """The family a Config belongs to: the name of its module (``models/<family>.py``)."""
    return cls.__module__.rsplit(".", 1)[-1]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{where}: expected a list of values ({tp}), got {type(value).__name__} {value!r}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported field type {tp} (configs are flat: scalars and tuples)")
    raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def parse_config(cls: type, mapping: Mapping[str, Any] | None = None):
    """Build ``cls(**mapping)`` with type checks; missing fields take the dataclass defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    family = config_family(cls)
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config field {unknown[0]!r} for family {family!r}"
            + (f" (also unknown: {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed fields: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {
        name: _coerce(value, hints[name], f"config field {name!r} of family {family!r}")
        for name, value in mapping.items()
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # __post_init__ range checks
        raise ConfigError(f"family {family!r}: {e}") from e


def config_values(config: Any) -> dict:
    """A config dataclass (or mapping) as plain JSON values (tuples become lists)."""
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(raw, default=str))
