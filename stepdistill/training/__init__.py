"""The training loop, split by job: ``build`` (teacher, batch source, distiller, trainables),
``update`` (one optimiser step of one trainable), ``checkpoints`` (write, verify, list, resume),
``distributed`` (what the ranks agree on), ``outputs`` (sample grids, the final student, export) and
``trainer`` (the :class:`Trainer` that sequences them)."""

from .build import validate_inputs
from .checkpoints import checkpoint_problem, config_changes, list_checkpoints
from .trainer import Trainer

__all__ = ["Trainer", "checkpoint_problem", "config_changes", "list_checkpoints", "validate_inputs"]
