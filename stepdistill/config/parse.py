"""Reading configs: YAML values and ``key=value`` command-line overrides, coerced to the types of
dataclass fields with one error naming the dotted key (an unknown key names the closest known one)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .yaml_loader import ConfigYAMLError, load_yaml, non_decimal_number


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class OverrideText(str):
    """The text of a command-line ``key=value`` override, read by the type of the field it sets: a
    string field takes the text as given (``train.mixed_precision=no`` stays ``"no"``, not YAML 1.1's
    False), any other field its YAML value (read as config files are: ``yaml_loader``)."""

    @property
    def yaml_value(self) -> Any:
        return self.parse()

    def parse(self, key: str = "") -> Any:
        """The text's YAML value (None for empty text); ``key``: the dotted key it sets, for messages."""
        return load_yaml(str(self), key) if str(self) != "" else None

    def value_for(self, tp, key: str) -> Any:
        """The value this text gives a field of type ``tp``: a text field takes the YAML string when the
        text is one (quotes removed) and the text as written when YAML would read it as something else
        (``no``, ``1e-3``, ``@x``); empty or null text is None; other fields take the YAML value."""
        text = str(self)
        try:
            parsed = self.parse(key)
        except ConfigYAMLError as exc:  # a duplicate key, a non-decimal !!int
            raise ConfigError(exc.describe()) from None
        except yaml.YAMLError as exc:
            if _is_text_type(tp) and text.strip():
                return text
            raise ConfigError(f"{key}: {text!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if parsed is None:
            return None
        if isinstance(parsed, list) and _takes_text_list(tp):
            return yaml.load(text, Loader=yaml.BaseLoader)  # a list of texts: every item as written
        if _is_text_type(tp) and not isinstance(parsed, (list, dict)):
            return parsed if isinstance(parsed, str) else text
        return parsed


def _is_text_type(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return True
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_is_text_type(a) for a in args if a is not type(None))
    return False


def _takes_text_list(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return bool(args) and _is_text_type(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_text_list(a) for a in args)
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:  # untyped here (method_args): the method's Options read the override's text later
        return value
    if isinstance(value, OverrideText):
        value = value.value_for(tp, key)
        if value is None and type(None) in args:
            return None
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not any of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(value, str) and tp in (int, float) and non_decimal_number(value):
        raise ConfigError(f"{key}: {value!r} is not a decimal number")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys by dotted name."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{prefix + '.' if prefix else ''}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj) -> Any:
    if isinstance(obj, OverrideText):  # an override no dataclass typed (inside method_args): its YAML value
        try:
            return obj.yaml_value
        except yaml.YAMLError:
            return str(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def fail(key: str, msg: str):
    """Raise one ConfigError naming ``key``."""
    raise ConfigError(f"{key}: {msg}")


_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)(?P<close>\}?)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_path(key: str, value):
    """A path field's text with ``~`` / ``~user`` at its start and ``$VAR`` / ``${VAR}`` expanded, or one
    ConfigError naming ``key`` (an unknown user, a variable that is not set, an unclosed ``${``). Text
    without a leading ``~`` or a ``$`` (hub ids, ``stepdistill:...``), ``hf:`` ids and non-text values are
    returned as they are; a ``$`` not followed by a name or ``{`` stays a ``$``."""
    if not isinstance(value, str) or value.startswith("hf:") or not (value.startswith("~") or "$" in value):
        return value
    text = value
    if text.startswith("~"):
        text = os.path.expanduser(text)
        if text.startswith("~"):
            fail(key, f"{value!r}: '{value.split('/', 1)[0]}' names no home folder (no such user)")

    def variable(match: re.Match) -> str:
        name = match["bare"] if match["bare"] is not None else match["braced"]
        if match["bare"] is None and not match["close"]:
            fail(key, f"{value!r}: '${{' is not closed by '}}'")
        if not _NAME.fullmatch(name):
            fail(key, f"{value!r}: {match[0]!r} does not name an environment variable")
        if name not in os.environ:
            fail(key, f"{value!r}: environment variable '{name}' is not set")
        return os.environ[name]

    text = _VARIABLE.sub(variable, text)
    if not text:
        fail(key, f"{value!r} is empty once expanded")
    return text


def check_range(key: str, value, *, gt=None, ge=None, lt=None, le=None) -> None:
    """One line naming ``key`` when ``value`` (if not None) is outside the given bounds."""
    if value is None:
        return
    for ok, rule in ((gt is None or value > gt, f"> {gt}"), (ge is None or value >= ge, f">= {ge}"),
                     (lt is None or value < lt, f"< {lt}"), (le is None or value <= le, f"<= {le}")):
        if not ok:
            fail(key, f"must be {rule}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """(dotted key, value) of ``key=value``; the value keeps its text (:class:`OverrideText`) until the
    field's type is known."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has no key" if not key else f"override {text!r}: '{key}' is not a dotted key")
    return key.split("."), OverrideText(raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if isinstance(node.get(part), OverrideText):  # a mapping set by an earlier override
                node[part] = node[part].value_for(dict, text)
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a mapping")
            node = node[part]
        node[path[-1]] = value
    return raw
