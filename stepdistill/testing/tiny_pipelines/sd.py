"""The tiny ``sd`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

from .common import TEXT_HIDDEN, clip_pair, keep_global_rng, save_pipeline, tiny_vae, unet_cond


@keep_global_rng
def make_tiny_sd(
    path: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``StableDiffusionPipeline`` (UNet2DConditionModel + AutoencoderKL +
    CLIPTextModel + CLIPTokenizer + DDIMScheduler).

    * latents 4x8x8, images 3x16x16; text embeds ``[B, 16, 32]``
      (``cross_attention_dim=32`` = CLIP hidden size).
    * ``prediction_type``: ``"epsilon"`` or ``"v_prediction"`` (scheduler config).
    * ``time_cond_proj_dim``: passed to the UNet (guidance-embedding students,
      LCM style); the pipeline then feeds ``timestep_cond`` built from
      ``guidance_scale`` and disables CFG batching.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    unet = unet_cond(seed, cross_attention_dim=TEXT_HIDDEN, time_cond_proj_dim=time_cond_proj_dim)
    vae = tiny_vae(seed + 1)
    text_encoder, tokenizer = clip_pair(seed + 2, with_projection=False)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return save_pipeline(pipe, path)
