"""The training loop, split by job: ``build`` (teacher, batch source, distiller, trainables),
``update`` (one optimiser step of one trainable), ``checkpointer`` (write, verify, list, choose,
resume) over ``checkpoints`` (what a checkpoint folder holds), ``parallel`` (FSDP2 sharding over
processes), ``distributed`` (what the ranks agree on), ``run_folder`` (the lock and the run record),
``outputs`` and ``figures`` (sample grids, the final student, the loss plot) and ``trainer`` (the
:class:`Trainer` that sequences them)."""

from .build import validate_inputs
from .checkpoints import checkpoint_problem, config_changes, list_checkpoints
from .trainer import Trainer

__all__ = ["Trainer", "checkpoint_problem", "config_changes", "list_checkpoints", "validate_inputs"]
