"""A seeded family of Gaussian-mixture teachers (``teacher.oracle.layout: random``): the layouts the
shipped oracle recipes are checked on beyond the ring they were written on.

``random_layout(seed)`` draws, from ``seed`` alone:

- the dimension, 2 to 32, and the number of modes, 3 to 16;
- the placement: a ring or a grid in a random 2-D plane of the space, or modes scattered in all of it;
- unequal weights (the heaviest 4x the lightest) and unequal stds (0.5x to 1.5x a base std),
  every std kept at most 1/6 of the closest two modes' distance, so that each mode stays a mode;
- the noise process: VP with a linear, scaled-linear or cosine beta schedule, or flow matching with a
  timestep shift of 1 to 8 (SD3 uses 3, Wan 5 and more).

``eval/benchmark.py --suite oracle --layouts random:N`` runs every shipped oracle config on layouts
0..N-1; a layout never drawn before is one more seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .oracle import GaussianMixture

PLACEMENTS = ("ring", "grid", "scattered")
VP_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' names; the last is the cosine schedule


@dataclass(frozen=True)
class Layout:
    """One drawn layout: its mixture and its process."""

    seed: int
    dim: int
    components: int
    placement: str
    means: torch.Tensor  # (components, dim), float64
    stds: torch.Tensor  # (components,)
    weights: torch.Tensor  # (components,), summing to 1
    process: str  # "vp" or "flow"
    beta_schedule: str  # VP only
    shift: float  # flow only

    def mixture(self) -> GaussianMixture:
        return GaussianMixture(self.means, self.stds, self.weights)

    def describe(self) -> str:
        proc = f"VP {self.beta_schedule}" if self.process == "vp" else f"flow, shift {self.shift:g}"
        return (f"layout {self.seed}: {self.components} modes ({self.placement}) in {self.dim}-D, {proc}, "
                f"weights {float(self.weights.min()):.3f}-{float(self.weights.max()):.3f}, "
                f"stds {float(self.stds.min()):.2f}-{float(self.stds.max()):.2f}")


def _plane(dim: int, g: torch.Generator) -> torch.Tensor:
    """An orthonormal (dim, 2) basis of a random plane."""
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    return q


def _positions(placement: str, k: int, dim: int, radius: float, g: torch.Generator) -> torch.Tensor:
    if placement == "ring":
        phase = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi / k
        angles = phase + torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        return radius * torch.stack([angles.cos(), angles.sin()], 1) @ _plane(dim, g).T
    if placement == "grid":
        m = math.ceil(math.sqrt(k))
        spacing = 2 * radius / max(m - 1, 1)
        cells = torch.randperm(m * m, generator=g)[:k]  # k cells of the m x m grid
        xy = torch.stack([cells // m, cells % m], 1).double() * spacing - radius
        return xy @ _plane(dim, g).T
    dirs = torch.randn(k, dim, generator=g, dtype=torch.float64)
    scale = radius * (0.6 + 0.4 * torch.rand(k, 1, generator=g, dtype=torch.float64))
    return scale * dirs / dirs.norm(dim=1, keepdim=True)


def random_layout(seed: int) -> Layout:
    """The layout of ``seed`` (see the module's docstring); the same seed gives the same layout."""
    g = torch.Generator().manual_seed(int(seed))

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    dim = int(torch.randint(2, 33, (), generator=g))
    k = int(torch.randint(3, 17, (), generator=g))
    placement = pick(PLACEMENTS)
    means = _positions(placement, k, dim, uniform(2.0, 4.0), g)
    closest = float(torch.cdist(means, means).add(torch.eye(k, dtype=torch.float64) * 1e9).min())
    # 0.5x-1.5x a base std, and weights from 1 to 4 (normalised), spread evenly over the modes in a random order
    factors = torch.linspace(0.5, 1.5, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    base = min(uniform(0.1, 0.35), closest / 6 / float(factors.max()))
    weights = torch.linspace(1.0, 4.0, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    if float(torch.rand((), generator=g)) < 0.5:
        process, schedule, shift = "vp", pick(VP_SCHEDULES), 1.0
    else:
        process, schedule, shift = "flow", "scaled_linear", round(uniform(1.0, 8.0) * 2) / 2
    return Layout(int(seed), dim, k, placement, means, base * factors, weights / weights.sum(), process, schedule, shift)


def resolve_oracle(spec):
    """``teacher.oracle`` with a random layout's drawn keys in place (dimension, modes, process, schedule,
    shift): what the process, the networks and the fitted teacher are built from. Other layouts as given."""
    if spec.layout != "random":
        return spec
    lay = random_layout(spec.seed)
    return dataclasses.replace(spec, dim=lay.dim, components=lay.components, process=lay.process,
                               beta_schedule=lay.beta_schedule, shift=lay.shift)


def oracle_mixture(spec) -> GaussianMixture:
    """The mixture of ``teacher.oracle``: a random layout's, or the named placement's."""
    if spec.layout == "random":
        return random_layout(spec.seed).mixture()
    return getattr(GaussianMixture, spec.layout)(spec.components, spec.dim, spec.radius, spec.std)
