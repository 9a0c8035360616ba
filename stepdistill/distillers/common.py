"""What several methods build from: the student (a trainable copy of the teacher), frozen copies,
its timesteps, and the pool of teacher samples of the trajectory methods."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import torch_dtype
from ..data.batch import Batch, BatchSource
from ..diffusion.denoiser import Cond, Denoiser, base_network, class_name
from ..diffusion.sampling import ode_sample
from ..errors import ConfigError
from ..models.nets import PhasedExperts, expert_at, network_class
from ..models.sharding import placed, plain_copy
from ..models.shared_lora import STUDENT, add_adapter_view
from ..models.student import ATTENTION_LORA_TARGETS, Student, StudentSpec, copy_for_training
from .base import Context, Trainable

logger = logging.getLogger(__name__)


def make_student(ctx: Context, method: str, sampler: str, timesteps: list[float], *, guidance_scale=None,
                 w_conditioned: bool = False, experts: bool = False, prediction_type: str | None = None,
                 lora_base: torch.nn.Module | None = None, lora_targets=ATTENTION_LORA_TARGETS) -> Student:
    """A trainable copy of ``ctx.init`` (full or LoRA, per ``student.*``) with its schedule; with
    ``w_conditioned``, rebuilt with a guidance-scale input; with ``experts``, one copy per timestep
    (:class:`~stepdistill.models.nets.PhasedExperts`, each step served by its own network); with
    ``prediction_type``, its output read in that parameterisation instead of the teacher's; with
    ``student.architecture``, a smaller network of the teacher's class cut from its weights; with
    ``student.init``, a copy of the network in that folder instead of the teacher's. A LoRA student adapts
    ``student.lora_targets``, or the method's ``lora_targets`` when that is unset. Of a two-expert
    teacher (Wan2.2's high- and low-noise networks) a student network is a copy of the expert serving its
    t_init, and each per-step expert a copy of the expert serving its step's time. With ``lora_base`` (a
    LoRA student on the teacher's network itself, :func:`shared_lora_base`) the student is adapter
    ``student`` on that network instead of a copy of it."""
    sc = ctx.config.student
    source = ctx.init.model if sc.init is None else load_init_network(sc.init, ctx.init.model)
    targets = list(lora_targets if sc.lora_targets is None else sc.lora_targets)

    def trainable_copy(t: float):
        # a two-expert teacher (Wan2.2): the copy starts from the expert that serves time t
        return placed(copy_for_training(expert_at(source, t, ctx.init.process), lora_rank=sc.lora_rank,
                                        lora_alpha=sc.lora_alpha, lora_targets=targets,
                                        w_conditioned=w_conditioned, dtype=torch_dtype(ctx.config.train.trainable_dtype),
                                        architecture=sc.architecture, layer_map=sc.layer_map,
                                        lora_init=sc.lora_init), ctx.device)

    if lora_base is not None:
        if experts or w_conditioned:
            raise ValueError("a shared LoRA base holds one student network without new inputs")
        model = add_adapter_view(lora_base, STUDENT, rank=sc.lora_rank, alpha=sc.lora_alpha, targets=targets,
                                 init=sc.lora_init)
    elif experts:  # expert k starts from the teacher's network at step k's time
        model = PhasedExperts.from_experts([trainable_copy(t) for t in timesteps], [float(t) for t in timesteps])
    else:  # one network for every step: the teacher's at t_init
        model = trainable_copy(timesteps[0])
    pred = prediction_type or ctx.init.prediction_type
    embedded = ctx.init.embedded_guidance  # a copy of a network with a guidance input (FLUX.1-dev) reads the teacher's
    if embedded is not None and guidance_scale is None:
        guidance_scale = embedded  # ... and samples and exports with it
    spec = StudentSpec(method, sampler, [float(t) for t in timesteps], guidance_scale, ctx.init.process.describe(), pred,
                       sample_shape=[int(v) for v in ctx.teacher.sample_shape])
    warning = ill_conditioned_start(ctx.init.process, pred, spec.timesteps[0])
    if warning:
        logger.warning(warning)
    return Student(Denoiser(model, ctx.init.process, pred, embedded), spec)


def init_network_class(folder: str) -> str:
    """The network class saved in ``student.init``'s folder (a diffusers model folder)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ConfigError(f"student.init: '{folder}' is not a model folder (it has no config.json)")
    return json.loads(config.read_text()).get("_class_name")


def check_init_class(folder: str, teacher_class: str) -> str:
    """``student.init`` must hold a network of the teacher network's class; returns that class's name."""
    name = init_network_class(folder)
    if name != teacher_class:
        raise ConfigError(f"student.init: '{folder}' holds a {name}; the teacher's network is a {teacher_class}")
    return name


def load_init_network(folder: str, teacher_model) -> torch.nn.Module:
    """``student.init``: the network saved in ``folder`` (e.g. a run's ``student/``)."""
    name = check_init_class(folder, class_name(base_network(teacher_model)))  # a two-expert teacher: its experts' class
    return network_class(name).from_pretrained(folder).eval().requires_grad_(False)


def refuse_cfg_on_embedded_guidance(method, options, network: str) -> None:
    """A method option asking for classifier-free guidance (``Distiller.cfg_options``) on a teacher whose
    guidance scale is a network input is refused, naming the option."""
    for name, value in method.cfg_options(options).items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and v != 1 for v in values):
            raise ConfigError(f"method_args.{name}={value}: classifier-free guidance on {network}, whose guidance scale "
                              f"is a network input (guidance_embeds: the teacher is fed teacher.guidance instead); "
                              f"set method_args.{name} to 1 (or null)")


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
    """A frozen snapshot of a denoiser's current weights (e.g. the teacher of a progressive round); of a
    sharded network, an unsharded copy on every rank (``stepdistill.models.sharding``)."""
    model = plain_copy(den.model).eval().requires_grad_(False)
    return Denoiser(model, den.process, den.prediction_type, den.embedded_guidance)


