import pytest
import torch

from stepdistill.models.teachers import TeacherLoadError, load_teacher


@pytest.mark.parametrize("family,shape,kind,pred", [
    ("sd", (4, 8, 8), "vp", "epsilon"),
    ("sd_v", (4, 8, 8), "vp", "v_prediction"),
    ("sdxl", (4, 8, 8), "vp", "epsilon"),
    ("dit", (4, 8, 8), "vp", "epsilon"),
    ("pixart", (4, 8, 8), "vp", "epsilon"),
    ("sd3", (4, 8, 8), "flow", "flow"),
    ("sd35", (4, 8, 8), "flow", "flow"),
    ("sana", (4, 8, 8), "flow", "flow"),  # DPMSolverMultistepScheduler on flow sigmas
    ("pixel", (3, 16, 16), "vp", "epsilon"),
])
def test_tiny_pipeline_loads_frozen(tiny_pipelines, family, shape, kind, pred):
    teacher = load_teacher(tiny_pipelines[family])
    assert teacher.sample_shape == shape
    assert teacher.process.kind == kind and teacher.process.prediction_type == pred
    assert all(not p.requires_grad for p in teacher.denoiser.model.parameters())
    if teacher.vae is not None:
        assert all(not p.requires_grad for p in teacher.vae.parameters())
        size = 32 if family == "sana" else 16  # Sana's DC-AE downsamples by 4
        img = torch.rand(2, 3, size, size) * 2 - 1
        z = teacher.encode_images(img, generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, *shape)
        assert teacher.decode(z).shape == img.shape


def test_lower_precision_teacher(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sd"], dtype=torch.bfloat16)
    assert teacher.denoiser.dtype == torch.bfloat16
    cond, _ = teacher.encode(["a cat"])
    out = teacher.denoiser(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_text_encoding_matches_pipeline_and_empty_prompt_is_uncond(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sd"])
    cond, uncond = teacher.encode(["a red cat", "a dog"])
    direct = teacher.pipeline.encode_prompt(["a red cat", "a dog"], "cpu", 1, False)[0]
    torch.testing.assert_close(cond.kwargs["encoder_hidden_states"], direct)
    empty = teacher.pipeline.encode_prompt([""], "cpu", 1, False)[0]
    torch.testing.assert_close(uncond.kwargs["encoder_hidden_states"][:1], empty)


def test_missing_path_fails_naming_it(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(TeacherLoadError, match=f"teacher path '{missing}' does not exist"):
        load_teacher(missing)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(TeacherLoadError, match="has no model_index.json"):
        load_teacher(tmp_path / "junk")


def test_uncached_hub_id_offline_fails_clearly():
    with pytest.raises(TeacherLoadError, match="'nobody/not-a-model' \\(hub id"):
        load_teacher("nobody/not-a-model")


def test_pipeline_without_supported_denoiser(tmp_path):
    from diffusers import DanceDiffusionPipeline, IPNDMScheduler, UNet1DModel

    unet = UNet1DModel(block_out_channels=(8, 8, 8), in_channels=2, out_channels=2, extra_in_channels=16)
    path = tmp_path / "dance"
    DanceDiffusionPipeline(unet=unet, scheduler=IPNDMScheduler()).save_pretrained(path)
    with pytest.raises(TeacherLoadError, match="no denoiser adapter for UNet1DModel"):
        load_teacher(path)


def test_loss_plot_marks_where_rounds_stages_and_phases_begin(tmp_path):
    from stepdistill.training.figures import plot_losses, segment_starts

    history = [{"step": s, "student/loss": 1.0 / s, "student/round": float(r)} for s, r in
               [(10, 0), (20, 0), (30, 1), (40, 1), (50, 2)]]
    assert segment_starts(history) == [(30, "round 1"), (50, "round 2")]
    phased = [{"step": s, "fake/loss": 1.0, "fake/phase": float(p), "expert0/phase": float(p)} for s, p in
              [(5, 0), (10, 1), (15, 1)]]
    assert segment_starts(phased) == [(10, "phase 1")]  # one trainable's record is enough
    assert plot_losses(history, tmp_path / "l.png").stat().st_size > 1000
