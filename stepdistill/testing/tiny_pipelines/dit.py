"""The tiny ``dit`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import LATENT_CHANNELS, LATENT_SIZE, keep_global_rng, save_pipeline, tiny_vae


@keep_global_rng
def make_tiny_dit(
    path: str | os.PathLike,
    *,
    num_classes: int = 1000,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny class-conditional ``DiTPipeline`` (DiTTransformer2DModel +
    AutoencoderKL + DDIMScheduler with linear betas).

    * ``num_embeds_ada_norm = num_classes``; the label table has
      ``num_classes + 1`` rows, the last one being the null/CFG class.
      Default 1000 because ``DiTPipeline.__call__`` hard-codes the null class
      id ``1000`` when ``guidance_scale > 1``; with fewer classes call the
      pipeline with ``guidance_scale=1`` (the transformer itself is fine).
    * learned sigma: ``out_channels = 2 * in_channels = 8``.
    * ``id2label`` ({i: "class_i"}) is registered in ``model_index.json`` so the
      reloaded pipeline has ``pipe.labels`` (``DiTPipeline.__init__`` does not
      register it itself).
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=2,
        norm_num_groups=8,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()
    vae = tiny_vae(seed + 1)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
    )
    id2label = {i: f"class_{i}" for i in range(num_classes)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    return save_pipeline(pipe, path)
