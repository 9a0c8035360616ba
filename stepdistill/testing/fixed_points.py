"""The distribution a score-distillation objective converges to, computed exactly on the
Gaussian-mixture teacher: the reference for students distilled with classifier-free guidance.

Without guidance the real score is the score of the data, and DMD, DMD2 and SiD are minimised by
the data distribution itself. With CFG the real score ``u + w (c - u)`` is, at each noise level, the
score of the tilted density ``p_t(x|c)^w p_t(x)^(1-w)``; these tilted densities are not the noisy
marginals of any one distribution, so no generator matches all of them. What the student learns is
then the compromise that the method's update balances, weighted over its time range (and by DMD's
per-sample normaliser): a different distribution from the teacher's many-step CFG samples.

This module finds that compromise directly. The student is replaced by free particles ``x_i``;
its samples are ``x_i + h xi`` (a kernel of width ``h``), so the fake score is known in closed form:
the exact posterior mean of that particle mixture, the score a perfectly trained fake network would
have. Each iteration noises the samples at the method's times and moves every particle along the
method's own generator gradient (DMD eq. 7-8; SiD's alpha-weighted loss with gradients through both
scores), averaged over ``reps`` draws. The particles settle where that gradient vanishes.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.process import NoiseProcess
from ..distillers.score import score_time_range
from ..models.oracle import GaussianMixture


def _bandwidth(x: torch.Tensor) -> float:
    """Kernel width: Scott's rule on the narrowest principal direction (the fixed points are strongly
    anisotropic, e.g. wide along the radius and narrow across it)."""
    n, d = x.shape
    cov = torch.cov(x.T.double())
    smallest = float(torch.linalg.eigvalsh(cov)[0].clamp(min=1e-8)) ** 0.5
    return smallest * n ** (-1.0 / (d + 4))


def objective_gradient(gmm: GaussianMixture, process: NoiseProcess, x: torch.Tensor, label: int, guidance: float, *,
                       method: str = "dmd", alpha: float = 1.2, t_min: float = 0.02, t_max: float = 0.98,
                       reps: int = 6, h: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The student gradient of ``method`` on each particle of ``x`` (rows), averaged over ``reps``
    draws of (kernel offset, time, noise), with the fake score the exact score of the particles'
    own kernel mixture (width ``h``; Scott's rule by default)."""
    if method not in ("dmd", "sid"):
        raise ValueError(f"method must be 'dmd' or 'sid', got {method!r}")
    n, d = x.shape
    h = _bandwidth(x) if h is None else h
    fake = GaussianMixture(x.detach(), h)
    m = n * reps
    t = process.sample_uniform(m, *score_time_range(process, t_min, t_max), generator=generator)
    a, s = process.alpha_sigma(t)
    xs = (x.detach().repeat(reps, 1) + h * torch.randn(m, d, generator=generator)).requires_grad_(method == "sid")
    x_t = a[:, None] * xs + s[:, None] * torch.randn(m, d, generator=generator)
    y_r = gmm.posterior_mean(x_t, a, s, torch.full((m,), label, dtype=torch.long))
    if guidance != 1.0:
        u = gmm.posterior_mean(x_t, a, s, torch.full((m,), gmm.num_components, dtype=torch.long))
        y_r = u + guidance * (y_r - u)
    y_f = fake.posterior_mean(x_t, a, s)
    if method == "dmd":  # DMD eq. 7-8: (p_real - p_fake) / mean|p_real|, p = x - x0_pred
        grad = (y_f - y_r) / (xs - y_r).abs().mean(1, keepdim=True).clamp(min=1e-8)
    else:  # SiD: gradient of the alpha-weighted loss, through both scores, detached normaliser
        norm = (xs - y_r).detach().abs().mean(1, keepdim=True).clamp(min=1e-5)
        diff = y_r - y_f
        grad, = torch.autograd.grad((diff * ((y_r - xs) - alpha * diff) / norm).sum(), xs)
    return grad.detach().reshape(reps, n, d).mean(0)


def objective_fixed_point(gmm: GaussianMixture, process: NoiseProcess, label: int, guidance: float, *,
                          method: str = "dmd", alpha: float = 1.2, t_min: float = 0.02, t_max: float = 0.98,
                          particles: int = 256, reps: int = 6, iters: int = 800, lr: float = 0.05,
                          seed: int = 0, init: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The distribution that ``method`` ('dmd': DMD / DMD2, 'sid': SiD and SiD-LSG with equal
    guidance in both scores) converges to for class ``label`` when the real score is the exact
    teacher with CFG scale ``guidance`` (diffusers form): ``(particles, h)``, the mixture of
    N(x_i, h^2 I) (draw with :func:`draw`). The particles start at ``init`` (rows) or else at
    samples of the class's true distribution."""
    g = torch.Generator().manual_seed(seed)
    if init is None:
        x = gmm.means[label].float() + gmm.stds[label].float() * torch.randn(particles, gmm.dim, generator=g)
    else:
        x = init.detach().float().clone()
    for it in range(iters):
        step = lr * (0.5 * (1 + math.cos(math.pi * it / iters)) + 1e-3)  # cosine decay quiets the noise
        x = x - step * objective_gradient(gmm, process, x, label, guidance, method=method, alpha=alpha,
                                          t_min=t_min, t_max=t_max, reps=reps, generator=g)
    return x, _bandwidth(x)


def draw(particles: torch.Tensor, h: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of the particle mixture returned by :func:`objective_fixed_point`."""
    idx = torch.randint(0, particles.shape[0], (n,), generator=generator)
    return particles[idx] + h * torch.randn(n, particles.shape[1], generator=generator)
