"""What the score-based methods (VSD, DMD, DMD2, Phased DMD, SiD) share: the fake score network,
its denoising loss on detached generator samples, the generator's rollout (one step, or a few
steps with backward simulation) and the time range of the score losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..generator import Student, copy_for_training
from .base import Context, Trainable, make_student, mse, student_timesteps, student_trainable


@dataclass
class FakeScoreOptions:
    """Options every score-based method has (flattened into its own Options)."""

    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher; > 0: a LoRA on a copy
    fake_lr: float = 1e-4
    fake_updates: int = 1  # fake-score updates per student update (two time-scale rule)
    t_min: float = 0.02  # score losses use times in [t_min, t_max] as fractions of the process range
    t_max: float = 0.98

    def __post_init__(self):
        if self.fake_updates < 1:
            raise ValueError(f"method_args.fake_updates must be >= 1, got {self.fake_updates}")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"method_args.t_min / t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")


def make_fake(ctx: Context, lora_rank: int) -> Denoiser:
    """The fake score: initialised as the teacher (DMD sec. 3.2 / SiD sec. 4), full or LoRA."""
    model = copy_for_training(ctx.init.model, lora_rank=lora_rank, lora_alpha=lora_rank or None,
                              lora_targets=ctx.config.student.lora_targets).to(ctx.device)
    return Denoiser(model, ctx.init.process, ctx.init.prediction_type)


def student_and_fake(ctx: Context, method: str, opt) -> tuple[Student, Denoiser]:
    """A re-noising student with the configured timesteps and its fake score."""
    return make_student(ctx, method, "renoise", student_timesteps(ctx)), make_fake(ctx, opt.fake_lora_rank)


def score_time_range(process, lo: float, hi: float) -> tuple[float, float]:
    """The fractions [lo, hi] of the process's noise range as times (DMD: [0.02 T, 0.98 T])."""
    a, b = (0.0, process.t_max) if process.kind == "vp" else (0.0, 1.0)
    return a + lo * (b - a), a + hi * (b - a)


def score_times(process, batch: Batch, lo: float, hi: float) -> torch.Tensor:
    """Times for the score losses: uniform over :func:`score_time_range`."""
    return process.sample_uniform(batch.size, *score_time_range(process, lo, hi),
                                  generator=batch.generator).to(batch.device)


def denoising_loss(den: Denoiser, x0: torch.Tensor, cond: Cond | None, t: torch.Tensor, batch: Batch,
                   guidance=None) -> torch.Tensor:
    """The teacher's own training loss (in its prediction parameterisation) on samples x0."""
    proc = den.process
    eps = batch.randn(*x0.shape)
    x_t = proc.add_noise(x0, eps, t)
    target = proc.from_x0_eps(x0, eps, t, den.prediction_type)
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x0.device).reshape(-1).expand(x0.shape[0])
    return mse(den.raw(x_t, t, cond, guidance), target)


def generator_rollout(student: Student, batch: Batch, shape, grad: bool, cond: Cond | None = None):
    """The generator's sample for this batch. One-step students map noise at t_init to x0. Few-step
    students (re-noising sampler) use backward simulation (DMD2 sec. 4.4): a random step k, the
    student's own no-grad rollout of steps < k makes the input at t_k, and the output of step k is
    the sample (with grad when asked). Returns (x0, k)."""
    proc = student.process
    times = student.times()
    k = int(torch.randint(0, len(times), (1,), generator=batch.generator)) if len(times) > 1 else 0
    cond = batch.cond if cond is None else cond
    noise = batch.randn(batch.size, *shape)
    x = noise  # unit noise at t_init (the diffusers convention the exported pipeline follows)
    with torch.no_grad():
        for j in range(k):
            x0 = student.denoiser(x, times[j].expand(batch.size), cond)
            x = proc.add_noise(x0, batch.randn(*x0.shape), times[j + 1].expand(batch.size))
    with torch.set_grad_enabled(grad):
        x0 = student.denoiser(x, times[k].expand(batch.size), cond)
    return x0, k


def score_trainables(student: Student, fake: Denoiser, opt) -> dict[str, Trainable]:
    """The student and the fake score, each with its learning rate."""
    return {
        "student": student_trainable(student, opt.lr),
        "fake": Trainable(fake.model, opt.fake_lr, lambda m: setattr(fake, "model", m)),
    }


def score_phases(step: int, opt) -> list[str]:
    """The two-time-scale rule (DMD2 sec. 4.2): the fake score updates every iteration, the student
    every ``fake_updates``; student first, then the fake score on the student's newest samples."""
    return (["student"] if step % opt.fake_updates == 0 else []) + ["fake"]
