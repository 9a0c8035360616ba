"""Guided distillation (Meng et al., 2023, "On Distillation of Guided Diffusion Models").

Stage 1 (sec. 4.1, eq. 6): a w-conditioned student x_eta(z_t, w) regresses the teacher's
classifier-free-guided prediction for w drawn uniformly from [w_min, w_max]. Stage 2 (sec. 4.1,
Alg. 2 of Salimans & Ho): progressive distillation of that student with the w input kept, so the
final few-step student samples at any w in the range without CFG's second forward pass.

Guidance convention: ``w_min``, ``w_max`` and ``sample_guidance`` are diffusers guidance scales,
x = u + w (c - u). The paper's w' in (1 + w') c - w' u is w - 1. The student's guidance input is
fed as diffusers pipelines feed ``timestep_cond`` (an embedding of w - 1), so the exported UNet
runs with a stock StableDiffusionPipeline's ``guidance_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.denoiser import W_CONDITIONED, unwrap
from ..diffusion.process import truncated_snr_weight
from ..models.nets import expert_at
from .base import Context, Distiller, Trainable
from .common import SamplePool, frozen_copy, make_student, student_trainable, x0_source
from .losses import mse
from .progressive import ProgressiveCore, ProgressiveOptions, RoundSchedule
from .score import regression_times


@dataclass
class GuidedOptions:
    w_min: float = 1.0  # guidance-scale range (diffusers convention)
    w_max: float = 8.0
    sample_guidance: float = 4.0  # the w written into the student's config for sampling / export
    stage1_steps: int = 500  # iterations of stage 1 (w-conditioned regression)
    progressive: ProgressiveOptions = field(default_factory=ProgressiveOptions)
    x_source: Literal["data", "teacher"] = "teacher"  # stage 1's x source
    lr: float = 1e-4

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.w_min", self.w_min, ge=0)
        check_range("method_args.stage1_steps", self.stage1_steps, ge=0)
        if not self.w_min <= self.w_max:
            raise ValueError(f"method_args.w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        if not self.w_min <= self.sample_guidance <= self.w_max:
            raise ValueError(f"method_args.sample_guidance ({self.sample_guidance}) must lie in [w_min, w_max]")


class Guided(Distiller):
    name = "guided"
    Options = GuidedOptions

    @classmethod
    def cfg_options(cls, options):
        """Guided distillation distils CFG over [w_min, w_max] into a guidance input: a teacher with
        embedded guidance has no CFG to distil (it needs w_min = w_max = 1, and then has nothing to do)."""
        return {"w_min": options.w_min, "w_max": options.w_max}

    def __init__(self, ctx: Context, options: GuidedOptions):
        if not ctx.teacher.conditional:
            raise ValueError("method guided: the teacher is unconditional; classifier-free guidance needs a conditional teacher")
        name = type(unwrap(expert_at(ctx.init.model, ctx.init.process.t_max, ctx.init.process))).__name__
        if name not in W_CONDITIONED:
            raise ValueError(f"method guided: {name} has no guidance-scale input; supported: {sorted(W_CONDITIONED)}")
        super().__init__(ctx, options)
        proc = ctx.init.process
        final = ctx.config.student.num_steps
        self.student = make_student(ctx, "guided", "deterministic", proc.grid(final).tolist(),
                                    guidance_scale=options.sample_guidance, w_conditioned=True)
        if options.stage1_steps >= ctx.config.train.max_steps:
            raise ValueError(f"method_args.stage1_steps ({options.stage1_steps}) leaves no steps of train.max_steps "
                             f"({ctx.config.train.max_steps}) for stage 2")
        popt = options.progressive
        schedule = RoundSchedule(proc, popt.start_steps, final, options.stage1_steps, ctx.config.train.max_steps,
                                 popt.steps_per_round)
        self.stage2: ProgressiveCore | None = None
        self._schedule = schedule
        need_pool = "teacher" in (options.x_source, popt.x_source)
        # the pool holds CFG samples at the middle of the range; stage 1 only needs on-manifold x
        self.pool = SamplePool(ctx.teacher.denoiser, ctx.source, popt.pool_size, popt.pool_steps,
                               options.sample_guidance) if need_pool else None

    def trainables(self) -> dict[str, Trainable]:
        return {"student": student_trainable(self.student, self.options.lr)}

    def _stage2(self) -> ProgressiveCore:
        if self.stage2 is None:
            # stage 1's student, frozen, is the w-conditioned teacher of the progressive rounds
            self.stage2 = ProgressiveCore(self.student, frozen_copy(self.student.denoiser), self._schedule,
                                          self.options.progressive, (self.options.w_min, self.options.w_max))
        return self.stage2

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        if iteration >= self.options.stage1_steps:
            out = self._stage2().loss(batch, iteration, self.pool, None)
            out["stage"] = torch.tensor(2.0)
            return out
        proc = self.student.process
        x0, cond, uncond = x0_source(self.options.x_source, batch, self.pool)
        t = regression_times(proc, batch)
        z = proc.add_noise(x0, batch.randn(*x0.shape), t)
        w = self.options.w_min + (self.options.w_max - self.options.w_min) * batch.rand(batch.size)
        with torch.no_grad():
            target = self.ctx.teacher.denoiser(z, t, cond, guidance_scale=w, uncond=uncond)
        pred = self.student.denoiser(z, t, cond, guidance=w)
        return {"loss": mse(pred, target, truncated_snr_weight(proc, t).to(pred)), "stage": torch.tensor(1.0)}

    def lr_factor(self, name: str, iteration: int) -> float:
        """Stage 2's rounds anneal when ``progressive.round_lr`` is ``linear`` (default: constant)."""
        if iteration < self.options.stage1_steps or self.options.progressive.round_lr != "linear":
            return 1.0
        return 1.0 - self._schedule.round_progress(iteration, self.ctx.config.train.max_steps)

    def state_dict(self) -> dict:
        return {"stage2": None if self.stage2 is None else self.stage2.state_dict(),
                "stage2_teacher": None if self.stage2 is None else unwrap(self.stage2.original.model).state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["stage2"] is not None:
            core = self._stage2()
            unwrap(core.original.model).load_state_dict(state["stage2_teacher"])
            core.load_state_dict(state["stage2"])
