"""The tiny ``wan`` and ``wan22`` families (``stepdistill.testing.tiny_pipelines``): text-to-video."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import keep_global_rng, save_pipeline, t5_pair

WAN_TEXT_DIM = 32  # UMT5 d_model (4096 in umt5-xxl) = the transformer's text_dim
WAN_LATENT_CHANNELS = 4  # z_dim (16 in Wan2.1's VAE)
# the first four of Wan2.1's per-channel latent statistics (AutoencoderKLWan's defaults)
WAN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
WAN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]
WAN_VIDEO_SIZE = (5, 16, 16)  # (frames, height, width) the tiny configs sample: latents 4 x 2 x 4 x 4


def tiny_wan_transformer(seed: int):
    """Wan2.1-T2V-1.3B's WanTransformer3DModel config scaled down: 2 layers of 2 heads x 12 (1.3B: 30 layers
    of 12 x 128), ffn 32 (8960), text_dim 32 (4096); patch (1, 2, 2), freq_dim 256, cross-attention norm and
    qk RMS norm across heads as in the public config."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=WAN_LATENT_CHANNELS,
        out_channels=WAN_LATENT_CHANNELS,
        text_dim=WAN_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    ).eval()


def tiny_wan_vae(seed: int):
    """An AutoencoderKLWan with two down stages (spatial factor 4), both temporal (factor 4: the VAE encodes
    frame 1, then chunks of 4 frames), 4 latent channels with Wan's per-channel normalisation."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=WAN_LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True, True],
        latents_mean=WAN_LATENTS_MEAN,
        latents_std=WAN_LATENTS_STD,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    ).eval()


@keep_global_rng
def make_tiny_wan(
    path: str | os.PathLike,
    *,
    flow_shift: float = 3.0,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
    seed: int = 0,
) -> pathlib.Path:
    """Tiny ``WanPipeline`` (Wan2.1 text-to-video; with ``two_experts``, Wan2.2's two-expert layout).

    * WanTransformer3DModel (:func:`tiny_wan_transformer`), seeded with ``seed``; with ``two_experts`` a
      second one as ``transformer_2`` (seed ``seed + 3``) and ``boundary_ratio``: the pipeline runs
      ``transformer`` at timesteps >= boundary_ratio * 1000 (high noise) and ``transformer_2`` below.
    * AutoencoderKLWan (:func:`tiny_wan_vae`), seed ``seed + 1``; UMT5EncoderModel + T5Tokenizer
      (``common.t5_pair`` with ``umt5``), seed ``seed + 2``.
    * UniPCMultistepScheduler with flow sigmas, ``flow_shift`` and flow prediction, as Wan2.1 ships.
    * ``__call__`` needs ``height`` and ``width`` divisible by 16 and ``num_frames`` = 4k + 1; the tiny
      configs use 5 frames of 16 x 16 (latents 4 x 2 x 4 x 4). ``max_sequence_length`` defaults to 512
      text tokens, as in the real pipeline.
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    transformer = tiny_wan_transformer(seed)
    vae = tiny_wan_vae(seed + 1)
    text_encoder, tokenizer = t5_pair(seed + 2, d_model=WAN_TEXT_DIM, model_max_length=512, umt5=True)
    transformer_2 = tiny_wan_transformer(seed + 3) if two_experts else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift, num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio if two_experts else None)
    return save_pipeline(pipe, path)


def make_tiny_wan22(path: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Tiny two-expert ``WanPipeline`` (Wan2.2's layout): :func:`make_tiny_wan` with ``two_experts=True``,
    boundary_ratio 0.875 and flow_shift 5."""
    return make_tiny_wan(path, flow_shift=5.0, two_experts=True, seed=seed)
