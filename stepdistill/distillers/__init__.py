"""Distillation methods, one file each, behind the contract in ``base.py``."""

from .base import Context, Distiller, Trainable
from .registry import BUILTIN, get_method

__all__ = ["BUILTIN", "Context", "Distiller", "Trainable", "get_method"]
