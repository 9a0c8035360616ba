"""The distiller contract: what the training loop asks of every method.

Words used throughout (docs/ARCHITECTURE.md, glossary): an *iteration* is one pass of the loop
(``train.max_steps`` counts them, ``checkpoint-N`` is written after iteration N); an *update* is one
optimiser step of one trainable inside an iteration (e.g. DMD2's fake score, then its student);
*round* is a halving of progressive distillation, *stage* one of guided distillation's two stages,
and *phase* only ever one of Phased DMD's noise intervals.

A method subclasses :class:`Distiller` and overrides what it needs; every hook has a documented
default. The loop in ``stepdistill.training`` calls, per iteration::

    for name in distiller.reinitialised(iteration): clear that trainable's optimiser state
    for name in distiller.updates(iteration):
        loss = distiller.loss(batch, iteration, name)["loss"]   # one per micro-batch
        backward, average over ranks, clip, step the optimiser of ``name``

and saves ``state_dict()`` with every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..config import RunConfig
from ..data.batch import Batch, BatchSource
from ..diffusion.denoiser import Denoiser
from ..models.student import Student
from ..models.teachers import Teacher


@dataclass
class Trainable:
    """A module one optimiser updates."""

    module: nn.Module
    lr: float
    on_prepared: Callable[[nn.Module], None] | None = None  # receives the accelerate-prepared module
    is_student: bool = False  # the EMA tracks this one
    betas: tuple[float, float] | None = None  # the method's Adam betas (optim.<name>.betas overrides)


@dataclass
class Context:
    """What a distiller is built from."""

    teacher: Teacher  # frozen
    init: Denoiser  # the network students and fake scores are copied from (the teacher's, or the oracle's fitted MLP)
    source: BatchSource
    config: RunConfig
    device: torch.device


class Distiller:
    """Base class of every method. Subclasses set ``name`` and ``Options`` and implement
    :meth:`trainables` and :meth:`loss`; the other hooks have defaults."""

    name: ClassVar[str] = ""  # the method name configs use (plug-ins: their 'module:Class' path)
    Options: ClassVar[type]  # dataclass of the method's options (``method_args``)
    student: Student  # what the method trains; sampling, validation and export read it

    def __init__(self, ctx: Context, options: Any):
        self.ctx, self.options = ctx, options

    @classmethod
    def trainable_names(cls, config, options) -> list[str]:
        """The names :meth:`trainables` will return, known from the config alone, so that
        ``optim.<name>`` keys are checked before the teacher is loaded. Default: ``["student"]``."""
        return ["student"]

    @classmethod
    def check_config(cls, config, options) -> None:
        """Checks of the method's options against the rest of the config, made before the teacher is
        loaded or anything is written; raise ``ValueError`` naming the key. Default: none."""

    @classmethod
    def cfg_options(cls, options) -> dict[str, Any]:
        """The options (``method_args`` names, their values) that apply classifier-free guidance, so that
        they can be refused on a teacher whose guidance scale is a network input (FLUX.1-dev's
        ``guidance_embeds``): such a teacher was distilled from CFG into that input and is used with its
        embedded guidance (``teacher.guidance``). On it every method feeds the teacher, the student and
        any fake score that guidance and applies no CFG; the student samples and exports with it. A
        value of None or 1 means no CFG. Default: none."""
        return {}

    def trainables(self) -> dict[str, Trainable]:
        """The modules the method trains, by name, with their learning rates."""
        raise NotImplementedError

    def updates(self, iteration: int) -> list[str]:
        """The trainables updated at this iteration, in order (the score methods' two-time-scale rule
        lives here). Default: the student, every iteration."""
        return ["student"]

    def loss(self, batch: Batch, iteration: int, update: str) -> dict[str, torch.Tensor]:
        """The losses of one update on one micro-batch: ``"loss"`` is back-propagated into the
        trainable ``update``, every other entry is logged."""
        raise NotImplementedError

    def lr_factor(self, name: str, iteration: int) -> float:
        """A factor on trainable ``name``'s learning rate at this iteration, on top of
        ``train.lr_schedule`` (progressive distillation anneals within each round). Default: 1."""
        return 1.0

    def reinitialised(self, iteration: int) -> list[str]:
        """Trainables whose weights the method re-initialised at the start of this iteration, so that
        the loop clears their optimiser state. Default: none."""
        return []

    def state_dict(self) -> dict:
        """State beyond the trainables' weights (rounds, stages, phases), saved in checkpoints as JSON
        and safetensors. Default: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output on resume."""

    def final_parts(self) -> dict[str, nn.Module]:
        """Networks a finished run writes beside the student, by name; the trainer gathers each into a
        whole copy (all processes take part when it is sharded) and hands them to :meth:`save_final`.
        Default: none."""
        return {}

    def save_final(self, run_dir, parts: dict[str, nn.Module]) -> None:
        """Write :meth:`final_parts`' whole networks into ``run_dir`` (the main process only). Default:
        nothing."""
