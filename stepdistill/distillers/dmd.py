"""Distribution Matching Distillation: DMD (Yin et al., CVPR 2024) and DMD2 (Yin et al., NeurIPS 2024).

Both move the student along the difference of two scores at a noised student sample
x_t = alpha_t x + sigma_t eps, t ~ U[t_min T, t_max T] (DMD eq. 7-8, Alg. 1):

    grad = (p_real - p_fake) / mean_CHW |p_real|,   p = x - x0_pred(x_t),
    loss = 0.5 || x - sg(x - grad) ||^2,

with the real score the teacher with CFG and the fake score a network trained by the teacher's
denoising loss on detached student samples (DMD eq. 6). DMD adds a regression loss on teacher ODE
(noise, sample) pairs the toolkit generates and caches (eq. 9; LPIPS in the paper, a squared
distance in the data/latent space here, see ``regression_distance``). DMD2 drops it and adds the
two-time-scale rule (sec. 4.2), a GAN classifier on the fake score's bottleneck features against
real data (sec. 4.3) and multi-step students trained by backward simulation (sec. 4.4).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import check_range, to_dict
from ..data.batch import Batch
from ..diffusion.denoiser import Cond
from ..diffusion.sampling import ode_sample
from ..storage import load_or_make, load_state, save_state
from .base import Context
from .gan import GANMixin, GANOptions
from .losses import denoising_loss, gradient_matching_loss, guided_x0, mse, per_sample_mean_abs
from .score import FakeScoreOptions, ScoreDistiller, score_times

REGRESSION_PAIRS = "dmd_regression_pairs"  # in the run folder: DMD's cached (noise, teacher sample) pairs
logger = logging.getLogger("stepdistill")


def dm_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7-8 with the per-sample normaliser; x0_real, x0_fake carry no grad."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    return gradient_matching_loss(x, (p_real - p_fake) / per_sample_mean_abs(p_real, 1e-8))


@dataclass
class DMDOptions(FakeScoreOptions):
    guidance_scale: float = 1.75  # real score CFG (diffusers convention; 1.75 SD1.5, 8 SDXL in the papers)
    lr: float = 1e-5
    regression_weight: float = 0.25  # DMD eq. 9 lambda_reg
    regression_pairs: int = 1024  # teacher ODE pairs generated and cached in the run folder
    regression_steps: int = 32  # teacher DDIM steps per pair

    def __post_init__(self):
        super().__post_init__()
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.regression_weight", self.regression_weight, ge=0)
        check_range("method_args.regression_pairs", self.regression_pairs, ge=1)
        check_range("method_args.regression_steps", self.regression_steps, ge=1)


@dataclass
class DMD2Options(GANOptions):
    guidance_scale: float = 1.75
    lr: float = 1e-5
    fake_updates: int = 5  # DMD2: 5 fake-score updates per student update (two time-scale rule)
    fake_guidance_scale: float | None = None  # CFG of the fake score (None: conditional prediction only)

    def __post_init__(self):
        super().__post_init__()
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.fake_guidance_scale", self.fake_guidance_scale, ge=0)


class DMDBase(ScoreDistiller):
    """What DMD and DMD2 share: the distribution-matching loss and the fake score's denoising loss."""

    fake_guidance_scale: float | None = None  # CFG of the fake score in the DM loss (DMD2 has an option)

    def distribution_matching(self, x: torch.Tensor, batch: Batch, real=None) -> torch.Tensor:
        """DMD's update at noised samples of ``x``; ``real`` replaces the teacher as the real score (DisBack)."""
        proc = self.student.process
        t = score_times(proc, batch, self.options.t_min, self.options.t_max, self.options.integer_times)
        with torch.no_grad():
            x_t = proc.add_noise(x, batch.randn(*x.shape), t)
            real = self.ctx.teacher.denoiser if real is None else real
            x0_real = guided_x0(real, x_t, t, batch.cond, batch.uncond, self.options.guidance_scale)
            x0_fake = guided_x0(self.fake, x_t, t, batch.cond, batch.uncond, self.fake_guidance_scale)
        return dm_loss(x, x0_real, x0_fake)

    def fake_loss(self, batch: Batch, x: torch.Tensor | None = None) -> torch.Tensor:
        """The fake score's denoising loss on the student's (detached) samples ``x``, drawn when not given."""
        if x is None:
            with torch.no_grad():
                x, _ = self.sample(batch, grad=False)
        t = score_times(self.student.process, batch, 0.0, 1.0, self.options.integer_times)
        return denoising_loss(self.fake, x, batch.cond, t, batch)


