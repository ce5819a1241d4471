"""Typed configs from YAML: dataclasses filled strictly, with errors that name the file and the field.

Every config in megamobi (model, run) is a dataclass. `from_dict` fills one from plain YAML data,
refusing unknown keys, wrong types and missing fields before anything is built, so a typo in a
run file fails in a second on the login node instead of an hour into a SLURM allocation.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot work. The message names the file and the field, and says what to do."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give a YAML config file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, *, where: str) -> T:
    """Build dataclass `cls` from `data`; `where` (e.g. 'configs/tiny.yaml: model') prefixes every error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    # A field's YAML key is its name, or metadata["key"] where the key is a Python keyword (async).
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, field in fields.items():
        if key in data:
            kwargs[field.name] = _coerce(hints[field.name], data[key], where=f"{where}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {key!r}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON-able data under its YAML keys (the inverse of `from_dict`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.metadata.get("key", f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")  # `stages[1]`: one entry of a list (data.stages[1].until_tokens=...)


def _step_into(node: Any, part: str, *, item: str, where: str) -> tuple[Any, str | int]:
    """(container, key) that `part` of an override's key names inside `node`: a mapping key, or `name[i]`."""
    indexed = _INDEXED.match(part)
    if not indexed:
        return node, part
    name, index = indexed.group(1), int(indexed.group(2))
    entries = node.get(name)
    if not isinstance(entries, list) or index >= len(entries):
        size = f"has {len(entries)} entries" if isinstance(entries, list) else "is not a list"
        raise ConfigError(f"{where}: override {item!r}: {name} {size}; edit the YAML file to add one")
    return entries, index


def apply_overrides(data: dict[str, Any], overrides: list[str], *, where: str) -> dict[str, Any]:
    """Apply command-line overrides `a.b.c=value` (value parsed as YAML) to nested `data`, in place;
    `a.list[i].c=value` sets a key of the i-th entry of a list (e.g. data.stages[1].until_tokens)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: override {item!r} must look like key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            container, name = _step_into(node, part, item=item, where=where)
            node = container.setdefault(name, {}) if isinstance(container, dict) else container[name]
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: override {item!r}: {part!r} is not a section")
        node, leaf = _step_into(node, leaf, item=item, where=where)
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: override {item!r}: the value is not valid YAML ({problem}); quote strings "
                              "and write lists as [a, b] and mappings as {k: v}") from None
    return data


def _coerce(tp: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where=where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        # A mapping given where a name-or-mapping is allowed (model: {...}): the mapping's own error
        # names the offending key; "matches none of" would not.
        shaped = [err for arg, err in zip((a for a in args if a is not type(None)), errors)
                  if isinstance(value, dict) and dataclasses.is_dataclass(arg)]
        raise ConfigError(shaped[0] if len(shaped) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            # A fixed-length tuple such as betas: (float, float).
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}: {list(value)!r}")
            return tuple(_coerce(t, v, where=f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        return origin(_coerce(item_type, v, where=f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(key_type, k, where=where): _coerce(value_type, v, where=f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 3e-4 as a string (it wants 3.0e-4); accept both spellings.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")  # a bug in a dataclass, not user input
