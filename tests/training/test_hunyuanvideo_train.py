"""HunyuanVideo: the guidance-distilled teacher refuses every CFG option in one line before anything is
loaded or written (its transformer's config says guidance_embeds), a teacher built without the input takes
them, and still-image data are refused as for every video teacher. (Each configs/tiny-hunyuanvideo config
trains and exports in tests/training/test_matrix.py, the family x method matrix.)"""

from pathlib import Path

import pytest

from stepdistill.config import ConfigError, load_config
from stepdistill.errors import DataError
from stepdistill.training import validate_inputs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("dmd2_4step", "sid_1step", "vsd_1step", "lcm_4step", "progressive_2step", "phased_dmd_2step")


def _config(path, config, *overrides):
    return load_config(ROOT / "configs" / "tiny-hunyuanvideo" / f"{config}.yaml", [f"teacher.path={path}", *overrides])


def test_cfg_options_on_the_guidance_distilled_teacher_are_refused_in_one_line(tmp_path, tiny_pipelines, monkeypatch):
    from stepdistill.testing.tiny_pipelines import make_tiny_hunyuanvideo

    monkeypatch.chdir(ROOT)
    teacher = tiny_pipelines["hunyuanvideo"]
    refused = {("dmd2_4step", "method_args.guidance_scale=4.5"): "guidance_scale=4.5",
               ("sid_1step", "method_args.guidance_mode=lsg"): "guidance_mode=lsg",
               ("lcm_4step", "method_args.w_max=8.0"): "w_max=8.0",
               ("progressive_2step", "method_args.guidance_scale=3.0"): "guidance_scale=3.0"}
    for (config, override), option in refused.items():
        with pytest.raises(ConfigError, match=rf"^method_args.{option}: classifier-free guidance on "
                                              r"HunyuanVideoTransformer3DModel, whose guidance scale is a network "
                                              r"input[^\n]*$"):
            validate_inputs(_config(teacher, config, override))
    for config in CONFIGS:
        validate_inputs(_config(teacher, config))  # the shipped configs take none
    # a HunyuanVideo transformer without the input: CFG is a method option there, and teacher.guidance is refused
    plain = make_tiny_hunyuanvideo(tmp_path / "plain", guidance_embeds=False)
    validate_inputs(_config(plain, "dmd2_4step", "teacher.guidance=null", "method_args.guidance_scale=4.5"))


def test_still_images_for_the_video_teacher_are_refused_in_one_line(tmp_path, tiny_pipelines, monkeypatch):
    from stepdistill.testing.data_fixtures import write_image_folder
    from stepdistill.training import Trainer

    monkeypatch.chdir(ROOT)
    images = write_image_folder(tmp_path / "images", 4)
    run = tmp_path / "run"
    with pytest.raises(DataError) as err:
        Trainer(_config(tiny_pipelines["hunyuanvideo"], "dmd2_4step", f"data.images={images}",
                        f"train.output_dir={run}"))
    assert str(err.value) == (f"data.images: teacher {tiny_pipelines['hunyuanvideo']} makes videos (its network is a "
                              f"HunyuanVideoTransformer3DModel); real data here are still images, which cannot train "
                              f"it: distill it from data.prompts alone")
    assert not run.exists()
