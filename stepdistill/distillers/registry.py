"""Method names to classes: the built-in methods, and plug-ins named ``package.module:ClassName``.

Built-ins are listed here by import path and imported on first use, so that no module imports every
method to fill a table.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Distiller

BUILTIN = {
    "progressive": "stepdistill.distillers.progressive:Progressive",
    "guided": "stepdistill.distillers.guided:Guided",
    "boot": "stepdistill.distillers.boot:Boot",
    "vsd": "stepdistill.distillers.vsd:VSD",
    "dmd": "stepdistill.distillers.dmd:DMD",
    "dmd2": "stepdistill.distillers.dmd:DMD2",
    "phased_dmd": "stepdistill.distillers.phased_dmd:PhasedDMD",
    "sid": "stepdistill.distillers.sid:SiD",
    "lcm": "stepdistill.distillers.consistency:Consistency",
    "disback": "stepdistill.distillers.disback:DisBack",
    "tsm": "stepdistill.distillers.tsm:TeacherScoreMatching",
}


def _load(path: str) -> type:
    mod_name, attr = path.split(":", 1) if ":" in path else path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"method: cannot import plug-in '{path}' ({exc})") from exc


def get_method(name: str) -> type[Distiller]:
    """A built-in method by name, or a plug-in by dotted path ``package.module:ClassName``."""
    if name in BUILTIN:
        return _load(BUILTIN[name])
    if ":" in name or "." in name:
        cls = _load(name)
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise ConfigError(f"method: plug-in '{name}' is not a subclass of stepdistill.distillers.Distiller")
        missing = [a for a in ("trainables", "loss") if getattr(cls, a) is getattr(Distiller, a)]
        if missing or not hasattr(cls, "Options"):
            raise ConfigError(f"method: plug-in '{name}' does not define {missing + ([] if hasattr(cls, 'Options') else ['Options'])} "
                              f"of the distiller contract")
        return cls
    raise ConfigError(f"method: unknown method '{name}'; built-in: {sorted(BUILTIN)} or a 'module:Class' plug-in")
