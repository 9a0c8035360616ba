"""The tiny ``sdxl`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

from .common import TEXT_HIDDEN, TEXT_PROJ, clip_pair, keep_global_rng, save_pipeline, tiny_vae, unet_cond


@keep_global_rng
def make_tiny_sdxl(
    path: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    time_cond_proj_dim: int | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``StableDiffusionXLPipeline``.

    * text_encoder: CLIPTextModel (hidden 32), text_encoder_2:
      CLIPTextModelWithProjection (hidden 32, projection_dim 32); both
      tokenizers are the locally written CLIP tokenizer.
    * UNet: ``cross_attention_dim = 32 + 32 = 64`` (penultimate hidden states of
      both encoders concatenated), ``addition_embed_type="text_time"``,
      ``addition_time_embed_dim=8``,
      ``projection_class_embeddings_input_dim = 6 * 8 + 32 = 80``
      (6 micro-conditioning time ids + pooled text_embeds of encoder 2).
    * EulerDiscreteScheduler (scaled_linear, leading spacing, like SDXL base).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    addition_time_embed_dim = 8
    unet = unet_cond(
        seed,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + TEXT_PROJ,
        use_linear_projection=True,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = tiny_vae(seed + 1, force_upcast=False)
    text_encoder, tokenizer = clip_pair(seed + 2, with_projection=False)
    text_encoder_2, tokenizer_2 = clip_pair(seed + 3, with_projection=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return save_pipeline(pipe, path)
