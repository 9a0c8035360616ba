"""Consistency distillation: latent consistency models (LCM, Luo et al. 2023) and LCM-LoRA (Luo et al.
2023b), after consistency distillation (Song et al. 2023, sec. 4).

The student f(x_t, t, w) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t, w) (LCM eq. 9; the boundary
scalings of diffusers' LCMScheduler, :func:`~stepdistill.models.student.boundary_scalings`) is trained so
that its outputs at neighbouring points of the teacher's CFG-augmented probability-flow ODE agree
(LCM Algorithm 1). Per row:

- a skipping-step pair (t_{n+k}, t_n) of the solver grid (``solver_steps`` points, "trailing" as
  LCM's DDIM solver: 999, 979, ..., 19 for 50 of 1000; the step below 19 lands on t = 0);
- x_{t_{n+k}} = alpha x0 + sigma eps from the data (or a pool of teacher samples);
- one DDIM step of the teacher with CFG scale w ~ U[w_min, w_max] from t_{n+k} to t_n gives x_{t_n};
- the loss d(f_theta(x_{t_{n+k}}, t_{n+k}, w), f_target(x_{t_n}, t_n, w)), L2 or pseudo-Huber
  sqrt(d^2 + c^2) - c (mean over elements, as the official scripts reduce it).

The target network is an EMA of the student (decay ``target_decay``, 0.95 in the LCM script) for full
students; LCM-LoRA (``student.lora_rank`` > 0) uses the online student itself (decay 0), as its script
does, and adapts by default the script's target modules (``LCM_LORA_TARGETS``: attention, transformer
in/out projections, feed-forward, resnet convolutions, samplers and time-embedding projections, those the
network has; ``student.lora_targets`` overrides them). The full student reads w through a guidance-scale
embedding (UNet ``time_cond_proj_dim``; the diffusers pipelines feed it ``guidance_scale``); the LoRA
student has none, so its adapters load into the teacher with ``load_lora_weights`` and sample with the
stock ``LCMScheduler`` at guidance 1.

Guidance convention: ``w_min``, ``w_max`` and ``sample_guidance`` are diffusers guidance scales
(u + w (c - u)); the LCM scripts' w is this minus 1 (their [5, 15] is [6, 16] here).

Flow teachers: the grid is the process's own (shifted) grid and c_skip = 0, c_out = 1, since the x0
prediction x - t v already equals its input at t = 0 (diffusers' FlowMatchLCMScheduler applies no
scalings either). Deviation: none from the VP recipe; flow consistency distillation has no official
LCM script and follows the same algorithm on the flow ODE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.denoiser import W_CONDITIONED, Denoiser, unwrap
from ..diffusion.process import per_sample
from ..models.nets import expert_at
from ..models.sharding import full, is_sharded
from ..models.student import LCM_LORA_TARGETS, boundary_scalings, lcm_timesteps
from .base import Context, Distiller, Trainable
from .common import SamplePool, check_x_source, make_student, student_trainable, x0_source

LCM_TIMESTEP_SCALING = 10.0  # LCM's timestep_scaling_factor


@dataclass
class ConsistencyOptions:
    solver_steps: int = 50  # points of the teacher's skipping-step DDIM grid (LCM: 50 of 1000, k = 20)
    w_min: float = 6.0  # teacher CFG scale range (diffusers convention; LCM's w + 1)
    w_max: float = 16.0
    w_embedding: bool | None = None  # the student reads w (guidance embedding); default: full students yes, LoRA no
    sample_guidance: float | None = None  # the w a w-conditioned student samples and exports with; default 8.5
    target_decay: float | None = None  # EMA decay of the target network; default: 0.95 full, 0 (online) LoRA
    loss: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.001
    timestep_scaling: float = LCM_TIMESTEP_SCALING  # boundary scalings of VP students
    x_source: Literal["data", "teacher"] = "data"  # LCM trains on image-text pairs; "teacher": a sample pool
    pool_size: int = 4096
    pool_steps: int = 64
    lr: float = 1e-4

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.solver_steps", self.solver_steps, ge=2)
        check_range("method_args.w_min", self.w_min, ge=0)
        check_range("method_args.target_decay", self.target_decay, ge=0, lt=1)
        check_range("method_args.huber_c", self.huber_c, gt=0)
        check_range("method_args.timestep_scaling", self.timestep_scaling, gt=0)
        check_range("method_args.pool_size", self.pool_size, ge=1)
        check_range("method_args.pool_steps", self.pool_steps, ge=1)
        if not self.w_min <= self.w_max:
            raise ValueError(f"method_args.w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        if self.sample_guidance is not None and not self.w_min <= self.sample_guidance <= self.w_max:
            raise ValueError(f"method_args.sample_guidance ({self.sample_guidance}) must lie in [w_min, w_max] "
                             f"= [{self.w_min}, {self.w_max}]")


class TargetNetwork:
    """The EMA target f_theta^- of consistency distillation: an average of the student's trainable
    parameters, updated once per iteration from the weights the optimiser left (so the target of
    iteration i has seen i student updates). It is no second network: unsharded students are called
    with the averaged tensors in place of their parameters (``torch.func.functional_call``); sharded
    ones (FSDP) get the averaged shards copied in for the call and their own weights back after it.
    Decay 0 is the online network (LCM-LoRA's target) and keeps no average."""

    def __init__(self, student, decay: float):
        self.student, self.decay = student, decay
        self.shadow: list[torch.Tensor] | None = None
        self.iteration: int | None = None

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in unwrap(self.student.model).named_parameters() if p.requires_grad]

    def advance(self, iteration: int) -> None:
        if self.decay == 0 or iteration == self.iteration:
            return
        with torch.no_grad():
            params = [p for _, p in self._named()]
            if self.shadow is None:
                self.shadow = [p.detach().float().clone() for p in params]
            else:
                for avg, p in zip(self.shadow, params):
                    avg.lerp_(p.detach().float(), 1 - self.decay)
        self.iteration = iteration

    @torch.no_grad()
    def __call__(self, x, t, cond, guidance):
        if self.decay == 0:
            return self.student.denoiser(x, t, cond, guidance=guidance)
        den = self.student.denoiser
        model = unwrap(den.model)
        named = self._named()
        if not is_sharded(model):
            inner = Denoiser(model, den.process, den.prediction_type, den.embedded_guidance)
            swap = {f"model.{n}": avg.to(p.dtype) for (n, p), avg in zip(named, self.shadow)}
            return torch.func.functional_call(inner, swap, (x, t, cond), {"guidance": guidance})
        kept = [p.detach().clone() for _, p in named]
        try:
            for (_, p), avg in zip(named, self.shadow):
                p.copy_(avg.to(p.dtype))
            return den(x, t, cond, guidance=guidance)
        finally:
            for (_, p), old in zip(named, kept):
                p.copy_(old)

    def state_dict(self) -> dict:
        if self.shadow is None:
            return {"iteration": self.iteration}
        return {"iteration": self.iteration, "shadow": {str(i): full(t) for i, t in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state.get("iteration")
        saved = state.get("shadow")
        if not saved:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for _, p in self._named()]
        if len(saved) != len(params):
            raise ValueError(f"resume: the checkpoint's consistency target holds {len(saved)} tensors, the student "
                             f"{len(params)} trainable parameters")
        self.shadow = []
        for i, p in enumerate(params):
            whole = saved[str(i)].to(torch.float32)
            if isinstance(p, DTensor):  # this rank's shard of the whole average
                whole = distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            self.shadow.append(whole.to(p.device))


class Consistency(Distiller):
    """LCM / LCM-LoRA: consistency distillation of a (CFG) teacher into a student that samples in any
    number of steps from 1 to ``solver_steps`` (trained for ``student.num_steps``)."""

    name = "lcm"
    Options = ConsistencyOptions

    @classmethod
    def cfg_options(cls, options):
        """The teacher's CFG range in the solver step; with embedded guidance the teacher and the student
        read the teacher's guidance (w_min = w_max = 1: no guidance-scale embedding is added)."""
        return {"w_min": options.w_min, "w_max": options.w_max}

    def __init__(self, ctx: Context, options: ConsistencyOptions):
        super().__init__(ctx, options)
        proc = ctx.init.process
        sc = ctx.config.student
        lora = bool(sc.lora_rank)
        cfg_teacher = ctx.teacher.conditional and options.w_max > 1
        self.w_conditioned = (not lora if options.w_embedding is None else options.w_embedding) and cfg_teacher
        check_x_source(ctx, options.x_source)
        network = type(unwrap(expert_at(ctx.init.model, proc.t_max, proc))).__name__
        if self.w_conditioned and network not in W_CONDITIONED:
            raise ValueError(f"method_args.w_embedding: {network} has no guidance-scale input (supported: "
                             f"{sorted(W_CONDITIONED)}); set method_args.w_embedding=false to distil the teacher's "
                             f"guidance into a student without one")
        self.decay = (0.0 if lora else 0.95) if options.target_decay is None else options.target_decay
        self.scaling = options.timestep_scaling if proc.kind == "vp" else None
        if proc.kind == "vp":
            if options.solver_steps > proc.num_train_timesteps:
                raise ValueError(f"method_args.solver_steps ({options.solver_steps}) exceeds the teacher's "
                                 f"{proc.num_train_timesteps} timesteps")
            grid = proc.grid(options.solver_steps)
            self.points = torch.cat([grid, torch.zeros(1)])  # LCM's DDIM solver: the step below the grid lands on t = 0
            default_times = lcm_timesteps(proc.num_train_timesteps, sc.num_steps, options.solver_steps)
        else:
            self.points = proc.sampling_times(options.solver_steps)
            default_times = proc.grid(sc.num_steps).tolist()
        if sc.num_steps > options.solver_steps:
            raise ValueError(f"student.num_steps ({sc.num_steps}) exceeds method_args.solver_steps ({options.solver_steps})")
        if sc.timesteps is not None and [float(t) for t in sc.timesteps] != default_times:
            raise ValueError(f"student.timesteps {list(sc.timesteps)}: a consistency student samples on the "
                             f"{'LCMScheduler' if proc.kind == 'vp' else 'process'} schedule, here {default_times} "
                             f"for {sc.num_steps} steps; leave student.timesteps unset")
        guidance = None
        if self.w_conditioned:
            guidance = 8.5 if options.sample_guidance is None else options.sample_guidance
            guidance = min(max(guidance, options.w_min), options.w_max)
        self.student = make_student(ctx, "lcm", "renoise", default_times, guidance_scale=guidance,
                                    w_conditioned=self.w_conditioned, lora_targets=LCM_LORA_TARGETS)
        self.student.spec.consistency = {"solver_steps": options.solver_steps, "timestep_scaling": self.scaling}
        self.target = TargetNetwork(self.student, self.decay)
        self.pool = None
        if options.x_source == "teacher":
            self.pool = SamplePool(ctx.teacher.denoiser, ctx.source, options.pool_size, options.pool_steps, None)

    def trainables(self) -> dict[str, Trainable]:
        return {"student": student_trainable(self.student, self.options.lr)}

    def _boundary(self, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t, self.scaling)
        return per_sample(c_skip.to(x.device), x) * x.float() + per_sample(c_out.to(x.device), x) * x0

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        self.target.advance(iteration)
        proc, b = self.student.process, batch.size
        x0, cond, uncond = x0_source(self.options.x_source, batch, self.pool)
        n = batch.randint(0, len(self.points) - 1)
        t, s = self.points[n].to(x0.device), self.points[n + 1].to(x0.device)  # t_{n+k} > t_n
        x_t = proc.add_noise(x0, batch.randn(*x0.shape), t)
        cfg = uncond is not None and cond is not None and self.options.w_max > 1
        w = (self.options.w_min + (self.options.w_max - self.options.w_min) * batch.rand(b)) if cfg else None
        g = w if self.w_conditioned else None
        with torch.no_grad():
            teacher = self.ctx.teacher.denoiser
            x0_teacher = teacher(x_t, t, cond, guidance_scale=w, uncond=uncond) if cfg else teacher(x_t, t, cond)
            x_s = proc.ode_step(x_t, x0_teacher, t, s)
            target = self._boundary(x_s, self.target(x_s, s, cond, g), s)
        pred = self._boundary(x_t, self.student.denoiser(x_t, t, cond, guidance=g), t)
        d = pred - target
        if self.options.loss == "huber":
            loss = (torch.sqrt(d.pow(2) + self.options.huber_c**2) - self.options.huber_c).mean()
        else:
            loss = d.pow(2).mean()
        return {"loss": loss}

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state.get("target") or {})
