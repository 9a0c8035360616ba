"""The tiny ``flux`` family (``stepdistill.testing.tiny_pipelines``): FLUX.1's layout scaled down."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import LATENT_SIZE, TEXT_HIDDEN, clip_pair, keep_global_rng, save_pipeline, t5_pair, tiny_vae

FLUX_LATENT_CHANNELS = 16  # FLUX.1's VAE; the transformer sees 2x2 patches of them: 64 features per token
FLUX_T5_LENGTH = 512  # FluxPipeline.__call__'s default max_sequence_length (the T5 tokens every prompt is padded to)


def tiny_flux_transformer(seed: int, guidance_embeds: bool = True):
    """The tiny family's FluxTransformer2DModel (see :func:`make_tiny_flux`)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


@keep_global_rng
def make_tiny_flux(
    path: str | os.PathLike,
    *,
    guidance_embeds: bool = True,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``FluxPipeline`` in FLUX.1-dev's layout (``guidance_embeds=False``: FLUX.1-schnell's).

    * FluxTransformer2DModel: 1 double-stream + 1 single-stream block, 2 heads x 16 (RoPE axes
      4 + 6 + 6 = 16), ``in_channels = 64`` (packed 2x2 patches of 16 latent channels),
      ``joint_attention_dim = 32`` (T5 ``d_model``), ``pooled_projection_dim = 32`` (CLIP's pooled
      output), ``guidance_embeds`` as given (FLUX.1-dev: the guidance scale is a network input).
    * CLIPTextModel (hidden 32) + local CLIP tokenizer; T5EncoderModel (``d_model=32``) + local T5
      tokenizer. Prompts are padded to 512 T5 tokens, as FluxPipeline does by default.
    * AutoencoderKL with 16 latent channels, FLUX.1's ``scaling_factor=0.3611``,
      ``shift_factor=0.1159``, no quant convs; latents are 16x8x8 for 16x16 images (``vae_scale_factor``
      2). The pipeline's ``default_sample_size`` is fixed at 128 by diffusers: call it with
      ``height=width=16`` (the toolkit's ``teacher.sample_size: 8``).
    * FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (``use_dynamic_shifting`` with
      ``base_shift`` 0.5 / ``max_shift`` 1.15 over image sequences of 256..4096 tokens).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux_transformer(seed, guidance_embeds)
    vae = tiny_vae(seed + 1, latent_channels=FLUX_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159,
                   use_quant_conv=False, use_post_quant_conv=False)
    text_encoder, tokenizer = clip_pair(seed + 2, with_projection=False)
    text_encoder_2, tokenizer_2 = t5_pair(seed + 3, d_model=TEXT_HIDDEN, model_max_length=FLUX_T5_LENGTH)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return save_pipeline(pipe, path)


TINY_FLUX_SIZE = LATENT_SIZE  # the latent height = width the tiny configs distil at (teacher.sample_size)
