"""The tiny ``pixart`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import LATENT_CHANNELS, LATENT_SIZE, TEXT_HIDDEN, keep_global_rng, save_pipeline, t5_pair, tiny_vae


@keep_global_rng
def make_tiny_pixart(
    path: str | os.PathLike,
    *,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``PixArtAlphaPipeline`` (PixArtTransformer2DModel + T5EncoderModel
    + T5Tokenizer + AutoencoderKL + DPMSolverMultistepScheduler).

    * ``caption_channels = 32`` = T5 ``d_model``; inner dim = 2 heads x 16 = 32
      (= ``cross_attention_dim``); learned sigma: ``out_channels = 8``.
    * ``sample_size=8`` != 128 so ``use_additional_conditions`` is False: the
      transformer still needs ``added_cond_kwargs={"resolution": None,
      "aspect_ratio": None}`` (or None) at call time.
    * Calling the pipeline needs ``use_resolution_binning=False`` (binning only
      exists for sample sizes 32/64/128 and would ask for 256-1024px images) and
      ``clean_caption=False`` (the default True needs bs4+ftfy and otherwise just
      warns and falls back). ``encode_prompt`` already defaults to
      ``clean_caption=False``; pass ``max_sequence_length`` (default 120) to
      shorten the padded text.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    text_encoder, tokenizer = t5_pair(seed + 2, d_model=TEXT_HIDDEN)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=LATENT_SIZE,
        patch_size=2,
        caption_channels=TEXT_HIDDEN,
        use_additional_conditions=False,
    ).eval()
    vae = tiny_vae(seed + 1)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return save_pipeline(pipe, path)
