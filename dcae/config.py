"""Typed configs are dataclasses: this module turns them into dicts and back (unknown keys refused), applies dotted
`key=value` overrides from a command line, and hashes them. Every config in dcae (training, diffusion, run files) goes
through these functions, so a typo fails the same way everywhere."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dcae.errors import DCAEError


class ConfigError(DCAEError, ValueError):
    """A config that does not fit its dataclass: a user error (one line in the CLI) and a ValueError for callers."""


def is_integer(value: Any, low: int = 0, high: int = 2 ** 62) -> bool:
    """An int (not a bool) in [low, high]: the range check of a config or file field."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_finite_number(value: Any, low: float = -math.inf) -> bool:
    """An int or float (not a bool), finite and >= low."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Rebuild a (nested) config dataclass from `config_to_dict`; unknown keys and values of the wrong type are an
    error (a config file is outside data: a string where a number belongs must fail here, not deep in a run), lists
    become tuples, integers in float fields become floats."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = config_from_dict(kind, value, f"{where}.{key}")
        else:
            kwargs[key] = typed_value(value, kind, f"{where}.{key}")
    return cls(**kwargs)


def typed_value(value: Any, kind: Any, where: str) -> Any:
    """`value` (from JSON) as a field of type `kind` (bool, int, float, str, tuples of them, X | None); a value of
    another type is a ConfigError. Kinds it does not know (a union of dataclasses) pass unchecked."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value
        kind, args = rest[0], typing.get_args(rest[0])
    expected = getattr(kind, "__name__", str(kind))
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={_shown(value)}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}={_shown(value)}: expected {len(args)} values")
        return tuple(typed_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return value
    if not ok:
        raise ConfigError(f"{where}={_shown(value)}: expected {'an' if expected == 'int' else 'a'} {expected}")
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def config_hash(data: Mapping[str, Any], length: int | None = None) -> str:
    """sha256 of a config's JSON (sorted keys), hex; the first `length` digits if given."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def parse_value(text: str, kind: Any, key: str) -> Any:
    """A command-line string -> a value of the field's type (bool, int, float, str, tuple, optional)."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typing.get_origin(kind) is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length, "" or "()" for empty
                args = (args[0],) * len(parts)
            return tuple(parse_value(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
        if kind is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if kind in (float, str):
            return kind(text)
    except ConfigError:  # an element of a tuple: its own message ("expected int")
        raise
    except (ValueError, OverflowError):  # int(float("1e999")) overflows
        raise ConfigError(f"override {key}={text}: expected {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"override {key}: cannot set a field of type {kind}")


def _field_owner(config: Any, key: str, fixed: tuple[str, ...]) -> tuple[Any, str, Any]:
    """Dotted key -> (the dataclass holding the field, field name, its type); sections and unknown keys refused."""
    *path, name = key.split(".")
    target = config
    for part in path:
        target = getattr(target, part, None) if dataclasses.is_dataclass(target) else None
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"override {key}: no config section {part!r}")
    kinds = typing.get_type_hints(type(target))
    if name not in kinds or name in fixed:
        raise ConfigError(f"override {key}: unknown key {name!r}")
    value = getattr(target, name)
    if dataclasses.is_dataclass(kinds[name]) or dataclasses.is_dataclass(value):
        first = dataclasses.fields(value if dataclasses.is_dataclass(value) else kinds[name])[0].name
        raise ConfigError(f"override {key}: is a section; set one of its keys, e.g. {key}.{first}=...")
    return target, name, kinds[name]


def apply_overrides(config: Any, overrides: Iterable[str] = (), settings: Mapping[str, Any] | None = None,
                    resolve_key: Callable[[str], str] = lambda key: key, fixed: tuple[str, ...] = ()) -> Any:
    """A copy of `config` with typed `settings` ({dotted key: value}, e.g. from command-line flags) and then the
    `key=value` strings of `overrides` (parsed to each field's type) applied; later ones win.

    `resolve_key` may expand short keys; `fixed` names fields that cannot be overridden.
    """
    config = copy.deepcopy(config)
    for key, value in (settings or {}).items():
        target, name, _ = _field_owner(config, resolve_key(key), fixed)
        setattr(target, name, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key = resolve_key(key.strip())
        target, name, kind = _field_owner(config, key, fixed)
        setattr(target, name, parse_value(text.strip(), kind, key))
    return config
