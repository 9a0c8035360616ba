"""What the score-based methods (VSD, DMD, DMD2, Phased DMD, SiD) share: the fake score network,
the student's rollout (one step, or a few steps with backward simulation), the time range of the
score losses and the two-time-scale update order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import check_range, torch_dtype
from ..data.batch import Batch
from ..diffusion.denoiser import Cond, Denoiser
from ..models.nets import NoiseLevelExperts
from ..models.sharding import placed
from ..models.shared_lora import FAKE_SCORE, add_adapter_view
from ..models.student import ATTENTION_LORA_TARGETS, Student, copy_for_training
from . import fake_store
from .base import Context, Distiller, Trainable
from .common import make_student, student_timesteps, student_trainable

logger = logging.getLogger("stepdistill")


@dataclass
class FakeScoreOptions:
    """Options every score-based method has (flattened into its own Options)."""

    fake_lora_rank: int = 0  # 0: the fake score is a full copy of the teacher; > 0: a LoRA on a copy
    fake_lora_alpha: float | None = None  # LoRA scale alpha / rank (default alpha = rank)
    # modules the fake score's LoRA adapts (default: student.lora_targets, or the attention projections)
    fake_lora_targets: list[str] | None = None
    fake_lr: float | None = None  # default: the student's learning rate (DMD2, SiD); Phased DMD: fake_lr_ratio x it
    fake_updates: int = 1  # fake-score updates per student update (two time-scale rule)
    t_min: float = 0.02  # score losses use times in [t_min, t_max] as fractions of the process range
    t_max: float = 0.98
    # the score losses' times: integer timesteps in [int(t_min T), int(t_max T)] as the official DMD2, SwiftBrush and
    # SiD scripts draw them (true; VP teachers only), or continuous (false); null: integer on a VP teacher, continuous
    # on a flow one (docs/METHODS.md, "Times")
    integer_times: bool | None = None
    # write the trained fake score (and a GAN head) as fake_score/ beside the student at the end: the start of a
    # DisBack run from this one (method_args.fake_init); off by default, as it is a second network's worth of disk
    save_fake_score: bool = False

    def __post_init__(self):
        check_range("method_args.fake_lr", self.fake_lr, gt=0)
        check_range("method_args.fake_lora_rank", self.fake_lora_rank, ge=0)
        check_range("method_args.fake_lora_alpha", self.fake_lora_alpha, gt=0)
        if self.fake_updates < 1:
            raise ValueError(f"method_args.fake_updates must be >= 1, got {self.fake_updates}")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"method_args.t_min / t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")


def fake_learning_rate(opt) -> float:
    """``fake_lr``, or the student's ``lr`` when it is not set (DMD2 and SiD train both at one rate)."""
    return opt.lr if opt.fake_lr is None else opt.fake_lr


def shared_lora_base(ctx: Context, opt: FakeScoreOptions, student: bool = True) -> tuple[nn.Module | None, bool, bool]:
    """(base, student on it, fake score on it): the frozen network a LoRA student and a LoRA fake score
    are adapters of (``train.shared_lora_base``, ``models/shared_lora.py``), and which of the two are.
    A network is shared when it is a LoRA (rank > 0) on the teacher's own network as it is (a student
    without ``student.architecture``, ``student.init`` or ``student.layer_map``), in the teacher's dtype
    (``train.trainable_dtype``: the adapters compute on the base in its dtype), with one process (the
    sharded paths of ``training/parallel.py`` take whole networks). Base None: copies, as before."""
    sc, base = ctx.config.student, ctx.init.model
    if not ctx.config.train.shared_lora_base or isinstance(base, NoiseLevelExperts) or not hasattr(base, "add_adapter"):
        return None, False, False
    if dist.is_initialized() and dist.get_world_size() > 1:
        logger.info("train.shared_lora_base: several processes, so the LoRA networks are whole copies")
        return None, False, False
    if written_by_several_processes(ctx.config.train.output_dir):
        logger.info("train.shared_lora_base: this run's checkpoints were written by several processes, with whole "
                    "copies under each LoRA; it resumes with copies")
        return None, False, False
    if next(base.parameters()).dtype != torch_dtype(ctx.config.train.trainable_dtype):
        return None, False, False
    on_student = student and sc.lora_rank > 0 and sc.architecture is None and sc.init is None and not sc.layer_map
    on_fake = opt.fake_lora_rank > 0
    return (base if on_student or on_fake else None), on_student, on_fake


def written_by_several_processes(output_dir) -> bool:
    """Whether the run folder holds a checkpoint of several processes (its ``sharded/`` folder: the layout of
    ``training/checkpoints.py``), whose LoRA networks were copies: a run resumed from it on one process keeps
    them copies, so that its checkpoint's names are the networks' names."""
    return output_dir is not None and any((Path(output_dir) / "checkpoints").glob("checkpoint-*/sharded"))


def fake_lora_targets(ctx: Context, opt: FakeScoreOptions) -> list[str]:
    """The modules a LoRA fake score adapts: ``fake_lora_targets``, else ``student.lora_targets``, else the
    attention projections."""
    return list(opt.fake_lora_targets or ctx.config.student.lora_targets or ATTENTION_LORA_TARGETS)


