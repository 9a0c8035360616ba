"""Each family's exported pipeline, sampled in a process that never imports stepdistill (plain diffusers:
tests/helpers/stock_sample.py), equals the toolkit's ``Student.sample`` for the same seed (1e-5); a LoRA
student's adapters, loaded into the teacher's own pipeline with ``load_lora_weights``, sample as the
fused export and as the student, for every family whose pipeline loads LoRA files."""

from pathlib import Path

import pytest
import torch
from helpers.stock import PACKED, as_latents, family_teacher, stock_call, stock_samples, toolkit_sample
from test_export import make_student_folder

from stepdistill.export import export
from stepdistill.export.schedulers import flow_match_grid
from stepdistill.models.nets import expert_at
from stepdistill.models.student import Student

ROOT = Path(__file__).resolve().parents[2]
# family: (sampler, timesteps); an int: the teacher's own n-step grid
STUDENTS = {"sd": ("renoise", [999, 749, 499, 249]), "sdxl": ("renoise", [999, 499]), "dit": ("renoise", [999, 499]),
            "pixart": ("deterministic", [999, 499]), "sd3": ("renoise", 4), "sd35": ("deterministic", 2),
            "flux": ("renoise", 4), "qwenimage": ("deterministic", 2), "sana": ("renoise", 4),
            "wan": ("renoise", flow_match_grid(4, 3.0, 0.5)), "wan22": ("deterministic", [1.0]),
            "hunyuanvideo": ("renoise", 4)}


def test_every_familys_export_samples_like_the_toolkit_without_stepdistill(tmp_path, tiny_pipelines):
    jobs, refs, teachers = [], {}, {}
    for family, (sampler, timesteps) in STUDENTS.items():
        teacher = teachers[family] = family_teacher(tiny_pipelines, family)
        if isinstance(timesteps, int):
            timesteps = teacher.process.grid(timesteps).tolist()
        if family == "wan22":  # a student of the two-expert teacher is its expert at t_init
            teacher.denoiser.model = expert_at(teacher.denoiser.model, timesteps[0], teacher.process)
        make_student_folder(tmp_path / family / "student", teacher, sampler, timesteps)
        out = export(tmp_path / family / "student", tmp_path / family / "pipe", teacher=tiny_pipelines[family])
        jobs.append({"folder": str(out), "call": stock_call(out, teacher, family)})
        refs[family] = toolkit_sample(Student.load(tmp_path / family / "student"), teacher, family)
    got = stock_samples(jobs, tmp_path / "stock")
    for (family, teacher), job, sample in zip(teachers.items(), jobs, got):
        sample = as_latents(sample, teacher, family, job["call"])
        torch.testing.assert_close(sample, refs[family], rtol=1e-5, atol=1e-5, msg=family)
    # two students of the same latent shape sample differently (the comparison can fail)
    assert refs["sd"].shape == refs["sdxl"].shape and not torch.allclose(refs["sd"], refs["sdxl"], atol=1e-3)


LORA = {"sd": "tiny-sd", "sdxl": "tiny-sd", "sd3": "tiny-sd3", "flux": "tiny-flux", "qwenimage": "tiny-sd3",
        "sana": "tiny-sana", "wan": "tiny-wan", "hunyuanvideo": "tiny-hunyuanvideo"}
FAMILY_ARGS = {"flux": ["teacher.sample_size=8"], "qwenimage": ["teacher.sample_size=8"],
               "wan": ["teacher.video_size=[5, 16, 16]"], "hunyuanvideo": ["teacher.video_size=[5, 16, 16]"]}


@pytest.mark.slow  # 15-25 s each; tests/export/test_export.py loads an SD LoRA run in the default run
@pytest.mark.parametrize("family", list(LORA))
def test_lora_student_loads_into_the_teachers_pipeline(tmp_path, tiny_pipelines, monkeypatch, family):
    """A LoRA run (progressive, 2 steps, 2 iterations): ``export --lora``'s adapters loaded into the
    teacher's pipeline with ``load_lora_weights`` and run by the exported scheduler sample as the fused
    export does and as the toolkit's student, and not as the teacher with that scheduler."""
    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / LORA[family] / "progressive_2step.yaml",
                      [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={run}", "student.lora_rank=4",
                       "train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=2",
                       "train.report_to=none", "train.progress=false", "method_args.lr=1e-2",
                       *FAMILY_ARGS.get(family, [])])
    Trainer(cfg).fit()
    out = export(run, tmp_path / "pipe", lora=True)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    teacher = family_teacher(tiny_pipelines, family)
    call = stock_call(out, teacher, family)
    teacher_dir = str(tiny_pipelines[family])
    fused, lora, plain = stock_samples([{"folder": str(out), "call": call},
                                        {"folder": teacher_dir, "call": call, "lora": str(out / "lora"),
                                         "scheduler_from": str(out)},
                                        {"folder": teacher_dir, "call": call, "scheduler_from": str(out)}],
                                       tmp_path / "stock")
    torch.testing.assert_close(lora, fused, rtol=1e-5, atol=1e-5)
    ref = toolkit_sample(Student.load(run / "student"), teacher, family)
    torch.testing.assert_close(as_latents(lora, teacher, family, call), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, fused, atol=1e-4)  # the adapters changed the sampler's output
    assert family not in PACKED or call["height"] == 16
