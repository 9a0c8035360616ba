"""How each diffusers pipeline class turns prompts (or class labels) into the network's conditioning:
``PIPELINE_FAMILIES`` holds one small entry per pipeline class, through the pipeline's own
``encode_prompt``, so that every family encodes prompts exactly as its diffusers pipeline does at
sampling time, and what its unconditional branch is (the empty prompt, the null label)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..diffusion.denoiser import Cond

# ------------------------------------------------------------------------------------------------
# pipeline families: how each pipeline class turns prompts into (cond, uncond)
# ------------------------------------------------------------------------------------------------
EncodeFn = Callable[[Any, Sequence[Any]], tuple[Cond, Cond]]  # (the teacher, its prompts) -> (cond, uncond)
PIPELINE_FAMILIES: dict[str, EncodeFn] = {}
TEXT_FAMILIES: set[str] = set()  # pipelines whose conditioning is a text prompt


def register_pipeline(*class_names: str, text: bool = True) -> Callable[[EncodeFn], EncodeFn]:
    def deco(fn: EncodeFn) -> EncodeFn:
        for name in class_names:
            PIPELINE_FAMILIES[name] = fn
            if text:
                TEXT_FAMILIES.add(name)
        return fn

    return deco


@register_pipeline("StableDiffusionPipeline")
def _encode_sd(teacher, prompts):
    pe, npe = teacher.pipeline.encode_prompt(list(prompts), teacher.encoder_device, 1, True, negative_prompt=None)
    return Cond({"encoder_hidden_states": pe}), Cond({"encoder_hidden_states": npe})


@register_pipeline("StableDiffusionXLPipeline")
def _encode_sdxl(teacher, prompts):
    pipe = teacher.pipeline
    pe, npe, pooled, npooled = pipe.encode_prompt(list(prompts), device=teacher.encoder_device, do_classifier_free_guidance=True)
    size = tuple(teacher.sample_shape[-2:])
    size = (size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
    ids = ids.to(teacher.encoder_device).repeat(len(prompts), 1)
    return (
        Cond({"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}),
        Cond({"encoder_hidden_states": npe, "added_cond_kwargs": {"text_embeds": npooled, "time_ids": ids}}),
    )


@register_pipeline("PixArtAlphaPipeline", "PixArtSigmaPipeline")
def _encode_pixart(teacher, prompts):
    pe, mask, npe, nmask = teacher.pipeline.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="", device=teacher.encoder_device, clean_caption=False
    )
    return (
        Cond({"encoder_hidden_states": pe, "encoder_attention_mask": mask}),
        Cond({"encoder_hidden_states": npe, "encoder_attention_mask": nmask}),
    )


@register_pipeline("StableDiffusion3Pipeline")
def _encode_sd3(teacher, prompts):
    prompts = list(prompts)
    pe, npe, pooled, npooled = teacher.pipeline.encode_prompt(
        prompts, prompt_2=None, prompt_3=None, device=teacher.encoder_device, do_classifier_free_guidance=True
    )
    return (
        Cond({"encoder_hidden_states": pe, "pooled_projections": pooled}),
        Cond({"encoder_hidden_states": npe, "pooled_projections": npooled}),
    )


def call_default(pipe, name: str):
    """The default of the pipeline's own ``__call__`` argument ``name``: what a stock pipeline (an exported
    student's) encodes with when not told otherwise."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _rows(cond: Cond, n: int) -> Cond:
    """A batch-1 conditioning repeated to ``n`` rows (the empty prompt of every row)."""
    return cond.map(lambda t: t.repeat(n, *[1] * (t.ndim - 1)))


@register_pipeline("FluxPipeline")
def _encode_flux(teacher, prompts):
    """T5 states (padded to the pipeline's default ``max_sequence_length``, 512) and CLIP's pooled output.
    The text position ids ``encode_prompt`` also returns are zeros of the text length; the adapter
    (``diffusion/packed.py``) builds them. The unconditional branch is the empty prompt (Flux's
    ``negative_prompt`` default), used only by methods whose options ask for CFG (refused on a
    guidance-embedded teacher)."""
    pipe = teacher.pipeline
    length = call_default(pipe, "max_sequence_length")

    def encode(texts):
        pe, pooled, _ = pipe.encode_prompt(texts, prompt_2=None, device=teacher.encoder_device, max_sequence_length=length)
        return Cond({"encoder_hidden_states": pe, "pooled_projections": pooled})

    return encode(list(prompts)), _rows(encode([""]), len(prompts))


