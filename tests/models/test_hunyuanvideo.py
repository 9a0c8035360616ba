"""The HunyuanVideo text-to-video family: the teacher denoises, encodes and decodes as HunyuanVideoPipeline
does, its guidance-distilled transformer is fed the embedded guidance (teacher.guidance, default the
pipeline's 6.0) and never classifier-free guidance, and its scheduler's shift is the process's."""

import inspect

import pytest
import torch

from stepdistill.diffusion.packed import GUIDANCE_INPUT_NETWORKS, guidance_embedded
from stepdistill.diffusion.process import FlowProcess
from stepdistill.models.teachers import TeacherLoadError, load_teacher

VIDEO = (5, 16, 16)
PROMPTS = ["a red cat sitting on a chair", "two dogs"]


@pytest.fixture(scope="module")
def teacher(tiny_pipelines):
    return load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO)


def test_hunyuanvideo_teacher_loads_with_video_latents_and_the_pipelines_guidance(tiny_pipelines, teacher):
    from diffusers import HunyuanVideoPipeline

    assert teacher.video and teacher.video_size == VIDEO and teacher.sample_shape == (4, 2, 4, 4)
    assert isinstance(teacher.process, FlowProcess) and teacher.process.shift == 7.0
    assert teacher.process.prediction_type == "flow" and teacher.family == "HunyuanVideoPipeline" and teacher.conditional
    assert guidance_embedded(teacher.denoiser.model)
    default = inspect.signature(HunyuanVideoPipeline.__call__).parameters["guidance_scale"].default
    assert teacher.denoiser.embedded_guidance == default == 6.0
    assert GUIDANCE_INPUT_NETWORKS["HunyuanVideoTransformer3DModel"] == default
    assert all(not p.requires_grad for p in teacher.denoiser.model.parameters())
    assert load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO, guidance=2.5).denoiser.embedded_guidance == 2.5
    # the pipeline's own defaults when no size is given: 129 frames of 720 x 1280 (spatial factor 4 here)
    assert load_teacher(tiny_pipelines["hunyuanvideo"]).sample_shape == (4, 33, 180, 320)
    with pytest.raises(TeacherLoadError, match=r"teacher.video_size \[6, 16, 16\]: HunyuanVideoPipeline takes 4k \+ 1"):
        load_teacher(tiny_pipelines["hunyuanvideo"], video_size=(6, 16, 16))
    with pytest.raises(TeacherLoadError, match="teacher.sample_size: HunyuanVideoTransformer3DModel takes no sample_size"):
        load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO, sample_size=8)
    with pytest.raises(TeacherLoadError, match="teacher.guidance: WanTransformer3DModel takes no guidance option"):
        load_teacher(tiny_pipelines["wan"], video_size=VIDEO, guidance=6.0)


def test_a_hunyuanvideo_transformer_without_the_input_takes_no_guidance(tmp_path):
    from stepdistill.testing.tiny_pipelines import make_tiny_hunyuanvideo

    path = make_tiny_hunyuanvideo(tmp_path / "cfg", guidance_embeds=False)
    plain = load_teacher(path, video_size=VIDEO)
    assert plain.denoiser.embedded_guidance is None and not guidance_embedded(plain.denoiser.model)
    with pytest.raises(TeacherLoadError, match="teacher.guidance: HunyuanVideoTransformer3DModel has no guidance input"):
        load_teacher(path, video_size=VIDEO, guidance=6.0)


def test_hunyuanvideo_encoding_and_decoding_are_the_pipelines(teacher):
    pipe = teacher.pipeline
    cond, uncond = teacher.encode(PROMPTS)
    pe, pooled, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=256, device="cpu")
    assert pe.shape == (2, 256, 32) and pooled.shape == (2, 32) and mask.shape == (2, 256)
    for key, ref in (("encoder_hidden_states", pe), ("pooled_projections", pooled), ("encoder_attention_mask", mask)):
        assert torch.equal(cond.kwargs[key], ref), key
    n = mask.sum(1).tolist()  # each prompt its own length, its padding on the right
    assert n[0] != n[1] and all(mask[k].tolist() == [1] * n[k] + [0] * (256 - n[k]) for k in range(2))
    assert not torch.equal(cond.kwargs["encoder_hidden_states"][0], cond.kwargs["encoder_hidden_states"][1])
    empty = pipe.encode_prompt([""], max_sequence_length=256, device="cpu")
    assert torch.equal(uncond.kwargs["encoder_hidden_states"], empty[0].expand(2, -1, -1))
    assert torch.equal(uncond.kwargs["encoder_attention_mask"], empty[2].expand(2, -1))
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    video = teacher.decode(x)
    assert video.shape == (2, 3, 5, 16, 16)
    ref = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)  # as __call__ does
    torch.testing.assert_close(video, ref)


@pytest.mark.parametrize("guidance", [6.0, 3.0])
def test_hunyuanvideo_teacher_samples_what_the_pipeline_samples(tiny_pipelines, guidance):
    """Euler with the teacher's denoiser on the pipeline's own sigmas gives the pipeline's latents at the
    same guidance scale: timestep convention, the guidance input (x 1000), text states, mask and pooled
    output are the pipeline's; another guidance scale gives other latents (the input is used)."""
    from stepdistill.diffusion.sampling import ode_sample

    teacher = load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO, guidance=guidance)
    pipe = teacher.pipeline
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"].tolist()), with_kwargs=True)
    got = pipe(prompt=PROMPTS, num_frames=5, height=16, width=16, num_inference_steps=6, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    assert seen[0] == [guidance * 1000] * 2
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = teacher.encode(PROMPTS)[0]
    ref = ode_sample(teacher.denoiser, noise, pipe.scheduler.sigmas[:-1], cond)
    torch.testing.assert_close(ref, got, rtol=1e-4, atol=1e-4)
    other = load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO, guidance=guidance + 2).denoiser
    assert not torch.allclose(ode_sample(other, noise, pipe.scheduler.sigmas[:-1], cond), got, atol=1e-3)


def test_cfg_on_the_guidance_distilled_teacher_is_refused(teacher):
    cond, uncond = teacher.encode(PROMPTS)
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        same = teacher.denoiser(x, t, cond, guidance_scale=1.0, uncond=uncond)  # w = 1 is no guidance
        torch.testing.assert_close(same, teacher.denoiser(x, t, cond), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"classifier-free guidance \(scale 4.5\) on HunyuanVideoTransformer3DModel"):
            teacher.denoiser(x, t, cond, guidance_scale=4.5, uncond=uncond)
