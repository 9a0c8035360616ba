"""The seeded family of Gaussian-mixture layouts (stepdistill/models/oracle_layouts.py): what it draws covers
the ranges it promises, each mode stays a mode, a seed is one layout, and a config with
``teacher.oracle.layout: random`` builds that layout's mixture and process."""

import math

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.models.oracle_layouts import PLACEMENTS, VP_SCHEDULES, random_layout, resolve_oracle
from stepdistill.training.build import build_teacher, validate_inputs

DRAWS = [random_layout(s) for s in range(300)]


def test_a_seed_is_one_layout():
    a, b, c = random_layout(7), random_layout(7), random_layout(8)
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and a.describe() == b.describe()
    assert a.describe() != c.describe()


def test_the_draws_cover_the_promised_ranges():
    dims, ks = [d.dim for d in DRAWS], [d.components for d in DRAWS]
    assert min(dims) == 2 and max(dims) == 32 and min(ks) == 3 and max(ks) == 16
    assert {d.placement for d in DRAWS} == set(PLACEMENTS)
    assert {d.beta_schedule for d in DRAWS if d.process == "vp"} == set(VP_SCHEDULES)
    shifts = [d.shift for d in DRAWS if d.process == "flow"]
    assert 0.3 < len(shifts) / len(DRAWS) < 0.7 and min(shifts) == 1.0 and max(shifts) == 8.0


def test_every_mode_stays_a_mode_with_unequal_weights_and_stds():
    for d in DRAWS:
        assert d.means.shape == (d.components, d.dim)
        closest = float(torch.cdist(d.means, d.means).add(torch.eye(d.components, dtype=torch.float64) * 1e9).min())
        assert float(d.stds.max()) <= closest / 6 + 1e-12, d.describe()
        assert math.isclose(float(d.weights.sum()), 1.0)
        assert math.isclose(float(d.weights.max() / d.weights.min()), 4.0) and math.isclose(float(d.stds.max() / d.stds.min()), 3.0)
    # the exact mixture puts its samples on their own modes: a layout the judges can score
    gmm = DRAWS[0].mixture()
    x, labels = gmm.sample(4000, torch.Generator().manual_seed(0))
    assert float((gmm.assign(x) == labels).double().mean()) > 0.99


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_a_config_on_a_random_layout_builds_its_mixture_and_process(tmp_path, process):
    seed = next(i for i, d in enumerate(DRAWS) if d.process == process and d.dim > 2)
    lay = DRAWS[seed]
    cfg = load_config("configs/oracle/dmd2_1step.yaml", [
        "teacher.oracle.layout=random", f"teacher.oracle.seed={seed}", "teacher.oracle.network_steps=5",
        f"train.output_dir={tmp_path / 'run'}"])
    validate_inputs(cfg)
    spec = resolve_oracle(cfg.teacher.oracle)
    assert (spec.dim, spec.components, spec.process) == (lay.dim, lay.components, lay.process)
    teacher, init, gmm = build_teacher(cfg, "cpu", tmp_path / "run", True, lambda: None)
    assert torch.equal(gmm.means, lay.means) and torch.allclose(gmm.weights, lay.weights)
    assert teacher.sample_shape == (lay.dim,) and init.process.kind == process
    if process == "flow":
        assert init.process.shift == lay.shift
