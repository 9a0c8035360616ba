"""The one YAML reader of the config layer (config files and ``key=value`` override values): YAML's safe
schema, except that

- a number is written in decimal: ``-12``, ``3``, ``1.5``, ``.5``, ``1.5e-3``, ``.inf``, ``.nan``. YAML 1.1's
  other number forms (``010`` and ``0o10`` octal, ``0x10`` hex, ``0b101`` binary, ``1:30`` sexagesimal,
  ``1_000`` underscores) are text here, so a number field given one fails naming its key
  (:func:`non_decimal_number` tells such text apart) and a text field keeps it as written. ``1e-3`` (no dot)
  stays text, as in YAML 1.1: a number field reads it as the number (``parse._coerce``), a text field keeps it;
- a key given twice in one mapping (at any depth) is an error naming its dotted path and line, not the
  second value silently replacing the first (keys a ``<<`` merge brings in may still be overridden).
"""

from __future__ import annotations

import re

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

INT_TAG, FLOAT_TAG, MERGE_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"

_INT = r"[-+]?(?:0|[1-9][0-9]*)"
_FLOAT = r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
DECIMAL_INT = re.compile(_INT)
DECIMAL_FLOAT = re.compile(_FLOAT)
# the texts a number field takes as a number: the above, and an exponent without a dot (1e-3)
DECIMAL = re.compile(rf"{_INT}(?:[eE][-+]?[0-9]+)?|{_FLOAT}")
# YAML 1.1's own number forms (what yaml.safe_load reads as int or float)
_YAML11_NUMBER = [regexp for resolvers in yaml.SafeLoader.yaml_implicit_resolvers.values()
                  for tag, regexp in resolvers if tag in (INT_TAG, FLOAT_TAG)]


def non_decimal_number(text: str) -> bool:
    """Whether ``text`` is a number in a form other than decimal: one YAML 1.1 or Python reads as a
    number (``010``, ``0o10``, ``0x10``, ``0b101``, ``1:30``, ``1_000``), so taking it either way could be wrong."""
    t = text.strip()
    if not t or DECIMAL.fullmatch(t) or t.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return False
    if any(regexp.match(t) for regexp in _YAML11_NUMBER):
        return True
    for parse in (lambda s: int(s, 0), float):
        try:
            parse(t)
            return True
        except ValueError:
            pass
    return False


class ConfigYAMLError(ConstructorError):
    """A duplicate key, or a number tagged ``!!int`` / ``!!float`` that is not decimal; ``key`` is its
    dotted path in the document (with the loader's ``key_prefix``), ``line`` its 1-based line."""

    def __init__(self, key: str, what: str, mark, first_line: int | None = None):
        self.key, self.what, self.line, self.first_line = key, what, mark.line + 1, first_line
        super().__init__(None, None, self.describe(), mark)

    def describe(self) -> str:
        if self.first_line is not None:
            return f"duplicate key '{self.key}'"
        return f"{self.key}: {self.what}" if self.key else self.what

    def where(self) -> str:
        return f"line {self.line}" + (f"; first at line {self.first_line}" if self.first_line is not None else "")


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader with decimal numbers only and no duplicate keys (the module's docstring)."""

    key_prefix = ""  # the dotted key the document is the value of (an override's key), for messages

    def _path_of(self, node) -> str:
        return getattr(self, "_paths", {}).get(id(node), self.key_prefix)

    def _note_path(self, node, path: str) -> None:
        paths = self.__dict__.setdefault("_paths", {})
        paths.setdefault(id(node), path)
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._note_path(item, f"{path}[{i}]")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            path = self._path_of(node)
            seen: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                dotted = f"{path}.{key}" if path else str(key)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: SafeLoader says so
                    continue
                if first is not key_node:
                    raise ConfigYAMLError(dotted, "duplicate key", key_node.start_mark, first.start_mark.line + 1)
                self._note_path(value_node, dotted)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        if not DECIMAL_INT.fullmatch(value):  # an explicit !!int on 010, 0x10, 1:30 ...
            raise ConfigYAMLError(self._path_of(node), f"{value!r} is not a decimal number", node.start_mark)
        return int(value)

    def construct_yaml_float(self, node):
        value = self.construct_scalar(node)
        if not DECIMAL.fullmatch(value):
            raise ConfigYAMLError(self._path_of(node), f"{value!r} is not a decimal number", node.start_mark)
        return super().construct_yaml_float(node)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(FLOAT_TAG, re.compile(f"^(?:{_FLOAT})$"), list("-+0123456789."))
ConfigLoader.add_implicit_resolver(INT_TAG, re.compile(f"^(?:{_INT})$"), list("-+0123456789"))
ConfigLoader.add_constructor(INT_TAG, ConfigLoader.construct_yaml_int)
ConfigLoader.add_constructor(FLOAT_TAG, ConfigLoader.construct_yaml_float)


def load_yaml(text: str, prefix: str = ""):
    """``text``'s YAML value read by :class:`ConfigLoader`; ``prefix``: the dotted key it is the value of."""
    loader = ConfigLoader(text)
    loader.key_prefix = prefix
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
