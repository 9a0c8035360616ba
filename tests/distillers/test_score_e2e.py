"""The score-based methods through `accelerate launch train/distill.py` on the tiny pipelines."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import launch

CASES = [("sd", "dmd2_4step", [])]
SLOW = [("sd", "sid_1step", ["method_args.fake_lora_rank=4"]), ("sd", "phased_dmd_2step", ["method_args.fake_lora_rank=4"]),
        ("sd", "vsd_1step", []), ("dit", "dmd2_4step", ["method_args.fake_lora_rank=0"]), ("sd3", "sid_1step", ["method_args.fake_lora_rank=4"]),
        ("sd", "dmd_1step", ["method_args.fake_lora_rank=4"]), ("dit", "sid_1step", []), ("sd3", "dmd2_4step", [])] + [
    (f, m, []) for f in ("dit", "sd3") for m in ("vsd_1step", "dmd_1step", "phased_dmd_2step")]


def _check_run(out: Path, steps: int = 4):
    from stepdistill.models.student import Student

    manifest = json.loads((out / "checkpoints" / f"checkpoint-{steps}" / "manifest.json").read_text())
    assert any(f.startswith("model_1") or "optimizer_1" in f for f in manifest["files"])  # the fake score's state too
    assert (out / "samples" / f"step_{steps:07d}.png").is_file()
    hist = json.loads((out / "history.json").read_text())
    generator_losses = {k for h in hist for k in h if k.endswith("/loss") and not k.startswith("fake")}
    assert any("fake/loss" in h for h in hist) and generator_losses, hist  # student/loss, or expert<k>/loss
    return Student.load(out / "student")


@pytest.mark.parametrize("family,config,extra", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
                         ids=[f"{f}-{c}{'-' + e[0].split('=')[0].split('.')[-1] + e[0].split('=')[1] if e else ''}"
                              for f, c, e in CASES + SLOW])
def test_score_method_runs(tmp_path, tiny_pipelines, family, config, extra):
    out = tmp_path / "run"
    r = launch(f"configs/tiny-{family}/{config}.yaml", [f"teacher.path={tiny_pipelines[family]}",
                                                      f"train.output_dir={out}", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    student = _check_run(out)
    assert len(student.spec.timesteps) == int(config.split("_")[-1][0])
    assert student.spec.sampler == ("deterministic" if config.startswith("phased") else "renoise")


@pytest.mark.slow  # about 24 s
def test_phased_dmd_trains_one_expert_per_phase_and_freezes_the_earlier(tmp_path, tiny_pipelines):
    """4 iterations, 2 phases: expert 0 trains in iterations 0-1 and is frozen after; expert 1 is the
    teacher's copy until iteration 2 and trains after."""
    import torch
    from safetensors.torch import load_file

    from stepdistill.models.teachers import load_teacher

    out = tmp_path / "run"
    r = launch("configs/tiny-sd/phased_dmd_2step.yaml", [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}",
                                                       "method_args.lr=1e-2"])
    assert r.returncode == 0, r.stderr[-3000:]
    student = _check_run(out)
    assert type(student.model).__name__ == "PhasedExperts" and len(student.model.experts) == 2
    hist = json.loads((out / "history.json").read_text())
    assert [sorted(k for k in h if k.startswith("expert") and k.endswith("/loss")) for h in hist] == \
        [["expert0/loss"], ["expert0/loss"], ["expert1/loss"], ["expert1/loss"]]
    teacher = load_teacher(tiny_pipelines["sd"]).denoiser.model.state_dict()
    ckpt = out / "checkpoints" / "checkpoint-2"
    mid = [load_file(ckpt / f"expert{k}" / "diffusion_pytorch_model.safetensors") for k in range(2)]
    final = [e.state_dict() for e in student.model.experts]

    def same(a, b):
        return all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)

    assert not same(mid[0], teacher) and same(mid[0], final[0])  # trained in phase 0, then frozen
    assert same(mid[1], teacher) and not same(final[1], teacher)  # untouched until phase 1
    # the fake score restarts from the teacher at phase 1, its optimiser state with it (optimizers:
    # expert0, expert1, fake): 2 Adam steps by the end of phase 0, 2 again by the end of phase 1, not 4
    fake_steps = [int(next(iter(torch.load(out / "checkpoints" / f"checkpoint-{k}" / "optimizer_2.bin",
                                           weights_only=True)["state"].values()))["step"]) for k in (2, 4)]
    assert fake_steps == [2, 2], fake_steps
    # sampling routes step k to expert k: a sample differs from one made with expert 0 at both steps
    t = load_teacher(tiny_pipelines["sd"])
    cond = t.encode(["a cat", "a dog"])[0]
    noise = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed = student.sample(noise, cond)
        student.model.experts[1].load_state_dict(final[0])
        one_expert = student.sample(noise, cond)
    assert not torch.allclose(routed, one_expert, atol=1e-5)


@pytest.mark.slow  # about 22 s; the GAN's paired real rows are checked by default in tests/test_sources.py
def test_dmd2_gan_reads_real_images_from_folder(tmp_path, tiny_pipelines):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing {i}")  # each real image's own caption
    (folder / "notes.md").write_text("not an image")
    out = tmp_path / "gan"
    r = launch("configs/tiny-sd/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}",
                                                 f"data.images={folder}", "method_args.gan=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(out)
    hist = json.loads((out / "history.json").read_text())
    assert any("fake/gan_disc" in h for h in hist) and any("student/gan_gen" in h for h in hist)


def test_dmd2_gan_without_images_fails_early(tmp_path, tiny_pipelines):
    r = launch("configs/tiny-sd/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path}/x",
                                                 "method_args.gan=true"], python=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: method_args.gan=true needs real images: set data.images (stepdistill/data/sources.py)"


# slow: tests/distillers/test_tsm.py starts a distillation from a TSM student in the default run
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sd3", "dit"])
def test_tsm_then_dmd2_from_its_student(tmp_path, tiny_pipelines, family):
    """MSD's path for a smaller student: teacher score matching (method tsm) trains it as a multi-step
    denoiser, then a DMD2 run starts from its student/ (student.init) and keeps its smaller network."""
    import torch
    from safetensors.torch import load_file

    from stepdistill.models.student import Student

    tsm = tmp_path / "tsm"
    r = launch(f"configs/tiny-{family}/tsm_4step.yaml", [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={tsm}"])
    assert r.returncode == 0, r.stderr[-3000:]
    small = Student.load(tsm / "student")
    assert small.spec.method == "tsm" and len(small.spec.timesteps) == 4 and small.spec.sampler == "deterministic"
    out = tmp_path / "dmd2"
    r = launch(f"configs/tiny-{family}/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={out}",
                                                        f"student.init={tsm / 'student'}", "method_args.fake_lora_rank=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    student = _check_run(out)
    public = (lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")})  # noqa: E731
    assert public(student.model.config) == public(small.model.config)  # the smaller network, not the teacher's
    start, end = load_file(tsm / "student" / "diffusion_pytorch_model.safetensors"), student.model.state_dict()
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
