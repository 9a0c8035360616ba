"""The tiny ``pixel`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import keep_global_rng, save_pipeline


@keep_global_rng
def make_tiny_pixel(
    path: str | os.PathLike,
    *,
    num_class_embeds: int | None = None,
    channels: int = 3,
    sample_size: int = 16,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> pathlib.Path:
    """Tiny pixel-space ``DDPMPipeline`` (UNet2DModel + DDPMScheduler with
    ``squaredcos_cap_v2`` betas), images ``channels x sample_size x sample_size``.

    With ``num_class_embeds=int`` the UNet is class conditional
    (``unet(x, t, class_labels=...)``). ``DDPMPipeline.__call__`` cannot pass
    labels, so such a pipeline only saves/loads; sample it with your own loop.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=True,
    )
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    return save_pipeline(pipe, path)
