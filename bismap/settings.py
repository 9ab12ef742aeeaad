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
    if annotation is int:
        return _integer(value, section)
    return value


def _integer(value: Any, section: str) -> int:
    """An integer setting: an int, or a float with an integral value (YAML's 5.0); anything else fails here,
    naming the key, instead of later inside a job."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{section}: expected an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise SettingsError(f"{section}: expected an integer, got {value!r}")
    return int(value)


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


def merged(base: dict[str, Any], overrides: dict[str, Any], section: str) -> dict[str, Any]:
    """``base`` with ``overrides`` applied key by key, mappings recursively; a key ``base`` lacks fails, naming it.

    A self-training variant's ``overrides`` (a tuning trial) change only settings its method reads.
    """
    result = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise SettingsError(f"{section}: cannot override '{key}': not a setting here; known: {sorted(base)}")
        both_mappings = isinstance(value, dict) and isinstance(base[key], dict) and not _is_run_relative(value)
        result[key] = merged(base[key], value, f"{section}.{key}") if both_mappings else value
    return result


RUN_RELATIVE_KEYS = ("memory", "run_fraction")


def _is_run_relative(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RUN_RELATIVE_KEYS


def resolve_run_relative(settings: Any, iterations: int, section: str = "settings") -> Any:
    """Replace run-relative values by absolute ones for a run of ``iterations`` iterations.

    ``{memory: f}`` is a momentum whose exponential memory 1 / (1 - m) is the share f of the run:
    m = 1 - 1 / (f x iterations), so a setting tuned on a short run carries to a long one (0.99 on
    1,000 iterations is memory 0.1; on GTA5's 90,000 the same 0.1 is 0.99989). ``{run_fraction: f}``
    is an interval of round(f x iterations) iterations. Anything else is returned unchanged.
    """
    if _is_run_relative(settings):
        (kind, share), = settings.items()
        if not (isinstance(share, (int, float)) and share > 0):
            raise SettingsError(f"{section}: {kind} must be a number > 0, got {share!r}")
        if kind == "run_fraction":
            return max(1, round(share * iterations))
        return max(0.0, 1.0 - 1.0 / (share * iterations))
    if isinstance(settings, dict):
        return {key: resolve_run_relative(value, iterations, f"{section}.{key}") for key, value in settings.items()}
    return settings


# How a job runs, never what it computes: split off every rule's settings (rules/common.smk).
EXECUTION_KEYS = ("workers", "log_interval", "checkpoint_interval")


@dataclasses.dataclass(frozen=True)
class ExecutionSettings:
    """A rule's execution settings (DataLoader workers, log and checkpoint intervals, an evaluation's batch size).

    Rules pass them as a param of this type: Snakemake's params rerun trigger compares builtin values only, so
    editing one plans no job; and resume fingerprints hash the other params only, so it keeps resume progress.
    ``values`` has the nesting of the settings it was split from.
    """

    values: dict[str, Any]


def split_execution(settings: dict[str, Any], keys: tuple[str, ...] = EXECUTION_KEYS
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings without ``keys`` at any depth, those keys with their nesting)."""
    result: dict[str, Any] = {}
    execution: dict[str, Any] = {}
    for key, value in settings.items():
        if key in keys:
            execution[key] = value
        elif isinstance(value, dict):
            result[key], nested = split_execution(value, keys)
            if nested:
                execution[key] = nested
        else:
            result[key] = value
    return result, execution


def with_execution(settings: dict[str, Any], execution: ExecutionSettings | None) -> dict[str, Any]:
    """``settings`` with the execution settings split off them put back (the dict a stage's dataclass reads)."""
    if execution is None:
        return dict(settings)
    return _put_back(dict(settings), execution.values)


def _put_back(settings: dict[str, Any], execution: dict[str, Any]) -> dict[str, Any]:
    for key, value in execution.items():
        settings[key] = _put_back(dict(settings.get(key, {})), value) if isinstance(value, dict) else value
    return settings


def job_settings(params: Any, name: str = "settings") -> dict[str, Any]:
    """A rule's settings param (``name``) with its ``execution`` param merged back in."""
    return with_execution(getattr(params, name), params.get("execution", None))
