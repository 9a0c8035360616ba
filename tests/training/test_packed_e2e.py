"""Flux and Qwen-Image: the options that cannot apply are refused in one line before anything is written
(each config of configs/tiny-flux and configs/tiny-qwenimage trains and exports in
tests/training/test_matrix.py, the family x method matrix)."""

import pytest
from helpers.runs import ROOT, launch

from stepdistill.config import ConfigError, load_config
from stepdistill.training import validate_inputs


def _validate(tiny_pipelines, family, config, *overrides):
    cfg = load_config(f"configs/tiny-{family}/{config}.yaml", [f"teacher.path={tiny_pipelines[family]}", *overrides])
    return validate_inputs(cfg)


def test_cfg_options_on_a_guidance_embedded_teacher_are_refused_in_one_line(tmp_path, tiny_pipelines, monkeypatch):
    from stepdistill.testing.tiny_pipelines import make_tiny_flux

    monkeypatch.chdir(ROOT)
    refused = {("dmd2_4step", "method_args.guidance_scale=4.5"): "guidance_scale=4.5",
               ("dmd2_4step", "method_args.fake_guidance_scale=2.0"): "fake_guidance_scale=2.0",
               ("sid_1step", "method_args.guidance_mode=lsg"): "guidance_mode=lsg",
               ("vsd_1step", "method_args.guidance_range=[2.0, 6.0]"): r"guidance_range=\[2.0, 6.0\]",
               ("lcm_4step", "method_args.w_max=8.0"): "w_max=8.0",
               ("progressive_2step", "method_args.guidance_scale=3.0"): "guidance_scale=3.0",
               ("phased_dmd_2step", "method_args.guidance_scale=1.75"): "guidance_scale=1.75"}
    for (config, override), option in refused.items():
        with pytest.raises(ConfigError, match=rf"^method_args.{option}: classifier-free guidance on "
                                              r"FluxTransformer2DModel, whose guidance scale is a network input"):
            _validate(tiny_pipelines, "flux", config, override)
    for config in ("dmd2_4step", "sid_1step", "vsd_1step", "lcm_4step", "progressive_2step", "phased_dmd_2step"):
        _validate(tiny_pipelines, "flux", config)  # the shipped configs take none
    # guided distillation distils CFG into a guidance input: nothing to distil on a guidance-embedded teacher
    with pytest.raises(ConfigError, match="^method_args.w_max=8.0: classifier-free guidance on FluxTransformer2DModel"):
        _validate(tiny_pipelines, "flux", "dmd2_4step", "method=guided", "method_args={}")
    # FLUX.1-schnell's layout has no guidance input: CFG is a method option there, as for other families
    schnell = make_tiny_flux(tmp_path / "schnell", guidance_embeds=False)
    cfg = load_config("configs/tiny-flux/dmd2_4step.yaml", [f"teacher.path={schnell}", "teacher.guidance=null",
                                                            "method_args.guidance_scale=4.5"])
    validate_inputs(cfg)
    # the command: exit status 2, one line naming the option, nothing written
    out = tmp_path / "run"
    r = launch("configs/tiny-flux/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['flux']}", f"train.output_dir={out}",
                                                    "method_args.guidance_scale=4.5"], python=True)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].count("method_args.guidance_scale=4.5: classifier-free guidance") == 1
    assert not (out / "checkpoints").exists()


def test_teacher_options_of_packed_families_are_checked(tiny_pipelines, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="teacher.sample_size: must be >= 2, got 0"):
        _validate(tiny_pipelines, "flux", "dmd2_4step", "teacher.sample_size=0")
