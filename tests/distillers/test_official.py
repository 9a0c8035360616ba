"""Each method's update against what its authors' code computes, on fixed tensors.

The official losses are written out here by hand from the papers' public code (docs/METHODS.md names
the files): SiD-LSG's fake-score loss (epsilon space, CFG kappa_1, summed over elements) and
generator loss (summed), SwiftBrush's alpha_t^2-weighted LoRA loss, DMD2's GAN head layout and its
real branch (each real image with its own caption). Random draws are replayed from the batch's own
generator in the order the method makes them.
"""

import copy

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.data.batch import Batch, BatchSource
from stepdistill.diffusion.denoiser import Cond, Denoiser
from stepdistill.distillers.base import Context
from stepdistill.models.nets import MLPDenoiser
from stepdistill.models.oracle import GaussianMixture
from stepdistill.models.teachers import Teacher


def _context(method: str, *overrides, t_init: float = 600.0, prediction: str = "epsilon", betas: str = "scaled_linear"):
    """A conditional oracle teacher whose networks (teacher copy, student, fake score) are an
    epsilon-prediction MLP, as SD1.5's UNet is (or a v-prediction one, as SD2.1's)."""
    from diffusers import DDIMScheduler

    from stepdistill.diffusion.process import process_from_scheduler_config

    proc = process_from_scheduler_config(DDIMScheduler(beta_schedule=betas, prediction_type=prediction))
    gmm = GaussianMixture.ring(4, 3, 2.0, 0.3)
    teacher = Teacher.from_oracle(gmm, proc)
    torch.manual_seed(0)
    net = MLPDenoiser(dim=3, hidden=32, depth=2, num_classes=4).requires_grad_(False)
    teacher.denoiser = Denoiser(net, proc, prediction)  # the 'real score' of these tests
    cfg = load_config(None, [f"method={method}", "teacher.oracle.components=4", "teacher.oracle.dim=3",
                             "teacher.oracle.conditional=true", f"student.timesteps=[{t_init}]", *overrides])
    source = BatchSource(teacher, seed=0, device="cpu", oracle=gmm)
    return Context(teacher, teacher.denoiser, source, cfg, torch.device("cpu")), proc


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _eps(net, x_t, t, labels):
    return net(x_t, t, class_labels=labels)


def _replay(batch: Batch) -> torch.Generator:
    g = torch.Generator()
    g.set_state(batch.generator.get_state())
    return g


def _batch(source, seed=3, n=6):
    return source.batch(step=seed, rank=0, size=n)


# ------------------------------------------------------------------------------------------------
# SiD-LSG (mingyuanzhou/SiD-LSG, training/sid_training_loop.py)
# ------------------------------------------------------------------------------------------------
def _sid(*overrides, prediction="epsilon"):
    from stepdistill.distillers.sid import SiD

    ctx, proc = _context("sid", "method_args.guidance_mode=lsg", "method_args.guidance_scale=2.5", *overrides,
                         prediction=prediction)
    from stepdistill.config import from_dict

    sid = SiD(ctx, from_dict(SiD.Options, ctx.config.method_args, "method_args"))
    _perturb(sid.student.model, 1)
    _perturb(sid.fake.model, 2)
    return sid, ctx, proc


def test_sid_fake_loss_is_the_official_guided_epsilon_regression_summed_over_elements():
    sid, ctx, proc = _sid()
    batch = _batch(ctx.source)
    g = _replay(batch)
    loss = sid.loss(batch, 0, "fake")["loss"]
    # the same draws, in the method's order: prompt dropout, the student's noise, t, the loss's eps
    labels = batch.labels.clone()
    drop = torch.rand(6, generator=g) < 0.1
    labels = torch.where(drop, torch.full_like(labels, 4), labels)  # 4 = the null label: the empty prompt
    z = torch.randn(6, 3, generator=g)
    t0 = torch.full((6,), 600.0)
    a0, s0 = proc.alpha_sigma(t0)
    with torch.no_grad():
        x_g = (z - s0[:, None] * _eps(sid.student.model, z, t0, labels)) / a0[:, None]
    t = torch.randint(20, 981, (6,), generator=g).float()  # randint(int(0.02 T), int(0.98 T) + 1)
    eps = torch.randn(6, 3, generator=g)
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x_g + s[:, None] * eps
    e_c = _eps(sid.fake.model, x_t, t, labels)
    e_u = _eps(sid.fake.model, x_t, t, torch.full_like(labels, 4))
    official = ((e_u + 2.5 * (e_c - e_u) - eps) ** 2).sum() / 6  # (1 / B) sum over every element
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-6)


