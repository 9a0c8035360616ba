"""Export into HunyuanVideoPipeline: the folder loads with plain ``DiffusionPipeline.from_pretrained`` and
samples exactly what the toolkit's ``Student.sample`` samples for the same seed. The pipeline passes
sigmas to its scheduler (any grid exports, unlike WanPipeline), and its guidance-distilled transformer is
fed the embedded guidance the student was distilled with, never classifier-free guidance. (Sampled in a
process without stepdistill, and with a LoRA student's adapters: tests/export/test_export_stock.py.)"""

import json

import pytest
import torch
from helpers.video import PROMPTS, VIDEO, sample_both
from test_export import make_student_folder

from stepdistill.diffusion.denoiser import Denoiser
from stepdistill.errors import ExportError
from stepdistill.export import export, sampling_kwargs
from stepdistill.models.student import Student, StudentSpec, copy_for_training
from stepdistill.models.teachers import load_teacher

CASES = [  # sampler, timesteps, embedded guidance (None: the pipeline's default, 6.0), scheduler class
    ("deterministic", [1.0], None, "FlowMatchEulerDiscreteScheduler"),  # one step (SiD, VSD, DMD2 1-step)
    ("renoise", [1.0, 0.9, 0.75, 0.5], None, "FlowMatchLCMScheduler"),  # DMD2 4-step on the process grid
    ("deterministic", [1.0, 0.75], 3.0, "FlowMatchEulerDiscreteScheduler"),  # progressive, teacher.guidance 3
    ("signal", [0.0], None, "FlowMatchEulerDiscreteScheduler"),  # BOOT: the timestep embeddings folded away
]


@pytest.mark.parametrize("sampler,timesteps,guidance,scheduler", CASES,
                         ids=[f"{s}-{len(t)}step-{g}" for s, t, g, _ in CASES])
def test_exported_hunyuanvideo_pipeline_samples_like_the_toolkit(tmp_path, tiny_pipelines, sampler, timesteps,
                                                                  guidance, scheduler):
    teacher = load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO, guidance=guidance)
    make_student_folder(tmp_path / "student", teacher, sampler, timesteps)
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["hunyuanvideo"])
    kwargs = sampling_kwargs(out)
    n = len(timesteps)
    # the sigmas before the scheduler's shift of 7, the guidance the student was distilled with, the video size
    assert {k: v for k, v in kwargs.items() if k != "sigmas"} == {
        "num_inference_steps": n, "guidance_scale": guidance or 6.0, "true_cfg_scale": 1.0,
        **dict(zip(("num_frames", "height", "width"), VIDEO))}
    assert len(kwargs["sigmas"]) == n
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == scheduler and config["shift"] == 7.0
    pipe, got, ref = sample_both(out, tmp_path / "student", teacher, kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)), atol=1e-2)
    # the guidance input is used: the same pipeline at another guidance scale samples otherwise
    other = pipe(prompt=PROMPTS, output_type="latent", generator=torch.Generator().manual_seed(7),
                 **{**kwargs, "guidance_scale": kwargs["guidance_scale"] + 2}).frames
    assert not torch.allclose(other, got, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "export_to_video(frames" in card and "pipeline_tag: text-to-video" in card and "guidance_scale" in card


def test_a_student_of_the_guidance_input_without_a_guidance_scale_is_refused(tmp_path, tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["hunyuanvideo"], video_size=VIDEO)
    net = copy_for_training(teacher.denoiser.model).eval()
    spec = StudentSpec("test", "deterministic", [1.0], None, teacher.process.describe(), "flow",
                       sample_shape=list(teacher.sample_shape))
    Student(Denoiser(net, teacher.process, "flow", 6.0), spec).save(tmp_path / "student")
    with pytest.raises(ExportError, match="HunyuanVideoTransformer3DModel with a guidance input records no guidance "
                                          "scale to sample with"):
        export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["hunyuanvideo"])
    assert not (tmp_path / "pipe").exists()
