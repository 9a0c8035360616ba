"""The Wan text-to-video family: the teacher (Wan2.1's one network, Wan2.2's two experts) denoises, encodes
and decodes as WanPipeline does, its scheduler's flow shift is the process's, and students copied from a
two-expert teacher start from the expert of their time."""

import pytest
import torch

from stepdistill.diffusion.process import FlowProcess
from stepdistill.models.teachers import TeacherLoadError, load_teacher

VIDEO = (5, 16, 16)
PROMPTS = ["a red cat sitting on a chair", "two dogs"]


@pytest.mark.parametrize("family,shift,network", [("wan", 3.0, "WanTransformer3DModel"),
                                                  ("wan22", 5.0, "NoiseLevelExperts")])
def test_wan_teacher_loads_with_video_latents_and_wan_shift(tiny_pipelines, family, shift, network):
    teacher = load_teacher(tiny_pipelines[family], video_size=VIDEO)
    assert teacher.video and teacher.video_size == VIDEO and teacher.sample_shape == (4, 2, 4, 4)
    assert isinstance(teacher.process, FlowProcess) and teacher.process.shift == shift
    assert teacher.process.prediction_type == "flow" and teacher.family == "WanPipeline" and teacher.conditional
    assert type(teacher.denoiser.model).__name__ == network
    assert all(not p.requires_grad for p in teacher.denoiser.model.parameters())
    # the pipeline's own defaults when no size is given: 81 frames of 480 x 832 (spatial factor 4 here)
    assert load_teacher(tiny_pipelines[family]).sample_shape == (4, 21, 120, 208)
    with pytest.raises(TeacherLoadError, match=r"teacher.video_size \[6, 16, 16\]: WanPipeline takes 4k \+ 1 frames"):
        load_teacher(tiny_pipelines[family], video_size=(6, 16, 16))
    with pytest.raises(TeacherLoadError, match="teacher.video_size: StableDiffusionPipeline makes images"):
        load_teacher(tiny_pipelines["sd"], video_size=VIDEO)


def test_wan_encoding_and_decoding_are_the_pipelines(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["wan"], video_size=VIDEO)
    pipe = teacher.pipeline
    cond, uncond = teacher.encode(PROMPTS)
    pe, npe = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=512, device="cpu")
    assert torch.equal(cond.kwargs["encoder_hidden_states"], pe) and pe.shape == (2, 512, 32)
    assert torch.equal(uncond.kwargs["encoder_hidden_states"], npe)  # the empty prompt, as the pipeline's default
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    video = teacher.decode(x)
    assert video.shape == (2, 3, 5, 16, 16)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    ref = vae.decode(x / std + mean, return_dict=False)[0].clamp(-1, 1)  # pipeline_wan.py's un-normalisation
    torch.testing.assert_close(video, ref)
    z = teacher.encode_images(video, noise=torch.zeros(2, *teacher.sample_shape))  # the normalisation's inverse
    dist = vae.encode(video).latent_dist
    torch.testing.assert_close(z, (dist.mean - mean) * std)


@pytest.mark.parametrize("family,guidance", [("wan", 1.0), ("wan22", 1.0), ("wan22", 4.0)])
def test_wan_teacher_samples_what_the_pipeline_samples(tiny_pipelines, family, guidance):
    """Euler with the teacher's denoiser on the sigmas of the pipeline's own loop (a grid that crosses
    Wan2.2's boundary) gives the pipeline's latents: timestep convention, text states, CFG and the switch
    from transformer to transformer_2 at boundary_ratio * 1000 are the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.diffusion.sampling import ode_sample

    teacher = load_teacher(tiny_pipelines[family], video_size=VIDEO)
    pipe = teacher.pipeline
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=teacher.process.shift)
    seen = []
    for net in ([pipe.transformer] + ([pipe.transformer_2] if family == "wan22" else [])):
        net.register_forward_pre_hook(lambda m, a, kw, net=net: seen.append(
            (net is pipe.transformer, float(kw["timestep"][0]))), with_kwargs=True)
    got = pipe(prompt=PROMPTS, num_frames=5, height=16, width=16, num_inference_steps=6, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    sigmas = pipe.scheduler.sigmas[:-1]
    if family == "wan22":  # both experts ran, each on its side of the boundary
        assert {high for high, _ in seen} == {True, False}
        assert all(high == (t >= 875.0) for high, t in seen)
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond, uncond = teacher.encode(PROMPTS)
    cfg = {} if guidance == 1.0 else {"guidance_scale": guidance, "uncond": uncond}
    ref = ode_sample(teacher.denoiser, noise, sigmas, cond, **cfg)
    torch.testing.assert_close(ref, got, rtol=1e-4, atol=1e-4)


def test_two_expert_routing_at_the_boundary(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["wan22"], video_size=VIDEO)
    experts = teacher.denoiser.model
    assert experts.config.boundary_timestep == 875.0
    t = torch.tensor([1.0, 0.875, 0.8749, 0.3])
    assert experts.expert_index(teacher.process.model_time(t)).tolist() == [0, 0, 1, 1]
    cond = teacher.encode(PROMPTS * 2)[0]
    x = torch.randn(4, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    mixed = teacher.denoiser.raw(x, t, cond)
    for k in range(4):  # a batch mixing both sides gives each row its own expert's prediction
        net = experts.experts[0 if k < 2 else 1]
        alone = net(hidden_states=x[k:k + 1], timestep=t[k:k + 1] * 1000,
                    encoder_hidden_states=cond.kwargs["encoder_hidden_states"][k:k + 1]).sample
        torch.testing.assert_close(mixed[k:k + 1], alone)


def test_students_of_a_two_expert_teacher_start_from_the_expert_of_their_time(tiny_pipelines):
    from stepdistill.models.nets import expert_at
    from stepdistill.models.student import copy_for_training

    teacher = load_teacher(tiny_pipelines["wan22"], video_size=VIDEO)
    mix, proc = teacher.denoiser.model, teacher.process
    assert expert_at(mix, 1.0, proc) is mix.experts[0] and expert_at(mix, 0.875, proc) is mix.experts[0]
    assert expert_at(mix, 0.75, proc) is mix.experts[1]
    single = load_teacher(tiny_pipelines["wan"], video_size=VIDEO).denoiser.model
    assert expert_at(single, 0.3, proc) is single
    fake = copy_for_training(mix, lora_rank=2)  # a fake score initialised as the teacher: both experts
    assert type(fake).__name__ == "NoiseLevelExperts" and fake.config.boundary_timestep == 875.0
    assert all(getattr(e, "peft_config", None) for e in fake.experts)
    assert all(p.requires_grad == ("lora" in n) for n, p in fake.named_parameters())