def test_sid_fake_loss_on_a_v_prediction_teacher_is_the_official_snr_weighted_v_regression():
    """SiD-LSG's code on a v-prediction network: (v_fake^cfg - v)^2 * snr / (snr + 1), summed; that is the
    epsilon-space loss (the eps the guided v implies against the noise)."""
    sid, ctx, proc = _sid(prediction="v_prediction")
    assert sid.fake.prediction_type == "v_prediction"
    batch = _batch(ctx.source)
    g = _replay(batch)
    loss = sid.loss(batch, 0, "fake")["loss"]
    labels = batch.labels.clone()
    drop = torch.rand(6, generator=g) < 0.1
    labels = torch.where(drop, torch.full_like(labels, 4), labels)
    z = torch.randn(6, 3, generator=g)
    a0, s0 = proc.alpha_sigma(torch.full((6,), 600.0))
    with torch.no_grad():
        x_g = a0[:, None] * z - s0[:, None] * _eps(sid.student.model, z, torch.full((6,), 600.0), labels)  # v -> x0
    t = torch.randint(20, 981, (6,), generator=g).float()  # randint(int(0.02 T), int(0.98 T) + 1)
    eps = torch.randn(6, 3, generator=g)
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x_g + s[:, None] * eps
    v_c, v_u = _eps(sid.fake.model, x_t, t, labels), _eps(sid.fake.model, x_t, t, torch.full_like(labels, 4))
    v_fake = v_u + 2.5 * (v_c - v_u)
    target = a[:, None] * eps - s[:, None] * x_g  # get_velocity
    snr = a**2 / s**2  # compute_snr: alphas_cumprod / (1 - alphas_cumprod)
    official = ((v_fake - target) ** 2 * (snr / (snr + 1))[:, None]).sum() / 6
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-6)
    eps_fake = s[:, None] * x_t + a[:, None] * v_fake  # the same loss in epsilon space
    torch.testing.assert_close(loss, ((eps_fake - eps) ** 2).sum() / 6, rtol=1e-4, atol=1e-6)
    unweighted = ((v_fake - target) ** 2).sum() / 6
    assert not torch.allclose(unweighted, official, rtol=1e-2)  # the weight matters on these tensors


def test_sid_generator_loss_is_the_official_score_identity_loss_summed_over_elements():
    sid, ctx, proc = _sid("method_args.alpha=1.2")
    batch = _batch(ctx.source, seed=4)
    g = _replay(batch)
    loss = sid.loss(batch, 0, "student")["loss"]
    labels, null = batch.labels, torch.full_like(batch.labels, 4)
    z = torch.randn(6, 3, generator=g)
    t0 = torch.full((6,), 600.0)
    a0, s0 = proc.alpha_sigma(t0)
    x_g = (z - s0[:, None] * _eps(sid.student.model, z, t0, labels)) / a0[:, None]
    t = torch.randint(20, 981, (6,), generator=g).float()  # randint(int(0.02 T), int(0.98 T) + 1)
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x_g + s[:, None] * torch.randn(6, 3, generator=g)

    def guided_x0(net, kappa):
        e_c, e_u = _eps(net, x_t, t, labels), _eps(net, x_t, t, null)
        return (x_t - s[:, None] * (e_u + kappa * (e_c - e_u))) / a[:, None]

    y_real, y_fake = guided_x0(ctx.teacher.denoiser.model, 2.5), guided_x0(sid.fake.model, 2.5)
    w = (x_g - y_real).abs().mean(1, keepdim=True).detach().clamp(min=1e-5)
    official = ((y_real - y_fake) * ((y_real - x_g) - 1.2 * (y_real - y_fake)) / w).sum() / 6
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-6)


def test_sid_drops_prompts_when_only_the_fake_guidance_differs_and_the_generator_sees_the_drop():
    sid, ctx, _ = _sid("method_args.fake_train_guidance=1.0", "method_args.prompt_dropout=0.5")
    assert sid.train_s == 1.0 and sid.fake_s == 2.5  # kappa_1 = 1, kappa_2 != 1: the official code drops
    batch = _batch(ctx.source, seed=9)
    drop = torch.rand(6, generator=_replay(batch)) < 0.5
    assert 0 < int(drop.sum()) < 6
    seen = []
    real_rollout = sid.sample
    sid.sample = lambda b, grad, cond=None: (seen.append(cond), real_rollout(b, grad, cond))[1]
    sid.loss(batch, 0, "fake")
    expect = torch.where(drop, torch.full_like(batch.labels, 4), batch.labels)
    assert torch.equal(seen[0].kwargs["class_labels"], expect)  # the generator drew from the dropped prompts


