import itertools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from stepdistill.diffusion.process import FlowProcess, VPProcess, process_from_scheduler_config, truncated_snr_weight

SCHEDULERS = [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler]
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("cls,betas,pred", list(itertools.product(SCHEDULERS, BETAS, PREDS)))
def test_vp_alpha_sigma_match_diffusers(cls, betas, pred):
    sched = cls(beta_schedule=betas, prediction_type=pred)
    # from the saved-config form too (what a pipeline folder holds)
    for src in (sched, {**sched.config, "_class_name": cls.__name__}):
        proc = process_from_scheduler_config(src)
        assert isinstance(proc, VPProcess) and proc.prediction_type == pred
        t = torch.arange(1000)
        a, s = proc.alpha_sigma(t)
        acp = sched.alphas_cumprod.float()
        torch.testing.assert_close(a, acp.sqrt(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, (1 - acp).sqrt(), rtol=1e-5, atol=1e-6)
    if cls is EulerDiscreteScheduler:  # Karras sigma = sigma / alpha at the scheduler's (integer) timesteps
        sched = cls(beta_schedule=betas, prediction_type=pred, timestep_spacing="trailing")
        sched.set_timesteps(50)
        a, s = proc.alpha_sigma(sched.timesteps.float())
        torch.testing.assert_close(s / a, sched.sigmas[:-1].float(), rtol=1e-4, atol=1e-5)


def test_vp_clean_end_and_interpolation():
    proc = process_from_scheduler_config(DDIMScheduler())
    a, s = proc.alpha_sigma(torch.tensor([-1.0]))
    assert float(a) == 1.0 and float(s) == 0.0
    # a non-integer time lies between its neighbours, strictly
    a_lo, a_mid, a_hi = proc.alpha(torch.tensor([500.0, 500.5, 501.0]))
    assert a_lo > a_mid > a_hi
    with pytest.raises(ValueError, match="outside the process range"):
        proc.alpha(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="outside the process range"):
        FlowProcess().alpha(torch.tensor([1.5]))


def test_snr_log_snr_and_weight():
    for proc, t in ((process_from_scheduler_config(DDPMScheduler()), torch.tensor([10.0, 500.0, 990.0])),
                    (FlowProcess(), torch.tensor([0.1, 0.5, 0.9]))):
        a, s = proc.alpha_sigma(t)
        torch.testing.assert_close(proc.snr(t), a**2 / s**2)
        torch.testing.assert_close(proc.log_snr(t), torch.log(a**2 / s**2), rtol=1e-5, atol=1e-5)
        w = truncated_snr_weight(proc, t)
        assert torch.all(w >= 1) and w[0] == proc.snr(t)[0]


def test_flow_matches_flowmatch_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    proc = process_from_scheduler_config({**sched.config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert isinstance(proc, FlowProcess) and proc.shift == 3.0 and proc.prediction_type == "flow"
    sched.set_timesteps(8)
    sig = sched.sigmas[:-1]
    torch.testing.assert_close(proc.model_time(sig), sched.timesteps.float())
    torch.testing.assert_close(proc.sigma(sig), sig.float())
    torch.testing.assert_close(proc.alpha(sig), 1 - sig.float())
    # the shift used for sampling grids is diffusers' own shift
    torch.testing.assert_close(proc.grid(4), proc.shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25])))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        process_from_scheduler_config({**sched.config, "_class_name": "FlowMatchEulerDiscreteScheduler",
                                       "use_dynamic_shifting": True})


