"""Each method's configs/tiny-wan config trains a few iterations on the tiny Wan pipelines (Wan2.1's one
network, and Wan2.2's two experts), writes a frame grid and a clip per validation, and exports into
WanPipeline where a stock scheduler can run it, sampling exactly as the toolkit does; where it cannot,
train.export refuses before training, in one line. Video teachers refuse still-image data in one line."""

import json
from pathlib import Path

import pytest
import torch
from helpers.video import VIDEO, sample_both

from stepdistill.config import ConfigError, load_config
from stepdistill.errors import DataError
from stepdistill.export.schedulers import flow_match_grid

ROOT = Path(__file__).resolve().parents[2]
# the tiny Wan2.2 teacher's shift is 5: FlowMatchEulerDiscreteScheduler's own 4-step grid for it, ending
# where the process grid ends (5 * 0.25 / (1 + 4 * 0.25) = 0.625), the grid its export refusal names
WAN22_4STEP = "student.timesteps=" + str(flow_match_grid(4, 5.0, 0.625))
# family, config, exported, overrides; the first is the default run's (about 6 s), the others are slow
CASES = [("wan", "dmd2_4step", True, [])]
SLOW = [("wan", "sid_1step", True, []), ("wan", "lcm_4step", False, []), ("wan", "progressive_2step", True, []),
        ("wan", "phased_dmd_2step", True, []), ("wan", "vsd_1step", True, []), ("wan22", "dmd2_4step", True, [WAN22_4STEP]),
        ("wan22", "sid_1step", True, []), ("wan22", "phased_dmd_2step", True, []),
        ("wan22", "progressive_2step", True, [])]


def _config(tiny_pipelines, family, name, run, *extra):
    return load_config(ROOT / "configs" / "tiny-wan" / f"{name}.yaml",
                       [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={run}", "train.report_to=none",
                        "train.progress=false", "train.max_steps=2", "train.checkpoint_every=2",
                        "train.validate_every=2", *extra])


@pytest.mark.parametrize("family,name,exported,extra", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
                         ids=[f"{f}-{n}" for f, n, _, _ in CASES + SLOW])
def test_wan_method_trains_and_exports(tmp_path, tiny_pipelines, monkeypatch, family, name, exported, extra):
    from stepdistill.distill import train
    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher

    monkeypatch.chdir(ROOT)  # the configs' prompt file
    run = tmp_path / "run"
    if not exported:  # refused before anything is trained or written, naming the reason
        with pytest.raises(ConfigError, match=r"^train.export: WanPipeline passes no sigmas to its scheduler"):
            train(_config(tiny_pipelines, family, name, run, "train.export=true", *extra))
        assert not (run / "checkpoints").exists()
    train(_config(tiny_pipelines, family, name, run, f"train.export={str(exported).lower()}", *extra))
    hist = json.loads((run / "history.json").read_text())
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(v)) for h in hist for k, v in h.items() if k.endswith("loss"))
    assert (run / "samples" / "step_0000002.png").is_file() and (run / "samples" / "step_0000002.gif").is_file()
    student = Student.load(run / "student")
    teacher = load_teacher(tiny_pipelines[family], video_size=VIDEO)
    assert student.spec.timesteps[0] == 1.0 and student.process.shift == teacher.process.shift
    if name.startswith("phased"):  # one expert per step, each from the teacher's network at its time
        assert [type(e).__name__ for e in student.model.experts] == ["WanTransformer3DModel"] * 2
    else:
        assert type(student.model).__name__ == "WanTransformer3DModel"
    if not exported:
        assert not (run / "pipeline").exists()
        return
    kwargs = json.loads((run / "pipeline" / "stepdistill_sampling.json").read_text())["call_kwargs"]
    assert [kwargs[k] for k in ("num_frames", "height", "width")] == list(VIDEO)  # the run's video size
    pipe, got, ref = sample_both(run / "pipeline", run / "student", teacher, kwargs)
    assert (pipe.transformer_2 is not None) == name.startswith("phased")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_two_expert_teachers_students_and_fake_score(tmp_path, tiny_pipelines, monkeypatch):
    """Of Wan2.2's two experts, a one-network student starts from the expert of its t_init, Phased DMD's
    expert k from the expert of step k's time, and a fake score from both."""
    from stepdistill.training import Trainer

    monkeypatch.chdir(ROOT)
    teacher = None
    for name in ("sid_1step", "phased_dmd_2step"):
        trainer = Trainer(_config(tiny_pipelines, "wan22", name, tmp_path / name))
        teacher = trainer.teacher.denoiser.model
        d = trainer.distiller
        student = d.student.model
        nets = list(student.experts) if name.startswith("phased") else [student]
        sources = [teacher.experts[0], teacher.experts[1]] if name.startswith("phased") else [teacher.experts[0]]
        for net, src in zip(nets, sources):
            assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), src.state_dict().values()))
        fake = d.fake.model
        assert type(fake).__name__ == "NoiseLevelExperts"
        for f, src in zip(fake.experts, teacher.experts):
            assert all(torch.equal(a, b) for a, b in zip(f.state_dict().values(), src.state_dict().values()))
        trainer.close()
    assert not all(torch.equal(a, b) for a, b in zip(teacher.experts[0].state_dict().values(),
                                                     teacher.experts[1].state_dict().values()))


