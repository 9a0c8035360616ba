"""The adapter's x0 equals the prediction computed by hand from a direct model call, per family."""

import pytest
import torch

from stepdistill.diffusion.denoiser import Cond, Denoiser, find_adapter
from stepdistill.models.teachers import load_teacher

FAMILIES = ["sd", "sd_v", "sdxl", "dit", "pixart", "sd3", "pixel", "pixel_cls"]
PROMPTS = {"text": ["a red cat", "two dogs"], "labels": [3, 1]}


def _direct_x0(teacher, x, t, cond: Cond):
    """The x0 prediction computed from the scheduler's own tables and a direct forward call."""
    model, pipe = teacher.denoiser.model, teacher.pipeline
    kw = cond.kwargs
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        u = model(hidden_states=x, encoder_hidden_states=kw["encoder_hidden_states"],
                  pooled_projections=kw["pooled_projections"], timestep=t * 1000).sample
        return x - t.reshape(-1, 1, 1, 1) * u  # x_t = (1-t) x0 + t eps, u = eps - x0
    if name == "UNet2DConditionModel":
        out = model(x, t, encoder_hidden_states=kw["encoder_hidden_states"], added_cond_kwargs=kw.get("added_cond_kwargs")).sample
    elif name == "UNet2DModel":
        out = model(x, t, class_labels=kw.get("class_labels")).sample
    elif name == "DiTTransformer2DModel":
        out = model(x, timestep=t, class_labels=kw["class_labels"]).sample[:, :4]
    elif name == "PixArtTransformer2DModel":
        out = model(x, encoder_hidden_states=kw["encoder_hidden_states"], encoder_attention_mask=kw["encoder_attention_mask"],
                    timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
    else:
        raise AssertionError(name)
    acp = pipe.scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    a, s = acp.sqrt(), (1 - acp).sqrt()
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return a * x - s * out
    return (x - s * out) / a


@pytest.fixture(scope="module")
def teachers(tiny_pipelines):
    return {f: load_teacher(tiny_pipelines[f]) for f in FAMILIES}


def _inputs(teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *teacher.sample_shape, generator=g)
    t = torch.tensor([0.3, 0.8]) if teacher.process.kind == "flow" else torch.tensor([150.0, 700.0])
    if teacher.conditional:
        kind = "labels" if teacher.null_label is not None else "text"
        cond, uncond = teacher.encode(PROMPTS[kind])
    else:
        cond = uncond = None
    return x, t, cond, uncond


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_x0_equals_direct_call(teachers, family):
    teacher = teachers[family]
    x, t, cond, _ = _inputs(teacher)
    with torch.no_grad():
        ours = teacher.denoiser(x, t, cond)
        ref = _direct_x0(teacher, x, t, cond or Cond())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(ours).all()
    # other parameterisations are the process's conversions of the same prediction
    eps = teacher.denoiser(x, t, cond, output="epsilon")
    torch.testing.assert_close(teacher.process.add_noise(ours, eps, t), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("pixel",)])
def test_cfg_scale_one_and_batched_equals_separate(teachers, family):
    teacher = teachers[family]
    x, t, cond, uncond = _inputs(teacher, seed=1)
    den = teacher.denoiser
    with torch.no_grad():
        c = den(x, t, cond)
        u = den(x, t, uncond.expand_to(2))
        one = den(x, t, cond, guidance_scale=1.0, uncond=uncond)
        w = den(x, t, cond, guidance_scale=4.5, uncond=uncond)
    torch.testing.assert_close(one, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w, u + 4.5 * (c - u), rtol=1e-4, atol=1e-4)
    assert (c - u).abs().max() > 1e-4  # the conditioning actually changes the prediction


def test_guidance_embedding_reaches_w_conditioned_unet(tmp_path):
    from stepdistill.testing.tiny_pipelines import make_tiny_sd

    teacher = load_teacher(make_tiny_sd(tmp_path / "sdw", time_cond_proj_dim=8))
    x, t, cond, _ = _inputs(teacher)
    with torch.no_grad():
        teacher.denoiser.model.time_embedding.cond_proj.weight.normal_()
        a = teacher.denoiser(x, t, cond, guidance=2.0)
        b = teacher.denoiser(x, t, cond, guidance=7.5)
    assert (a - b).abs().max() > 1e-4


def test_unknown_model_class_names_itself():
    with pytest.raises(TypeError, match="no denoiser adapter for Linear"):
        find_adapter(torch.nn.Linear(2, 2))


def test_denoiser_on_mlp_and_oracle_agree_in_shape():
    from stepdistill.diffusion.process import FlowProcess
    from stepdistill.models.nets import MLPDenoiser

    den = Denoiser(MLPDenoiser(dim=2, num_classes=4), FlowProcess())
    x = torch.randn(5, 2)
    cond = Cond({"class_labels": torch.arange(5) % 4})
    out = den(x, torch.full((5,), 0.5), cond, guidance_scale=2.0, uncond=Cond({"class_labels": torch.full((1,), 4)}))
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_lora_on_a_class_without_diffusers_lora_support_names_it(tiny_pipelines):
    from stepdistill.models.student import copy_for_training

    dit = load_teacher(tiny_pipelines["dit"]).denoiser.model
    with pytest.raises(ValueError, match="a LoRA \\(rank 4\\) on DiTTransformer2DModel: diffusers has no LoRA support"):
        copy_for_training(dit, lora_rank=4)
    assert copy_for_training(dit).training  # a full copy is fine


def test_smaller_student_is_cut_from_the_teachers_layers():
    from stepdistill.models.nets import MLPDenoiser
    from stepdistill.models.student import copy_for_training

    teacher = MLPDenoiser(dim=2, hidden=32, depth=3, num_classes=4)
    narrow = copy_for_training(teacher, architecture={"hidden": 16})
    assert narrow.config.hidden == 16 and narrow.config.depth == 3
    torch.testing.assert_close(narrow.inp.weight, teacher.inp.weight[:16])  # the leading rows / channels
    torch.testing.assert_close(narrow.blocks[2].fc1.weight, teacher.blocks[2].fc1.weight[:16, :16])
    shallow = copy_for_training(teacher, architecture={"depth": 2}, layer_map={"blocks": [0, 2]})
    assert len(shallow.blocks) == 2
    torch.testing.assert_close(shallow.blocks[1].fc2.weight, teacher.blocks[2].fc2.weight)  # layer 1 <- layer 2
    torch.testing.assert_close(shallow.out.weight, teacher.out.weight)
    with pytest.raises(ValueError, match="not config keys of MLPDenoiser"):
        copy_for_training(teacher, architecture={"widht": 16})
    with pytest.raises(ValueError, match="layer_map: the teacher has no blocks.5"):
        copy_for_training(teacher, architecture={"depth": 2}, layer_map={"blocks": [0, 5]})
