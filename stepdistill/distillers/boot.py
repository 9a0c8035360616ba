"""BOOT: data-free distillation by bootstrapping (Gu et al., 2023).

The student g(eps, t) always reads the initial noise eps and predicts the *signal* of the
teacher's ODE trajectory started from it, y_t = (x_t - sigma_t eps) / alpha_t (the "signal ODE",
sec. 3.1). Training needs no data:

- boundary (t = T): g(eps, T) matches the teacher's x0 prediction at x_T = alpha_T sg(g(eps, T)) +
  sigma_T eps;
- bootstrapping (sec. 3.2): for neighbouring grid times t > s, rebuild x_t = alpha_t g(eps, t) +
  sigma_t eps, take one teacher DDIM step to s, and regress g(eps, s) onto the stop-gradient target
  y_s = (x_s - sigma_s eps) / alpha_s, weighted by 1 / Delta^2 with Delta = 1 - e^{lambda_s - lambda_t}
  (lambda = -log(alpha/sigma)), the step's size in y-space. In y-space the DDIM step reads
  y_s = y_t + Delta (f(x_t, t) - y_t).

x_t is built one way at every time, T included: the boundary reads the teacher at the point the first
bootstrapping step starts from, so a student that meets the boundary (y_T = f(x_T, T)) takes that step
from its own trajectory. The paper writes the boundary at pure noise, which is this x_T when alpha_T = 0
(flow, and its continuous schedules); on a discrete VP schedule alpha_T > 0 (SD: 0.068), and x_T =
sigma_T eps would leave the boundary's y_T off the signal the bootstrapping steps continue.

The sample is g(eps, t_clean): at the clean end y = x. The network's raw output is read as an x0
prediction with t_max's coefficients whatever t it is given (``signal_prediction``), so at
initialisation g(eps, T) is exactly the teacher's first x0 prediction. No public code exists; this follows the paper
and its secondary descriptions (boundary as a separate loss term, plain L2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.process import per_sample
from ..models.student import signal_prediction
from .base import Context, Distiller, Trainable
from .common import make_student, student_trainable
from .losses import guided_x0, mse


@dataclass
class BootOptions:
    grid_steps: int = 32  # teacher DDIM steps along the trajectory; t, s are neighbours on this grid
    boundary_weight: float = 1.0
    guidance_scale: float | None = None  # teacher CFG in the bootstrap target (diffusers convention)
    lr: float = 1e-4

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.boundary_weight", self.boundary_weight, ge=0)
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        if self.grid_steps < 1:
            raise ValueError(f"method_args.grid_steps must be >= 1, got {self.grid_steps}")


class Boot(Distiller):
    name = "boot"
    Options = BootOptions

    @classmethod
    def cfg_options(cls, options):
        """CFG in the bootstrap target; with embedded guidance the teacher reads its guidance instead."""
        return {"guidance_scale": options.guidance_scale}

    def __init__(self, ctx: Context, options: BootOptions):
        if ctx.config.student.num_steps != 1:
            raise ValueError("method boot: the BOOT student samples in one step; set student.num_steps=1")
        super().__init__(ctx, options)
        proc = ctx.init.process
        self.grid = proc.sampling_times(options.grid_steps)  # t_max ... t_clean
        self.student = make_student(ctx, "boot", "signal", [proc.t_clean])

    def trainables(self) -> dict[str, Trainable]:
        return {"student": student_trainable(self.student, self.options.lr)}

    def _signal(self, x, eps, t):
        a, s = self.student.process.alpha_sigma(t)
        return (x - per_sample(s, x) * eps) / per_sample(a, x)

    def x0(self, x_t, t, batch: Batch):
        """The teacher's x0, with CFG when ``guidance_scale`` is set."""
        return guided_x0(self.ctx.teacher.denoiser, x_t, t, batch.cond, batch.uncond, self.options.guidance_scale)

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        proc, student = self.student.process, self.student.denoiser
        b = batch.size
        eps = batch.randn(b, *self.ctx.teacher.sample_shape)
        # boundary condition at t = T, at the x_T the bootstrapping rebuilds there: alpha_T y_T + sigma_T eps
        t_max = self.grid[0].expand(b)
        y_T = signal_prediction(student, eps, t_max, batch.cond)
        with torch.no_grad():
            target_T = self.x0(proc.add_noise(y_T.detach(), eps, t_max), t_max, batch)
        loss_bc = mse(y_T, target_T)
        # bootstrapping between neighbouring grid times
        i = batch.randint(0, len(self.grid) - 1)
        t, s = self.grid[i], self.grid[i + 1]
        with torch.no_grad():
            y_t = signal_prediction(student, eps, t, batch.cond)
            x_t = proc.add_noise(y_t, eps, t)
            x_s = proc.ode_step(x_t, self.x0(x_t, t, batch), t, s)
            target = self._signal(x_s, eps, s)
            lam = lambda tt: -proc.log_snr(tt) / 2  # noqa: E731  (lambda_t = -log(alpha_t / sigma_t))
            s_clamped = s.clamp(min=proc.t_clean + 1e-3) if proc.kind == "flow" else s
            delta = torch.where(s <= proc.t_clean, torch.ones_like(t), 1 - torch.exp(lam(s_clamped) - lam(t)))
        loss_bs = mse(signal_prediction(student, eps, s, batch.cond), target, (1.0 / delta.clamp(min=1e-4) ** 2).to(eps))
        return {"loss": loss_bs + self.options.boundary_weight * loss_bc, "bootstrap": loss_bs.detach(),
                "boundary": loss_bc.detach()}
