"""Export into WanPipeline: the folder loads with plain ``DiffusionPipeline.from_pretrained`` and samples
exactly what the toolkit's ``Student.sample`` samples for the same seed. WanPipeline passes no sigmas to
its scheduler, so a student exports on FlowMatchEulerDiscreteScheduler's own grid and is refused on others."""

import json

import pytest
import torch
from helpers.video import PROMPTS, VIDEO, sample_both
from test_export import make_student_folder

from stepdistill.errors import ExportError
from stepdistill.export import export, sampling_kwargs
from stepdistill.export.schedulers import flow_match_grid
from stepdistill.models.nets import PhasedExperts, expert_at
from stepdistill.models.student import Student, StudentSpec, copy_for_training
from stepdistill.models.teachers import load_teacher

CASES = [  # family, sampler, timesteps
    ("wan", "deterministic", [1.0]),  # one step (SiD, VSD, DMD2 1-step)
    ("wan", "renoise", flow_match_grid(4, 3.0, 0.5)),  # DMD2 4-step on the stock scheduler's stretched grid
    ("wan", "deterministic", [1.0, 0.75]),  # progressive 2-step: the process grid
    ("wan22", "renoise", [1.0]),  # a student of the two-expert teacher: its high-noise expert at t_init
    ("wan22", "renoise", flow_match_grid(2, 5.0, 0.5)),  # its high-noise expert for both steps
    ("wan", "signal", [0.0]),  # BOOT: the condition embedder's timestep folded away (nets.time_frozen_copy)
]


@pytest.mark.parametrize("family,sampler,timesteps", CASES,
                         ids=[f"{f}-{s}-{len(t)}step" for f, s, t in CASES])
def test_exported_wan_pipeline_samples_like_the_toolkit(tmp_path, tiny_pipelines, family, sampler, timesteps):
    teacher = load_teacher(tiny_pipelines[family], video_size=VIDEO)
    if family == "wan22":  # the student network is the teacher's expert at t_init (distillers.common.make_student)
        teacher.denoiser.model = expert_at(teacher.denoiser.model, timesteps[0], teacher.process)
    make_student_folder(tmp_path / "student", teacher, sampler, timesteps)
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines[family])
    kwargs = sampling_kwargs(out)
    # no sigmas (WanPipeline takes none); the frames and size the student was trained at, from its latents
    assert kwargs == {"num_inference_steps": len(timesteps), "guidance_scale": 1.0,
                      **dict(zip(("num_frames", "height", "width"), VIDEO))}
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["stochastic_sampling"] == (sampler == "renoise" and len(timesteps) > 1)
    pipe, got, ref = sample_both(out, tmp_path / "student", teacher, kwargs)
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None  # the student alone
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)), atol=1e-2)
    card = (out / "README.md").read_text()
    assert "export_to_video(frames" in card and ".frames[0]" in card and "pipeline_tag: text-to-video" in card


@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_two_step_expert_student_exports_as_transformer_and_transformer_2(tmp_path, tiny_pipelines, family):
    """Phased DMD's per-step experts: step 1's expert as ``transformer``, step 2's as ``transformer_2``, the
    pipeline switching between the two steps' times."""
    teacher = load_teacher(tiny_pipelines[family], video_size=VIDEO)
    proc, times = teacher.process, [1.0, 0.75]
    experts = []
    for k, t in enumerate(times):
        net = copy_for_training(expert_at(teacher.denoiser.model, t, proc)).eval().requires_grad_(False)
        with torch.no_grad():
            g = torch.Generator().manual_seed(k)
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(net)
    from stepdistill.diffusion.denoiser import Denoiser

    model = PhasedExperts.from_experts(experts, times)
    spec = StudentSpec("phased_dmd", "deterministic", times, None, proc.describe(), "flow")
    Student(Denoiser(model, proc, "flow"), spec).save(tmp_path / "student")
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines[family])
    pipe, got, ref = sample_both(out, tmp_path / "student", teacher, sampling_kwargs(out))
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    one = Student(Denoiser(experts[0], proc, "flow"), spec).sample(
        torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7)), teacher.encode(PROMPTS)[0])
    assert not torch.allclose(ref, one, atol=1e-3)  # step 2 ran the second expert
    with pytest.raises(ExportError, match="--lora: a two-expert student is exported fused"):
        export(tmp_path / "student", tmp_path / "pipe2", teacher=tiny_pipelines[family], lora=True)


def test_wan_students_off_the_stock_grid_are_refused_in_one_line(tmp_path, tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["wan"], video_size=VIDEO)
    grid = teacher.process.grid(4).tolist()  # [1, 0.9, 0.75, 0.5]: no stock scheduler's own 4-step grid
    make_student_folder(tmp_path / "s1", teacher, "renoise", grid)
    with pytest.raises(ExportError) as err:
        export(tmp_path / "s1", tmp_path / "p1", teacher=tiny_pipelines["wan"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("WanPipeline passes no sigmas to its scheduler")
    hint = json.loads(msg.split("student.timesteps=")[1])
    assert hint == flow_match_grid(4, 3.0, 0.5)  # the grid it names exports (test above)
    make_student_folder(tmp_path / "s2", teacher, "renoise", [0.9])  # one step below t = 1
    with pytest.raises(ExportError, match=r"student timesteps \[0.9\] .*student.timesteps=\[1.0\]"):
        export(tmp_path / "s2", tmp_path / "p2", teacher=tiny_pipelines["wan"])
    three = teacher.process.describe()
    spec = StudentSpec("phased_dmd", "deterministic", [1.0, 0.75, 0.5], None, three, "flow")
    experts = [copy_for_training(teacher.denoiser.model) for _ in range(3)]
    from stepdistill.diffusion.denoiser import Denoiser

    Student(Denoiser(PhasedExperts.from_experts(experts, spec.timesteps), teacher.process), spec).save(tmp_path / "s3")
    with pytest.raises(ExportError, match="the student is a PhasedExperts of stepdistill: one expert network per step"):
        export(tmp_path / "s3", tmp_path / "p3", teacher=tiny_pipelines["wan"])
    assert not any((tmp_path / p).exists() for p in ("p1", "p2", "p3"))
