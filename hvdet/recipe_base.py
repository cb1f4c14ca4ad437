"""Recipe inheritance: ``_base_: other.yaml`` (a path relative to the recipe's folder, or a list of
them), as MMDetection and detectron2 users expect. Torch-free.

The bases are read first (recursively, each with its own ``_base_``; several are merged in order,
later ones win), then the recipe's keys are deep-merged over them: mappings merge key by key, lists
and scalars replace. ``_delete_: true`` inside a mapping replaces the base's mapping instead of
merging into it (MMDetection's convention). The result is one plain mapping without ``_base_``:
what :func:`hvdet.config.load_config` validates and a run's ``config.yaml`` holds.

Each key remembers the file that wrote it last (a :class:`hvdet.dataclass_yaml.Sources`), so that
an unknown key or a wrong value is reported in the file where it was written.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from hvdet.dataclass_yaml import ConfigError, Sources

BASE_KEY, DELETE_KEY = "_base_", "_delete_"


def load(path: str | Path) -> tuple[dict, Sources]:
    """The recipe at ``path`` merged over its bases, and which file wrote each of its keys."""
    raw, files = _load(str(path), [])
    return raw, Sources(str(path), files)


def _load(path: str, chain: list[str]) -> tuple[dict, dict[str, str]]:
    chain = [*chain, path]
    raw = _read(path)
    bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of them, got {bases!r}")
    merged: dict = {}
    files: dict[str, str] = {}   # dotted key -> the file that wrote it last
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if any(os.path.realpath(base_path) == os.path.realpath(p) for p in chain):
            raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join([*chain, base_path])}")
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: {BASE_KEY} {base!r} does not exist ({base_path})")
        base_raw, base_files = _load(base_path, chain)
        merged = merge(merged, base_raw, files, path)
        files.update(base_files)
    merged = merge(merged, raw, files, path)
    files.update(_written(raw, path))
    return merged, files


def _read(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def merge(base: dict, child: dict, files: dict[str, str] | None = None, path: str = "<dict>",
          prefix: str = "") -> dict:
    """``child`` deep-merged over ``base`` (neither is changed); the keys of ``base`` it replaces are
    dropped from ``files`` (``base``'s record of who wrote what)."""
    delete = child.get(DELETE_KEY, False)
    if not isinstance(delete, bool):
        raise ConfigError(f"{path}: {prefix}{DELETE_KEY} must be true or false, got {delete!r}")
    if delete:
        _forget(files, prefix)
    out = {} if delete else dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if key == DELETE_KEY:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, files, path, f"{dotted}.")
        else:
            _forget(files, f"{dotted}.")  # a mapping replaced by a value: its keys are gone
            out[key] = merge({}, value, None, path, f"{dotted}.") if isinstance(value, dict) else value
    return out


def _forget(files: dict[str, str] | None, prefix: str) -> None:
    for key in [k for k in files or () if k.startswith(prefix)]:
        del files[key]


def _written(raw: dict, path: str, prefix: str = "") -> dict[str, str]:
    """Every dotted key of one file's own mapping -> that file."""
    out = {}
    for key, value in raw.items():
        if key != DELETE_KEY:
            out[f"{prefix}{key}"] = path
            if isinstance(value, dict):
                out.update(_written(value, path, f"{prefix}{key}."))
    return out