class DMD(DMDBase):
    """One-step DMD: distribution matching plus the regression loss on cached teacher ODE pairs."""

    name = "dmd"
    Options = DMDOptions

    @classmethod
    def cfg_options(cls, options):
        """CFG of the real score (and of the regression pairs' teacher ODE); with embedded guidance the
        teacher, the fake score and the student read the teacher's guidance instead."""
        return {"guidance_scale": options.guidance_scale}

    def __init__(self, ctx: Context, options: DMDOptions):
        if ctx.config.student.num_steps != 1:
            raise ValueError("method dmd: DMD trains one-step students; use dmd2 for few-step students")
        super().__init__(ctx, options)
        self.pairs = self._regression_pairs()

    def _regression_pairs(self):
        """(noise, teacher ODE sample, conditioning) pairs, generated once and cached in the run folder
        (identical on every rank: the same seeds) with the settings they were made under; a cache made
        under others is generated again."""
        folder = Path(self.ctx.config.train.output_dir) / REGRESSION_PAIRS
        cfg = self.ctx.config
        table = self.ctx.source.prompt_table
        prompts = None if table is None else getattr(table.prompts, "values", table.prompts)
        prompts = prompts if prompts is None or isinstance(prompts, list) else table.prompts.fingerprint  # Arrow-backed
        key = {"pairs": self.options.regression_pairs, "steps": self.options.regression_steps,
               "guidance_scale": self.options.guidance_scale, "teacher": to_dict(cfg.teacher), "seed": cfg.train.seed,
               "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]}
        # every rank makes the same pairs (the same seeds); the main process stores them (not the data stream's
        # rank 0: with context parallelism every process of the first group draws that stream)
        main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        return load_or_make(folder, key, self._make_pairs, save=lambda pairs, tmp: save_state(pairs, tmp, "pairs"),
                            load=self._load_pairs, what="DMD's regression pairs", write=main)

    def _load_pairs(self, folder: Path) -> dict:
        """The stored pairs, refused (so made again) unless they are what :meth:`_make_pairs` makes."""
        pairs = load_state(folder, "pairs")
        n, shape = self.options.regression_pairs, (self.options.regression_pairs, *self.ctx.teacher.sample_shape)
        if not isinstance(pairs, dict) or {"noise", "x", "cond"} - set(pairs) or \
                tuple(pairs["noise"].shape) != shape or tuple(pairs["x"].shape) != shape or \
                not (pairs["cond"] is None or all(len(v) == n for v in pairs["cond"].values() if torch.is_tensor(v))):
            raise ValueError("the stored pairs do not have the expected fields and shapes")
        return pairs

    def _make_pairs(self) -> dict:
        """(noise, the teacher's ODE sample from it, conditioning) for ``regression_pairs`` draws."""
        src, n = self.ctx.source, self.options.regression_pairs
        b = src.draw("regression_pairs", n)
        noise = b.randn(n, *self.ctx.teacher.sample_shape)
        gs = self.options.guidance_scale if b.uncond is not None else None
        x = torch.cat([ode_sample(self.ctx.teacher.denoiser, noise[i:i + 256], self.options.regression_steps,
                                  None if b.cond is None else b.cond[i:i + 256], guidance_scale=gs,
                                  uncond=None if b.uncond is None else b.uncond.expand_to(n)[i:i + 256])
                       for i in range(0, n, 256)])
        return {"noise": noise.cpu(), "x": x.cpu(), "cond": None if b.cond is None else b.cond.to("cpu").kwargs}

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        if update == "fake":
            return {"loss": self.fake_loss(batch)}
        x, _ = self.sample(batch, grad=True)
        loss_dm = self.distribution_matching(x, batch)
        # regression on the cached pairs (eq. 9)
        idx = batch.randint(0, len(self.pairs["noise"]))
        cond = None if self.pairs["cond"] is None else Cond(self.pairs["cond"])[idx].to(batch.device)
        t0 = self.student.times()[0]
        noise = self.pairs["noise"][idx].to(batch.device)
        pred = self.student.denoiser(noise, t0.expand(batch.size), cond)
        loss_reg = regression_distance(pred, self.pairs["x"][idx].to(batch.device))
        return {"loss": loss_dm + self.options.regression_weight * loss_reg, "dm": loss_dm.detach(),
                "regression": loss_reg.detach()}


def regression_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DMD's regression distance. The paper uses LPIPS on decoded images; LPIPS weights cannot be
    fetched offline, so this is the mean squared distance in the denoiser's space (latents)."""
    return mse(a, b)


class DMD2(GANMixin, DMDBase):
    """DMD2: DM loss, TTUR, optional GAN head, one- or few-step students (backward simulation)."""

    name = "dmd2"
    Options = DMD2Options

    @classmethod
    def cfg_options(cls, options):
        """CFG of the real and the fake score; with embedded guidance the teacher, the fake score (and its
        GAN features) and the student read the teacher's guidance instead."""
        return {"guidance_scale": options.guidance_scale, "fake_guidance_scale": options.fake_guidance_scale}

    def __init__(self, ctx: Context, options: DMD2Options):
        super().__init__(ctx, options)
        self.fake_guidance_scale = options.fake_guidance_scale
        self.setup_gan(ctx, options)

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        if update == "fake":
            with torch.no_grad():
                x, _ = self.sample(batch, grad=False)
            loss = self.fake_loss(batch, x)
            out = {"denoise": loss.detach()}
            if self.head is not None:
                loss_d = self.gan_disc_loss(x, batch)
                loss = loss + self.options.gan_disc_weight * loss_d
                out["gan_disc"] = loss_d.detach()
            out["loss"] = loss
            return out
        x, k = self.sample(batch, grad=True)
        loss = self.distribution_matching(x, batch)
        out = {"dm": loss.detach()}
        if self.head is not None:
            loss_g = self.gan_gen_loss(x, batch)
            loss = loss + self.options.gan_gen_weight * loss_g
            out["gan_gen"] = loss_g.detach()
        out["loss"] = loss
        return out
