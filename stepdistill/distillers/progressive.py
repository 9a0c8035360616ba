"""Progressive distillation (Salimans & Ho, 2022, Algorithm 2).

A student of N steps learns to match two DDIM steps of its teacher (the previous round's student,
2N steps) in one: at grid time t with t' = t - 1/(2N) and t'' = t - 1/N (in the process's own
spacing), the teacher goes z_t -> z_t' -> z_t'' and the student regresses the x implied by landing
on z_t'' in one DDIM step (eq. 8 / Alg. 2):

    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),

with the truncated-SNR weight max(SNR_t, 1) (sec. 4). Rounds halve N inside one run (e.g. 64 -> 1);
the student of round r becomes the frozen teacher of round r + 1.

As in the paper and its official configs, the learning rate is annealed linearly to zero within each
round (``round_lr``), on top of ``train.lr_schedule``. Sec. 4 avoids an epsilon output for the student,
because x0 = (z - sigma eps) / alpha multiplies the network's error by sigma / alpha at high noise
(14.6 at t = 999 for SD's schedule); ``student_prediction`` gives the student an x0 (``sample``) or
``v_prediction`` output head instead of the teacher's (the network is the teacher's, its output read
in the new parameterisation, so the first round also learns the new head; the exported scheduler's
prediction_type follows it). By default (``auto``) a student of 4 steps or fewer of an epsilon teacher
gets the v head where the epsilon head's x0 is ill-conditioned at its first time (sigma / alpha above
50: linear and cosine betas, not SD's scaled-linear ones); ``teacher`` keeps the teacher's. The
official code's x-and-eps head ('both') has no diffusers equivalent; v is the paper's other safe
choice that diffusers' schedulers read.
With ``x_source: data`` the x of each row is a real image with its own caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.denoiser import Denoiser, unwrap
from ..diffusion.process import NoiseProcess, per_sample, truncated_snr_weight
from .base import Context, Distiller, Trainable
from .common import (SamplePool, check_x_source, frozen_copy, ill_conditioned_start, make_student, student_trainable,
                     x0_source)
from .losses import guided_x0, mse


@dataclass
class ProgressiveOptions:
    start_steps: int = 32  # student steps of the first round (its teacher runs 2x that many)
    steps_per_round: int | None = None  # iterations per halving round; default: train.max_steps / rounds
    x_source: Literal["data", "teacher"] = "teacher"  # real data, or a pool of teacher samples
    pool_size: int = 4096
    pool_steps: int = 64  # teacher DDIM steps that make the pool
    guidance_scale: float | None = None  # CFG of the original teacher (round 0), diffusers convention
    weighting: Literal["truncated_snr", "snr", "none"] = "truncated_snr"
    lr: float = 1e-4
    # the learning rate within each round; None: linear to 0 in progressive distillation (the official configs),
    # constant in guided distillation's stage 2 (the paper is silent; linear measured 9.2x against 5.0x the
    # oracle's noise floor)
    round_lr: Literal["linear", "constant"] | None = None
    # the student's output head; auto: v_prediction for an epsilon teacher at SAFE_HEAD_STEPS student steps or
    # fewer whose x0 is ill-conditioned at the first step (the paper's sec. 4), the teacher's own head otherwise
    student_prediction: Literal["auto", "teacher", "sample", "v_prediction"] = "auto"

    def __post_init__(self):
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.pool_size", self.pool_size, ge=1)
        check_range("method_args.pool_steps", self.pool_steps, ge=1)
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.steps_per_round", self.steps_per_round, ge=1)
        if self.start_steps < 1 or self.start_steps & (self.start_steps - 1):
            raise ValueError(f"method_args.start_steps must be a power of two, got {self.start_steps}")


SAFE_HEAD_STEPS = 4  # at this many student steps or fewer an ill-conditioned epsilon head is replaced by default


def student_head(choice: str, teacher_head: str, process, steps: int, t_init: float) -> str | None:
    """The student's output head for ``student_prediction`` (None: the teacher's). ``auto`` gives an
    epsilon VP teacher's student of at most ``SAFE_HEAD_STEPS`` steps a v head, x0 = alpha z - sigma v,
    when its epsilon head would be ill-conditioned at the student's first time: x0 = (z - sigma eps) /
    alpha multiplies the error by sigma / alpha, above ``EPS_AMPLIFICATION_LIMIT`` (50) for linear betas
    (158 at t = 999) and cosine ones, not for SD's scaled-linear betas (14.6), where relearning the head
    cost more than it saved on the MNIST teacher (docs/METHODS.md, progressive)."""
    if choice == "teacher":
        return None
    if choice != "auto":
        return choice
    if teacher_head == "epsilon" and steps <= SAFE_HEAD_STEPS and ill_conditioned_start(process, teacher_head, t_init):
        return "v_prediction"
    return None


def num_rounds(start_steps: int, final_steps: int) -> int:
    if final_steps > start_steps or start_steps % final_steps or (start_steps // final_steps) & (start_steps // final_steps - 1):
        raise ValueError(f"student.num_steps={final_steps} must be start_steps={start_steps} halved some number of times")
    return int(math.log2(start_steps // final_steps)) + 1


def two_step_target(teacher, process: NoiseProcess, z: torch.Tensor, t, t_mid, s):
    """Alg. 2 target: the x that one DDIM step z_t -> z_s must use to land where two teacher
    steps (t -> t_mid -> s) land. ``teacher(z, t) -> x0``."""
    z_mid = process.ode_step(z, teacher(z, t), t, t_mid)
    z_s = process.ode_step(z_mid, teacher(z_mid, t_mid), t_mid, s)
    a_t, s_t = process.alpha_sigma(t)
    a_s, s_s = process.alpha_sigma(s)
    ratio = per_sample(s_s / s_t, z)
    return (z_s - ratio * z) / (per_sample(a_s, z) - ratio * per_sample(a_t, z))


def loss_weight(kind: str, process: NoiseProcess, t) -> torch.Tensor | None:
    if kind == "truncated_snr":
        return truncated_snr_weight(process, t)
    if kind == "snr":
        return process.snr(t)
    return None


class RoundSchedule:
    """Which round an iteration is in, its student steps and time grids."""

    def __init__(self, process: NoiseProcess, start_steps: int, final_steps: int, first_step: int, total_steps: int,
                 steps_per_round: int | None):
        self.process = process
        self.rounds = num_rounds(start_steps, final_steps)
        self.start_steps = start_steps
        self.first = first_step
        self.per_round = steps_per_round or max(1, (total_steps - first_step) // self.rounds)

    def round_of(self, iteration: int) -> int:
        return min(max(iteration - self.first, 0) // self.per_round, self.rounds - 1)

    def round_progress(self, iteration: int, total_steps: int) -> float:
        """How far into its round ``iteration`` is, in [0, 1) (the last round runs to ``total_steps``)."""
        rnd = self.round_of(iteration)
        start = self.first + rnd * self.per_round
        length = (total_steps - start) if rnd == self.rounds - 1 else self.per_round
        return (iteration - start) / max(length, 1)

    def student_steps(self, rnd: int) -> int:
        return self.start_steps >> rnd

    def sample_times(self, rnd: int, batch: Batch):
        """(t, t', t'') for each row: a random student interval and the teacher's midpoint."""
        n = self.student_steps(rnd)
        fine = self.process.sampling_times(2 * n)
        i = batch.randint(0, n)
        return fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]


class ProgressiveCore:
    """The round machinery shared by progressive and guided (stage 2) distillation."""

    def __init__(self, student, original_teacher: Denoiser, schedule: RoundSchedule, options: ProgressiveOptions,
                 guidance_range: tuple[float, float] | None = None):
        self.student = student
        self.original = original_teacher
        self.schedule = schedule
        self.options = options
        self.guidance_range = guidance_range  # guided: w ~ U[range] fed to both (w-conditioned) nets
        self.round = -1
        self.round_teacher: Denoiser | None = None

    def teacher_for(self, iteration: int) -> Denoiser:
        rnd = self.schedule.round_of(iteration)
        if rnd != self.round:
            # the student at the start of a round is the frozen teacher of that round
            self.round_teacher = self.original if rnd == 0 else frozen_copy(self.student.denoiser)
            self.round = rnd
        return self.round_teacher

    def loss(self, batch: Batch, iteration: int, pool: SamplePool | None, cfg_scale: float | None) -> dict:
        teacher = self.teacher_for(iteration)
        proc = self.student.process
        x0, cond, uncond = x0_source(self.options.x_source, batch, pool)
        b = batch.size
        t, t_mid, s = self.schedule.sample_times(self.round, batch)
        eps = batch.randn(*x0.shape)
        z = proc.add_noise(x0, eps, t)
        w = None
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            w = (lo + (hi - lo) * batch.rand(b))
        scale = cfg_scale if (self.round == 0 and teacher is self.original) else None
        with torch.no_grad():
            target = two_step_target(lambda x, tt: guided_x0(teacher, x, tt, cond, uncond, scale, guidance=w), proc, z,
                                     t, t_mid, s)
        pred = self.student.denoiser(z, t, cond, guidance=w)
        weight = loss_weight(self.options.weighting, proc, t)
        return {"loss": mse(pred, target, None if weight is None else weight.to(pred)),
                "round": torch.tensor(float(self.round)),
                "student_steps": torch.tensor(float(self.schedule.student_steps(self.round)))}

    def state_dict(self) -> dict:
        teacher = None
        if self.round_teacher is not None and self.round_teacher is not self.original:
            teacher = unwrap(self.round_teacher.model).state_dict()
        return {"round": self.round, "teacher": teacher, "per_round": self.schedule.per_round}

    def load_state_dict(self, state: dict) -> None:
        # the round length is kept from the run's start: a resume with another train.max_steps keeps the
        # round boundaries (no new round teacher mid-round, no jump in the per-round learning rate)
        self.schedule.per_round = int(state.get("per_round", self.schedule.per_round))
        self.round = int(state["round"])
        if state["teacher"] is None:
            self.round_teacher = self.original if self.round == 0 else None
        else:
            self.round_teacher = frozen_copy(self.student.denoiser)
            unwrap(self.round_teacher.model).load_state_dict(state["teacher"])


class Progressive(Distiller):
    """Progressive distillation of a (CFG) teacher into ``student.num_steps`` deterministic steps."""

    name = "progressive"
    Options = ProgressiveOptions

    @classmethod
    def cfg_options(cls, options):
        """CFG of the original teacher (round 0); with embedded guidance every round's teacher and the
        student read the teacher's guidance."""
        return {"guidance_scale": options.guidance_scale}

    def __init__(self, ctx: Context, options: ProgressiveOptions):
        super().__init__(ctx, options)
        check_x_source(ctx, options.x_source)
        final = ctx.config.student.num_steps
        proc = ctx.init.process
        grid = proc.grid(final).tolist()
        head = student_head(options.student_prediction, ctx.init.prediction_type, proc, final, grid[0])
        self.student = make_student(ctx, "progressive", "deterministic", grid, prediction_type=head)
        schedule = RoundSchedule(proc, options.start_steps, final, 0, ctx.config.train.max_steps, options.steps_per_round)
        self.core = ProgressiveCore(self.student, ctx.teacher.denoiser, schedule, options)
        self.pool = None
        if options.x_source == "teacher":
            self.pool = SamplePool(ctx.teacher.denoiser, ctx.source, options.pool_size, options.pool_steps,
                                   options.guidance_scale)

    def trainables(self) -> dict[str, Trainable]:
        return {"student": student_trainable(self.student, self.options.lr)}

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        return self.core.loss(batch, iteration, self.pool, self.options.guidance_scale)

    def lr_factor(self, name: str, iteration: int) -> float:
        if self.options.round_lr == "constant":  # None and "linear" anneal
            return 1.0
        return 1.0 - self.core.schedule.round_progress(iteration, self.ctx.config.train.max_steps)

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state)