# ------------------------------------------------------------------------------------------------
# SwiftBrush (VinAIResearch/SwiftBrush, train_swiftbrush.py)
# ------------------------------------------------------------------------------------------------
def test_vsd_fake_loss_weights_by_alphas_cumprod_as_swiftbrush():
    from stepdistill.config import from_dict
    from stepdistill.distillers.vsd import VSD

    ctx, proc = _context("vsd", "method_args.fake_lora_rank=0", "method_args.prompt_dropout=0.0")
    vsd = VSD(ctx, from_dict(VSD.Options, ctx.config.method_args, "method_args"))
    _perturb(vsd.student.model, 1)
    _perturb(vsd.fake.model, 2)
    batch = _batch(ctx.source, seed=5)
    g = _replay(batch)
    loss = vsd.loss(batch, 0, "fake")["loss"]
    z = torch.randn(6, 3, generator=g)
    t0 = torch.full((6,), 600.0)
    a0, s0 = proc.alpha_sigma(t0)
    with torch.no_grad():
        x = (z - s0[:, None] * _eps(vsd.student.model, z, t0, batch.labels)) / a0[:, None]
    t = torch.randint(0, 1000, (6,), generator=g).float()  # randint(0, T)
    eps = torch.randn(6, 3, generator=g)
    a, s = proc.alpha_sigma(t)
    e = _eps(vsd.fake.model, a[:, None] * x + s[:, None] * eps, t, batch.labels)
    acp = a[:, None] ** 2
    official = torch.nn.functional.mse_loss(acp.sqrt() * e, acp.sqrt() * eps)  # both scaled by sqrt(alphas_cumprod)
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-7)


def test_vsd_lora_is_swiftbrushs():
    from stepdistill.distillers.vsd import VSDOptions

    opt = VSDOptions()
    assert (opt.fake_lora_rank, opt.fake_lora_alpha, opt.fake_lora_targets) == (64, 108.0, ["to_q", "to_v"])
    assert (opt.lr, opt.fake_lr, opt.guidance_scale, opt.fake_guidance_scale) == (1e-6, 1e-3, 4.5, 4.5)


# ------------------------------------------------------------------------------------------------
# DMD2 (tianweiy/DMD2, main/sd_guidance.py)
# ------------------------------------------------------------------------------------------------
def test_dmd2_gan_head_has_the_official_layout_at_the_native_bottlenecks():
    from torch import nn

    from stepdistill.distillers.gan import GANHead

    def layout(head):
        return [(m.kernel_size[0], m.stride[0], m.padding[0], m.out_channels) for m in head.net if isinstance(m, nn.Conv2d)]

    # SD1.5: 64x64 latents give an 8x8 mid block of 1280 channels; SDXL: 128x128 latents give 32x32
    assert layout(GANHead((1280, 8, 8))) == [(4, 2, 1, 1280), (4, 4, 0, 1280), (1, 1, 0, 1)]
    assert layout(GANHead((1280, 32, 32))) == [(4, 2, 1, 1280)] * 3 + [(4, 4, 0, 1280), (1, 1, 0, 1)]
    assert all(m.num_groups == 32 for m in GANHead((1280, 8, 8)).net if isinstance(m, nn.GroupNorm))
    assert GANHead((1280, 8, 8))(torch.randn(2, 1280, 8, 8)).shape == (2,)  # one logit per sample


def test_dmd2_gan_real_branch_sees_each_real_image_with_its_own_caption(tmp_path, tiny_pipelines, record_gan_logits):
    """The classifier's real rows are conditioned on their own captions (not on the batch's other
    prompts), and the classifier times are drawn over the whole range."""
    from PIL import Image

    from stepdistill.training import Trainer

    images = tmp_path / "images"
    images.mkdir()
    captions = ["a red cube", "two cats", "a dog on grass", "a blue car", "an old tree", "a small boat"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 20)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    cfg = load_config("configs/tiny-sd/dmd2_4step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path}/run", "train.report_to=none",
        "train.progress=false", "method_args.gan=true", f"data.images={images}", "data.prompts=[a yellow sun]"])
    trainer = Trainer(cfg)
    with record_gan_logits() as calls:
        batch = trainer.source.batch(0, 0, 4)
        trainer.distiller.loss(batch, 0, "fake")
    (x_fake, cond_fake), (x_real, cond_real) = calls
    table = trainer.source.x0_data
    for row in range(4):
        item = int(((table - x_real[row]).flatten(1).abs().amax(1) == 0).nonzero()[0])
        own = trainer.teacher.encode([captions[item]])[0].kwargs["encoder_hidden_states"][0]
        torch.testing.assert_close(cond_real.kwargs["encoder_hidden_states"][row], own)
    prompt = trainer.teacher.encode(["a yellow sun"])[0].kwargs["encoder_hidden_states"][0]
    assert all(torch.allclose(c, prompt) for c in cond_fake.kwargs["encoder_hidden_states"])  # fakes: their prompts
    assert not torch.allclose(cond_real.kwargs["encoder_hidden_states"][0], prompt)


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd"])
def test_integer_times_are_the_official_scripts_randint(method):
    """method_args.integer_times: the DM loss's times are sd_guidance.py's
    randint(int(0.02 T), int(0.98 T) + 1) = integers in [20, 980] (drawn from the batch's stream), and the
    fake score's randint(0, T); the default (null) does so on this VP teacher; false draws continuous times
    in the same range."""
    from stepdistill.config import from_dict
    from stepdistill.distillers.registry import get_method

    cls = get_method(method)
    seen = {}
    for integer in ("true", "false", "null"):
        ctx, proc = _context(method, f"method_args.integer_times={integer}", "method_args.fake_lora_rank=0")
        distiller = cls(ctx, from_dict(cls.Options, ctx.config.method_args, "method_args"))
        calls = []
        add_noise = proc.add_noise
        proc.add_noise = lambda x, eps, t: (calls.append(t.clone()), add_noise(x, eps, t))[1]
        for step in range(30):
            for update in ("student", "fake"):
                distiller.loss(ctx.source.batch(step, 0, 16), step, update)
        seen[integer] = torch.cat(calls)
    t = seen["true"]
    assert torch.equal(t, t.round()) and float(t.min()) >= 0 and float(t.max()) <= 999
    assert len(t.unique()) > 50  # spread over the range, not a few values
    assert torch.equal(seen["null"], t)  # the default on a VP teacher: the same integer draws
    assert not torch.equal(seen["false"], seen["false"].round())  # false: continuous
    ctx, proc = _context("dmd2", "method_args.integer_times=true")
    dmd2 = get_method("dmd2")(ctx, from_dict(get_method("dmd2").Options, ctx.config.method_args, "method_args"))
    batch = ctx.source.batch(5, 0, 64)
    g = _replay(batch)
    from stepdistill.distillers.score import score_times

    got = score_times(proc, batch, 0.02, 0.98, integer=True)
    torch.testing.assert_close(got, torch.randint(20, 981, (64,), generator=g).float())
    assert dmd2.options.integer_times


