"""Wan2.2's two experts as the students' and the fake score's starting points; the methods and options
that cannot apply to Wan refused in one line; video teachers refuse still-image data in one line. (Each
configs/tiny-wan config trains on Wan2.1 and Wan2.2 and exports into WanPipeline where a stock
scheduler can run it in tests/training/test_matrix.py, the family x method matrix.)"""

from pathlib import Path

import pytest
import torch

from stepdistill.config import ConfigError, load_config
from stepdistill.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
def _config(tiny_pipelines, family, name, run, *extra):
    return load_config(ROOT / "configs" / "tiny-wan" / f"{name}.yaml",
                       [f"teacher.path={tiny_pipelines[family]}", f"train.output_dir={run}", "train.report_to=none",
                        "train.progress=false", "train.max_steps=2", "train.checkpoint_every=2",
                        "train.validate_every=2", *extra])


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