def make_fake(ctx: Context, opt: FakeScoreOptions, lora_base: nn.Module | None = None) -> Denoiser:
    """The fake score: initialised as the teacher (DMD sec. 3.2 / SiD sec. 4), full or LoRA; with
    ``lora_base`` (:func:`shared_lora_base`), adapter ``fake_score`` on that network."""
    if lora_base is not None:
        model = add_adapter_view(lora_base, FAKE_SCORE, rank=opt.fake_lora_rank, alpha=opt.fake_lora_alpha,
                                 targets=fake_lora_targets(ctx, opt), init=ctx.config.student.lora_init)
        return Denoiser(model, ctx.init.process, ctx.init.prediction_type, ctx.init.embedded_guidance)
    model = placed(copy_for_training(ctx.init.model, lora_rank=opt.fake_lora_rank, lora_alpha=opt.fake_lora_alpha,
                                     lora_targets=fake_lora_targets(ctx, opt),
                                     dtype=torch_dtype(ctx.config.train.trainable_dtype),
                                     lora_init=ctx.config.student.lora_init), ctx.device)
    return Denoiser(model, ctx.init.process, ctx.init.prediction_type, ctx.init.embedded_guidance)


def score_time_range(process, lo: float, hi: float) -> tuple[float, float]:
    """The fractions [lo, hi] of the process's noise range as times (DMD: [0.02 T, 0.98 T])."""
    a, b = (0.0, process.t_max) if process.kind == "vp" else (0.0, 1.0)
    return a + lo * (b - a), a + hi * (b - a)


def regression_times(process, batch: Batch) -> torch.Tensor:
    """Times uniform over the whole range, for regressions onto the teacher at noised data (guided
    stage 1, teacher score matching); flow from t = 1e-3, off the clean end."""
    lo, hi = score_time_range(process, 0.0, 1.0)
    return batch.times(process, lo if process.kind == "vp" else 1e-3, hi)


def score_times(process, batch: Batch, lo: float, hi: float, integer: bool | None = False) -> torch.Tensor:
    """Times for the score losses: uniform over :func:`score_time_range`; with ``integer`` (a VP process),
    integer timesteps uniform in [int(lo T), int(hi T)] (T = num_train_timesteps, at most T - 1), the
    official scripts' ``randint(min_step, max_step + 1)``; ``integer=None``: integer on VP, continuous on flow."""
    if integer is None:
        integer = process.kind == "vp"
    if integer:
        if process.kind != "vp":
            raise ValueError("method_args.integer_times: integer timesteps are of a VP teacher; flow times are continuous")
        n = process.num_train_timesteps
        return batch.randint(int(lo * n), min(int(hi * n), n - 1) + 1).float().to(batch.device)
    lo, hi = score_time_range(process, lo, hi)
    return batch.times(process, lo, hi)


def student_rollout(student: Student, batch: Batch, shape, grad: bool, cond: Cond | None = None):
    """The student's sample for this batch. One-step students map noise at t_init to x0. Few-step
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


def score_updates(iteration: int, fake_updates: int) -> list[str]:
    """The two-time-scale rule (DMD2 sec. 4.2): the fake score updates every iteration, the student
    every ``fake_updates``; student first, then the fake score on the student's newest samples."""
    return (["student"] if iteration % fake_updates == 0 else []) + ["fake"]


class ScoreDistiller(Distiller):
    """A re-noising student (``student.timesteps`` or the process grid) and its fake score, each a
    trainable with its own learning rate, updated by :func:`score_updates`."""

    shares_lora_base = True  # LoRA networks as adapters of the teacher's (DisBack: no, it copies its fake score)

    def __init__(self, ctx: Context, options):
        super().__init__(ctx, options)
        if getattr(options, "integer_times", None) and ctx.init.process.kind != "vp":
            raise ValueError("method_args.integer_times: integer timesteps are of a VP teacher; this teacher's are "
                             "flow times, which are continuous")
        base, on_student, on_fake = shared_lora_base(ctx, options) if self.shares_lora_base else (None, False, False)
        if base is not None:
            logger.info("train.shared_lora_base: %s on the teacher's network, with its adapters switched per call",
                        " and ".join(n for n, on in (("the LoRA student", on_student), ("the LoRA fake score", on_fake)) if on))
        # a whole fake score (rank 0) beside a shared LoRA student: copied before the student's adapter is added
        # to the teacher's network (a whole copy draws nothing random, so the adapters start as they would)
        fake = make_fake(ctx, options) if on_student and not on_fake else None
        self.student = make_student(ctx, self.name, "renoise", student_timesteps(ctx),
                                    lora_base=base if on_student else None)
        self.fake = fake or make_fake(ctx, options, lora_base=base if on_fake else None)

    @classmethod
    def trainable_names(cls, config, options) -> list[str]:
        return ["student", "fake"]

    def final_parts(self) -> dict[str, nn.Module]:
        """With ``save_fake_score``, the trained fake score (with DMD2's GAN head: the bundle of both)."""
        if not self.options.save_fake_score:
            return {}
        head = getattr(self, "head", None)
        return {fake_store.FAKE_SCORE: self.fake_bundle if head is not None else self.fake.model}

    def save_final(self, run_dir, parts: dict[str, nn.Module]) -> None:
        """``fake_score/``: the fake score as a diffusers model folder, the GAN head beside it (fake_store.py)."""
        part = parts[fake_store.FAKE_SCORE]
        net, head = (part["net"], part["head"]) if isinstance(part, nn.ModuleDict) else (part, None)
        fake_store.save_fake_score(Path(run_dir) / fake_store.FAKE_SCORE, net, head)

    def trainables(self) -> dict[str, Trainable]:
        return {
            "student": student_trainable(self.student, self.options.lr),
            "fake": Trainable(self.fake.model, self.fake_lr, lambda m: setattr(self.fake, "model", m)),
        }

    @property
    def fake_lr(self) -> float:
        return fake_learning_rate(self.options)

    def updates(self, iteration: int) -> list[str]:
        return score_updates(iteration, self.options.fake_updates)

    def sample(self, batch: Batch, grad: bool, cond: Cond | None = None):
        """The student's sample for ``batch`` (:func:`student_rollout`)."""
        return student_rollout(self.student, batch, self.ctx.teacher.sample_shape, grad, cond)
