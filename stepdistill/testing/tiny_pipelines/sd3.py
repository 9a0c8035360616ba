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
    num_layers: int = 2,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
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
    * SD3Transformer2DModel: ``num_layers`` blocks, 2 heads x 16 = 32 inner dim =
      ``caption_projection_dim``; ``pos_embed_max_size=16`` (latents up to 32);
      ``dual_attention_layers`` and ``qk_norm`` as in SD3.5 (:func:`make_tiny_sd35`).
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
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_PROJ,
        pos_embed_max_size=16,
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm=qk_norm,
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


def make_tiny_sd35(path: str | os.PathLike, *, shift: float = 3.0, seed: int = 0) -> pathlib.Path:
    """Tiny SD3.5 ``StableDiffusion3Pipeline``: the SD3.5 Medium layout scaled down. Medium has 24
    blocks, RMS QK-norm (``qk_norm="rms_norm"``) in every attention, and a second image-only attention
    (``attn2``, MMDiT-X) in blocks 0-12, the first half; here 4 blocks with QK-norm, blocks 0 and 1
    dual-attention, block 3 (the last, ``context_pre_only``) not. SD3.5 Large has QK-norm and no dual
    blocks. Encoders, VAE and scheduler (shift 3.0, as both models ship) are :func:`make_tiny_sd3`'s."""
    return make_tiny_sd3(path, shift=shift, seed=seed, num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")
