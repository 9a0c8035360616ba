"""Typed, validated run configs: YAML -> dataclasses, ``key=value`` overrides, one clear error.

Every key is checked against the dataclass fields (an unknown key is an error naming its dotted path
and the closest known key), values are coerced to the field types (``parse``), and each dataclass
validates itself in ``__post_init__`` (``schema``, litgpt / torchtune style). Method-specific options
live under ``method_args`` and are validated by the method's own ``Options`` dataclass.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError
from .parse import OverrideText, apply_overrides, check_range, expand_path, from_dict, parse_override, to_dict
from .schema import (
    PRECISIONS,
    DataConfig,
    OptimConfig,
    OracleConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    torch_dtype,
)
from .yaml_loader import ConfigLoader, ConfigYAMLError, load_yaml

__all__ = ["PRECISIONS", "ConfigError", "ConfigLoader", "DataConfig", "OptimConfig", "OracleConfig", "OverrideText",
           "RunConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "apply_overrides", "check_range",
           "dump_config", "expand_path", "from_dict", "load_config", "load_yaml", "parse_override", "to_dict",
           "torch_dtype"]


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML file (or start empty), apply ``key=value`` overrides, validate. The file and the
    overrides' values are read by ``yaml_loader.ConfigLoader`` (decimal numbers only, no duplicate keys)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' " + ("is a folder, not a file" if p.is_dir() else "does not exist"))
        try:
            raw = load_yaml(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except ConfigYAMLError as exc:  # a duplicate key, a non-decimal !!int
            raise ConfigError(f"config file '{p}': {exc.describe()} ({exc.where()})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    for key in ("method", "teacher"):
        if key not in raw:
            raise ConfigError(f"missing config key '{key}'")
    return from_dict(RunConfig, raw)


def dump_config(cfg: RunConfig, method_args: dict | None = None) -> str:
    """The config as YAML; ``method_args`` (the method's resolved options) replaces the section as given."""
    data = cfg.to_dict()
    if method_args is not None:
        data["method_args"] = method_args
    return yaml.safe_dump(data, sort_keys=False)