def test_still_images_for_a_video_teacher_are_refused_in_one_line(tmp_path, tiny_pipelines, monkeypatch):
    from stepdistill.data.cache import build_cache
    from stepdistill.testing.data_fixtures import write_image_folder
    from stepdistill.training import Trainer

    monkeypatch.chdir(ROOT)
    images = write_image_folder(tmp_path / "images", 4)
    run = tmp_path / "run"
    with pytest.raises(DataError) as err:
        Trainer(_config(tiny_pipelines, "wan", "dmd2_4step", run, f"data.images={images}"))
    assert str(err.value) == (f"data.images: teacher {tiny_pipelines['wan']} makes videos (its network is a "
                              f"WanTransformer3DModel); real data here are still images, which cannot train it: "
                              f"distill it from data.prompts alone")
    assert not run.exists()  # refused before the run folder is claimed
    with pytest.raises(DataError, match=r"^data.images: .* makes videos \(latents 4 x 2 x 4 x 4\); real data here are "
                                        r"still images"):
        build_cache(_config(tiny_pipelines, "wan", "dmd2_4step", run, f"data.images={images}"), tmp_path / "cache")


REFUSED = [  # (config of tiny-sd3 or tiny-wan, overrides, the one line)
    ("tiny-sd3/guided_2step", [], "method guided: WanTransformer3DModel has no guidance-scale input; supported: "),
    ("tiny-wan/lcm_4step", ["method_args.w_embedding=true"],
     "method_args.w_embedding: WanTransformer3DModel has no guidance-scale input (supported: "),
    ("tiny-wan/lcm_4step", ["method_args.x_source=data"], "method_args.x_source=data: teacher "),
    ("tiny-wan/progressive_2step", ["method_args.x_source=data"], "method_args.x_source=data: teacher "),
    ("tiny-wan/dmd2_4step", ["method_args.gan=true"], "method_args.gan=true: the GAN head tells real data from the "),
]


@pytest.mark.parametrize("config,extra,line", REFUSED, ids=[f"{c.split('/')[1]}-{e[0].split('.')[-1] if e else ''}"
                                                            for c, e, _ in REFUSED])
@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_methods_that_cannot_apply_to_wan_are_refused_in_one_line(tmp_path, tiny_pipelines, monkeypatch, family,
                                                                   config, extra, line):
    from stepdistill.training import Trainer

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / f"{config}.yaml",
                      [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={tmp_path / 'run'}",
                       "teacher.video_size=[5, 16, 16]", "train.report_to=none", "train.progress=false", *extra])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
