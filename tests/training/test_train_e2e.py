"""End to end: `accelerate launch train/distill.py` on the tiny pipelines, 2 processes, resume."""

import json
from pathlib import Path

import pytest
import torch
from helpers.runs import launch, state_files
from safetensors.torch import load_file

CASES = [("sd", "progressive_2step")]
SLOW = [("sd", "guided_2step"), ("sd", "boot_1step"), ("dit", "progressive_2step"), ("sd3", "boot_1step"), ("dit", "boot_1step"),
        ("sd3", "progressive_2step"), ("dit", "guided_2step"), ("sd3", "guided_2step")]


@pytest.mark.parametrize("family,config", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
                         ids=[f"{f}-{c}" for f, c in CASES + SLOW])
def test_accelerate_launch_writes_checkpoint_grid_student(tmp_path, tiny_pipelines, family, config):
    from PIL import Image

    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher

    out = tmp_path / "run"
    r = launch(f"configs/tiny-{family}/{config}.yaml", [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = out / "checkpoints" / "checkpoint-4"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["files"]
    assert (ckpt / "student" / "config.json").is_file()  # the save hook's diffusers folder
    grid = Image.open(out / "samples" / "step_0000004.png")
    assert grid.size[0] >= 32 and grid.size[1] >= 32
    assert (out / "losses.png").is_file() and (out / "config.yaml").is_file()
    student = Student.load(out / "student")
    teacher = load_teacher(tiny_pipelines[family])
    assert student.spec.method == config.split("_")[0]
    noise = torch.randn(2, *teacher.sample_shape)
    cond = teacher.encode([1, 2] if teacher.null_label is not None else ["a cat", "a dog"])[0]
    x = student.sample(noise, cond)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    # training moved the student away from the teacher's weights
    t_sd = teacher.denoiser.model.state_dict()
    s_sd = student.model.state_dict()
    assert any(not torch.equal(s_sd[k], t_sd[k]) for k in t_sd if k in s_sd)


def test_guided_on_a_model_without_guidance_input_fails_early(tmp_path, tiny_pipelines):
    r = launch("configs/tiny-sd/guided_2step.yaml", [f"teacher.path={tiny_pipelines['pixel_cls']}",
                                                   f"train.output_dir={tmp_path}/g", "data.prompts=null"], python=True)
    assert r.returncode == 2
    assert "UNet2DModel has no guidance-scale input" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "g" / "checkpoints").exists()


# two processes (DDP and FSDP against one process, ranks identical, sharded checkpoints): test_parallel.py


# progressive's exact resume is also checked by test_robustness's kill -9 test in the default run
RESUME_CASES = [pytest.param("progressive_2step", [], marks=pytest.mark.slow), pytest.param("dmd2_4step", [], marks=pytest.mark.slow),
                pytest.param("sid_1step", ["method_args.fake_lora_rank=4"], marks=pytest.mark.slow),
                pytest.param("lcm_4step", ["method_args.target_decay=0.5"], marks=pytest.mark.slow),  # the EMA target goes with the checkpoint
                pytest.param("disback_1step", [], marks=pytest.mark.slow)]  # and the degradation path's snapshots


@pytest.mark.parametrize("config,extra", RESUME_CASES)
def test_resume_after_interruption_is_exact(tmp_path, tiny_pipelines, config, extra):
    common = [f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=6", "train.checkpoint_every=100",
              "train.validate_every=100", "train.ema_decay=0.9", "train.lr_schedule=cosine", "method_args.lr=1e-3", *extra]
    full, split = tmp_path / "full", tmp_path / "split"
    cfg = f"configs/tiny-sd/{config}.yaml"
    r = launch(cfg, common + [f"train.output_dir={full}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = common + [f"train.output_dir={split}"]
    r = launch(cfg, ["--stop-after", "4", *cmd], python=True)
    assert r.returncode == 3, r.stderr[-3000:]
    assert (split / "checkpoints" / "checkpoint-4" / "manifest.json").is_file() and not (split / "student").exists()
    r = launch(cfg, cmd, python=True)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    for folder in ("student", "student_ema"):
        a = load_file(full / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(split / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    # the whole training state at the end: student, fake score, optimisers, schedulers, EMA
    sa = state_files(full / "checkpoints" / "checkpoint-6")
    sb = state_files(split / "checkpoints" / "checkpoint-6")
    assert sa.keys() == sb.keys() and len(sa) > 10
    has_fake = not config.startswith(("progressive", "lcm"))
    assert any(k.startswith("fake/") for k in sa) == has_fake  # the fake score is compared too
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    teacher = load_file(Path(tiny_pipelines["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[k], a[k]) for k in teacher)


@pytest.mark.slow  # about 19 s; tests/test_export.py checks the fused LoRA export by default
def test_lora_student_is_saved_fused(tmp_path, tiny_pipelines):
    out = tmp_path / "lora"
    r = launch("configs/tiny-sd/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}",
                                                 "student.lora_rank=4", "train.max_steps=2"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    student = load_file(out / "student" / "diffusion_pytorch_model.safetensors")
    teacher = load_file(Path(tiny_pipelines["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert student.keys() == teacher.keys()  # a plain UNet: adapters merged, no lora_A/lora_B keys
    changed = [k for k in teacher if not torch.equal(student[k], teacher[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed), changed
