"""Deterministic ODE sampling with any Denoiser (the teacher's many-step reference, baselines)."""

from __future__ import annotations

from typing import Sequence

import torch

from .denoiser import Cond, Denoiser


@torch.no_grad()
def ode_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    steps: int | Sequence[float] | torch.Tensor,
    cond: Cond | None = None,
    *,
    guidance_scale: float | torch.Tensor | None = None,
    uncond: Cond | None = None,
    guidance: float | torch.Tensor | None = None,
):
    """DDIM (eta = 0) / Euler sampling from pure noise at the first time to the clean end.

    ``steps`` is a step count (the process's own grid, e.g. trailing 999, 749, ... for VP) or an
    explicit descending list of times (the clean end is appended when missing). It starts from the unit
    noise itself at the first time, as diffusers' DDIM / Euler pipelines do (init_noise_sigma = 1)."""
    process = denoiser.process
    if isinstance(steps, int):
        times = process.sampling_times(steps)
    else:
        times = torch.as_tensor(steps, dtype=torch.float32)
        if float(times[-1]) != process.t_clean:
            times = torch.cat([times, torch.tensor([process.t_clean])])
    x = noise
    for t, s in zip(times[:-1], times[1:]):
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale, uncond=uncond, guidance=guidance)
        x = process.ode_step(x, x0, t, s)
    return x
