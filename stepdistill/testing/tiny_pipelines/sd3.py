"""The tiny ``sd3`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    TEXT_HIDDEN,
    TEXT_PROJ,
    clip_pair,
    keep_global_rng,
    save_pipeline,
    t5_pair,
    tiny_vae,
)


@keep_global_rng
def make_tiny_sd3(
    path: str | os.PathLike,
    *,
    shift: float = 3.0,
    with_t5: bool = True,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``StableDiffusion3Pipeline``.

    * two CLIPTextModelWithProjection (hidden 32, projection 32) + local CLIP
      tokenizers; ``pooled_projection_dim = 32 + 32 = 64``.
    * ``with_t5=True`` (default): a tiny T5EncoderModel (``d_model=96``) + the
      local T5 tokenizer as ``text_encoder_3``/``tokenizer_3``, and
      ``joint_attention_dim = 96``; the concatenated CLIP penultimate states
      (64 features) are zero-padded to 96 and concatenated with the T5 tokens
      along the sequence axis, exactly like SD3 (2048 -> 4096).
    * ``with_t5=False``: ``text_encoder_3=None``/``tokenizer_3=None`` (the
      pipeline then uses zeros for the T5 tokens) and
      ``joint_attention_dim = 64``.  diffusers does NOT list these two as
      optional components, so a plain ``DiffusionPipeline.from_pretrained(path)``
      raises; reload with ``from_pretrained(path, text_encoder_3=None,
      tokenizer_3=None)``.
    * SD3Transformer2DModel: 2 heads x 16 = 32 inner dim =
      ``caption_projection_dim``; ``pos_embed_max_size=16`` (latents up to 32).
    * AutoencoderKL with SD3-style ``scaling_factor=1.5305``,
      ``shift_factor=0.0609``, no quant convs, 4 latent channels (16 in SD3).
    * FlowMatchEulerDiscreteScheduler(shift=``shift``).
    * ``__call__``'s ``max_sequence_length`` (default 256) is the number of T5
      tokens; pass e.g. ``max_sequence_length=16`` to keep calls cheap.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_dim = 96
    joint_attention_dim = t5_dim if with_t5 else 2 * TEXT_HIDDEN
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_PROJ,
        pos_embed_max_size=16,
    ).eval()
    vae = tiny_vae(
        seed + 1,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder, tokenizer = clip_pair(seed + 2, with_projection=True)
    text_encoder_2, tokenizer_2 = clip_pair(seed + 3, with_projection=True)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        text_encoder_3, tokenizer_3 = t5_pair(seed + 4, d_model=t5_dim, model_max_length=256)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return save_pipeline(pipe, path)