def test_integer_times_are_refused_on_a_flow_teacher_and_in_phased_dmd(tmp_path):
    from stepdistill.config import from_dict
    from stepdistill.distillers.phased_dmd import PhasedDMD
    from stepdistill.training import Trainer

    with pytest.raises(ValueError, match="method_args.integer_times: Phased DMD"):
        from_dict(PhasedDMD.Options, {"integer_times": True}, "method_args")
    cfg = load_config("configs/oracle/dmd2_1step.yaml", [
        f"train.output_dir={tmp_path}/run", "train.report_to=none", "train.progress=false", "teacher.oracle.process=flow",
        "teacher.oracle.network_steps=2", "method_args.integer_times=true"])
    with pytest.raises(Exception, match="integer timesteps are of a VP teacher"):
        Trainer(cfg)
    from stepdistill.diffusion.process import FlowProcess
    from stepdistill.distillers.score import score_times

    ctx, _ = _context("dmd2")
    t = score_times(FlowProcess(shift=3.0), ctx.source.batch(0, 0, 64), 0.02, 0.98, None)  # the default on flow
    assert float(t.min()) >= 0.02 and float(t.max()) <= 0.98 and len(t.unique()) == 64


def test_dmd2_gan_classifier_times_cover_the_whole_range():
    from stepdistill.config import from_dict
    from stepdistill.distillers.dmd import DMD2

    ctx, proc = _context("dmd2", "method_args.gan=true", "method_args.t_min=0.4", "method_args.t_max=0.6")
    dmd2 = DMD2(ctx, from_dict(DMD2.Options, ctx.config.method_args, "method_args"))
    seen = []
    features = dmd2._fake_features
    dmd2._fake_features = lambda x_t, t, cond: (seen.append(t), features(x_t, t, cond))[1]
    for step in range(20):
        dmd2.loss(ctx.source.batch(step, 0, 32), step, "fake")
    t = torch.cat(seen)
    assert float(t.min()) < 0.1 * proc.t_max and float(t.max()) > 0.9 * proc.t_max  # not the DM loss's [0.4, 0.6]


# ------------------------------------------------------------------------------------------------
# BOOT (Gu et al. 2023; no public code: the paper's signal ODE x_t = alpha_t y_t + sigma_t eps)
# ------------------------------------------------------------------------------------------------
def test_boot_boundary_reads_the_teacher_at_the_x_T_the_bootstrapping_steps_from():
    """The boundary's target is the teacher's x0 at x_T = alpha_T sg(y(eps, T)) + sigma_T eps, the point the
    first bootstrapping step (t = T) rebuilds from the same y(eps, T): one x_T, not sigma_T eps in one place."""
    from stepdistill.config import from_dict
    from stepdistill.distillers.boot import Boot

    ctx, proc = _context("boot", "method_args.grid_steps=2")
    boot = Boot(ctx, from_dict(Boot.Options, ctx.config.method_args, "method_args"))
    _perturb(boot.student.model, 1)
    calls = []
    teacher_x0 = boot.x0
    boot.x0 = lambda x_t, t, batch: (calls.append((x_t.clone(), t.expand(x_t.shape[0]).clone())), teacher_x0(x_t, t, batch))[1]
    batch = _batch(ctx.source, seed=8)
    g = _replay(batch)
    out = boot.loss(batch, 0, "student")
    eps = torch.randn(6, 3, generator=g)
    first = torch.randint(0, 2, (6,), generator=g) == 0  # rows whose bootstrapping step starts at T
    t_max = torch.full((6,), proc.t_max)
    a, s = proc.alpha_sigma(t_max)
    with torch.no_grad():
        y_T = (eps - s[:, None] * _eps(boot.student.model, eps, t_max, batch.labels)) / a[:, None]  # read as x0 at T
        x_T = a[:, None] * y_T + s[:, None] * eps
        f_T = (x_T - s[:, None] * _eps(ctx.teacher.denoiser.model, x_T, t_max, batch.labels)) / a[:, None]
    torch.testing.assert_close(out["boundary"], torch.nn.functional.mse_loss(y_T, f_T), rtol=1e-5, atol=1e-7)
    (x_bc, t_bc), (x_bs, t_bs) = calls
    assert 0 < int(first.sum()) < 6 and torch.equal(t_bs == proc.t_max, first)
    torch.testing.assert_close(x_bc, x_T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_bs[first], x_bc[first], rtol=1e-5, atol=1e-6)  # the same x_T in both terms
    assert (x_T - s[:, None] * eps).abs().min() > 1e-3  # alpha_T y_T is not negligible here (SD: alpha_T = 0.068)


