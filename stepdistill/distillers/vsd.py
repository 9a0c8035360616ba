"""Variational score distillation for one-step students: SwiftBrush (Nguyen & Tran, CVPR 2024),
after ProlificDreamer's VSD (Wang et al., NeurIPS 2023).

The student maps noise at t_init to x. A LoRA copy of the teacher (the fake score, eps_phi) learns
the student's distribution with the teacher's denoising loss on detached samples. The student
follows the VSD gradient (ProlificDreamer eq. 9; SwiftBrush eq. 6) at x_t = alpha_t x + sigma_t eps:

    grad = w(t) (eps_teacher^cfg(x_t) - eps_fake^cfg(x_t)),    loss = 0.5 || x - sg(x - grad) ||^2,

with CFG on both networks as SwiftBrush does (4.5 in the paper), w(t) = sigma_t^2 and
t ~ U[20, 980] for T = 1000.

The fake score follows SwiftBrush's code: its denoising loss at t ~ U[0, T) weights each sample by
alpha_t^2 (the code scales both the LoRA's epsilon and the target by sqrt(alphas_cumprod)); its LoRA
has rank 64 and alpha 108 (scale 1.69) on ``to_q`` and ``to_v`` only; and 10% of the fake score's
updates see the empty prompt for the whole batch (one coin per batch, as the code draws it).

``guidance_range`` is SNOOPI's PG-SB (Nguyen et al. 2024, "proper guidance"): instead of one fixed
scale, each sample's VSD gradient uses a guidance scale drawn uniformly from the range, for the teacher
and for the fake score alike (the paper varies the scale of both; here one draw per sample serves both,
and without ``fake_guidance_scale`` the fake score stays unguided). The paper reports that this
stabilises one-step VSD across backbones. The range is the config's: the paper's per-backbone values
are not reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.process import per_sample
from .base import Context
from .losses import denoising_loss, gradient_matching_loss, guided_x0
from .score import FakeScoreOptions, ScoreDistiller, score_times


@dataclass
class VSDOptions(FakeScoreOptions):
    guidance_scale: float = 4.5  # CFG of the teacher (diffusers convention)
    fake_guidance_scale: float | None = 4.5  # CFG of the LoRA fake score
    fake_lora_rank: int = 64
    fake_lora_alpha: float | None = 108.0  # SwiftBrush's scale 108 / 64
    fake_lora_targets: list[str] | None = field(default_factory=lambda: ["to_q", "to_v"])
    fake_lr: float | None = 1e-3
    lr: float = 1e-6
    prompt_dropout: float = 0.1  # probability that a fake-score update sees the empty prompt (whole batch)
    fake_weighting: Literal["alpha2", "none"] = "alpha2"  # SwiftBrush's alpha_t^2 weight of the fake loss
    guidance_range: list[float] | None = None  # SNOOPI PG-SB: [lo, hi], a scale per sample in place of the fixed ones

    def __post_init__(self):
        super().__post_init__()
        if self.guidance_range is not None:
            if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
                raise ValueError(f"method_args.guidance_range must be [lo, hi] with 0 <= lo <= hi, got {self.guidance_range}")
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.fake_guidance_scale", self.fake_guidance_scale, ge=0)
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.prompt_dropout", self.prompt_dropout, ge=0, le=1)


class VSD(ScoreDistiller):
    name = "vsd"
    Options = VSDOptions

    @classmethod
    def cfg_options(cls, options):
        """CFG of the teacher and the LoRA fake score (or SNOOPI's per-sample range); with embedded
        guidance both read the teacher's guidance instead."""
        return {"guidance_scale": options.guidance_scale, "fake_guidance_scale": options.fake_guidance_scale,
                "guidance_range": options.guidance_range}

    def __init__(self, ctx: Context, options: VSDOptions):
        if ctx.config.student.num_steps != 1:
            raise ValueError("method vsd: SwiftBrush trains one-step students; set student.num_steps=1")
        super().__init__(ctx, options)

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        proc = self.student.process
        if update == "fake":
            with torch.no_grad():
                x, _ = self.sample(batch, grad=False)
            cond = batch.cond
            dropout = self.options.prompt_dropout
            if batch.uncond is not None and dropout > 0 and float(batch.rand(1)) < dropout:
                cond = batch.uncond.expand_to(batch.size)
            t = score_times(proc, batch, 0.0, 1.0, self.options.integer_times)
            weight = proc.alpha(t) ** 2 if self.options.fake_weighting == "alpha2" else None
            return {"loss": denoising_loss(self.fake, x, cond, t, batch, weight=weight)}
        x, _ = self.sample(batch, grad=True)
        t = score_times(proc, batch, self.options.t_min, self.options.t_max, self.options.integer_times)
        real_scale, fake_scale = self.options.guidance_scale, self.options.fake_guidance_scale
        if self.options.guidance_range is not None and batch.uncond is not None:  # PG-SB: a random scale per sample
            lo, hi = self.options.guidance_range
            real_scale = lo + (hi - lo) * batch.rand(batch.size)
            fake_scale = None if fake_scale is None else real_scale
        with torch.no_grad():
            eps = batch.randn(*x.shape)
            x_t = proc.add_noise(x, eps, t)
            x0_real = self._guided(self.ctx.teacher.denoiser, x_t, t, batch, real_scale)
            x0_fake = self._guided(self.fake, x_t, t, batch, fake_scale)
            e_real = proc.to_x0_eps(x0_real, x_t, t, "sample")[1]
            e_fake = proc.to_x0_eps(x0_fake, x_t, t, "sample")[1]
            grad = per_sample(proc.sigma(t) ** 2, x) * (e_real - e_fake)
        return {"loss": gradient_matching_loss(x, grad)}

    @staticmethod
    def _guided(den, x_t, t, batch: Batch, scale):
        """x0 with CFG at ``scale``: a number (``guided_x0``) or one scale per sample."""
        if torch.is_tensor(scale):
            return den(x_t, t, batch.cond, guidance_scale=scale, uncond=batch.uncond)
        return guided_x0(den, x_t, t, batch.cond, batch.uncond, scale)
