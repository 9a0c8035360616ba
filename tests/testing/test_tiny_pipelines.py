import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDPMPipeline,
    DiffusionPipeline,
    DiTPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    QwenImagePipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from stepdistill.testing.tiny_pipelines import (
    TINY_FAMILIES,
    make_tiny_dit,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_pixel,
    make_tiny_sd,
    make_tiny_sd3,
    tiny_qwen2_tokenizer,
)

PROMPT = "a photo of a cat"
IMG = (3, 16, 16)

# family -> (pipeline class, denoiser attribute, __call__ kwargs, expected image shape)
CASES = {
    "sd": (StableDiffusionPipeline, "unet", dict(prompt=PROMPT), (1, *IMG)),
    "sdxl": (StableDiffusionXLPipeline, "unet", dict(prompt=PROMPT), (1, *IMG)),
    "dit": (DiTPipeline, "transformer", dict(class_labels=[1, 7]), (2, *IMG)),
    "pixart": (
        PixArtAlphaPipeline,
        "transformer",
        dict(prompt=PROMPT, use_resolution_binning=False, clean_caption=False, max_sequence_length=16),
        (1, *IMG),
    ),
    "sd3": (StableDiffusion3Pipeline, "transformer", dict(prompt=PROMPT, max_sequence_length=16), (1, *IMG)),
    "sd35": (StableDiffusion3Pipeline, "transformer", dict(prompt=PROMPT, max_sequence_length=16), (1, *IMG)),
    # the default call: 1024px without binning's sizes, so height/width; the complex human instruction stays on
    "sana": (SanaPipeline, "transformer", dict(prompt=PROMPT, use_resolution_binning=False, height=32, width=32),
             (1, 3, 32, 32)),
    "pixel": (DDPMPipeline, "unet", dict(), (1, *IMG)),
    # any size: diffusers' default_sample_size (128 latents) is too large for a tiny pipeline
    "flux": (FluxPipeline, "transformer", dict(prompt=PROMPT, height=16, width=16), (1, *IMG)),
    "qwenimage": (QwenImagePipeline, "transformer", dict(prompt=PROMPT, height=16, width=16), (1, *IMG)),
}