# ------------------------------------------------------------------------------------------------
# defaults and recipes
# ------------------------------------------------------------------------------------------------
def test_fake_score_learning_rate_defaults_to_the_students():
    from stepdistill.distillers.dmd import DMD2Options
    from stepdistill.distillers.sid import SiDOptions

    for options in (DMD2Options(lr=3e-6), SiDOptions(lr=3e-6)):
        assert options.fake_lr is None  # resolved to lr: DMD2 and SiD train both networks at one rate
    ctx, _ = _context("dmd2", "method_args.lr=3e-6")
    from stepdistill.config import from_dict
    from stepdistill.distillers.dmd import DMD2

    dmd2 = DMD2(ctx, from_dict(DMD2.Options, ctx.config.method_args, "method_args"))
    assert {n: t.lr for n, t in dmd2.trainables().items()} == {"student": 3e-6, "fake": 3e-6}


def test_phased_dmd_fake_score_learning_rate_is_lightx2vs_fifth_of_the_students():
    """LightX2V's Phased DMD configs (wan2_1_t2v_1_3b_phased_dmd.yaml): student 2e-6, fake score 4e-7."""
    from stepdistill.config import from_dict
    from stepdistill.distillers.phased_dmd import PhasedDMD

    def rates(*overrides):
        ctx, _ = _context("phased_dmd", "method_args.lr=2e-6", *overrides)
        return {n: t.lr for n, t in PhasedDMD(ctx, from_dict(PhasedDMD.Options, ctx.config.method_args,
                                                             "method_args")).trainables().items()}

    assert rates() == pytest.approx({"expert0": 2e-6, "fake": 4e-7}, rel=1e-9)
    assert rates("method_args.fake_lr=1e-3") == pytest.approx({"expert0": 2e-6, "fake": 1e-3}, rel=1e-9)
    assert rates("method_args.fake_lr_ratio=1.0") == pytest.approx({"expert0": 2e-6, "fake": 2e-6}, rel=1e-9)


@pytest.mark.slow
def test_progressive_learning_rate_anneals_linearly_within_each_round(tmp_path):
    from stepdistill.training import Trainer

    cfg = load_config("configs/oracle/progressive_1step.yaml", [
        f"train.output_dir={tmp_path}/run", "train.report_to=none", "train.progress=false", "train.max_steps=8",
        "train.checkpoint_every=8", "train.validate_every=8", "teacher.oracle.network_steps=20",
        "method_args.start_steps=2", "method_args.lr=1e-3", "train.lr_schedule=constant"])  # 2 rounds of 4
    trainer = Trainer(cfg)
    seen = []
    update = trainer._update

    def spy(name, iteration, micro):
        seen.append(trainer.states["student"].optimizer.param_groups[0]["lr"])
        return update(name, iteration, micro)

    trainer._update = spy
    trainer.fit()
    assert seen == pytest.approx([1e-3 * f for f in (1, 0.75, 0.5, 0.25, 1, 0.75, 0.5, 0.25)])


@pytest.mark.parametrize("steps,teacher_head,betas,expect", [
    (4, "epsilon", "linear", "v_prediction"), (1, "epsilon", "squaredcos_cap_v2", "v_prediction"),
    (8, "epsilon", "linear", "epsilon"), (1, "epsilon", "scaled_linear", "epsilon"), (2, "v_prediction", "linear", "v_prediction")])
