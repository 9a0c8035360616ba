"""Teacher score matching (TSM): the first stage of multi-student distillation's training path for
students smaller than the teacher (Song et al. 2024, "Multi-student Diffusion Distillation for Better
One-step Generators", sec. 4).

A smaller network cut from the teacher's weights (``student.architecture``) starts far from the teacher's
function, and distribution matching from there is slow and unstable (on the exact mixture a half-width
DMD2 student measured 4.1x the noise floor against the full-width student's 1.8x). TSM first trains the
smaller network as a diffusion model that imitates the teacher: at x_t = alpha_t x0 + sigma_t eps, with
x0 from the data (or a pool of teacher samples) and t uniform over the whole range,

    L = || F_student(x_t, t, c) - F_teacher(x_t, t, c) ||^2

in the student's own parameterisation F (the teacher's, e.g. epsilon for SD), with the conditioning
dropped to the unconditional branch with probability ``uncond_prob`` so the student learns both branches.
Its ``student/`` folder then starts a distillation run through ``student.init`` (stage 2: DMD2; the
paper's stage 3 adds the GAN, DMD2's ``gan: true``). The student saved here is a multi-step diffusion
model, sampled with ``student.num_steps`` DDIM steps (validation, export).

The paper does not publish code; its weighting over times is not given, and this module uses the
network's own parameterisation's unweighted MSE (the teacher's training loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from .base import Context, Distiller, Trainable
from .common import SamplePool, check_x_source, make_student, student_trainable, x0_source
from .losses import mse, prompt_dropout
from .score import regression_times


@dataclass
class TSMOptions:
    lr: float = 1e-4
    x_source: Literal["data", "teacher"] = "data"  # x0: real data (data.images, or the oracle) or teacher samples
    uncond_prob: float = 0.1  # rows trained on the unconditional branch (CFG)
    pool_size: int = 4096  # x_source=teacher: teacher samples in the pool
    pool_steps: int = 32  # ... and the DDIM steps that make them

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.uncond_prob", self.uncond_prob, ge=0, lt=1)
        check_range("method_args.pool_size", self.pool_size, ge=1)
        check_range("method_args.pool_steps", self.pool_steps, ge=1)


class TeacherScoreMatching(Distiller):
    name = "tsm"
    Options = TSMOptions

    @classmethod
    def check_config(cls, config, options: TSMOptions) -> None:
        if config.student.architecture is None and config.student.init is None:
            raise ValueError("method tsm trains a student that differs from the teacher: set student.architecture "
                             "(a smaller network) or student.init (a folder to start from); a copy of the teacher "
                             "already matches it")

    def __init__(self, ctx: Context, options: TSMOptions):
        super().__init__(ctx, options)
        check_x_source(ctx, options.x_source)
        sc = ctx.config.student
        proc = ctx.init.process
        self.student = make_student(ctx, "tsm", "deterministic", proc.grid(sc.num_steps).tolist())
        self.pool = (SamplePool(ctx.teacher.denoiser, ctx.source, options.pool_size, options.pool_steps, None)
                     if options.x_source == "teacher" else None)

    def trainables(self) -> dict[str, Trainable]:
        return {"student": student_trainable(self.student, self.options.lr)}

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        student = self.student.denoiser
        proc = student.process
        x0, cond, _ = x0_source(self.options.x_source, batch, self.pool)
        t = regression_times(proc, batch)
        x_t = proc.add_noise(x0, batch.randn(*x0.shape), t)
        if cond is not None:
            cond = prompt_dropout(batch, cond, self.options.uncond_prob)
        with torch.no_grad():
            target = self.ctx.teacher.denoiser(x_t, t, cond, output=student.prediction_type)
        return {"loss": mse(student.raw(x_t, t, cond), target)}
