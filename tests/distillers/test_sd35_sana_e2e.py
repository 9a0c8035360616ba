"""Sana's LCM: its w-conditioned student has no stock pipeline form, and is refused by train.export in one
line before training; without the w input it exports. (Every config of configs/tiny-sd35 and
configs/tiny-sana trains and exports in tests/training/test_matrix.py, the family x method matrix.)"""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _train(run: Path, tiny_pipelines, family: str, config: str, *extra: str):
    from stepdistill.config import load_config
    from stepdistill.distill import train

    cfg = load_config(ROOT / "configs" / f"tiny-{family}" / f"{config}.yaml",
                      [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={run}", "train.report_to=none",
                       "train.progress=false", f"data.prompts={ROOT / 'configs' / 'prompts' / 'example.txt'}", *extra])
    train(cfg)
    return cfg


def _exported_samples_like_the_student(run: Path, tiny_pipelines, family: str, steps=None):
    """The run's pipeline/ (stock diffusers from here) against the toolkit's sampler, same seed."""
    from diffusers import DiffusionPipeline

    from stepdistill.export import sampling_kwargs
    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher

    teacher = load_teacher(tiny_pipelines[family])
    student = Student.load_run(run)
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    assert type(pipe).__name__ == type(teacher.pipeline).__name__
    for name, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, student.model.state_dict()[name], rtol=0, atol=0)
    kwargs = sampling_kwargs(run / "pipeline")
    assert kwargs["num_inference_steps"] == len(student.spec.timesteps) == (steps or len(student.spec.timesteps))
    prompts = ["a red cube", "two cats"]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    extra = {"use_resolution_binning": False} if family == "sana" else {}
    torch.manual_seed(123)  # SD3's pipeline re-noises from the global generator, Sana's from its own
    got = pipe(prompt=prompts, output_type="latent", height=size, width=size, generator=torch.Generator().manual_seed(7),
               **kwargs, **extra).images
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, *teacher.sample_shape, generator=g)
    torch.manual_seed(123)
    ref = student.sample(noise, teacher.encode(prompts)[0], generator=g if family == "sana" else torch.default_generator)
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)
    changed = any(not torch.equal(v, teacher.denoiser.model.state_dict()[k]) for k, v in student.model.state_dict().items())
    assert changed  # the run trained the student
    return student


@pytest.mark.slow  # about 15 s
def test_sana_lcm_trains_and_its_w_conditioned_student_is_refused_by_export(tmp_path, tiny_pipelines):
    """configs/tiny-sana/lcm_4step.yaml: with train.export, refused in one line before anything is written;
    without, it trains a guidance-conditioned Sana student that samples at any step count; with
    method_args.w_embedding=false the student has no w input and exports (FlowMatchLCMScheduler)."""
    from stepdistill.config import ConfigError
    from stepdistill.models.student import Student

    with pytest.raises(ConfigError) as refused:
        _train(tmp_path / "refused", tiny_pipelines, "sana", "lcm_4step", "train.export=true")
    assert str(refused.value) == ("train.export: the student is a GuidedSanaTransformer2DModel of stepdistill: a "
                                  "guidance-conditioned network that no stock diffusers pipeline feeds the guidance "
                                  "scale. Sample it with stepdistill.models.student.Student")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    _train(tmp_path / "lcm", tiny_pipelines, "sana", "lcm_4step")
    student = Student.load_run(tmp_path / "lcm")
    assert type(student.model).__name__ == "GuidedSanaTransformer2DModel" and student.spec.consistency is not None
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from stepdistill.models.teachers import load_teacher

    cond = load_teacher(tiny_pipelines["sana"]).encode(["a cat", "a dog"])[0]
    for n in (1, 4):
        assert torch.isfinite(student.at_steps(n).sample(noise, cond, generator=torch.Generator().manual_seed(1))).all()
    run = tmp_path / "plain"
    _train(run, tiny_pipelines, "sana", "lcm_4step", "train.export=true", "method_args.w_embedding=false")
    assert json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchLCMScheduler"
    _exported_samples_like_the_student(run, tiny_pipelines, "sana", steps=4)
