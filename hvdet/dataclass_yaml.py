"""Nested dataclasses from YAML mappings, with typed ``key=value`` overrides: the generic half of
:mod:`hvdet.config` (which holds hvdet's schema and its rules). Torch-free.

Every key must name a field (an unknown one is an error naming the closest valid key, by difflib),
and every value must have the field's type (int is accepted for float; YAML 1.1's ``1e-4``, which
PyYAML reads as a string, is accepted as a float).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing

import yaml

from hvdet.errors import HvdetError
from hvdet.exit_codes import EXIT_CONFIG

_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(HvdetError, ValueError):
    """A recipe or override is invalid; the message names the key and where it came from."""

    exit_code = EXIT_CONFIG
    label = "config error: "


class Sources(str):
    """A recipe's file name that also knows which file (the recipe, one of its ``_base_`` files, an
    override) wrote each dotted key, so that an error names where the bad key was written."""

    def __new__(cls, name: str, files: dict[str, str]):
        self = super().__new__(cls, name)
        self.files = files
        return self

    def wrote(self, key: str, writer: str) -> None:
        """``key`` (and all below it) now comes from ``writer``, e.g. an override."""
        for k in [k for k in self.files if k.startswith(key + ".")]:
            del self.files[k]
        self.files[key] = writer

    def of(self, key: str) -> str:
        while key:
            if key in self.files:
                return self.files[key]
            key = key.rpartition(".")[0]
        return str(self)


def where(source: str, key: str) -> str:
    """The file (or override) that wrote ``key``: ``source`` itself unless it is a :class:`Sources`."""
    return source.of(key) if isinstance(source, Sources) else source


def apply_override(raw: dict, item: str, root: type) -> None:
    """Apply ``a.b.c=value`` (value parsed as a YAML scalar or flow collection) to a raw recipe dict."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. solver.base_lr=0.1")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse the value {text!r}: {err}") from None
    parts = key.split(".")
    hint = _check_path(root, parts, f"override {item!r}")
    if hint is not typing.Any:
        value = _check_type(value, hint, key, f"override {item!r}")  # name the override, not the file
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check_path(root: type, parts: list[str], where: str):
    """The type a dotted key's value must have; every component must name a field (a free-form
    dict accepts any sub-key, whose value has the dict's value type)."""
    cls = root
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(unknown_key(".".join(parts[:i + 1]), part, names, where))
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            cls = hint
        elif i == len(parts) - 1:
            return hint
        elif not _is_dict(hint):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is a {_type_name(hint)}, it has no sub-keys")
        else:
            args = typing.get_args(hint)
            return args[1] if args and i == len(parts) - 2 else typing.Any
    return dict  # a whole section, e.g. solver={...}


def unknown_key(full_key: str, key: str, names: typing.Iterable[str], where: str) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    if close:
        parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        return f"{where}: unknown key {full_key!r}; did you mean '{parent}{close[0]}'?"
    return f"{where}: unknown key {full_key!r} (valid keys here: {', '.join(sorted(names))})"


def build(cls, raw, prefix: str = "", source: str = "<dict>"):
    if not isinstance(raw, dict):
        key = prefix.rstrip(".")
        raise ConfigError(f"{where(source, key)}: {key or 'the top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(unknown_key(prefix + str(key), str(key), names, where(source, prefix + str(key))))
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check_type(value, hints[key], prefix + key, where(source, prefix + key))
    return cls(**kwargs)


def _check_type(value, hint, key: str, source: str):
    """``value`` as ``hint`` (int is accepted for float); anything else is a ConfigError."""
    ok, converted = _convert(value, hint)
    if not ok:
        tip = ""
        if isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items()):
            tip = " (YAML needs a space after the colon: {bbox: 0.5})"
        raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__}){tip}")
    return converted


def _convert(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _convert(value, arg)
            if ok:
                return True, out
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return True, float(value)  # PyYAML (YAML 1.1) reads 1e6 or 5e-4, without a dot, as strings
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_convert(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False, None
        items = {k: _convert(v, args[1]) if args else (True, v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    raise TypeError(f"unsupported config type {hint}")


def _is_dict(hint) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)