def test_progressive_default_head_is_v_where_epsilon_is_ill_conditioned(steps, teacher_head, betas, expect):
    """Salimans & Ho sec. 4: an epsilon student fails at 4 steps or fewer, where x0 = (z - sigma eps) / alpha
    amplifies its error by sigma / alpha (158 at t = 999 for linear betas, 2e4 for cosine); the official code
    reads its network in a safe parameterisation. The default reads an epsilon teacher's network as v there,
    x0 = alpha z - sigma v (the paper's v), and keeps epsilon above 4 steps and for SD's scaled-linear betas
    (14.6), where relearning the head measured worse on the MNIST teacher."""
    from stepdistill.config import from_dict
    from stepdistill.distillers.progressive import Progressive

    ctx, proc = _context("progressive", "student.timesteps=null", f"student.num_steps={steps}",
                         "method_args.start_steps=8", "method_args.x_source=data", prediction=teacher_head, betas=betas)
    prog = Progressive(ctx, from_dict(Progressive.Options, ctx.config.method_args, "method_args"))
    student = prog.student.denoiser
    assert student.prediction_type == prog.student.spec.prediction_type == expect
    g = torch.Generator().manual_seed(3)
    z, t, labels = torch.randn(5, 3, generator=g), torch.full((5,), 999.0), torch.tensor([0, 1, 2, 3, 0])
    out = student.model(z, t, class_labels=labels)
    alpha, sigma = (v[:, None] for v in proc.alpha_sigma(t))
    official = alpha * z - sigma * out if expect == "v_prediction" else (z - sigma * out) / alpha
    torch.testing.assert_close(student(z, t, Cond({"class_labels": labels})), official, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", [pytest.param("v_prediction", marks=pytest.mark.slow), "sample"])
def test_progressive_student_head_round_trips_through_export(tmp_path, tiny_pipelines, head):
    from diffusers import DiffusionPipeline

    from stepdistill.export import export, sampling_kwargs
    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher
    from stepdistill.training import Trainer

    cfg = load_config("configs/tiny-sd/progressive_2step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path}/run", "train.report_to=none",
        "train.progress=false", "train.max_steps=2", f"method_args.student_prediction={head}"])
    Trainer(cfg).fit()
    student = Student.load(tmp_path / "run" / "student")
    assert student.spec.prediction_type == head == student.denoiser.prediction_type
    out = export(tmp_path / "run", tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == head
    teacher = load_teacher(tiny_pipelines["sd"])
    prompts = ["a red cube", "two cats"]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    got = pipe(prompt=prompts, output_type="latent", height=size, width=size, generator=torch.Generator().manual_seed(7),
               **sampling_kwargs(out)).images
    noise = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    ref = student.sample(noise, teacher.encode(prompts)[0])
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)
    as_eps = copy.copy(student.denoiser)
    as_eps.prediction_type = "epsilon"  # the same network read as the teacher's head samples differently
    assert not torch.allclose(Student(as_eps, student.spec).sample(noise, teacher.encode(prompts)[0]), ref, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# LCM (huggingface/diffusers examples/consistency_distillation/train_lcm_distill_sd_wds.py, by the LCM
# team and Hugging Face: DDIMSolver, scalings_for_boundary_conditions, the loop's steps 2-10)
# ------------------------------------------------------------------------------------------------
def _lcm(*overrides):
    from stepdistill.config import from_dict
    from stepdistill.distillers.consistency import Consistency

    ctx, proc = _context("lcm", "student.timesteps=null", "student.num_steps=4", "method_args.x_source=data",
                         "method_args.w_min=3.0", "method_args.w_max=5.0", *overrides)
    lcm = Consistency(ctx, from_dict(Consistency.Options, ctx.config.method_args, "method_args"))
    _perturb(lcm.student.model, 1)
    return lcm, ctx, proc


def _official_lcm_loss(lcm, ctx, proc, batch, g, student_net, target_net, huber_c=None):
    acp = proc.alpha(torch.arange(1000).float()) ** 2  # alphas_cumprod[t]
    k = 1000 // 50
    n = torch.randint(0, 50, (6,), generator=g)  # our grid runs from 999 down: start = 999 - k n
    start = 999 - k * n
    prev = torch.where(start - k < 0, torch.zeros_like(start), start - k)
    eps = torch.randn(6, 3, generator=g)
    w_diffusers = 3.0 + 2.0 * torch.rand(6, generator=g)
    w = (w_diffusers - 1)[:, None]  # the script's w: x = c + w (c - u)

    def scalings(tt):
        scaled = 10.0 * tt.float()
        return (0.25 / (scaled**2 + 0.25))[:, None], (scaled / (scaled**2 + 0.25) ** 0.5)[:, None]

    def x0_of(e, x, tt):
        return (x - (1 - acp[tt]).sqrt()[:, None] * e) / acp[tt].sqrt()[:, None]

    x0 = batch.x0
    labels, null = batch.x0_cond.kwargs["class_labels"], torch.full_like(batch.labels, 4)
    x_t = acp[start].sqrt()[:, None] * x0 + (1 - acp[start]).sqrt()[:, None] * eps
    cs, co = scalings(start)
    model_pred = cs * x_t + co * x0_of(student_net(x_t, start.float(), class_labels=labels, guidance=w_diffusers), x_t, start)
    with torch.no_grad():
        e_c = ctx.teacher.denoiser.model(x_t, start.float(), class_labels=labels)
        e_u = ctx.teacher.denoiser.model(x_t, start.float(), class_labels=null)
        pred_x0 = x0_of(e_c, x_t, start) + w * (x0_of(e_c, x_t, start) - x0_of(e_u, x_t, start))
        pred_eps = e_c + w * (e_c - e_u)
        x_prev = acp[prev].sqrt()[:, None] * pred_x0 + (1 - acp[prev]).sqrt()[:, None] * pred_eps
        cp, op = scalings(prev)
        target = cp * x_prev + op * x0_of(target_net(x_prev, prev.float(), class_labels=labels, guidance=w_diffusers),
                                          x_prev, prev)
    if huber_c is None:
        return torch.nn.functional.mse_loss(model_pred, target)
    return torch.mean(torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_lcm_loss_is_the_official_consistency_distillation_loss(loss):
    lcm, ctx, proc = _lcm(f"method_args.loss={loss}")
    batch = _batch(ctx.source, seed=6)
    g = _replay(batch)
    ours = lcm.loss(batch, 0, "student")["loss"]
    net = lcm.student.model
    official = _official_lcm_loss(lcm, ctx, proc, batch, g, net, net, None if loss == "l2" else 0.001)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-7)


def test_lcm_target_is_the_ema_of_the_student_after_each_iteration():
    lcm, ctx, proc = _lcm()
    assert lcm.decay == 0.95 and lcm.w_conditioned
    before = copy.deepcopy(lcm.student.model)
    lcm.loss(_batch(ctx.source, seed=1), 0, "student")  # iteration 0: the target is the student
    _perturb(lcm.student.model, 7)  # the optimiser's step
    batch = _batch(ctx.source, seed=2)
    g = _replay(batch)
    ours = lcm.loss(batch, 1, "student")["loss"]
    ema = copy.deepcopy(before)
    with torch.no_grad():
        for p_ema, p_now in zip(ema.parameters(), lcm.student.model.parameters()):
            p_ema.mul_(0.95).add_(0.05 * p_now)
    official = _official_lcm_loss(lcm, ctx, proc, batch, g, lcm.student.model, ema)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-7)
    # a second micro-batch of the same iteration does not move the target again
    kept = [t.clone() for t in lcm.target.shadow]
    lcm.loss(batch, 1, "student")
    assert all(torch.equal(a, b) for a, b in zip(kept, lcm.target.shadow))


