"""The project's real-data teacher and evaluator (sklearn 8x8 digits, shipped in stepdistill/assets):
the evaluator separates real digits from bad samples, and DMD2 turns the teacher's useless one-step
DDIM output into digits."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.diffusion.sampling import ode_sample
from stepdistill.evaluation.digits import DigitsEvaluator, load_classifier
from stepdistill.models.shipped import DIGITS8, load_digits8
from stepdistill.models.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    return DigitsEvaluator(load_classifier(), load_digits8("train")[0], cache_dir=tmp_path_factory.mktemp("fdcache"))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(str(DIGITS8 / "teacher"))


def _draw(teacher, n=1000, seed=5):
    labels = torch.arange(n) % 10
    cond, uncond = teacher.encode(labels)
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    return labels, cond, uncond, z


def test_splits_are_disjoint_and_fixed():
    xt, yt = load_digits8("train")
    xh, yh = load_digits8("heldout")
    assert xt.shape == (1500, 1, 8, 8) and xh.shape == (297, 1, 8, 8)
    assert xt.min() >= -1 and xt.max() <= 1
    rows = {tuple(r.tolist()) for r in xt.flatten(1)}
    assert sum(tuple(r.tolist()) in rows for r in xh.flatten(1)) < 5  # (sklearn has a few exact duplicates)
    assert torch.equal(load_digits8("heldout")[0], xh)


def test_evaluator_sanity(evaluator, teacher, tmp_path):
    xh, yh = load_digits8("heldout")
    assert evaluator.accuracy(xh, yh) >= 0.97
    fd_real = evaluator.fd(xh)
    fd_noise = evaluator.fd(torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    labels, cond, _, z = _draw(teacher)
    fd_ddim1 = evaluator.fd(ode_sample(teacher.denoiser, z, 1, cond))
    assert fd_real < 0.1 * fd_noise, (fd_real, fd_noise)
    assert fd_ddim1 > 5 * fd_real, (fd_ddim1, fd_real)  # measured 6.9x
    # reference statistics are cached once per (classifier, reference set) and reused
    assert (evaluator.cache / "statistics.safetensors").is_file()
    again = DigitsEvaluator(load_classifier(), load_digits8("train")[0], cache_dir=evaluator.cache.parent)
    assert again.fd(xh) == pytest.approx(fd_real, rel=1e-9)
    # and they are the torchmetrics running sums of the reference features
    assert int(again.metric.real_features_num_samples) == 1500


@pytest.mark.slow
def test_shipped_teacher_is_a_diffusers_pipeline_and_is_good(evaluator, teacher):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(DIGITS8 / "teacher")
    assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.config.num_class_embeds == 11
    labels, cond, uncond, z = _draw(teacher, n=300)
    x50 = ode_sample(teacher.denoiser, z, 50, cond, guidance_scale=2.0, uncond=uncond)
    fd_real = evaluator.fd(load_digits8("heldout")[0])
    assert evaluator.fd(x50) < 3 * fd_real
    assert evaluator.accuracy(x50, labels) > 0.95
    shipped = json.loads((DIGITS8 / "metrics.json").read_text())
    assert shipped["classifier_heldout_accuracy"] >= 0.97


@pytest.mark.slow  # DMD2 quality is asserted by default on the exact mixture (tests/distillers/test_score_oracle.py)
def test_dmd2_150_steps_beat_one_step_ddim(evaluator, teacher, tmp_path):
    from stepdistill.config import load_config
    from stepdistill.models.student import Student
    from stepdistill.training import Trainer

    cfg = load_config(ROOT / "configs" / "digits8" / "dmd2_1step.yaml",
                      [f"teacher.path={DIGITS8 / 'teacher'}", f"train.output_dir={tmp_path / 'run'}",
                       "train.report_to=none", "train.progress=false", "train.validate_every=1000",
                       "train.max_steps=150", "train.checkpoint_every=150"])
    Trainer(cfg).fit()
    student = Student.load(tmp_path / "run" / "student")
    labels, cond, uncond, z = _draw(teacher, seed=11)
    with torch.no_grad():
        x1 = student.sample(z, cond)
    x_ddim = ode_sample(teacher.denoiser, z, 1, cond)  # the teacher's own 1-step DDIM from t = 999
    fd_student, fd_ddim = evaluator.fd(x1), evaluator.fd(x_ddim)
    assert fd_student < 0.6 * fd_ddim, (fd_student, fd_ddim)
    assert evaluator.accuracy(x1, labels) > evaluator.accuracy(x_ddim, labels)


def test_ill_conditioned_epsilon_start_is_warned(teacher):
    from stepdistill.distillers.common import ill_conditioned_start

    proc = teacher.denoiser.process  # linear betas: alpha_bar(999) = 4e-5
    msg = ill_conditioned_start(proc, "epsilon", 999)
    assert msg is not None and "157-fold" in msg and "student.timesteps" in msg
    assert ill_conditioned_start(proc, "epsilon", 600) is None  # the digits8 DMD2 config's t_init
    assert ill_conditioned_start(proc, "v_prediction", 999) is None


def test_kid_spread_floors_a_feature_the_real_digits_never_use():
    from stepdistill.evaluation.digits import kid_spread

    real = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4, 5, 6, 7, 1e-4])
    spread = kid_spread(real)
    assert torch.allclose(spread[:7], real.std(0)[:7])  # the used features keep their spread
    median = float(real.std(0).median())
    assert float(spread[7]) == pytest.approx(0.1 * median)  # a sample active there is scaled by ~10, not ~10^4