def _load(path, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _run(pipe, expected_shape, **kwargs):
    out = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    img = out.images
    assert isinstance(img, torch.Tensor)
    assert tuple(img.shape) == expected_shape
    assert torch.isfinite(img).all()
    return img


VIDEO = ("wan", "wan22")  # text-to-video: WanPipeline, frames instead of images


def test_families_registry():
    assert set(TINY_FAMILIES) == set(CASES) | set(VIDEO) | {"hunyuanvideo"}


@pytest.mark.parametrize("family", list(CASES))
def test_build_reload_and_call(family, tmp_path_factory):
    cls, attr, call_kwargs, shape = CASES[family]
    rng_before = torch.random.get_rng_state()
    path = TINY_FAMILIES[family](tmp_path_factory.mktemp(family) / "pipe")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller RNG untouched
    assert isinstance(path, pathlib.Path)
    assert (path / "model_index.json").is_file()
    assert list(path.glob(f"{attr}/*.safetensors"))
    assert not list(path.rglob("*.bin"))

    pipe = _load(path)
    assert type(pipe) is cls
    den = getattr(pipe, attr)
    assert sum(p.numel() for p in den.parameters()) < 400_000

    # the denoiser is created right after torch.manual_seed(0): rebuild the original and compare exactly
    torch.manual_seed(0)
    original = type(den).from_config(den.config)
    _assert_same_state(den, original)

    _run(pipe, shape, **call_kwargs)


def test_sd_options(tmp_path):
    path = make_tiny_sd(tmp_path / "sd", prediction_type="v_prediction", time_cond_proj_dim=16)
    pipe = _load(path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.time_cond_proj_dim == 16
    _run(pipe, (1, *IMG), prompt=PROMPT, guidance_scale=4.0)
    x = torch.randn(2, 4, 8, 8)
    out = pipe.unet(
        x, torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 16, 32), timestep_cond=torch.randn(2, 16)
    )
    assert out.sample.shape == x.shape


def test_pixart_encode_prompt(tmp_path):
    pipe = _load(make_tiny_pixart(tmp_path / "pixart"))
    emb, mask, neg, neg_mask = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=True, device="cpu", clean_caption=False, max_sequence_length=16
    )
    assert emb.shape == neg.shape == (1, 16, 32)
    assert mask.shape == neg_mask.shape == (1, 16)
    assert mask.sum() > neg_mask.sum() >= 1  # "</s>" is always kept
    x = torch.randn(2, 4, 8, 8)
    out = pipe.transformer(
        x,
        encoder_hidden_states=torch.cat([emb, neg]),
        timestep=torch.tensor([10, 900]),
        encoder_attention_mask=torch.cat([mask, neg_mask]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    assert out.shape == (2, 8, 8, 8)  # learned sigma


def test_dit_few_classes(tmp_path):
    pipe = _load(make_tiny_dit(tmp_path / "dit", num_classes=10))
    assert pipe.transformer.config.num_embeds_ada_norm == 10
    assert pipe.get_label_ids(["class_3"]) == [3]
    # DiTPipeline hard-codes null class 1000 for CFG -> no guidance with 10 classes
    _run(pipe, (1, *IMG), class_labels=[3], guidance_scale=1.0)
    out = pipe.transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([3, 10]))
    assert out.sample.shape == (2, 8, 8, 8)


def test_sd3_without_t5(tmp_path):
    path = make_tiny_sd3(tmp_path / "sd3", with_t5=False)
    with pytest.raises(ValueError):
        DiffusionPipeline.from_pretrained(path)  # diffusers: text_encoder_3 is not an optional component
    pipe = _load(path, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    assert pipe.transformer.config.joint_attention_dim == 64
    _run(pipe, (1, *IMG), prompt=PROMPT, max_sequence_length=16)


def test_pixel_class_conditional(tmp_path):
    path = make_tiny_pixel(tmp_path / "px", num_class_embeds=10, channels=1, sample_size=8)
    pipe = _load(path)
    assert type(pipe) is DDPMPipeline
    assert pipe.unet.config.num_class_embeds == 10
    x = torch.randn(2, 1, 8, 8)
    out = pipe.unet(x, torch.tensor([5, 500]), class_labels=torch.tensor([0, 9])).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_sana_tokenizer_is_a_gemma_tokenizer_written_locally(tmp_path):
    """A real GemmaTokenizer from a written vocabulary: <bos> first, known words one piece each, other text
    through byte fallback, decoding back to the text; it saves and reloads with the pipeline."""
    from transformers import GemmaTokenizer

    from stepdistill.testing.tiny_pipelines import make_tiny_sana, tiny_gemma_tokenizer

    tok = tiny_gemma_tokenizer()
    assert type(tok) is GemmaTokenizer
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:]) == ["a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat"]
    text = "Enhanced: a 🐱 naïve prompt"
    assert "<0xF0>" in tok.convert_ids_to_tokens(tok(text).input_ids)
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    pipe = _load(make_tiny_sana(tmp_path / "sana"))
    assert type(pipe.tokenizer) is GemmaTokenizer and pipe.tokenizer(text).input_ids == tok(text).input_ids
    assert type(pipe.text_encoder).__name__ == "Gemma2Model" and type(pipe.vae).__name__ == "AutoencoderDC"
    assert pipe.vae_scale_factor == 4 and pipe.scheduler.config.use_flow_sigmas