@register_pipeline("QwenImagePipeline")
def _encode_qwenimage(teacher, prompts):
    """Qwen2.5-VL's last hidden states of the prompt in the pipeline's template, with their mask.
    ``encode_prompt`` pads a batch to its longest prompt (and drops an all-ones mask); here every row is
    zero-padded, with a zero mask, to the pipeline's default ``max_sequence_length`` (512, where it
    truncates), so that rows of different batches, the cache and the empty prompt stack. The network
    masks the padding out of its attention, and text positions do not depend on the text length (RoPE
    starts them after the image's), so the padding changes its output only by rounding."""
    pipe = teacher.pipeline
    length = call_default(pipe, "max_sequence_length")

    def encode(texts):
        pe, mask = pipe.encode_prompt(texts, device=teacher.encoder_device, max_sequence_length=length)
        if mask is None:
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        pad = length - pe.shape[1]
        pe = torch.nn.functional.pad(pe, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask.long(), (0, pad))
        return Cond({"encoder_hidden_states": pe, "encoder_hidden_states_mask": mask})

    return encode(list(prompts)), _rows(encode([""]), len(prompts))


@register_pipeline("SanaPipeline")
def _encode_sana(teacher, prompts):
    """As SanaPipeline's ``__call__`` encodes by default, so that the exported student sees the states it
    was trained on: its complex human instruction before each prompt (not before the empty negative
    prompt: ``encode_prompt`` leaves it out there), ``max_sequence_length`` tokens with their mask."""
    pipe = teacher.pipeline
    pe, mask, npe, nmask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="", device=teacher.encoder_device,
        clean_caption=False, max_sequence_length=call_default(pipe, "max_sequence_length"),
        complex_human_instruction=call_default(pipe, "complex_human_instruction"),
    )
    return (
        Cond({"encoder_hidden_states": pe, "encoder_attention_mask": mask}),
        Cond({"encoder_hidden_states": npe, "encoder_attention_mask": nmask}),
    )


@register_pipeline("WanPipeline")
def _encode_wan(teacher, prompts):
    """UMT5 states padded with zeros to the length ``__call__`` encodes with (its max_sequence_length
    default, 512), so that the exported pipeline's default call conditions the student identically."""
    pipe = teacher.pipeline
    pe, npe = pipe.encode_prompt(list(prompts), negative_prompt=None, do_classifier_free_guidance=True,
                                 max_sequence_length=call_default(pipe, "max_sequence_length"),
                                 device=teacher.encoder_device)
    return Cond({"encoder_hidden_states": pe}), Cond({"encoder_hidden_states": npe})


@register_pipeline("HunyuanVideoPipeline")
def _encode_hunyuan_video(teacher, prompts):
    """The Llama states of each prompt in the pipeline's template (hidden layer -3, the template's tokens
    cropped; ``max_sequence_length`` 256 tokens, padded on the right), their token mask, and CLIP's
    pooled output, as ``__call__`` encodes by default. The unconditional branch is the empty prompt, used
    only by methods whose options ask for CFG (refused on the guidance-distilled teacher, whose guidance
    is the embedded ``teacher.guidance``)."""
    pipe = teacher.pipeline
    length = call_default(pipe, "max_sequence_length")

    def encode(texts):
        pe, pooled, mask = pipe.encode_prompt(texts, device=teacher.encoder_device, max_sequence_length=length,
                                              prompt_template=call_default(pipe, "prompt_template"))
        return Cond({"encoder_hidden_states": pe, "encoder_attention_mask": mask, "pooled_projections": pooled})

    return encode(list(prompts)), _rows(encode([""]), len(prompts))


def encode_labels(teacher, labels):
    """Class-conditional teachers: 'prompts' are class indices (DiT also takes its label names)."""
    if teacher.null_label is None:
        raise ValueError(f"teacher {teacher.name} is unconditional; it takes no prompts or labels")
    if teacher.pipeline is not None and hasattr(teacher.pipeline, "get_label_ids") and any(isinstance(p, str) for p in labels):
        labels = teacher.pipeline.get_label_ids(list(labels))
    labels = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long, device=teacher.device)
    if torch.any(labels < 0) or torch.any(labels >= teacher.null_label):
        raise ValueError(f"class labels must be in [0, {teacher.null_label}), got {labels.tolist()}")
    return Cond({"class_labels": labels}), Cond({"class_labels": torch.full_like(labels, teacher.null_label)})


register_pipeline("DiTPipeline", "DDPMPipeline", "DDIMPipeline", "oracle", text=False)(encode_labels)
