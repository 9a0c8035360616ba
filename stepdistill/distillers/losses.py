"""Loss pieces several methods share, each written once (docs/METHODS.md gives the equations).

- :func:`mse`: per-sample mean squared error, optionally weighted per sample;
- :func:`gradient_matching_loss`: ``0.5 || x - sg(x - g) ||^2``, whose gradient with respect to x is
  ``g / numel``: how VSD, DMD and Phased DMD apply a score difference to the student's sample;
- :func:`per_sample_mean_abs`: DMD's normaliser, the mean absolute value over all but the batch
  dimension (DMD, Phased DMD, SiD), detached and clamped;
- :func:`guided_x0`: a denoiser's x0 with classifier-free guidance when a scale other than 1 and an
  unconditional branch are given;
- :func:`prompt_dropout`: rows replaced by the unconditional branch (a fake score that must learn its
  own unconditional prediction for CFG);
- :func:`guided_raw`, :func:`denoising_loss`: the teacher's own training loss on given samples (fake
  scores), optionally on its CFG-combined prediction;
- :func:`v_as_epsilon_weight`: the per-sample weight that makes a v-prediction's squared error the
  squared error of the epsilon it implies (SiD-LSG's snr / (snr + 1) on a VP schedule).
"""

from __future__ import annotations

import torch

from ..data.batch import Batch
from ..diffusion.denoiser import Cond, Denoiser


def mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Per-sample squared error, optionally weighted per sample, averaged over the batch. Per sample it
    is the mean over elements (``reduction="mean"``) or their sum (``"sum"``, as SiD's code reduces)."""
    sq = (a - b).pow(2).flatten(1)
    per = sq.sum(1) if reduction == "sum" else sq.mean(1)
    return (per * weight).mean() if weight is not None else per.mean()


def gradient_matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 mean (x - sg(x - g))^2``: a loss whose gradient with respect to ``x`` is ``g / x.numel()``
    (non-finite entries of g are zeroed first, as DMD's code does)."""
    grad = torch.nan_to_num(grad)
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


def per_sample_mean_abs(d: torch.Tensor, min_value: float) -> torch.Tensor:
    """mean |d| over every dimension but the batch, clamped below at ``min_value``, detached and
    shaped to broadcast against ``d``."""
    norm = d.detach().abs().flatten(1).mean(1).clamp(min=min_value)
    return norm.reshape(-1, *[1] * (d.ndim - 1))


def guided_x0(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, uncond: Cond | None,
              scale: float | None, guidance=None) -> torch.Tensor:
    """``den``'s x0 at (x_t, t): with CFG ``u + scale (c - u)`` (diffusers convention) when ``scale`` is
    neither None nor 1 and there is an unconditional branch, else the plain conditional prediction."""
    if scale is not None and scale != 1.0 and uncond is not None:
        return den(x_t, t, cond, guidance_scale=scale, uncond=uncond, guidance=guidance)
    return den(x_t, t, cond, guidance=guidance)


def prompt_dropout(batch: Batch, cond: Cond, p: float) -> Cond:
    """``cond`` with each row replaced by the batch's unconditional branch with probability ``p``
    (draws from the batch's stream only when there is something to drop)."""
    if batch.uncond is None or p <= 0:
        return cond
    drop = batch.rand(batch.size) < p
    return batch.uncond.expand_to(batch.size).where(drop, cond)


def guided_raw(den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, uncond: Cond | None,
               scale: float | None, guidance=None) -> torch.Tensor:
    """``den``'s raw prediction (its own parameterisation), with CFG ``u + scale (c - u)`` applied to
    it (one batched forward) when ``scale`` is neither None nor 1 and there is an unconditional branch.
    The parameterisations are affine in the prediction at a fixed (x_t, t), so this is the CFG of the
    x0 prediction expressed in the network's own output."""
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    if scale is None or scale == 1.0 or uncond is None:
        return den.raw(x_t, t, cond, guidance)
    b = x_t.shape[0]
    both = den.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat(uncond.expand_to(b), cond.expand_to(b)),
                   None if guidance is None else torch.cat([guidance, guidance]))
    u, c = both.chunk(2)
    return u + scale * (c - u)


def denoising_loss(den: Denoiser, x0: torch.Tensor, cond: Cond | None, t: torch.Tensor, batch: Batch,
                   guidance=None, *, uncond: Cond | None = None, guidance_scale: float | None = None,
                   weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """The teacher's own training loss (in its prediction parameterisation) on samples x0: the network's
    prediction at x_t = alpha_t x0 + sigma_t eps regresses the target of its parameterisation (eps, x0,
    v or flow). ``guidance_scale`` with ``uncond`` regresses the CFG-combined prediction instead (SiD-LSG's
    kappa_1); ``weight`` (B,) weights samples; ``reduction`` as in :func:`mse`."""
    proc = den.process
    eps = batch.randn(*x0.shape)
    x_t = proc.add_noise(x0, eps, t)
    target = proc.from_x0_eps(x0, eps, t, den.prediction_type)
    pred = guided_raw(den, x_t, t, cond, uncond, guidance_scale, guidance)
    return mse(pred, target, weight, reduction)


def v_as_epsilon_weight(process, t: torch.Tensor, prediction_type: str) -> torch.Tensor | None:
    """For a ``v_prediction`` network, the weight per sample that turns its v-MSE into the MSE of the epsilon
    it implies: at fixed (x_t, t), eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2), so the eps error is
    alpha / (alpha^2 + sigma^2) times the v error and the weight is alpha^2 / (alpha^2 + sigma^2)^2; on a
    VP schedule (alpha^2 + sigma^2 = 1) that is alpha^2 = snr / (snr + 1), the weight SiD-LSG's code puts on
    a v-prediction fake score's loss. None (unweighted) for every other parameterisation."""
    if prediction_type != "v_prediction":
        return None
    a, s = process.alpha_sigma(t)
    return a**2 / (a**2 + s**2) ** 2
