"""docs/METHODS.md says only what the code does: every config key it quotes exists, and every default
it states is the dataclass default.

What is checked (the conventions section of docs/METHODS.md states the same rules):

- a key is a backticked ``section.key`` with section student, train, teacher, data, optim or
  method_args (``teacher.oracle.key`` and ``optim.<name>.key`` too), optionally with ``=value`` or
  ``: value``; or a backticked bare ``key: value`` / ``key=value``, a ``method_args`` key. A
  ``method_args`` key must be an option of the method whose section it is in (the ``(`<module>.py```
  of the section's heading), or of any method outside such sections;
- a default is stated in one of two forms: a parenthesised group of backticked ``key: value`` items
  that ends in "the default" / "the defaults" and a parenthesis, semicolon or full stop
  (``(`fake_updates: 1`, the default)``), or a backticked
  key followed by "default <value>" (``\\`train.grad_clip\\` (default 1.0)``); values are YAML (null is
  None);
- the word "default" within a few characters after a backticked key in any other form is an error, so
  a claim cannot slip past the check by its wording.
"""

import dataclasses
import importlib
import re
from pathlib import Path

import yaml

from stepdistill.config.schema import DataConfig, OptimConfig, OracleConfig, StudentConfig, TeacherConfig, TrainConfig
from stepdistill.distillers.registry import BUILTIN

DOC = Path(__file__).resolve().parents[2] / "docs" / "METHODS.md"
SECTIONS = {"student": StudentConfig, "train": TrainConfig, "teacher": TeacherConfig, "data": DataConfig}
TICK = re.compile(r"`([^`\n]+)`")
ASSIGN = re.compile(r"^([A-Za-z_][\w.]*)\s*(?:=|:\s)\s*(.+)$")
KEY = re.compile(r"^(?:student|train|teacher|data|optim|method_args)\.[A-Za-z_][\w.]*$")


def _options_by_module() -> dict[str, list[type]]:
    """{'vsd': [VSDOptions], 'dmd': [DMDOptions, DMD2Options], ...} from the registry."""
    out: dict[str, list[type]] = {}
    for path in BUILTIN.values():
        module, cls = path.split(":")
        opts = getattr(importlib.import_module(module), cls).Options
        out.setdefault(module.rsplit(".", 1)[1], []).append(opts)
    return out


