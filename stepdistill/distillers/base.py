"""The distiller contract, the method registry and what every method shares.

A distiller is a small object (EDM2's loss-as-callable, torchtune's recipe Protocol; no
implementation inheritance). The Accelerate loop in ``trainer.py`` drives any object that has:

- ``Options``: a dataclass of the method's options (``method_args`` in the config);
- ``trainables() -> dict[name, Trainable]``: the modules it trains, each with its optimiser
  settings;
- ``phases(step) -> list[name]``: which trainables update at this iteration, in order (the update
  ratio of the score-based methods' two-time-scale rule lives here);
- ``step(batch, step, phase) -> dict[str, Tensor]``: the losses of one phase; ``"loss"`` is
  back-propagated into the phase's trainable, the other entries are logged;
- ``student``: the :class:`~stepdistill.generator.Student` it trains (sampling, export);
- optionally ``state_dict()`` / ``load_state_dict()`` for state beyond the trainables (saved in
  checkpoints), ``on_step_end(step)``, and ``fresh_optimizers(step) -> list[name]``: trainables whose
  weights the method re-initialises at this step, so that their optimiser state starts afresh.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..data import Batch, BatchSource
from ..denoiser import Cond, Denoiser, unwrap
from ..generator import Student, StudentSpec, copy_for_training
from ..sampling import ode_sample

logger = logging.getLogger(__name__)


@dataclass
class Trainable:
    """A module one optimiser updates."""

    module: nn.Module
    lr: float
    on_prepared: Callable[[nn.Module], None] | None = None  # receives the accelerate-prepared module
    is_student: bool = False  # the EMA tracks this one
    betas: tuple[float, float] | None = None  # the method's Adam betas (optim.<name>.betas overrides)


@runtime_checkable
class Distiller(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]
    student: Student

    def trainables(self) -> dict[str, Trainable]: ...

    def phases(self, step: int) -> list[str]: ...

    def step(self, batch: Batch, step: int, phase: str) -> dict[str, torch.Tensor]: ...


@dataclass
class Context:
    """What a distiller is built from."""

    teacher: Any  # stepdistill.teachers.Teacher (frozen)
    init: Denoiser  # the network students and fake scores are copied from (the teacher's, or the oracle's fitted MLP)
    source: BatchSource
    config: Any  # RunConfig
    device: torch.device


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    """A built-in method by name, or a plug-in by dotted path ``package.module:ClassName``."""
    from . import boot, dmd, guided, phased_dmd, progressive, sid, vsd  # noqa: F401  (registration)

    if name in METHODS:
        return METHODS[name]
    if ":" in name or "." in name:
        mod_name, attr = name.split(":", 1) if ":" in name else name.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"method: cannot import plug-in '{name}' ({exc})") from exc
        missing = [a for a in ("Options", "trainables", "phases", "step") if not hasattr(cls, a)]
        if missing:
            raise ValueError(f"method: plug-in '{name}' lacks {missing} of the distiller contract")
        return cls
    raise ValueError(f"method: unknown method '{name}'; built-in: {sorted(METHODS)} or a 'module:Class' plug-in")


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
def make_student(ctx: Context, method: str, sampler: str, timesteps: list[float], *, guidance_scale=None,
                 w_conditioned: bool = False, experts: bool = False) -> Student:
    """A trainable copy of ``ctx.init`` (full or LoRA, per ``student.*``) with its schedule; with
    ``w_conditioned``, rebuilt with a guidance-scale input; with ``experts``, one copy per timestep
    (:class:`~stepdistill.nets.PhasedExperts`, each step served by its own network)."""
    sc = ctx.config.student

    def trainable_copy():
        return copy_for_training(ctx.init.model, lora_rank=sc.lora_rank, lora_alpha=sc.lora_alpha,
                                 lora_targets=sc.lora_targets, w_conditioned=w_conditioned).to(ctx.device)

    if experts:
        from ..nets import PhasedExperts

        model = PhasedExperts.from_experts([trainable_copy() for _ in timesteps], [float(t) for t in timesteps])
    else:
        model = trainable_copy()
    spec = StudentSpec(method, sampler, [float(t) for t in timesteps], guidance_scale, ctx.init.process.describe(),
                       ctx.init.prediction_type)
    warning = ill_conditioned_start(ctx.init.process, ctx.init.prediction_type, spec.timesteps[0])
    if warning:
        logger.warning(warning)
    return Student(Denoiser(model, ctx.init.process, ctx.init.prediction_type), spec)


EPS_AMPLIFICATION_LIMIT = 50.0


def ill_conditioned_start(process, prediction_type: str, t_init: float) -> str | None:
    """A warning when an epsilon network's x0 at the student's first time is ill-conditioned:
    x0 = (x - sigma eps) / alpha multiplies the epsilon error by sigma / alpha, which is 158 at
    t = 999 for linear betas and 2e4 for cosine betas (SD's scaled-linear: 15). One-step students
    from such a t_init diverged on the digits8 teacher."""
    if process.kind != "vp" or prediction_type != "epsilon":
        return None
    alpha, sigma = process.alpha_sigma(torch.tensor([float(t_init)]))
    ratio = float(sigma / alpha)
    if ratio <= EPS_AMPLIFICATION_LIMIT:
        return None
    return (f"student t_init = {t_init:g}: an epsilon-prediction network's x0 there amplifies its error "
            f"{ratio:.0f}-fold (sigma / alpha); students starting there tend to diverge. Set student.timesteps "
            f"to start lower (sigma / alpha <= {EPS_AMPLIFICATION_LIMIT:g}) or use a v-prediction teacher")


def student_trainable(student: Student, lr: float) -> Trainable:
    """The student as a trainable (the EMA follows it); the loop hands back the prepared module."""
    return Trainable(student.model, lr, lambda m: setattr(student.denoiser, "model", m), is_student=True)


def frozen_copy(den: Denoiser) -> Denoiser:
    """A frozen snapshot of a denoiser's current weights (e.g. the teacher of a progressive round)."""
    import copy

    model = copy.deepcopy(unwrap(den.model)).eval().requires_grad_(False)
    return Denoiser(model, den.process, den.prediction_type)


def student_timesteps(ctx: Context, num_steps: int | None = None) -> list[float]:
    sc = ctx.config.student
    if sc.timesteps is not None:
        return list(sc.timesteps)
    return ctx.init.process.grid(num_steps or sc.num_steps).tolist()


def teacher_x0(teacher: Denoiser, x_t, t, batch: Batch, guidance_scale: float | None, guidance=None) -> torch.Tensor:
    """The teacher's x0 with CFG when a scale is given (diffusers convention) and the batch is
    conditional."""
    if guidance_scale is not None and batch.uncond is not None and guidance_scale != 1.0:
        return teacher(x_t, t, batch.cond, guidance_scale=guidance_scale, uncond=batch.uncond, guidance=guidance)
    return teacher(x_t, t, batch.cond, guidance=guidance)


class SamplePool:
    """A fixed pool of teacher samples with the conditioning that made them: the 'teacher samples'
    x-source of the trajectory methods, built once (deterministically, identical on every rank)."""

    def __init__(self, teacher: Denoiser, source: BatchSource, size: int, steps: int, guidance_scale: float | None,
                 chunk: int = 256):
        xs, conds, unconds = [], [], []
        done = 0
        while done < size:
            n = min(chunk, size - done)
            b = source.batch(step=-1 - done, rank=0, size=n)
            noise = b.randn(n, *source.teacher.sample_shape)
            gs = guidance_scale if (guidance_scale not in (None, 1.0) and b.uncond is not None) else None
            xs.append(ode_sample(teacher, noise, steps, b.cond, guidance_scale=gs, uncond=b.uncond))
            conds.append(b.cond)
            unconds.append(None if b.uncond is None else b.uncond.expand_to(n))
            done += n
        self.x0 = torch.cat(xs)
        self.cond = None if conds[0] is None else Cond.cat_all(conds)
        self.uncond = None if unconds[0] is None else Cond.cat_all(unconds)

    def draw(self, batch: Batch) -> tuple[torch.Tensor, Cond | None, Cond | None]:
        idx = torch.randint(0, len(self.x0), (batch.size,), generator=batch.generator).to(self.x0.device)
        pick = (lambda c: None if c is None else c[idx])
        return self.x0[idx], pick(self.cond), pick(self.uncond)


def x0_source(kind: str, batch: Batch, pool: SamplePool | None):
    """(x0, cond, uncond) from the data or from the teacher-sample pool."""
    if kind == "data":
        if batch.x0 is None:
            raise ValueError("method_args.x_source=data needs real data: data.images, or an oracle teacher")
        return batch.x0, batch.cond, batch.uncond
    return pool.draw(batch)


def mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error, optionally weighted per sample, averaged over the batch."""
    per = (a - b).pow(2).flatten(1).mean(1)
    return (per * weight).mean() if weight is not None else per.mean()
