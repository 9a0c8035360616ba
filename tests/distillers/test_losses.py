"""The shared loss pieces against hand-computed values (fast: no training)."""

import pytest
import torch
from diffusers import DDIMScheduler

from stepdistill.data.batch import Batch
from stepdistill.diffusion.denoiser import Cond, Denoiser
from stepdistill.diffusion.process import process_from_scheduler_config
from stepdistill.distillers.dmd import dm_loss
from stepdistill.distillers.losses import (
    denoising_loss,
    gradient_matching_loss,
    guided_x0,
    mse,
    per_sample_mean_abs,
    prompt_dropout,
)
from stepdistill.distillers.progressive import two_step_target
from stepdistill.distillers.score import score_updates, student_rollout
from stepdistill.models.nets import MLPDenoiser
from stepdistill.models.student import Student, StudentSpec


@pytest.fixture(scope="module")
def proc():
    return process_from_scheduler_config(DDIMScheduler(beta_schedule="scaled_linear"))


@pytest.fixture(scope="module")
def den(proc):
    torch.manual_seed(0)
    return Denoiser(MLPDenoiser(dim=3, hidden=16, depth=1, num_classes=2), proc, "v_prediction").requires_grad_(False)


def _batch(n=4, seed=0, labels=(0, 1, 0, 1)):
    lab = torch.tensor(labels[:n])
    return Batch(n, torch.Generator().manual_seed(seed), torch.device("cpu"), Cond({"class_labels": lab}),
                 Cond({"class_labels": torch.full((1,), 2)}), lab)


def test_mse_per_sample_mean_then_batch_mean():
    a = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    b = torch.zeros(2, 2)
    assert float(mse(a, b)) == pytest.approx((5.0 + 0.0) / 2)
    assert float(mse(a, b, torch.tensor([2.0, 7.0]))) == pytest.approx((2 * 5.0 + 7 * 0.0) / 2)


def test_gradient_matching_loss_value_and_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    g[0, 1] = float("nan")
    loss = gradient_matching_loss(x, g)
    clean = torch.nan_to_num(g)
    assert float(loss.detach()) == pytest.approx(0.5 * float(clean.pow(2).mean()))
    loss.backward()
    assert torch.allclose(x.grad, clean / x.numel())  # the gradient is g / numel, NaN zeroed


def test_per_sample_mean_abs_is_detached_clamped_and_broadcastable():
    d = torch.tensor([[[1.0, -3.0]], [[0.0, 0.0]]], requires_grad=True)
    norm = per_sample_mean_abs(d, 1e-5)
    assert norm.shape == (2, 1, 1) and not norm.requires_grad
    assert norm.flatten().tolist() == pytest.approx([2.0, 1e-5])


def test_guided_x0_is_cfg_or_the_conditional_prediction(den):
    x, t = torch.randn(4, 3), torch.full((4,), 500.0)
    b = _batch()
    c = den(x, t, b.cond)
    u = den(x, t, b.uncond.expand_to(4))
    assert torch.allclose(guided_x0(den, x, t, b.cond, b.uncond, 3.0), u + 3.0 * (c - u), atol=1e-5)
    for scale, uncond in [(None, b.uncond), (1.0, b.uncond), (3.0, None)]:
        assert torch.equal(guided_x0(den, x, t, b.cond, uncond, scale), c)


def test_prompt_dropout_replaces_the_drawn_rows():
    b = _batch(labels=(0, 1, 1, 0))
    assert prompt_dropout(b, b.cond, 0.0) is b.cond
    out = prompt_dropout(_batch(seed=1, labels=(0, 1, 1, 0)), b.cond, 0.5)
    drop = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    expect = torch.where(drop, torch.full((4,), 2), torch.tensor([0, 1, 1, 0]))
    assert torch.equal(out.kwargs["class_labels"], expect) and 0 < int(drop.sum()) < 4
    assert (prompt_dropout(b, b.cond, 1.0).kwargs["class_labels"] == 2).all()


def test_denoising_loss_is_the_teachers_own_loss(den, proc):
    x0 = torch.randn(4, 3)
    t = torch.tensor([10.0, 200.0, 600.0, 990.0])
    b = _batch(seed=5)
    loss = denoising_loss(den, x0, b.cond, t, b)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    v = a[:, None] * eps - s[:, None] * x0  # the v-prediction target
    assert float(loss) == pytest.approx(float((den.raw(x_t, t, b.cond) - v).pow(2).mean()), rel=1e-5)


def test_dm_loss_gradient_is_the_normalised_score_difference():
    x = torch.randn(2, 3, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 3), torch.randn(2, 3)
    dm_loss(x, x0_real, x0_fake).backward()
    p_real, p_fake = x.detach() - x0_real, x.detach() - x0_fake
    expect = (p_real - p_fake) / p_real.abs().mean(1, keepdim=True) / x.numel()
    assert torch.allclose(x.grad, expect, atol=1e-7)


def test_two_step_target_lands_one_ddim_step_where_two_teacher_steps_land(den, proc):
    z = torch.randn(4, 3)
    t, mid, s = (torch.full((4,), v) for v in (999.0, 749.0, 499.0))
    teacher = lambda x, tt: den(x, tt, None)  # noqa: E731
    target = two_step_target(teacher, proc, z, t, mid, s)
    two = proc.ode_step(proc.ode_step(z, teacher(z, t), t, mid), teacher(proc.ode_step(z, teacher(z, t), t, mid), mid), mid, s)
    assert torch.allclose(proc.ode_step(z, target, t, s), two, atol=1e-5)
    assert not torch.allclose(target, teacher(z, t), atol=1e-3)  # not simply the teacher's own x0


def test_generator_rollout_backward_simulation(den, proc):
    times = [999.0, 749.0, 499.0, 249.0]
    student = Student(den, StudentSpec("dmd2", "renoise", times, None, proc.describe(), "v_prediction"))
    b = _batch(seed=11)
    x, k = student_rollout(student, b, (3,), grad=False)
    g = torch.Generator().manual_seed(11)  # the same stream, replayed by hand
    k_expect = int(torch.randint(0, 4, (1,), generator=g))
    xx = torch.randn(4, 3, generator=g)
    for j in range(k_expect):
        x0 = den(xx, torch.full((4,), times[j]), b.cond)
        xx = proc.add_noise(x0, torch.randn(4, 3, generator=g), torch.full((4,), times[j + 1]))
    assert k == k_expect and torch.equal(x, den(xx, torch.full((4,), times[k]), b.cond))
    one = Student(den, StudentSpec("dmd2", "renoise", [999.0], None, proc.describe(), "v_prediction"))
    x1, k1 = student_rollout(one, _batch(seed=2), (3,), grad=False)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    assert k1 == 0 and torch.equal(x1, den(noise, torch.full((4,), 999.0), _batch().cond))


def test_score_updates_two_time_scale_rule():
    assert [score_updates(i, 3) for i in range(4)] == [["student", "fake"], ["fake"], ["fake"], ["student", "fake"]]
    assert score_updates(5, 1) == ["student", "fake"]
