"""Score identity Distillation: SiD (Zhou et al., ICML 2024), SiD-LSG guidance (Zhou et al., 2024,
"Guided Score identity Distillation for Data-Free One-Step Text-to-Image Generation") and few-step
SiD (uniform mixture of the steps' outputs).

Per iteration (1:1 alternation, fake score first, as the official loop):

- the fake score f_psi (initialised as the teacher) takes the teacher's own denoising loss on
  detached student samples, in the network's own parameterisation (epsilon for SD1.5), on its
  CFG-combined prediction u + kappa_1 (c - u) when kappa_1 != 1 (SiD-LSG's code regresses the guided
  epsilon, not x0: an x0-space loss would reweight the times by (sigma/alpha)^2, 10^4 across SD's
  range); a v-prediction network's v-MSE is weighted per sample by snr / (snr + 1) (exactly: the
  epsilon-equivalent weight of ``losses.v_as_epsilon_weight``), as the official code weights it, so
  that it is the epsilon-space loss;
- the generator takes, at x_t = alpha_t x_g + sigma_t eps with y_r = teacher x0 and y_f = fake x0
  (SiD eq. 23 / the alpha-weighted form of sec. 4.3):

      L_G = (y_r - y_f) . ((y_r - x_g) - alpha (y_r - y_f)) / mean_CHW |x_g - y_r|,

  with gradients flowing into x_g directly and *through both score networks* (their weights frozen
  during this update); the normaliser is detached. alpha = 1.2 (EDM setting; the SD runs use 1.0).

Both losses are summed over the elements of a sample and averaged over the batch, as the official
code reduces them: with Adam's eps = 1e-8 at lr 1e-6 a mean over 4x64x64 latents (16384x smaller
gradients) would not be the same optimiser. Samples whose generator loss is not finite are dropped
(the batch mean still divides by the batch size), as in the official code.

SiD-LSG guidance (all CFG in the diffusers form u + s (c - u)):
- ``fake_train_guidance`` (kappa_1): the fake score's own prediction inside its denoising loss;
- ``fake_guidance`` (kappa_2 = kappa_3): y_f in the generator loss;
- ``real_guidance`` (kappa_4): y_r in the generator loss.
When kappa_1 or kappa_2 is not 1, each prompt of the fake score's update is replaced by the empty
prompt with probability ``prompt_dropout`` (0.1) before the generator draws its samples, so the
generator makes those samples from the empty prompt too (official); the student's own update never
drops prompts. ``guidance_mode`` fills the kappas: ``lsg`` (all = ``guidance_scale``; 1.5-4.5 in
the paper), ``zero`` (Zero-CFG: no CFG in the teacher, the fake score unconditioned), ``anti``
(Anti-CFG: no CFG in the teacher, negative guidance ``-guidance_scale`` in the fake score), ``none``.
Zero- and Anti-CFG follow the Few-Step SiD paper's description; their exact constants are not in
the public code.

Deviation from the official code: the generator starts from unit Gaussian noise at t_init (the
convention an exported diffusers pipeline follows); SiD-LSG's code feeds sigma(t_init) times the
noise (0.93 at t_init = 625).

Few-step SiD: the generator samples with re-noising between its steps; each iteration picks a step
k uniformly, runs steps < k without grad and trains on step k's output, so one fake score matches
the uniform mixture of every step's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from .base import Context
from .losses import denoising_loss, guided_x0, per_sample_mean_abs, prompt_dropout, v_as_epsilon_weight
from .score import FakeScoreOptions, ScoreDistiller, score_times


@dataclass
class SiDOptions(FakeScoreOptions):
    alpha: float = 1.2
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # SiD's Adam betas (both networks)
    guidance_mode: Literal["none", "lsg", "zero", "anti"] = "none"
    guidance_scale: float = 2.0  # s of the chosen mode
    real_guidance: float | None = None  # explicit kappa_4 (overrides the mode)
    fake_guidance: float | None = None  # explicit kappa_2 = kappa_3
    fake_train_guidance: float | None = None  # explicit kappa_1
    prompt_dropout: float = 0.1

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.real_guidance", self.real_guidance, ge=0)
        check_range("method_args.fake_train_guidance", self.fake_train_guidance, ge=0)
        check_range("method_args.prompt_dropout", self.prompt_dropout, ge=0, le=1)
        super().__post_init__()
        if self.fake_updates != 1:
            raise ValueError("method_args.fake_updates: SiD alternates 1:1")

    def scales(self) -> tuple[float, float, float, bool]:
        """(real, fake in the generator loss, fake in its own loss, fake conditioned?)"""
        s = self.guidance_scale
        real, fake, train, conditioned = {"none": (1.0, 1.0, 1.0, True), "lsg": (s, s, s, True),
                                          "zero": (1.0, 1.0, 1.0, False), "anti": (1.0, -s, 1.0, True)}[self.guidance_mode]
        return (self.real_guidance if self.real_guidance is not None else real,
                self.fake_guidance if self.fake_guidance is not None else fake,
                self.fake_train_guidance if self.fake_train_guidance is not None else train, conditioned)


class SiD(ScoreDistiller):
    name = "sid"
    Options = SiDOptions

    @classmethod
    def cfg_options(cls, options):
        """SiD-LSG's kappas (``guidance_mode`` or the explicit ones); with embedded guidance the teacher,
        the fake score and the student read the teacher's guidance and ``guidance_mode`` none or zero
        applies (zero only drops prompts from the fake score's training)."""
        keys = ("real_guidance", "fake_guidance", "fake_train_guidance")
        out = {key: getattr(options, key) for key in keys}
        if any(v != 1 for key, v in zip(keys, options.scales()[:3]) if out[key] is None):
            out["guidance_mode"] = options.guidance_mode  # a kappa the mode sets
        return out

    def __init__(self, ctx: Context, options: SiDOptions):
        super().__init__(ctx, options)
        self.real_s, self.fake_s, self.train_s, self.fake_conditioned = options.scales()

    def trainables(self):
        tr = super().trainables()
        for t in tr.values():
            t.betas = tuple(self.options.betas)
        return tr

    def updates(self, iteration: int) -> list[str]:
        return ["fake", "student"]

    def _fake_cond(self, batch: Batch):
        if self.fake_conditioned or batch.uncond is None:
            return batch.cond
        return batch.uncond.expand_to(batch.size)

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        proc = self.student.process
        if update == "fake":
            cond = batch.cond
            if self.train_s != 1.0 or self.fake_s != 1.0:  # before sampling: the generator sees the drop too
                cond = prompt_dropout(batch, cond, self.options.prompt_dropout)
            with torch.no_grad():
                x, _ = self.sample(batch, grad=False, cond=cond)
            if not self.fake_conditioned and batch.uncond is not None:
                cond = batch.uncond.expand_to(batch.size)
            t = score_times(proc, batch, self.options.t_min, self.options.t_max, self.options.integer_times)
            weight = v_as_epsilon_weight(proc, t, self.fake.prediction_type)  # the epsilon-space loss
            return {"loss": denoising_loss(self.fake, x, cond, t, batch, uncond=batch.uncond,
                                           guidance_scale=self.train_s, weight=weight, reduction="sum")}
        x_g, _ = self.sample(batch, grad=True)
        t = score_times(proc, batch, self.options.t_min, self.options.t_max, self.options.integer_times)
        x_t = proc.add_noise(x_g, batch.randn(*x_g.shape), t)
        # gradients flow through both networks into x_t (their weights do not require grad here)
        y_r = guided_x0(self.ctx.teacher.denoiser, x_t, t, batch.cond, batch.uncond, self.real_s)
        y_f = guided_x0(self.fake, x_t, t, self._fake_cond(batch), batch.uncond, self.fake_s)
        norm = per_sample_mean_abs(x_g - y_r, 1e-5)
        diff = y_r - y_f
        per = (diff * ((y_r - x_g) - self.options.alpha * diff) / norm).flatten(1).sum(1)
        per = torch.where(torch.isfinite(per), per, torch.zeros_like(per))  # a non-finite sample is dropped
        return {"loss": per.mean()}