def _default(cls, name):
    """(found, default) of field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return True, f.default
            return True, f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return False, None


def _lookup(key: str, method_options: list[type]) -> list:
    """The defaults of ``key`` in every dataclass that has it ([] when none does)."""
    parts = key.split(".")
    if parts[0] in SECTIONS and len(parts) == 2:
        classes, name = [SECTIONS[parts[0]]], parts[1]
    elif parts[:2] == ["teacher", "oracle"] and len(parts) == 3:
        classes, name = [OracleConfig], parts[2]
    elif parts[0] == "optim" and len(parts) == 3:
        classes, name = [OptimConfig], parts[2]
    elif parts[0] == "method_args" and len(parts) == 2:
        classes, name = method_options, parts[1]
    elif len(parts) == 1:
        classes, name = method_options, parts[0]
    else:
        return []
    return [d for found, d in (_default(c, name) for c in classes) if found]


def _value(text: str):
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def problems(text: str) -> list[str]:
    """Every quoted key that does not exist and every stated default that is not the default."""
    by_module, out = _options_by_module(), []
    every = [o for opts in by_module.values() for o in opts]
    for section in re.split(r"\n(?=## )", text):
        heading = re.match(r"## [^\n]*?\(`(\w+)\.py`", section)
        options = by_module.get(heading.group(1), every) if heading else every
        keys = []  # (key, value or None, end of the backtick)
        for m in TICK.finditer(section):
            token = m.group(1).strip()
            a = ASSIGN.match(token)
            key, value = (a.group(1), a.group(2)) if a else (token, None)
            if KEY.match(key) or (a and "." not in key and " " not in key):
                keys.append((key, value, m.end()))
                if not _lookup(key, options):
                    out.append(f"unknown key `{key}`" + (f" (section {heading.group(1)}.py)" if heading else ""))
        stated = {}  # end of the backtick -> (key, value)
        for m in re.finditer(r"\bthe defaults?[);.]", section):  # (`key: value`, ..., the default)
            group = section[section.rfind("(", 0, m.start()) + 1:m.start()]
            items = [ASSIGN.match(t.strip()) for t in TICK.findall(group)]
            if not items or not all(items):
                out.append(f"'the default' after {group.strip()!r}: expected (`key: value`, ..., the default)")
                continue
            start = section.rfind("(", 0, m.start()) + 1
            for t in TICK.finditer(group):
                i = ASSIGN.match(t.group(1).strip())
                stated[start + t.end()] = (i.group(1), i.group(2))
        for m in re.finditer(r"`([\w.]+)`,?\s*\(?default ([^\s,;:)]+)", section):  # `key` (default value
            stated[m.start() + len(m.group(1)) + 2] = (m.group(1), m.group(2))
        for key, value, end in keys:
            if end not in stated and re.match(r"[^`\n]{0,30}?\bdefault", section[end:]):
                out.append(f"`{key}`: a default stated in neither form")
        for key, value in stated.values():
            defaults = _lookup(key, options)
            if defaults and not all(_same(_value(value), d) for d in defaults):
                out.append(f"`{key}`: METHODS.md says default {value}, the code's is {defaults}")
    return out


def test_every_key_and_default_in_methods_md_is_the_codes():
    text = DOC.read_text()
    assert len(TICK.findall(text)) > 100  # the doc is read at all
    assert problems(text) == []


def test_the_check_finds_a_planted_wrong_key_and_a_planted_wrong_default():
    text = DOC.read_text()
    for right, wrong, found in [
        ("`method_args.fake_lr_ratio`, default 0.2", "`method_args.fake_lr_ratio`, default 0.3",
         "`method_args.fake_lr_ratio`: METHODS.md says default 0.3"),
        ("(`fake_updates: 1`, the default)", "(`fake_updates: 2`, the default)", "`fake_updates`: METHODS.md says default 2"),
        ("`fake_lora_alpha: 108.0`", "`fake_lora_alpha: 100.0`", "`fake_lora_alpha`: METHODS.md says default 100.0"),
        ("`method_args.betas: [0.0, 0.999]`", "`method_args.betas: [0.9, 0.999]`", "`method_args.betas`: METHODS.md"),
        ("`w_max: 16.0`", "`w_max: 15.0`", "`w_max`: METHODS.md says default 15.0"),
        ("`train.ema_decay` (default null)", "`train.ema_decay` (default 0.9999)", "`train.ema_decay`: METHODS.md"),
        ("`train.grad_clip` (default 1.0)", "`train.grad_klip` (default 1.0)", "unknown key `train.grad_klip`"),
        ("`train.grad_clip` (default 1.0)", "`train.grad_clip` is 1.0 by default", "`train.grad_clip`: a default stated in neither"),
        ("`guidance_mode: lsg`", "`guidance_mod: lsg`", "unknown key `guidance_mod` (section sid.py)"),
        ("`method_args.experts=false`", "`method_args.expert=false`", "unknown key `method_args.expert`"),
    ]:
        assert text.count(right) == 1, right  # the planted text replaces something the doc says
        got = problems(text.replace(right, wrong))
        assert any(p.startswith(found) for p in got), (wrong, got)
    # a key of another method is unknown in a method's own section (guidance_mode is SiD's, not VSD's)
    right = "`method_args.guidance_range: [lo, hi]`"
    assert text.count(right) == 1
    vsd = text.replace(right, "`method_args.guidance_mode: [lo, hi]`")
    assert "unknown key `method_args.guidance_mode` (section vsd.py)" in problems(vsd)