def student_timesteps(ctx: Context, num_steps: int | None = None) -> list[float]:
    sc = ctx.config.student
    if sc.timesteps is not None:
        return list(sc.timesteps)
    return ctx.init.process.grid(num_steps or sc.num_steps).tolist()


class SamplePool:
    """A fixed pool of teacher samples with the conditioning that made them: the 'teacher samples'
    x-source of the trajectory methods, built once (deterministically, identical on every rank)."""

    def __init__(self, teacher: Denoiser, source: BatchSource, size: int, steps: int, guidance_scale: float | None,
                 chunk: int = 256):
        xs, conds, unconds = [], [], []
        done = 0
        while done < size:
            n = min(chunk, size - done)
            b = source.draw("pool", n, index=done)
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
        idx = batch.randint(0, len(self.x0)).to(self.x0.device)
        pick = (lambda c: None if c is None else c[idx])
        return self.x0[idx], pick(self.cond), pick(self.uncond)


def check_x_source(ctx: Context, kind: str) -> None:
    """x from the data needs real data, which a video teacher never has here (real data are still
    images): refused when the method is built, not at its first loss."""
    if kind == "data" and getattr(ctx.teacher, "video", False):
        raise ValueError(f"method_args.x_source=data: teacher {ctx.teacher.name} makes videos and real data here are "
                         f"still images; use x_source: teacher (a pool of the teacher's own samples)")


def x0_source(kind: str, batch: Batch, pool: SamplePool | None):
    """(x0, cond, uncond) from the data (each real item with its own conditioning) or from the
    teacher-sample pool."""
    if kind == "data":
        if batch.x0 is None:
            raise ValueError("method_args.x_source=data needs real data: data.images, or an oracle teacher")
        return batch.x0, batch.x0_cond, batch.uncond
    return pool.draw(batch)
