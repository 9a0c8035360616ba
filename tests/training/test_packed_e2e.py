"""Flux and Qwen-Image end to end: configs/tiny-flux and configs/tiny-qwenimage train a few steps on the
tiny pipelines, export where the student has a stock pipeline form, and the exported folder, loaded
with plain diffusers, samples what the trained student samples; the methods that cannot apply are
refused in one line before anything is written."""

import pytest
import torch
from helpers.runs import ROOT, launch

from stepdistill.config import ConfigError, load_config
from stepdistill.training import validate_inputs

# (family, config, overrides); phased_dmd with one shared network, the form that exports
CASES = [("flux", "dmd2_4step", [])]
SLOW = [("flux", "sid_1step", []), ("flux", "lcm_4step", []), ("flux", "progressive_2step", []),
        ("flux", "phased_dmd_2step", ["method_args.experts=false"]), ("flux", "vsd_1step", []),
        ("qwenimage", "dmd2_4step", []), ("qwenimage", "sid_1step", [])]


def _sample_both(run, teacher_path):
    """(the exported pipeline's latents, the toolkit's Student.sample) for the same seed and prompts."""
    from diffusers import DiffusionPipeline

    from stepdistill.export import sampling_kwargs
    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher

    kwargs = sampling_kwargs(run / "pipeline")
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")  # plain diffusers from here
    prompts = ["a red cat", "two dogs"]
    torch.manual_seed(5)  # their pipelines re-noise (FlowMatchLCMScheduler) from the global generator
    got = pipe(prompt=prompts, output_type="latent", generator=torch.Generator().manual_seed(7), **kwargs).images
    got = pipe._unpack_latents(got, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)
    teacher = load_teacher(teacher_path, sample_size=8)
    student = Student.load_run(run)
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    ref = student.sample(noise, teacher.encode(prompts)[0], generator=torch.default_generator)
    return got.reshape(ref.shape), ref, student, teacher


@pytest.mark.parametrize("family,config,extra", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
                         ids=[f"{f}-{c}" for f, c, _ in CASES + SLOW])
def test_packed_family_trains_and_exports(tmp_path, tiny_pipelines, family, config, extra):
    run = tmp_path / "run"
    r = launch(f"configs/tiny-{family}/{config}.yaml", [f"teacher.path={tiny_pipelines[family]}",
                                                      f"train.output_dir={run}", "train.export=true", *extra],
               python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "checkpoint-4" / "manifest.json").is_file()
    assert (run / "samples" / "step_0000004.png").is_file()
    got, ref, student, teacher = _sample_both(run, tiny_pipelines[family])
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5)
    steps = int(config.split("_")[-1][0])
    assert len(student.spec.timesteps) == steps and student.spec.process["image_seq_len"] == 16
    # FLUX.1-dev's guidance input: the student was distilled, samples and exports with the teacher's 3.5
    assert student.spec.guidance_scale == (3.5 if family == "flux" else None)
    trained, original = student.model.state_dict(), teacher.denoiser.model.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original)  # training moved the student


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


def test_guided_on_qwenimage_names_the_missing_guidance_input(tmp_path, tiny_pipelines):
    """Guided distillation rebuilds the network with a guidance-scale input, which no Qwen-Image (or Flux)
    class has in stepdistill.models.nets: refused in one line after the teacher loads, before training."""
    out = tmp_path / "g"
    r = launch("configs/tiny-sd3/guided_2step.yaml", [f"teacher.path={tiny_pipelines['qwenimage']}",
                                                    "teacher.sample_size=8", f"train.output_dir={out}"], python=True)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "method guided: QwenImageTransformer2DModel has no guidance-scale input" in r.stderr.strip().splitlines()[-1]
    assert not (out / "checkpoints").exists()


def test_teacher_options_of_packed_families_are_checked(tiny_pipelines, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="teacher.sample_size: must be >= 2, got 0"):
        _validate(tiny_pipelines, "flux", "dmd2_4step", "teacher.sample_size=0")