@pytest.mark.parametrize("family", VIDEO)
def test_wan_build_reload_and_call(family, tmp_path_factory):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    rng_before = torch.random.get_rng_state()
    path = TINY_FAMILIES[family](tmp_path_factory.mktemp(family) / "pipe")
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not list(path.rglob("*.bin"))
    pipe = _load(path)
    assert type(pipe) is WanPipeline and type(pipe.scheduler) is UniPCMultistepScheduler
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.prediction_type == "flow_prediction"
    experts = [pipe.transformer] + ([pipe.transformer_2] if family == "wan22" else [])
    assert (pipe.transformer_2 is None) == (family == "wan") and (pipe.config.boundary_ratio == 0.875) == (family == "wan22")
    torch.manual_seed(0)
    _assert_same_state(pipe.transformer, type(pipe.transformer).from_config(pipe.transformer.config))
    if family == "wan22":
        torch.manual_seed(3)
        _assert_same_state(pipe.transformer_2, type(pipe.transformer_2).from_config(pipe.transformer_2.config))
        assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)
    assert all(sum(p.numel() for p in e.parameters()) < 400_000 for e in experts)
    latents = pipe(prompt=[PROMPT, "a dog"], num_frames=5, height=16, width=16, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert latents.shape == (2, 4, 2, 4, 4) and torch.isfinite(latents).all()
    video = pipe(prompt=PROMPT, num_frames=5, height=16, width=16, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 16, 16) and torch.isfinite(video).all()


def test_flux_schnell_layout_has_no_guidance_input(tmp_path):
    pipe = _load(make_tiny_flux(tmp_path / "schnell", guidance_embeds=False))
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.scheduler.config.use_dynamic_shifting
    _run(pipe, (1, *IMG), prompt=PROMPT, height=16, width=16, guidance_scale=0.0)


def test_qwen2_tokenizer_is_byte_level_bpe_with_the_chat_markers():
    tok = tiny_qwen2_tokenizer()
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.tokenize("<|im_start|>user\na photo of a cat<|im_end|>") == [
        "<|im_start|>", "u", "s", "e", "r", "\u010a", "a", "\u0120photo", "\u0120of", "\u0120a", "\u0120cat", "<|im_end|>"]
    assert tok.decode(tok("two dogs!")["input_ids"]) == "two dogs!"  # any text, byte by byte


def test_hunyuanvideo_build_reload_and_call(tmp_path):
    """HunyuanVideoPipeline with its real component classes: the guidance-distilled transformer, the causal
    video VAE, Llama + CLIP; its default call encodes, denoises and decodes 5 frames of 16 x 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    from stepdistill.testing.tiny_pipelines import make_tiny_hunyuanvideo

    rng_before = torch.random.get_rng_state()
    path = make_tiny_hunyuanvideo(tmp_path / "pipe")
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not list(path.rglob("*.bin"))
    pipe = _load(path)
    assert type(pipe) is HunyuanVideoPipeline and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.tokenizer.padding_side == "right"  # the network masks the text tokens after the prompt's
    assert pipe.scheduler.config.shift == 7.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert [type(m).__name__ for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)] == [
        "HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo", "LlamaModel", "CLIPTextModel"]
    assert pipe.transformer.config.guidance_embeds and (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 4)
    torch.manual_seed(0)
    _assert_same_state(pipe.transformer, type(pipe.transformer).from_config(pipe.transformer.config))
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 400_000
    latents = pipe(prompt=[PROMPT, "a dog"], num_frames=5, height=16, width=16, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert latents.shape == (2, 4, 2, 4, 4) and torch.isfinite(latents).all()
    assert not torch.allclose(latents[0], latents[1], atol=1e-3)  # the two prompts condition differently
    video = pipe(prompt=PROMPT, num_frames=5, height=16, width=16, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 16, 16) and torch.isfinite(video).all()


def test_llama_tokenizer_crops_exactly_the_prompt_template():
    """The pipeline crops its template's first 95 tokens (Llama 3's count, ``crop_start``): with the tiny
    Llama tokenizer the prompt's tokens are what remains, padded on the right."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from stepdistill.testing.tiny_pipelines import tiny_llama_tokenizer

    tok = tiny_llama_tokenizer()
    assert type(tok).__name__ == "LlamaTokenizer" and tok.padding_side == "right"
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    head = tok(template.split("{}")[0]).input_ids
    assert len(head) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95 and head[0] == tok.bos_token_id
    enc = tok(template.format(PROMPT), max_length=110, padding="max_length")
    assert tok.convert_ids_to_tokens(enc.input_ids[95:101]) == ["a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat",
                                                                "<|eot_id|>"]
    assert enc.input_ids[101:] == [tok.pad_token_id] * 9 and enc.attention_mask == [1] * 101 + [0] * 9