def test_lcm_lora_student_is_its_own_target_without_a_guidance_input():
    from stepdistill.config import from_dict
    from stepdistill.distillers.consistency import Consistency, ConsistencyOptions

    ctx, _ = _context("lcm", "student.timesteps=null", "student.num_steps=4", "method_args.x_source=data")
    ctx.config.student.lora_rank = 4
    ctx.config.student.lora_targets = ["fc1", "fc2"]
    lcm = Consistency(ctx, from_dict(ConsistencyOptions, ctx.config.method_args, "method_args"))
    assert lcm.decay == 0.0 and not lcm.w_conditioned and lcm.student.spec.guidance_scale is None
    lcm.loss(_batch(ctx.source), 0, "student")
    assert lcm.target.shadow is None


# the LCM-LoRA script's default lora_target_modules (train_lcm_distill_lora_sd_wds.py), as peft matches them
LCM_LORA_SCRIPT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _adapted(student) -> set[str]:
    """The names of the layers that carry the student's LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.models.shared_lora import adapter_name, is_view

    model = student.model
    base, name = (model.module if is_view(model) else unwrap(model)), adapter_name(model)
    return {n for n, m in base.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _peft_matches(network, targets) -> set[str]:
    """The layers peft adapts for a list of target names: a name equal to one or ending in '.' + one."""
    from torch import nn

    return {n for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in targets)}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_lcm_lora_adapts_the_lcm_lora_scripts_layers_by_default(tmp_path, tiny_pipelines, family):
    """An LCM-LoRA student without student.lora_targets adapts the layers the official script's default
    list reaches (on SD's UNet: attention, feed-forward, resnet convolutions, samplers, time projections; on
    a transformer those of the list it has); other methods keep the attention projections, and an explicit
    list wins."""
    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.training import Trainer

    def student(config, *overrides):
        cfg = load_config(config, [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={tmp_path}/{len(seen)}",
                                   "train.report_to=none", "train.progress=false", *overrides])
        seen.append(Trainer(cfg))
        return seen[-1].distiller.student

    seen = []
    lcm = student(f"configs/tiny-{family}/lcm_lora_4step.yaml")
    teacher = unwrap(seen[-1].teacher.denoiser.model)
    official = _peft_matches(teacher, LCM_LORA_SCRIPT_TARGETS)
    attention = _peft_matches(teacher, ["to_q", "to_k", "to_v", "to_out.0"])
    assert official > attention  # the script's set reaches more than the attention (the test can fail)
    assert _adapted(lcm) == official
    dmd2 = student(f"configs/tiny-{family}/dmd2_4step.yaml", "student.lora_rank=4")
    assert _adapted(dmd2) == attention
    explicit = student(f"configs/tiny-{family}/lcm_lora_4step.yaml", "student.lora_targets=[to_q]")
    assert _adapted(explicit) == _peft_matches(teacher, ["to_q"])


@pytest.mark.parametrize("init", [None, "gaussian"])
def test_lora_adapters_start_as_peft_default_as_the_lcm_lora_and_swiftbrush_code(init):
    """A LoRA copy and a LoRA adapter on a shared base draw their adapters as peft's default LoraConfig does
    (the official scripts pass no init_lora_weights: A kaiming-uniform, B zero), from the same random state;
    student.lora_init=gaussian keeps peft's Gaussian A."""
    from peft import LoraConfig

    from stepdistill.models.shared_lora import add_adapter_view
    from stepdistill.models.student import copy_for_training

    torch.manual_seed(0)
    net = MLPDenoiser(dim=3, hidden=32, depth=2).requires_grad_(False)

    def official():
        ref = copy.deepcopy(net)
        torch.manual_seed(5)
        ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"],
                                   **({} if init is None else {"init_lora_weights": init})))
        return {k: v for k, v in ref.state_dict().items() if "lora_" in k}

    def ours(model):
        return {k.replace(".fake_score", ".default"): v for k, v in model.state_dict().items() if "lora_" in k}

    expect = official()
    assert expect and all(float(v.abs().sum()) == 0 for k, v in expect.items() if "lora_B" in k)
    torch.manual_seed(5)
    copied = copy_for_training(net, lora_rank=4, lora_targets=["fc1", "fc2"], lora_init=init or "default")
    torch.manual_seed(5)
    view = add_adapter_view(copy.deepcopy(net), "fake_score", rank=4, alpha=None, targets=["fc1", "fc2"],
                            init=init or "default")
    for got in (ours(copied), ours(view.module)):
        assert got.keys() == expect.keys()
        assert all(torch.equal(got[k], expect[k]) for k in expect)
    a = next(v for k, v in expect.items() if "lora_A" in k)
    bound = 1 / a.shape[1] ** 0.5  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert (float(a.abs().max()) <= bound) == (init is None)  # a Gaussian of std 1/r leaves that bound


