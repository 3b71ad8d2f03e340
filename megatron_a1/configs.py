"""Typed configs: dataclasses loaded from YAML with dotted ``key=value`` overrides.

    cfg = load_config(TrainConfig, "examples/configs/sft_tiny_cpu.yaml", ["optim.lr=3e-4"])

Every section is a ``@dataclass(kw_only=True)`` whose fields carry a docstring. Loading is
strict: an unknown key, a value of the wrong type or a missing required field raises
:class:`ConfigError` naming the dotted path, before any compute starts. Types understood: bool,
int, float (ints accepted), str, ``Literal[...]``, ``X | None``, ``list[X]``, ``dict[str, X]``
and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match the schema; the message names the key.

    ``key`` is the dotted key at fault when one is (``train.micro_batch_size``) and ``detail``
    the message without it, so :func:`load_config` can blame the override that set the key.
    """

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        self.detail = message if detail is None else detail


def _bad(path: str, detail: str) -> ConfigError:
    return ConfigError(f"{path}: {detail}", key=path, detail=detail)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _bad(path, f"{value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise _bad(path, f"{value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _bad(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, item = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _bad(path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, f"expected a string, got {value!r}")
        return value
    raise _bad(path, f"unsupported field type {tp}")


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (see module docstring)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"'{where}{k}'" for k in unknown)
            + f"; {cls.__name__} accepts: {', '.join(sorted(fields))}",
            key=f"{where}{unknown[0]}",
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'", key=key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain dict/list/scalar form of a config (for logging and checkpoint metadata)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=VALUE`` overrides (VALUE parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); "
                              "quote an override with spaces for the shell, e.g. "
                              "'rollout.tasks={tool: bundled}'") from None
    return data


def load_config(cls: type[T], path: str | None = None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults) plus dotted overrides, strictly."""
    data: dict = {}
    if path:
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    overrides = list(overrides)
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        item = _override_setting(exc.key, overrides)
        if item is None:
            raise ConfigError(f"{path or 'config'}: {exc}", key=exc.key) from None
        exact = item.split("=", 1)[0].strip() == exc.key
        raise ConfigError(f"override {item}: {exc.detail if exact else exc}", key=exc.key,
                          detail=exc.detail) from None


def _override_setting(key: str | None, overrides: list[str]) -> str | None:
    """The last override that set ``key``, a section above it or a key below it (None: the
    value came from the file)."""
    if key is None:
        return None
    for item in reversed(overrides):
        k = item.split("=", 1)[0].strip()
        if k == key or key.startswith((k + ".", k + "[")) or k.startswith(key + "."):
            return item
    return None