@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
def test_flow_matches_wan_unipc_scheduler(flow_shift):
    """Wan's scheduler (UniPC on flow sigmas): its flow_shift is the process's shift, its sigmas the
    process's sigma (alpha = 1 - sigma), its timesteps the network time sigma * 1000 truncated."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    proc = process_from_scheduler_config({**sched.config, "_class_name": "UniPCMultistepScheduler"})
    assert isinstance(proc, FlowProcess) and proc.shift == flow_shift and proc.prediction_type == "flow"
    assert proc.scheduler_config["_class_name"] == "UniPCMultistepScheduler" and proc.num_train_timesteps == 1000
    sched.set_timesteps(8)
    sig = sched.sigmas[:-1]
    assert torch.equal(proc.model_time(sig).long(), sched.timesteps)
    alpha, sigma = sched._sigma_to_alpha_sigma_t(sig)
    torch.testing.assert_close(proc.alpha_sigma(sig), (alpha.float(), sigma.float()))
    # the grid: the same shift of the same linear times, from t = 1 (UniPC starts at 1 - 1/1000)
    u = torch.linspace(1, 1 / 1000, 9, dtype=torch.float64)[:-1]
    torch.testing.assert_close(proc.shift_time(u)[1:].float(), sig[1:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="use_dynamic_shifting.*static 'flow_shift'"):
        process_from_scheduler_config({**sched.config, "_class_name": "UniPCMultistepScheduler",
                                       "use_dynamic_shifting": True})
    # the solver's own x0 readings on flow sigmas: epsilon is one, its v_prediction has no counterpart here
    eps = process_from_scheduler_config({**sched.config, "_class_name": "UniPCMultistepScheduler",
                                         "prediction_type": "epsilon"})
    assert eps.kind == "flow" and eps.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type 'v_prediction'.*supported: \\['epsilon', 'flow_prediction'"):
        process_from_scheduler_config({**sched.config, "_class_name": "UniPCMultistepScheduler",
                                       "prediction_type": "v_prediction"})
    vp = process_from_scheduler_config({**sched.config, "_class_name": "UniPCMultistepScheduler",
                                        "use_flow_sigmas": False, "prediction_type": "epsilon"})
    assert vp.kind == "vp"  # the same class on its VP schedule


@pytest.mark.parametrize("proc", [process_from_scheduler_config(DDIMScheduler(beta_schedule="scaled_linear")),
                                  FlowProcess(shift=3.0)], ids=["vp", "flow"])
def test_every_conversion_round_trips(proc):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([20.0, 200.0, 400.0, 600.0, 800.0, 980.0]) if proc.kind == "vp" else torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.98])
    x_t = proc.add_noise(x0, eps, t)
    types = ["epsilon", "sample", "v_prediction", "flow"]
    preds = {k: proc.from_x0_eps(x0, eps, t, k) for k in types}
    for src, dst in itertools.product(types, types):
        out = proc.convert(preds[src], x_t, t, src, dst)
        torch.testing.assert_close(out, preds[dst], rtol=1e-5, atol=1e-5, msg=f"{src}->{dst}")
        back = proc.convert(out, x_t, t, dst, src)
        torch.testing.assert_close(back, preds[src], rtol=1e-5, atol=1e-5, msg=f"{src}->{dst}->{src}")
    with pytest.raises(ValueError, match="unknown prediction type"):
        proc.convert(preds["epsilon"], x_t, t, "epsilon", "score")


def test_ddim_step_matches_diffusers_ddim():
    sched = DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", prediction_type="v_prediction",
                          clip_sample=False)
    sched.set_timesteps(4)
    proc = process_from_scheduler_config(sched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    times = proc.sampling_times(4)
    assert times[:-1].tolist() == sched.timesteps.float().tolist() == [999.0, 749.0, 499.0, 249.0]
    for t, s in zip(times[:-1], times[1:]):
        v = torch.randn(x.shape, generator=g)
        ref = sched.step(v, int(t), x, eta=0.0).prev_sample
        x0, _ = proc.to_x0_eps(v, x, t, "v_prediction")
        ours = proc.ode_step(x, x0, t, s)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        x = ref


def test_euler_step_matches_flowmatch_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    proc = process_from_scheduler_config(sched)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        u = torch.randn(x.shape, generator=g)
        ref = sched.step(u, t, x).prev_sample
        tt, ss = sched.sigmas[i], sched.sigmas[i + 1]
        x0, _ = proc.to_x0_eps(u, x, tt, "flow")
        torch.testing.assert_close(proc.ode_step(x, x0, tt, ss), ref, rtol=1e-4, atol=1e-5)
        x = ref


@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_vp_grid_is_diffusers_trailing_spacing(n):
    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(n)
    assert process_from_scheduler_config(sched).grid(n).tolist() == sched.timesteps.float().tolist()


def test_timestep_sampling_helpers():
    proc = process_from_scheduler_config(DDPMScheduler())
    g = torch.Generator().manual_seed(0)
    t = proc.sample_uniform(5000, 20, 980, generator=g)
    assert t.min() >= 20 and t.max() <= 980 and abs(float(t.mean()) - 500) < 15
    grid = [999.0, 749.0, 499.0, 249.0]
    t = proc.sample_grid(4000, grid, generator=g)
    assert set(t.tolist()) == set(grid)
    counts = torch.stack([(t == v).sum() for v in grid]).float()
    assert counts.min() > 900
    with pytest.raises(ValueError, match="outside the process range"):
        proc.sample_uniform(4, 0, 2000)


def test_a_solver_on_flow_sigmas_keeps_its_terminal_and_refuses_other_spacings():
    """UniPC on flow sigmas with ``shift_terminal``: the process grid is the scheduler's sigmas (it starts at
    1 - 1/1000 where the process starts at 1); Karras / exponential / beta spacings are not flow times."""
    from diffusers import UniPCMultistepScheduler

    for terminal in (0.1, 0.3):
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        shift_terminal=terminal)
        proc = process_from_scheduler_config(sched)
        sched.set_timesteps(4)
        assert proc.shift_terminal == terminal
        torch.testing.assert_close(proc.grid(4)[1:], sched.sigmas[1:4].float(), rtol=0, atol=5e-4)  # its 1 - 1/1000 start
        assert proc.grid(4)[-1].item() == pytest.approx(terminal)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        config = {**UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True).config,
                  "_class_name": "UniPCMultistepScheduler", key: True}
        with pytest.raises(ValueError, match=f"{key}=True: its sigmas are not the shifted linear flow times"):
            process_from_scheduler_config(config)