def test_phased_dmd_starts_each_phase_from_the_teacher_without_a_snapshot():
    """At a phase's first iteration the fake score is the network it was copied from again ("rather than
    the model of the preceding phase"), read back from that frozen network rather than from a kept copy."""
    from stepdistill.config import from_dict
    from stepdistill.distillers.phased_dmd import PhasedDMD

    ctx, _ = _context("phased_dmd", "student.timesteps=[999.0,500.0]", "train.max_steps=4")
    phased = PhasedDMD(ctx, from_dict(PhasedDMD.Options, ctx.config.method_args, "method_args"))
    assert phased._fake_init is None  # nothing kept beside the fake score itself
    start = {k: v.clone() for k, v in phased.fake.model.state_dict().items()}
    assert all(torch.equal(start[k], v.to(start[k].dtype)) for k, v in ctx.init.model.state_dict().items())
    _perturb(phased.fake.model, 1)  # the first phase's training
    assert phased.reinitialised(1) == []  # still phase 0 (2 iterations per phase)
    assert not torch.equal(next(phased.fake.model.parameters()), next(iter(start.values())))
    assert phased.reinitialised(2) == ["fake"]
    assert all(torch.equal(start[k], v) for k, v in phased.fake.model.state_dict().items())


def test_phased_dmd_with_a_lora_fake_score_restores_its_adapters(tmp_path, tiny_pipelines):
    """A LoRA fake score's base never changes: only its adapters are kept, and restored at a phase start."""
    from stepdistill.training import Trainer

    cfg = load_config("configs/tiny-sd/phased_dmd_2step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path / 'run'}", "train.report_to=none",
        "train.progress=false", "method_args.fake_lora_rank=4", "method_args.steps_per_phase=1"])
    trainer = Trainer(cfg)
    try:
        phased = trainer.distiller
        fake = phased.fake.model
        trained = {n for n, p in fake.named_parameters() if p.requires_grad}
        assert trained and set(phased._fake_init) == trained and all("lora" in n for n in trained)
        start = {k: v.clone() for k, v in fake.state_dict().items()}
        _perturb(fake, 2)  # adapters and base alike
        phased.reinitialised(1)
        now = fake.state_dict()
        assert all(torch.equal(now[k], start[k]) for k in trained)
        assert not all(torch.equal(now[k], start[k]) for k in start if k not in trained)  # the base was left alone
    finally:
        trainer.close()
