"""Networks that read 2x2-packed latent tokens with position inputs: Flux (``FluxTransformer2DModel``)
and Qwen-Image (``QwenImageTransformer2DModel``).

The toolkit keeps latents as (B, C, H, W) everywhere. These adapters pack them into (B, H/2 * W/2, 4C)
tokens on the way in and unpack the network's tokens on the way out, with the same reshapes as
diffusers' ``FluxPipeline._pack_latents`` / ``_unpack_latents`` (Qwen-Image's pipeline uses the same
ones), and build the position inputs as the pipelines do: Flux's ``img_ids`` (row, column of each
token) and ``txt_ids`` (zeros), Qwen-Image's ``img_shapes``. Both pipelines call the network with the
timestep divided by 1000 (the network multiplies it back), and so do the adapters.

Embedded guidance: a network with ``guidance_embeds=True`` (FLUX.1-dev, and HunyuanVideo's video
transformer, whose adapter is in ``adapters.py``) takes the guidance scale as an input, not as
classifier-free guidance. The adapter feeds it the ``guidance`` of the call, which a
:class:`~stepdistill.diffusion.denoiser.Denoiser` fills with its ``embedded_guidance`` when the caller
gives none; for a teacher that is ``teacher.guidance`` (default: its pipeline's default
``guidance_scale``, ``GUIDANCE_INPUT_NETWORKS``: 3.5 for FluxPipeline, 6.0 for HunyuanVideoPipeline).
A network without the input ignores it, as the pipelines do.

Noise: the pipelines draw their initial latents as (B, C, H, W) and pack them, as the toolkit draws
them, but FlowMatchLCMScheduler re-noises in the packed (B, tokens, 4C) layout. ``NOISE_LAYOUTS``
makes the toolkit's re-noising draw in that layout too, so an exported few-step student samples what
:meth:`~stepdistill.models.student.Student.sample` samples for the same seed.
"""

from __future__ import annotations

import torch
from torch import nn

from . import context_parallel
from .denoiser import FEATURE_MODULES, NOISE_LAYOUTS, ModelCall, base_network, class_name, register_adapter, unwrap

PACKED_NETWORKS = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline.__call__'s default guidance_scale
# the networks that may take the guidance scale as an input (their config's guidance_embeds), with the
# default guidance_scale of the pipeline that runs them (the embedded guidance a teacher gets by default)
GUIDANCE_INPUT_NETWORKS = {"FluxTransformer2DModel": DEFAULT_EMBEDDED_GUIDANCE,
                           "QwenImageTransformer2DModel": DEFAULT_EMBEDDED_GUIDANCE,
                           "HunyuanVideoTransformer3DModel": 6.0}  # HunyuanVideoPipeline's


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) tokens -> (B, C, H, W) latents (``FluxPipeline._unpack_latents`` in latent units)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's position ids of the (H/2) x (W/2) tokens: (0, row, column) (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def is_packed(model: nn.Module) -> bool:
    """Whether the network (or each of its experts) reads packed latent tokens; a network sharded by FSDP2
    (an ``FSDP<class>`` subclass) by its own class (``class_name``)."""
    return class_name(base_network(model)) in PACKED_NETWORKS


def guidance_embedded(model: nn.Module) -> bool:
    """Whether the network (or each of its experts) takes the guidance scale as an input (FLUX.1-dev's
    and HunyuanVideo's ``guidance_embeds``)."""
    if class_name(base_network(model)) not in GUIDANCE_INPUT_NETWORKS:
        return False
    return bool(getattr(base_network(model).config, "guidance_embeds", False))


def default_embedded_guidance(model: nn.Module) -> float:
    """The guidance scale a network with a guidance input is fed unless told otherwise: the default
    ``guidance_scale`` of its pipeline (``GUIDANCE_INPUT_NETWORKS``)."""
    return GUIDANCE_INPUT_NETWORKS[class_name(base_network(model))]


def latent_channels(model: nn.Module) -> int:
    """Latent channels of a packed network: its input features are 2x2 patches of them."""
    return int(base_network(model).config.in_channels) // 4


def embedded_guidance_input(model: nn.Module, c: ModelCall) -> torch.Tensor | None:
    """The call's guidance scale for a network with a guidance input (None for one without), on the
    latents' device; a call without it is refused."""
    if not guidance_embedded(model):
        return None
    if c.guidance is None:
        raise ValueError(f"{type(unwrap(model)).__name__} takes the guidance scale as an input (guidance_embeds=true); "
                         f"give it through the Denoiser's embedded_guidance (teacher.guidance)")
    return c.guidance.to(c.x.device)


def _check_even(x: torch.Tensor, model: nn.Module) -> tuple[int, int]:
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"{type(unwrap(model)).__name__} packs 2x2 latent patches; latents of {h}x{w} do not divide")
    return h, w


@register_adapter("FluxTransformer2DModel")
def _flux(model, c: ModelCall):
    context_parallel.prepare(model)
    h, w = _check_even(c.x, model)
    text = c.cond["encoder_hidden_states"]
    out = model(
        hidden_states=pack(c.x),
        timestep=c.model_t.to(c.x.dtype) / 1000,
        guidance=embedded_guidance_input(model, c),
        pooled_projections=c.cond["pooled_projections"],
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=c.x.device, dtype=c.x.dtype),
        img_ids=image_ids(h, w, c.x.device, c.x.dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


@register_adapter("QwenImageTransformer2DModel")
def _qwenimage(model, c: ModelCall):
    context_parallel.prepare(model)
    h, w = _check_even(c.x, model)
    out = model(
        hidden_states=pack(c.x),
        timestep=c.model_t.to(c.x.dtype) / 1000,
        guidance=embedded_guidance_input(model, c),
        encoder_hidden_states=c.cond["encoder_hidden_states"],
        encoder_hidden_states_mask=c.cond.get("encoder_hidden_states_mask"),
        img_shapes=[[(1, h // 2, w // 2)]] * c.x.shape[0],
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def _packed_noise(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Unit Gaussian latents drawn in the packed token layout and unpacked (FlowMatchLCMScheduler's draw)."""
    b, c, h, w = shape
    return unpack(torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=generator), h, w)


for _name in PACKED_NETWORKS:
    NOISE_LAYOUTS[_name] = _packed_noise
# DMD2's GAN head reads the image tokens of the middle double-stream block ((text, image) outputs)
FEATURE_MODULES["FluxTransformer2DModel"] = lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2]
FEATURE_MODULES["QwenImageTransformer2DModel"] = lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2]
