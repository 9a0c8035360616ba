"""Phased DMD (Fan et al., 2025, "Phased DMD: Few-step Distribution Matching Distillation via Score
Matching within Subintervals", arXiv 2510.27684; equation numbers of v3).

The student's timesteps t_0 > t_1 > ... > t_{K-1} and s_K = t_clean split the noise range into K
phases. Phase k's student maps x at t_k to x at s = t_{k+1} with one solver step (sec. 2.1.3: the
DDIM / Euler step from its x0 prediction, so the student samples deterministically); its input x at
t_k is the frozen rollout of the earlier phases (sec. 2.2.1). Phases are trained in turn from high
noise to low ("progressive distribution matching"); with ``experts`` every phase has its own expert
network (a copy of the teacher, full or LoRA per ``student.lora_rank``; a mixture of experts, only
the current one trained), otherwise one network serves every phase.

Within phase k, distribution matching happens on the subinterval forward process from s to t > s
(eq. 2): x_t = a_{t|s} x_s + s_{t|s} n, a_{t|s} = a_t / a_s, s_{t|s}^2 = s_t^2 - a_{t|s}^2 s_s^2
(flow matching: a_{t|s} = (1 - t)/(1 - s)), with t drawn from (s, T] ("reverse nested intervals").

- The fake score, re-initialised from the teacher at each phase start, learns the score of the
  phase output propagated to t by score matching within the subinterval (eq. 11-12): in epsilon form
  its target is s_t n / s_{t|s} (the eps of the marginal at x_t; eq. 12's x0 target
  x_s / a_s - a_t s_s^2 n / (a_s^2 s_{t|s}) is the same prediction), weighted by
  min(10 s_{t|s}^2, 1), the clamp of eq. 13 that bounds the target's growth as t -> s.
- The student follows the score difference at x_t (eq. 10) applied to x_s, in DMD's normalised
  form (as DMD drops the positive weight w_{t|s}, this implementation divides by the mean distance of
  the phase's x0 prediction to the teacher's, DMD2-style).

Where the paper and the public implementation (LightX2V's phased_dmd trainer for Wan) differ, this
follows the paper: (1) the fake score's loss keeps eq. 13's min(10 s_{t|s}^2, 1) weight (the code uses
an unweighted velocity MSE); (2) the DMD gradient is applied to the phase output x_s, where eq. 10
takes it (the code applies it to the student's x0 prediction); (3) phases are trained one after
another with the fake score re-initialised at each start, as sec. 2.2 describes (the code alternates
two regions every iteration, each with its own persistent fake score). From the code, where the
paper is silent: Adam betas (0, 0.999) for every trainable (``betas``), and the fake score's learning
rate a fifth of the student's (``fake_lr_ratio`` 0.2: LightX2V's Wan configs train the student at 2e-6
and the fake score at 4e-7) unless ``fake_lr`` sets it. Those configs also use AdamW weight decay 0.01
and gradient clipping at 10; here they are ``train.weight_decay`` (default 0) and ``train.grad_clip``
(default 1), which no shipped Phased DMD config changes.

The last phase (s = t_clean) is ordinary DMD. Per-phase experts are a :class:`~stepdistill.models.nets.PhasedExperts`
network (sampling routes each step to its expert; no stock diffusers pipeline does that, so such
students are sampled with stepdistill); ``experts: false`` gives one network that exports as an
ordinary few-step DDIM student.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.denoiser import unwrap
from ..diffusion.process import per_sample
from ..models.sharding import copy_weights, load_full_state
from .base import Context, Distiller, Trainable
from .common import make_student, student_timesteps, student_trainable
from .losses import gradient_matching_loss, guided_x0, mse, per_sample_mean_abs
from .score import FakeScoreOptions, make_fake, score_time_range

logger = logging.getLogger("stepdistill")


@dataclass
class PhasedDMDOptions(FakeScoreOptions):
    guidance_scale: float = 1.75  # teacher CFG (diffusers convention)
    lr: float = 1e-5
    fake_updates: int = 5  # the paper's 5:1 fake-to-student update ratio
    steps_per_phase: int | None = None  # default: train.max_steps / K
    experts: bool = True  # one expert network per phase (a mixture of experts); false: one shared network
    reset_fake: bool = True  # re-initialise the fake score from the teacher at each phase start
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam betas of every trainable (LightX2V)
    fake_lr_ratio: float = 0.2  # the fake score's learning rate over lr when fake_lr is unset (LightX2V: 4e-7 / 2e-6)

    def __post_init__(self):
        super().__post_init__()
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.steps_per_phase", self.steps_per_phase, ge=1)
        check_range("method_args.fake_lr_ratio", self.fake_lr_ratio, gt=0)
        if self.save_fake_score:
            raise ValueError("method_args.save_fake_score: Phased DMD's fake score is re-initialised at each phase; "
                             "there is no one trained fake score to save")
        if self.integer_times:
            raise ValueError("method_args.integer_times: Phased DMD draws each phase's times within its sub-interval "
                             "(LightX2V's continuous flow times); there is no integer variant")


class PhasedDMD(Distiller):
    name = "phased_dmd"
    Options = PhasedDMDOptions

    @classmethod
    def cfg_options(cls, options):
        """CFG of the teacher in every phase; with embedded guidance the teacher, the fake scores and the
        student read the teacher's guidance instead."""
        return {"guidance_scale": options.guidance_scale}

    def __init__(self, ctx: Context, options: PhasedDMDOptions):
        super().__init__(ctx, options)
        proc = ctx.init.process
        times = student_timesteps(ctx)
        self.student = make_student(ctx, "phased_dmd", "deterministic", times, experts=options.experts)
        self.fake = make_fake(ctx, options)
        self.bounds = torch.cat([self.student.times(), torch.tensor([proc.t_clean])])
        self.k = len(times)
        max_steps = ctx.config.train.max_steps
        self.per_phase = options.steps_per_phase or max(1, max_steps // self.k)
        if self.per_phase * (self.k - 1) >= max_steps:
            raise ValueError(f"method_args.steps_per_phase={self.per_phase} leaves the last of {self.k} phases no "
                             f"iterations of train.max_steps={max_steps}")
        if ctx.config.train.lr_schedule not in ("constant", "constant_with_warmup"):
            logger.warning("train.lr_schedule=%s runs over the whole run while the phases train one after another: "
                           "later phases (and their fresh fake scores) train at the decayed rate; use constant",
                           ctx.config.train.lr_schedule)
        self.phase = 0
        # what each phase's fake score starts from. A full fake score is a copy of the network it was made from
        # (the teacher, or student.init), which stays frozen: each phase copies it again, and no snapshot is kept
        # (for Wan2.2-A14B a snapshot of both experts is 57 GB in bf16, or its shards). A LoRA fake score's base
        # never changes: a snapshot of its adapters alone.
        fake_net = unwrap(self.fake.model)
        self._fake_source = ctx.init.model if options.fake_lora_rank == 0 else None
        trained = {n for n, p in fake_net.named_parameters() if p.requires_grad}
        self._fake_init = None if self._fake_source is not None else \
            {k: v.detach().clone() for k, v in fake_net.state_dict().items() if k in trained}

    # -- what trains when ---------------------------------------------------------------------------
    @classmethod
    def trainable_names(cls, config, options) -> list[str]:
        """With experts, one student trainable per phase (expert0, expert1, ...), then the fake score."""
        if not options.experts:
            return ["student", "fake"]
        return [f"expert{k}" for k in range(config.student.num_steps)] + ["fake"]

    def trainables(self) -> dict[str, Trainable]:
        opt = self.options
        fake_lr = opt.fake_lr if opt.fake_lr is not None else opt.fake_lr_ratio * opt.lr
        if self.options.experts:
            experts = unwrap(self.student.model).experts

            def put(k):
                return lambda m: experts.__setitem__(k, m)

            out = {f"expert{k}": Trainable(experts[k], self.options.lr, put(k), is_student=True) for k in range(self.k)}
        else:
            out = {"student": student_trainable(self.student, self.options.lr)}
        out["fake"] = Trainable(self.fake.model, fake_lr, lambda m: setattr(self.fake, "model", m))
        for tr in out.values():
            tr.betas = tuple(self.options.betas)
        return out

    def _phase_of(self, iteration: int) -> int:
        return min(iteration // self.per_phase, self.k - 1)

    def updates(self, iteration: int) -> list[str]:
        """The current phase's expert every ``fake_updates`` iterations, then the fake score."""
        k = self._phase_of(iteration)
        gen = f"expert{k}" if self.options.experts else "student"
        return ([gen] if iteration % self.options.fake_updates == 0 else []) + ["fake"]

    def reinitialised(self, iteration: int) -> list[str]:
        """At a phase's first iteration the fake score is re-initialised from the teacher ("rather than
        from the model of the preceding phase"), and its optimiser state with it."""
        k = self._phase_of(iteration)
        if k == self.phase:
            return []
        self.phase = k
        if not self.options.reset_fake:
            return []
        with torch.no_grad():
            if self._fake_source is not None:
                copy_weights(self._fake_source, self.fake.model)  # sharded or not
            else:
                load_full_state(self.fake.model, self._fake_init, strict=False)  # the adapters
        return ["fake"]

    # -- the phase's student and the subinterval process -----------------------------------------
    def _phase_output(self, batch: Batch, k: int, grad: bool):
        """(x_s at the phase's end s = t_{k+1}, the x0 prediction at t_k): the frozen deterministic
        rollout of phases < k from unit noise at t_0, then phase k's step (with grad when asked)."""
        proc, st = self.student.process, self.student.denoiser
        b = batch.size
        x = batch.randn(b, *self.ctx.teacher.sample_shape)  # unit noise at t_0, as the exported sampler starts
        with torch.no_grad():
            for j in range(k):
                t, s = self.bounds[j], self.bounds[j + 1]
                x = proc.ode_step(x, st(x, t.expand(b), batch.cond), t, s)
        with torch.set_grad_enabled(grad):
            t, s = self.bounds[k], self.bounds[k + 1]
            x0 = st(x, t.expand(b), batch.cond)
            return proc.ode_step(x, x0, t, s), x0

    def _sub_times(self, batch: Batch, s: torch.Tensor) -> torch.Tensor:
        """t uniform in (s, t_max] of the score range: every phase reaches up to the highest noise."""
        proc = self.student.process
        lo, hi = score_time_range(proc, self.options.t_min, self.options.t_max)
        if float(s) > proc.t_clean:  # an inner boundary: from just above s
            lo = float(s) + (hi - float(s)) * 0.02
        return batch.times(proc, lo, hi)

    def _kernel(self, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor):
        """(a_{t|s}, s_{t|s}, s_t) of eq. 2, shaped to broadcast against ``like``."""
        proc = self.student.process
        a_t, s_t = proc.alpha_sigma(t)
        a_s, s_s = proc.alpha_sigma(s.expand_as(t))
        a_ts = a_t / a_s
        var = (s_t**2 - a_ts**2 * s_s**2).clamp(min=1e-8)
        return per_sample(a_ts, like), per_sample(var.sqrt(), like), per_sample(s_t, like)

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        k = self._phase_of(iteration)
        s = self.bounds[k + 1]
        if update == "fake":
            with torch.no_grad():
                x_s, _ = self._phase_output(batch, k, grad=False)
            t = self._sub_times(batch, s)
            a_ts, sig_ts, s_t = self._kernel(t, s, x_s)
            n = batch.randn(*x_s.shape)
            x_t = a_ts * x_s + sig_ts * n
            target = s_t * n / sig_ts  # eq. 12 in epsilon form: s_t (x_t - a_{t|s} x_s) / s_{t|s}^2
            pred = self.fake(x_t, t, batch.cond, output="epsilon")
            weight = (10 * sig_ts**2).clamp(max=1.0).flatten()  # eq. 13's clamp of 1 / s_{t|s}^2 at 10
            return {"loss": mse(pred, target, weight), "phase": torch.tensor(float(k))}
        x_s, x0_hat = self._phase_output(batch, k, grad=True)
        t = self._sub_times(batch, s)
        a_ts, sig_ts, _ = self._kernel(t, s, x_s)
        x_t = a_ts * x_s + sig_ts * batch.randn(*x_s.shape)
        with torch.no_grad():
            x0_real = guided_x0(self.ctx.teacher.denoiser, x_t, t, batch.cond, batch.uncond,
                                self.options.guidance_scale)
            x0_fake = self.fake(x_t.detach(), t, batch.cond)
        # eq. 10: the direction of the KL's gradient at x_s is a_{t|s} a_t / s_t^2 (x0_fake - x0_real); DMD's
        # normalised form drops the positive factors and divides by the x0 prediction's distance to the teacher's
        grad = (x0_fake - x0_real) / per_sample_mean_abs(x0_hat - x0_real, 1e-8)
        return {"loss": gradient_matching_loss(x_s, grad), "phase": torch.tensor(float(k))}

    def state_dict(self) -> dict:
        return {"phase": self.phase, "per_phase": self.per_phase}

    def load_state_dict(self, state: dict) -> None:
        # the phase length is kept from the run's start: a resume with another train.max_steps keeps the
        # phase boundaries (and does not re-enter or reset a phase)
        self.phase, self.per_phase = int(state["phase"]), int(state.get("per_phase", self.per_phase))
