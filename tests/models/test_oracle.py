import pytest
import torch
from diffusers import DDIMScheduler

from stepdistill.diffusion.process import FlowProcess, process_from_scheduler_config
from stepdistill.diffusion.sampling import ode_sample
from stepdistill.models.oracle import GaussianMixture, energy_distance
from stepdistill.models.teachers import Teacher

PROCESSES = {
    "vp": lambda: process_from_scheduler_config(DDIMScheduler(beta_schedule="scaled_linear")),
    "flow": lambda: FlowProcess(shift=1.0),
}


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.ring(k=8, dim=2, radius=3.0, std=0.15)


@pytest.mark.parametrize("kind", PROCESSES)
def test_posterior_mean_is_tweedie(gmm, kind):
    """E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with p_t the noisy mixture, by autograd."""
    proc = PROCESSES[kind]()
    g = torch.Generator().manual_seed(0)
    x0, _ = gmm.sample(64, g)
    for t in ([100.0, 500.0, 900.0] if kind == "vp" else [0.1, 0.5, 0.9]):
        a, s = proc.alpha_sigma(torch.tensor(t))
        x_t = (a * x0 + s * torch.randn(x0.shape, generator=g)).double().requires_grad_(True)
        noisy = GaussianMixture(a.double() * gmm.means, (a.double() ** 2 * gmm.stds**2 + s.double() ** 2).sqrt(), gmm.weights)
        (score,) = torch.autograd.grad(noisy.log_prob(x_t).sum(), x_t)
        tweedie = (x_t + s.double() ** 2 * score) / a.double()
        post = gmm.posterior_mean(x_t.detach(), a.expand(64), s.expand(64))
        torch.testing.assert_close(post, tweedie.detach(), rtol=1e-6, atol=1e-6)


def test_conditional_posterior_uses_one_component(gmm):
    x_t = torch.zeros(3, 2)
    labels = torch.tensor([0, 3, 8])  # 8 == K: unconditional
    post = gmm.posterior_mean(x_t, torch.full((3,), 0.5), torch.full((3,), 0.8), labels)
    single0 = GaussianMixture(gmm.means[:1], gmm.stds[:1]).posterior_mean(x_t[:1], torch.tensor([0.5]), torch.tensor([0.8]))
    torch.testing.assert_close(post[:1], single0)
    assert torch.allclose(post[2], torch.zeros(2), atol=1e-6)  # symmetric ring: unconditional mean at the origin
    assert (post[1] @ gmm.means[3].float()) > 0


def test_metrics_can_tell_good_from_bad(gmm):
    g = torch.Generator().manual_seed(3)
    good, _ = gmm.sample(1000, g)
    collapsed, _ = gmm.sample(1000, g, labels=torch.zeros(1000, dtype=torch.long))
    ev_good, ev_bad = gmm.evaluate(good), gmm.evaluate(collapsed)
    assert ev_good["energy"] < 2 * ev_good["floor"]
    assert ev_bad["energy"] > 20 * ev_bad["floor"]
    assert ev_good["min_mode_mass"] > 0.08 and ev_bad["min_mode_mass"] == 0.0
    assert abs(sum(ev_good["mode_mass"]) - 1) < 1e-9
    # the mean log-density of exact samples is the negative entropy: about log(1/8) + 2 * (-0.5 log(2 pi e s^2))
    import math

    expected = math.log(1 / 8) - (1 + math.log(2 * math.pi * 0.15**2))
    assert abs(ev_good["log_prob"] - expected) < 0.1
    assert energy_distance(good, good) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("kind", PROCESSES)
def test_many_step_ode_within_floor_one_step_not(gmm, kind):
    teacher = Teacher.from_oracle(gmm, PROCESSES[kind]())
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    many = gmm.evaluate(ode_sample(teacher.denoiser, z, 128))
    one = gmm.evaluate(ode_sample(teacher.denoiser, z, 1))
    assert many["energy"] < 1.5 * many["floor"], many
    assert one["energy"] > 50 * one["floor"], one
    assert many["min_mode_mass"] > 0.08


@pytest.mark.parametrize("kind", PROCESSES)
def test_conditional_sampling_and_cfg(gmm, kind):
    teacher = Teacher.from_oracle(gmm, PROCESSES[kind]())
    labels = torch.arange(8).repeat_interleave(50)
    cond, uncond = teacher.encode(labels)
    z = torch.randn(400, 2, generator=torch.Generator().manual_seed(6))
    x = ode_sample(teacher.denoiser, z, 64, cond)
    assert (gmm.assign(x) == labels).float().mean() > 0.99
    # CFG pushes samples further along their class direction than the conditional ODE does
    xg = ode_sample(teacher.denoiser, z, 64, cond, guidance_scale=3.0, uncond=uncond)
    assert (gmm.assign(xg) == labels).float().mean() > 0.99
    assert xg.norm(dim=1).mean() > x.norm(dim=1).mean()
    with pytest.raises(ValueError, match="class labels must be in"):
        teacher.encode([9])
