"""Run a distiller on the exact Gaussian-mixture teacher in-process and measure its student (tests,
benchmarks)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from ..config import load_config
from ..diffusion.sampling import ode_sample
from ..models.oracle import energy_distance
from ..models.student import Student
from ..storage import claim_folder
from ..training import Trainer
from ..training.build import build_teacher
from .fixed_points import draw, objective_fixed_point

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "oracle"


def prefit_network(cfg, cache_root: Path) -> Path:
    """Fit (once per oracle config) the MLP network teacher and return its folder, to be copied
    into each run folder so tests share one fit."""
    key = "_".join(f"{k}-{v}" for k, v in sorted(vars(cfg.teacher.oracle).items())) + f"_seed-{cfg.train.seed}"
    folder = cache_root / key
    if not (folder / "oracle_network" / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_teacher(cfg, "cpu", folder, True, lambda: None)
    return folder / "oracle_network"


def run_oracle(config: str | Path, run_dir: Path, overrides=(), cache_root: Path | None = None):
    """Train ``config`` (a file under configs/oracle or a path) into ``run_dir``; returns
    (student, teacher, gmm, trainer)."""
    path = Path(config) if Path(config).is_file() else CONFIGS / config
    overrides = [f"train.output_dir={run_dir}", "train.report_to=none", "train.progress=false", *overrides]
    cfg = load_config(path, overrides)
    if cache_root is not None:
        src = prefit_network(cfg, cache_root)
        claim_folder(run_dir, "distill", option="train.output_dir")  # the run's own folder, its cache copied in
        if not (run_dir / "oracle_network").exists():
            shutil.copytree(src, run_dir / "oracle_network")
    trainer = Trainer(cfg)
    trainer.fit()
    student = Student.load_run(run_dir)
    return student, trainer.teacher, trainer.oracle, trainer


@torch.no_grad()
def trajectory_error(student: Student, teacher, n: int = 1000, ref_steps: int = 64, seed: int = 123) -> dict:
    """Per-sample mean squared deviation from the teacher's ``ref_steps`` DDIM output for the same
    noise, for the student and for plain DDIM with the student's number of steps."""
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    ref = ode_sample(teacher.denoiser, z, ref_steps)
    x = student.sample(z)
    base = ode_sample(teacher.denoiser, z, len(student.spec.timesteps))
    per = lambda a: float((a - ref).pow(2).flatten(1).sum(1).mean())  # noqa: E731
    return {"student": per(x), "ddim_baseline": per(base)}


@torch.no_grad()
def cfg_distance(student: Student, teacher, gmm, w: float, n: int = 1000, steps: int = 64, seed: int = 7,
                 repeats: int = 3) -> dict:
    """Energy distance between the student at guidance w and the teacher's many-step CFG samples
    (the marginal over uniformly drawn class labels), and its floor: the same distance between two
    independent teacher CFG sample sets of the same size."""
    g = torch.Generator().manual_seed(seed)

    def draw(den_sample):
        labels = torch.randint(0, gmm.num_components, (n,), generator=g)
        cond, uncond = teacher.encode(labels)
        z = torch.randn(n, *teacher.sample_shape, generator=g)
        return den_sample(z, cond, uncond)

    def teacher_samples():
        return draw(lambda z, c, u: ode_sample(teacher.denoiser, z, steps, c, guidance_scale=w, uncond=u))

    refs = [teacher_samples() for _ in range(repeats + 1)]
    floor = sum(energy_distance(refs[i], refs[i + 1]) for i in range(repeats)) / repeats
    x = draw(lambda z, c, u: student.sample(z, c, guidance=w))
    return {"energy": energy_distance(x, refs[0]), "floor": floor}


def _ring_rotation(gmm, k: int) -> torch.Tensor:
    """The rotation (in the first two coordinates) taking mode 0 of a ring mixture to mode k; it maps
    the whole mixture onto itself, so it maps class 0's CFG problem onto class k's."""
    a = 2 * math.pi * k / gmm.num_components
    rot = torch.eye(gmm.dim, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    moved = gmm.means @ rot.T
    if not (torch.allclose(moved, gmm.means.roll(-k, 0), atol=1e-6) and bool((gmm.stds == gmm.stds[0]).all())
            and bool((gmm.weights == gmm.weights[0]).all())):
        raise ValueError("the fixed-point reference needs a ring mixture (GaussianMixture.ring)")
    return rot.float()


@torch.no_grad()
def fixed_point_distance(student: Student, teacher, gmm, w: float, method: str, n: int = 1000, seed: int = 7,
                         **solver) -> dict:
    """Energy distance between the student at guidance w (labels drawn uniformly) and the distribution
    its objective converges to with the exact CFG teacher (``fixed_points.objective_fixed_point``,
    solved for class 0 and rotated onto each class). The floor is the distance between two
    independent solves (other seeds) drawn with the same labels: the reference's own noise.
    ``cfg_ode`` is the student's distance to the teacher's 64-step CFG samples, for comparison."""
    with torch.enable_grad():
        solves = [objective_fixed_point(gmm, teacher.process, 0, w, method=method, seed=seed + i, **solver)
                  for i in range(2)]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, gmm.num_components, (n,), generator=g)
    rots = torch.stack([_ring_rotation(gmm, k) for k in range(gmm.num_components)])[labels]  # (n, d, d)

    def reference(particles, h):
        return (rots @ draw(particles, h, n, g)[:, :, None]).squeeze(-1)

    refs = [reference(*s) for s in solves]
    cond, uncond = teacher.encode(labels)
    z = torch.randn(n, *teacher.sample_shape, generator=g)
    x = student.sample(z, cond, guidance=w)
    ode = ode_sample(teacher.denoiser, z, 64, cond, guidance_scale=w, uncond=uncond)
    return {"energy": energy_distance(x, refs[0]), "floor": energy_distance(refs[1], refs[0]),
            "cfg_ode": energy_distance(x, ode), "cfg_ode_to_fixed_point": energy_distance(ode, refs[0])}
