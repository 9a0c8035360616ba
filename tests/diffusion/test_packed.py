"""Flux and Qwen-Image (``stepdistill/diffusion/packed.py``): the adapters call the network as the
pipelines do (packing, position inputs, timestep / 1000, embedded guidance), the static shift at the
teacher's sample size is the pipelines' own dynamic shift there, and the bad inputs are refused in one
line."""

import math

import pytest
import torch

from stepdistill.diffusion.denoiser import Denoiser, find_adapter
from stepdistill.diffusion.process import FlowProcess, process_from_scheduler_config
from stepdistill.errors import TeacherLoadError
from stepdistill.models.teachers import load_teacher

PROMPTS = ["a red cat", "two dogs"]


@pytest.fixture(scope="module")
def teachers(tiny_pipelines):
    return {f: load_teacher(tiny_pipelines[f], sample_size=8) for f in ("flux", "qwenimage")}


def _inputs(teacher, seed=0):
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([0.3, 0.8]), *teacher.encode(PROMPTS)


def test_flux_adapter_calls_the_network_as_the_pipeline_does(teachers):
    teacher = teachers["flux"]
    pipe, model = teacher.pipeline, teacher.denoiser.model
    x, t, cond, _ = _inputs(teacher)
    kw = cond.kwargs
    b, c, h, w = x.shape
    with torch.no_grad():
        u = model(hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=(t * 1000) / 1000,
                  guidance=torch.full([1], 3.5).expand(b), pooled_projections=kw["pooled_projections"],
                  encoder_hidden_states=kw["encoder_hidden_states"],
                  txt_ids=torch.zeros(kw["encoder_hidden_states"].shape[1], 3),
                  img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)).sample
        u = pipe._unpack_latents(u, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
        ours = teacher.denoiser(x, t, cond)
        other = teacher.denoiser(x, t, cond, guidance=1.0)  # the guidance input reaches the network
    torch.testing.assert_close(ours, x - t.reshape(-1, 1, 1, 1) * u, rtol=1e-5, atol=1e-5)
    assert (ours - other).abs().max() > 1e-4
    assert teacher.denoiser.embedded_guidance == 3.5  # FluxPipeline's default guidance_scale


def test_qwenimage_adapter_and_its_padded_text_match_the_pipeline(teachers):
    """The toolkit pads every prompt to 512 masked tokens; the pipeline passes the batch's own length
    (and no mask when there is no padding): the network's output is the same up to rounding."""
    teacher = teachers["qwenimage"]
    pipe, model = teacher.pipeline, teacher.denoiser.model
    x, t, cond, _ = _inputs(teacher)
    b, c, h, w = x.shape
    pe, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    assert cond.kwargs["encoder_hidden_states"].shape[1] == 512 > pe.shape[1]
    with torch.no_grad():
        u = model(hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=(t * 1000) / 1000,
                  encoder_hidden_states=pe, encoder_hidden_states_mask=mask,
                  img_shapes=[[(1, h // 2, w // 2)]] * b).sample
        u = pipe._unpack_latents(u, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
        ours = teacher.denoiser(x, t, cond)
    torch.testing.assert_close(ours, x - t.reshape(-1, 1, 1, 1) * u[:, :, 0], rtol=1e-5, atol=1e-5)
    assert teacher.denoiser.embedded_guidance is None  # Qwen-Image has no guidance input


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_static_shift_is_the_pipelines_dynamic_shift_at_the_sample_size(teachers, family):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    teacher = teachers[family]
    sched = type(teacher.pipeline.scheduler).from_config(teacher.pipeline.scheduler.config)
    cfg = sched.config
    seq = (8 // 2) ** 2
    mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    desc = teacher.process.describe()
    assert desc["image_seq_len"] == seq and desc["mu"] == pytest.approx(mu)
    assert desc["shift"] == pytest.approx(math.exp(mu)) and desc["scheduler"]["use_dynamic_shifting"] is False
    for n in (2, 4, 8):  # the pipelines' own sigmas for n steps (Qwen-Image: stretched to shift_terminal 0.02)
        sched.set_timesteps(sigmas=[1 - i / n for i in range(n)], mu=mu)
        torch.testing.assert_close(teacher.process.grid(n), sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    # a reloaded student rebuilds the same process from the recorded (static) scheduler config
    again = process_from_scheduler_config(desc["scheduler"])
    torch.testing.assert_close(again.grid(4), teacher.process.grid(4))


def test_dynamic_shifting_needs_the_image_size():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True: the shift depends on the image size"):
        process_from_scheduler_config(sched)
    proc = process_from_scheduler_config(sched, image_seq_len=4096)  # FLUX.1 at 1024 px: mu = max_shift
    assert proc.shift == pytest.approx(math.exp(1.15))
    assert FlowProcess(shift=3.0).describe() == {"kind": "flow", "prediction_type": "flow", "shift": 3.0,
                                                 "num_train_timesteps": 1000, "scheduler": {
                                                     "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                                     "num_train_timesteps": 1000}}


def test_cfg_on_a_guidance_embedded_network_is_refused(teachers):
    teacher = teachers["flux"]
    x, t, cond, uncond = _inputs(teacher)
    with torch.no_grad():
        same = teacher.denoiser(x, t, cond, guidance_scale=1.0, uncond=uncond)  # w = 1 is no guidance
        torch.testing.assert_close(same, teacher.denoiser(x, t, cond), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"classifier-free guidance \(scale 4.5\) on FluxTransformer2DModel, whose "
                                             r"guidance scale is a network input \(embedded guidance 3.5\)"):
            teacher.denoiser(x, t, cond, guidance_scale=4.5, uncond=uncond)
        bare = Denoiser(teacher.denoiser.model, teacher.process)  # no embedded guidance given
        with pytest.raises(ValueError, match="takes the guidance scale as an input .* embedded_guidance"):
            bare(x, t, cond)


def test_noise_is_drawn_in_the_pipelines_layout(teachers, tiny_pipelines):
    flux = teachers["flux"].denoiser
    shape = (2, 16, 8, 8)
    packed = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    pipe = teachers["flux"].pipeline
    want = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)
    assert torch.equal(flux.noise(shape, torch.Generator().manual_seed(3)), want)
    sd = load_teacher(tiny_pipelines["sd"]).denoiser  # every other family: torch.randn, as before
    assert torch.equal(sd.noise((2, 4, 8, 8), torch.Generator().manual_seed(3)),
                       torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_teacher_options_are_for_the_networks_that_take_them(tiny_pipelines):
    with pytest.raises(TeacherLoadError, match="teacher.sample_size: UNet2DConditionModel takes no sample_size option"):
        load_teacher(tiny_pipelines["sd"], sample_size=8)
    with pytest.raises(TeacherLoadError, match="teacher.sample_size: 7 is not an even number >= 2; "
                                               "FluxTransformer2DModel packs 2x2 latent patches"):
        load_teacher(tiny_pipelines["flux"], sample_size=7)
    with pytest.raises(TeacherLoadError, match="teacher.guidance: QwenImageTransformer2DModel has no guidance input"):
        load_teacher(tiny_pipelines["qwenimage"], sample_size=8, guidance=4.0)
    flux = load_teacher(tiny_pipelines["flux"], guidance=2.0)  # default size: the pipeline's 128 latents
    assert flux.sample_shape == (16, 128, 128) and flux.denoiser.embedded_guidance == 2.0
    assert flux.process.describe()["image_seq_len"] == 64 * 64


def test_a_family_without_an_adapter_names_its_class_and_the_adapters():
    class UnknownTransformer2DModel(torch.nn.Linear):
        pass

    with pytest.raises(TypeError) as err:
        find_adapter(UnknownTransformer2DModel(2, 2))
    msg = str(err.value)
    assert msg.startswith("no denoiser adapter for UnknownTransformer2DModel; supported: [")
    assert "'FluxTransformer2DModel'" in msg and "'QwenImageTransformer2DModel'" in msg and "\n" not in msg


def test_gan_features_are_the_image_tokens(teachers):
    from stepdistill.diffusion.denoiser import feature_module

    for family, teacher in teachers.items():
        seen = []
        hook = feature_module(teacher.denoiser.model).register_forward_hook(lambda m, i, o, seen=seen: seen.append(o[-1]))
        x, t, cond, _ = _inputs(teacher)
        with torch.no_grad():
            teacher.denoiser(x, t, cond)
        hook.remove()
        assert seen[0].shape[:2] == (2, 16), family  # (B, 4x4 image tokens, width)


def test_loading_a_family_without_an_adapter_is_one_line(tiny_pipelines, monkeypatch):
    from stepdistill.diffusion.denoiser import MODEL_ADAPTERS

    monkeypatch.delitem(MODEL_ADAPTERS, "QwenImageTransformer2DModel")
    with pytest.raises(TeacherLoadError, match=r"^teacher '.*': no denoiser adapter for QwenImageTransformer2DModel; "
                                               r"supported: \[.*'FluxTransformer2DModel'.*\] \(add one with "
                                               r"stepdistill.diffusion.denoiser.register_adapter\)$"):
        load_teacher(tiny_pipelines["qwenimage"], sample_size=8)


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_latents_are_scaled_as_the_pipeline_decodes_them(teachers, family):
    """Teacher.decode is the pipeline's own decoding of its latents (Flux: AutoencoderKL's scaling and
    shift factors; Qwen-Image: its video VAE's per-channel mean and std, one frame), and encode_images
    is its inverse up to the VAE's round trip."""
    from stepdistill.data.loading import image_geometry

    teacher = teachers[family]
    vae = teacher.pipeline.vae
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if family == "flux":  # FluxPipeline.__call__'s lines after the loop
            image = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
        else:  # QwenImagePipeline.__call__'s
            mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
            std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
            image = vae.decode(x.unsqueeze(2) / std + mean).sample[:, :, 0]
        ours = teacher.decode(x)
        torch.testing.assert_close(ours, image.clamp(-1, 1), rtol=1e-5, atol=1e-5)
        z = teacher.encode_images(ours, noise=torch.zeros_like(x))  # the posterior mean
        drawn = teacher.encode_images(ours, torch.Generator().manual_seed(0))
    assert z.shape == drawn.shape == x.shape and torch.isfinite(drawn).all()
    assert image_geometry(teacher) == (16, 3)  # 16 px images, 3 channels (Qwen's VAE: input_channels)


def test_a_sharded_network_is_still_packed_and_guidance_embedded(teachers):
    """FSDP2's fully_shard turns a network's class into an ``FSDP<class>`` subclass of it: the packed
    layout and Flux's guidance input are read through the class's ancestry, so the sharded network is
    called exactly as the plain one."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    from stepdistill.diffusion.packed import guidance_embedded, is_packed

    teacher = teachers["flux"]
    plain = teacher.denoiser.model
    sharded = copy.deepcopy(plain)
    cls = type(plain)
    sharded.__class__ = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})  # the class fully_shard makes
    assert is_packed(sharded) and guidance_embedded(sharded)
    plain_den = Denoiser(plain, teacher.denoiser.process, teacher.denoiser.prediction_type, 3.5)
    den = Denoiser(sharded, teacher.denoiser.process, teacher.denoiser.prediction_type, 3.5)
    x, t, cond = _inputs(teacher)[:3]
    torch.testing.assert_close(den(x, t, cond), plain_den(x, t, cond), rtol=0, atol=0)
    assert not is_packed(teachers["qwenimage"].denoiser.model.time_text_embed)  # a part of the network is not
