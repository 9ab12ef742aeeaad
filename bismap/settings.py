"""Strict conversion of plain config dicts into typed, frozen dataclasses.

Every stage reads its settings through one of these dataclasses, so a key that
the stage does not know fails at once, naming the key and the section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

SettingsT = TypeVar("SettingsT")


class SettingsError(ValueError):
    """A settings dict does not match its dataclass."""


def from_dict(cls: type[SettingsT], data: dict[str, Any] | None, section: str) -> SettingsT:
    """Build ``cls`` from ``data``; unknown or missing keys raise ``SettingsError``.

    Nested dataclass fields are converted recursively, and lists become tuples
    where the field is annotated as a tuple, so the result is hashable.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SettingsError(f"{section}: missing required key '{field.name}'")
            continue
        values[field.name] = _convert(hints[field.name], data[field.name], f"{section}.{field.name}")
    return cls(**values)


def _convert(annotation: Any, value: Any, section: str) -> Any:
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise SettingsError(f"{section}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, section)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _convert(options[0], value, section)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain builtin types (lists, dicts, scalars) for params and checkpoints."""
    return _plain(dataclasses.asdict(settings))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def with_run_seed(settings: Any, run_seed: int | str, stride: int = 1) -> Any:
    """``settings`` (plain dicts, lists, scalars) with every integer under a key 'seed' offset by stride x run_seed.

    The workflow's run seeds (config ``seeds``) enter every stage through this:
    stage seeds get +run_seed, the digit-scenes split seeds +1000 x run_seed, so
    run seed 0 is exactly the configured run. Returns new builtin dicts and lists
    (tuples become lists), whatever the nesting.
    """
    offset = stride * int(run_seed)
    if isinstance(settings, dict):
        return {key: value + offset if key == "seed" and isinstance(value, int) and not isinstance(value, bool)
                else with_run_seed(value, run_seed, stride) for key, value in settings.items()}
    if isinstance(settings, (list, tuple)):
        return [with_run_seed(item, run_seed, stride) for item in settings]
    return settings
