"""One dotted config key: its name checked against the schema, its value typed.

An unknown key is an error listing the closest valid keys, a renamed key names its new name, and a
value of the wrong type names the key, the value and the expected type. `flatten` turns a YAML file's
nested mappings into dotted keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import yaml

from config.schema import RENAMED, STAGE_SCRIPTS, Config, stage_of
from config.yaml12 import load_yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def key_fields(cls_or_obj: Any) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are config keys or sections (not Config.overridden)."""
    return [f for f in dataclasses.fields(cls_or_obj) if f.metadata.get("key", True)]


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in key_fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def renamed(key: str) -> str | None:
    """The new name of an old key (RENAMED holds keys and whole sections), or None."""
    if key in RENAMED:
        return RENAMED[key]
    section, _, rest = key.partition(".")
    return f"{RENAMED[section]}.{rest}" if rest and section in RENAMED else None


def _unknown_key(key: str, source: str) -> ConfigError:
    new = renamed(key)
    if new is not None:
        owner = stage_of(new)  # said now, not after the next try
        only = f" (read by {STAGE_SCRIPTS[owner]} only)" if owner else ""
        return ConfigError(f"config key {key!r} ({source}) was renamed: use {new}{only}")
    valid = _leaf_keys(Config)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    # A bare or misplaced leaf (`epochs`, `data.epochs`) should point at `train.epochs`.
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r} ({source}){hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False}


def shown(value: Any) -> str:
    """repr(value) as messages print it; a number of hundreds of digits (or such an override) cut short."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(str(value))} characters)"


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Return value as type tp, or raise a ConfigError naming key, value and type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, source)
            except ConfigError:
                pass
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item_tp, source) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:  # YAML 1.1's words, as before config/yaml12.py
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int past float's range, refused below as infinite
                number = math.inf
        elif isinstance(value, str) and "_" not in value:  # `nan`, `inf` (named below); Python's float takes 1_0
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no key means anything by nan or inf (a NaN lr trains NaN weights)
                raise ConfigError(f"config key {key!r} ({source}) expects a finite number, got {shown(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name=123` means the string "123"
    raise ConfigError(
        f"config key {key!r} ({source}) expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _resolve(cfg: Any, key: str, source: str) -> tuple[Any, str, Any]:
    """(section object, field name, field type) of a dotted key, or an unknown-key error."""
    *sections, leaf = key.split(".")
    node = cfg
    for part in sections:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in key_fields(node)}:
            raise _unknown_key(key, source)
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in key_fields(node)}:
        raise _unknown_key(key, source)
    tp = typing.get_type_hints(type(node))[leaf]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key {key!r} ({source}) is a section; set its keys, e.g. {key}.<key>=...")
    return node, leaf, tp


def set_key(cfg: Any, key: str, value: Any, source: str) -> None:
    """Set dotted `key` of `cfg` to a parsed `value`, type-checked; `source` names where it came from."""
    node, leaf, tp = _resolve(cfg, key, source)
    setattr(node, leaf, _coerce(key, value, tp, source))


def set_override(cfg: Any, key: str, raw: str, source: str) -> None:
    """A command-line value: text as typed for string keys (`name=007`), YAML for the others."""
    node, leaf, tp = _resolve(cfg, key, source)
    if tp is str:
        setattr(node, leaf, raw)
        return
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"config key {key!r} ({source}): {shown(raw)} is not a valid value "
                          f"({str(e).splitlines()[0]}); lists look like [10, 20]") from None
    setattr(node, leaf, _coerce(key, value, tp, source))


def flatten(tree: dict, prefix: str = "", _inside: tuple[int, ...] = ()) -> dict[str, Any]:
    """Nested dicts -> {dotted key: leaf value}. A key given twice (nested and dotted: `train: {lr: 1}` and
    `train.lr: 2`), or a mapping inside itself (a YAML anchor used within it), is a ConfigError; an empty
    mapping below a section (`lr: {}`) is a leaf value, refused by the key's type."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and id(v) in _inside + (id(tree),):
            raise ConfigError(f"{key} holds itself (a YAML alias inside its own anchor): write its keys out")
        parts = flatten(v, f"{key}.", _inside + (id(tree),)) if isinstance(v, dict) and (v or not prefix) else {key: v}
        for part, value in parts.items():
            if part in flat:
                raise ConfigError(f"{part} is given twice (as nested and as dotted keys): keep one")
            flat[part] = value
    return flat
