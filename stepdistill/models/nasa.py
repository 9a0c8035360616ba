"""Negative prompts for one-step students: SNOOPI's Negative-Away Steer Attention (NASA, Nguyen et al.
2024).

A distilled student samples without classifier-free guidance, so the usual negative prompt (the
unconditional branch of CFG) has nowhere to go. NASA moves it into the cross-attention layers: each
one's attention output (softmax(Q K^T / sqrt(d)) V, before the output projection) becomes

    Attn(Q, K+, V+) - alpha Attn(Q, K-, V-),

K+ / V+ from the prompt and K- / V- from the negative prompt, steering the features away from what
the negative prompt describes. It needs no training; it works on any network whose cross-attention
layers are diffusers ``Attention`` modules (SD1.5 / SD2.1 / SDXL UNets, PixArt)::

    with negative_away(student.model, negative_cond, scale=0.5):
        images = student.sample(noise, cond)

This is our reading of the paper's equation (on the attention output before the projection); no
public code was available to compare with.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..diffusion.denoiser import Cond, unwrap


class NegativeAwayAttnProcessor:
    """A cross-attention processor computing Attn(Q, K+, V+) - scale Attn(Q, K-, V-) through diffusers'
    own ``AttnProcessor2_0`` (the output projection is affine, so its bias and the residual are
    restored once)."""

    def __init__(self, negative: torch.Tensor, scale: float, base=None, negative_mask: torch.Tensor | None = None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.negative, self.scale = negative, float(scale)
        self.base = base or AttnProcessor2_0()
        # a token mask of the negative prompt (PixArt's T5), in the additive form the transformers pass down
        self.negative_bias = None if negative_mask is None else ((1 - negative_mask.float()) * -10000.0).unsqueeze(1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        pos = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if encoder_hidden_states is None or self.scale == 0:
            return pos
        neg_states = self.negative.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        if neg_states.shape[0] != hidden_states.shape[0]:
            neg_states = neg_states.expand(hidden_states.shape[0], *neg_states.shape[1:])
        mask = None
        if self.negative_bias is not None:
            mask = self.negative_bias.to(hidden_states.device, hidden_states.dtype)
            if mask.shape[0] != hidden_states.shape[0]:
                mask = mask.expand(hidden_states.shape[0], *mask.shape[1:])
        neg = self.base(attn, hidden_states, neg_states, mask, temb, **kwargs)
        out = pos - self.scale * neg
        bias = attn.to_out[0].bias
        if bias is not None:  # to_out(a - s b) = to_out(a) - s to_out(b) + s bias
            shape = (1, -1, 1, 1) if out.ndim == 4 else (1,) * (out.ndim - 1) + (-1,)
            out = out + self.scale * bias.reshape(shape) / attn.rescale_output_factor
        if attn.residual_connection:
            out = out + self.scale * hidden_states / attn.rescale_output_factor
        return out


def cross_attention_names(model: nn.Module) -> list[str]:
    """The processor names (``set_attn_processor`` keys) of a network's cross-attention layers."""
    from diffusers.models.attention_processor import Attention

    return [f"{name}.processor" for name, m in unwrap(model).named_modules()
            if isinstance(m, Attention) and getattr(m, "is_cross_attention", False)]


@contextmanager
def negative_away(model: nn.Module, negative: Cond | torch.Tensor, scale: float = 0.5):
    """Inside the block, ``model``'s cross-attention layers steer away from ``negative`` (a Cond with
    ``encoder_hidden_states`` and, for T5 prompts, its ``encoder_attention_mask``; or that tensor: one row,
    or one per sample)."""
    net = unwrap(model)
    negative_mask = None
    if isinstance(negative, Cond):
        negative_mask = negative.kwargs.get("encoder_attention_mask")
        if "encoder_hidden_states" not in negative.kwargs:
            raise ValueError("negative_away: the negative conditioning has no encoder_hidden_states (a text prompt's "
                             "embedding); class-label teachers have no negative prompt")
        negative = negative.kwargs["encoder_hidden_states"]
    for attr in ("caption_projection", "encoder_hid_proj"):  # the network's own projection of the text states
        proj = getattr(net, attr, None)
        if isinstance(proj, nn.Module):
            with torch.no_grad():
                param = next(proj.parameters())
                negative = proj(negative.to(param.device, param.dtype))
    names = cross_attention_names(net)
    if not names or not hasattr(net, "set_attn_processor"):
        raise ValueError(f"negative_away: {type(net).__name__} has no diffusers cross-attention layers for NASA")
    saved = dict(net.attn_processors)
    net.set_attn_processor({name: NegativeAwayAttnProcessor(negative, scale, proc, negative_mask) if name in names else proc
                            for name, proc in saved.items()})
    try:
        yield net
    finally:
        net.set_attn_processor(saved)
