"""Phased DMD (2025, "Phased DMD: Few-step Distribution Matching Distillation via Score Matching
within Subintervals").

The student's timesteps t_0 > t_1 > ... > t_{K-1} (> t_clean) split the noise range into K phases.
In phase k the generator maps x at t_k (made by the student's own no-grad rollout of the earlier
phases) to x at the next boundary s = t_{k+1} (t_clean for the last phase), by re-noising its x0
prediction to s. Distribution matching then happens *within the subinterval*: with the subinterval
forward process from s to t > s,

    x_t = a_{t|s} x_s + s_{t|s} n,   a_{t|s} = a_t / a_s,   s_{t|s}^2 = s_t^2 - a_{t|s}^2 s_s^2,

(flow matching: a_{t|s} = (1 - t)/(1 - s)), the fake score learns the score of the generator's
phase-k output propagated to t by denoising score matching on that kernel,
eps_fake(x_t) ~ s_t (x_t - a_{t|s} x_s) / s_{t|s}^2 (the marginal-equivalent eps, so that fake and
teacher are compared as scores of the same x_t), weighted by min(s_{t|s}^2 / s_t^2, 1), which tames
the target's blow-up as t -> s. The generator follows DMD's normalised score difference at x_t,
applied to x_s (the positive chain-rule factors dropped, as DMD drops them). Phases are trained in
turn from high noise to low, the fake score re-initialised from the teacher at each phase start.

In this implementation one network serves every phase (the experts share weights; each sees its
own phase's times), so the result exports as one ordinary few-step student. Separate experts per
phase are not implemented, and on the Gaussian-mixture oracle this version does not yet converge as
well as the other methods (README): training phase k+1 also moves the shared network at phase k's
times, so earlier phases drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..denoiser import unwrap
from .base import Context, mse, register_method, teacher_x0
from .score import FakeScoreOptions, score_phases, score_trainables, student_and_fake


@dataclass
class PhasedDMDOptions(FakeScoreOptions):
    guidance_scale: float = 1.75  # teacher CFG (diffusers convention)
    lr: float = 1e-5
    steps_per_phase: int | None = None  # default: train.max_steps / K
    reset_fake: bool = True  # re-initialise the fake score from the teacher at each phase start


@register_method("phased_dmd")
class PhasedDMD:
    Options = PhasedDMDOptions
    TRAINABLES = ("student", "fake")

    def __init__(self, ctx: Context, options: PhasedDMDOptions):
        self.ctx, self.opt = ctx, options
        self.student, self.fake = student_and_fake(ctx, "phased_dmd", options)
        proc = self.student.process
        self.bounds = torch.cat([self.student.times(), torch.tensor([proc.t_clean])])
        self.k = len(self.bounds) - 1
        self.per_phase = options.steps_per_phase or max(1, ctx.config.train.max_steps // self.k)
        self.phase = 0
        self._fake_init = {k: v.detach().clone() for k, v in unwrap(self.fake.model).state_dict().items()}

    def trainables(self):
        return score_trainables(self.student, self.fake, self.opt)

    def phases(self, step: int) -> list[str]:
        return score_phases(step, self.opt)

    def _enter_phase(self, step: int) -> int:
        k = min(step // self.per_phase, self.k - 1)
        if k != self.phase:
            if self.opt.reset_fake:
                with torch.no_grad():
                    unwrap(self.fake.model).load_state_dict(self._fake_init)
            self.phase = k
        return k

    def _phase_output(self, batch: Batch, k: int, grad: bool):
        """(x at t_k from the no-grad rollout, the student's output x_s at the phase's end s, x0 prediction)."""
        proc, st = self.student.process, self.student.denoiser
        shape = self.ctx.teacher.sample_shape
        b = batch.size
        x = batch.randn(b, *shape)  # unit noise at the first bound, as the exported sampler starts
        with torch.no_grad():
            for j in range(k):
                x0 = st(x, self.bounds[j].expand(b), batch.cond)
                x = proc.add_noise(x0, batch.randn(*x0.shape), self.bounds[j + 1].expand(b))
        with torch.set_grad_enabled(grad):
            x0 = st(x, self.bounds[k].expand(b), batch.cond)
            x_s = proc.add_noise(x0, batch.randn(*x0.shape), self.bounds[k + 1].expand(b))
        return x_s, x0

    def _sub_times(self, batch: Batch, s: torch.Tensor) -> torch.Tensor:
        """t uniform in (s, t_max] (of the score range), the subinterval above the phase's end."""
        proc = self.student.process
        hi = proc.t_max * self.opt.t_max if proc.kind == "vp" else self.opt.t_max
        lo = float(s) + (hi - float(s)) * 0.02 if float(s) > proc.t_clean else (proc.t_max * self.opt.t_min
                                                                               if proc.kind == "vp" else self.opt.t_min)
        return proc.sample_uniform(batch.size, lo, hi, generator=batch.generator).to(batch.device)

    def _kernel(self, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor):
        proc = self.student.process
        a_t, s_t = proc.alpha_sigma(t)
        a_s, s_s = proc.alpha_sigma(s.expand_as(t))
        a_ts = a_t / a_s
        var = (s_t**2 - a_ts**2 * s_s**2).clamp(min=1e-8)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a_ts.reshape(shape).to(like), var.sqrt().reshape(shape).to(like), s_t.reshape(shape).to(like),
                a_t.reshape(shape).to(like))

    def step(self, batch: Batch, step: int, phase: str) -> dict:
        k = self._enter_phase(step)
        s = self.bounds[k + 1]
        if phase == "fake":
            with torch.no_grad():
                x_s, _ = self._phase_output(batch, k, grad=False)
            t = self._sub_times(batch, s)
            a_ts, sig_ts, s_t, _ = self._kernel(t, s, x_s)
            n = batch.randn(*x_s.shape)
            x_t = a_ts * x_s + sig_ts * n
            target = s_t * n / sig_ts  # = s_t (x_t - a_{t|s} x_s) / s_{t|s}^2
            pred = self.fake(x_t, t, batch.cond, output="epsilon")
            weight = (sig_ts**2 / s_t**2).clamp(max=1.0).flatten()  # down-weights t -> s, where the target blows up
            return {"loss": mse(pred, target, weight), "phase": torch.tensor(float(k))}
        x_s, x0_hat = self._phase_output(batch, k, grad=True)
        t = self._sub_times(batch, s)
        a_ts, sig_ts, _, _ = self._kernel(t, s, x_s)
        x_t = a_ts * x_s + sig_ts * batch.randn(*x_s.shape)
        with torch.no_grad():
            x0_real = teacher_x0(self.ctx.teacher.denoiser, x_t, t, batch, self.opt.guidance_scale)
            x0_fake = self.fake(x_t.detach(), t, batch.cond)
        # DMD's normalised score difference (in x0 units at t), applied to the phase output x_s: the
        # direction of d/dx_s of the KL at t is a_{t|s} a_t / s_t^2 (x0_fake - x0_real); DMD drops the
        # positive factors and normalises by the distance of the clean prediction to the teacher's
        norm = (x0_hat.detach() - x0_real).abs().flatten(1).mean(1).clamp(min=1e-8).reshape(-1, *[1] * (x_s.ndim - 1))
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        loss = 0.5 * (x_s - (x_s - grad).detach()).pow(2).mean()
        return {"loss": loss, "phase": torch.tensor(float(k))}

    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        self.phase = int(state["phase"])
