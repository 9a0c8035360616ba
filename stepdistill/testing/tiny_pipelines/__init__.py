"""Tiny, randomly initialised diffusers pipelines for offline tests.

Every ``make_tiny_<family>(path, **options)`` builds a complete pipeline from
local configs only (no Hub access: tokenizers are written by this module),
seeds ``torch.manual_seed`` before each model is created (inside
``torch.random.fork_rng``, so the caller's RNG state is left untouched), saves the pipeline
with ``save_pretrained(path)`` (safetensors) and returns ``pathlib.Path(path)``.
The folder reloads with ``DiffusionPipeline.from_pretrained(path)`` under
``HF_HUB_OFFLINE=1`` and the pipeline's own ``__call__`` runs.

Sizes: latents are 4x8x8 (16x8x8 for flux and qwenimage; images 3x16x16, VAE
downsampling factor 2; Sana's 3x32x32), denoisers have 50K-270K parameters, text
encoders have 2 layers (CLIP hidden 32, T5 d_model 32/96, Qwen2.5-VL hidden 32,
Gemma 2 hidden 32; HunyuanVideo's Llama has 3, hidden 32), every saved folder is under 2 MB.

Seeding: the denoiser (unet/transformer) is created right after
``torch.manual_seed(seed)``; the VAE uses ``seed + 1`` and text encoders
``seed + 2``, ``seed + 3``, ``seed + 4``.  So
``torch.manual_seed(seed); type(den).from_config(den.config)`` reproduces the
saved denoiser weights exactly.

Denoiser forward signatures (what a distillation loop has to pass):

* ``sd``: ``unet(x, t, encoder_hidden_states=[B, 16, 32])``
  (+ ``timestep_cond=[B, time_cond_proj_dim]`` when ``time_cond_proj_dim`` is set).
* ``sdxl``: ``unet(x, t, encoder_hidden_states=[B, 16, 64],
  added_cond_kwargs={"text_embeds": [B, 32], "time_ids": [B, 6]})``.
* ``dit``: ``transformer(x, timestep=t, class_labels=[B]).sample`` -> ``[B, 8, 8, 8]``
  (learned sigma: first 4 channels are epsilon); the null (CFG) class id is
  ``num_classes`` (= ``transformer.config.num_embeds_ada_norm``).
* ``pixart``: ``transformer(x, encoder_hidden_states=[B, L, 32], timestep=t,
  encoder_attention_mask=[B, L], added_cond_kwargs={"resolution": None,
  "aspect_ratio": None}).sample`` -> ``[B, 8, 8, 8]`` (learned sigma).
* ``sd3``: ``transformer(x, encoder_hidden_states=[B, 16 + L, 96],
  pooled_projections=[B, 64], timestep=t).sample`` (flow matching, ``t`` =
  sigma * 1000; 16 CLIP tokens + ``L = max_sequence_length`` T5 tokens;
  64 features instead of 96 with ``with_t5=False``).
* ``sd35``: as ``sd3``, with 4 blocks, RMS QK-norm and dual attention (an image-only ``attn2``) in
  blocks 0 and 1, the SD3.5 Medium layout scaled down.
* ``sana``: ``transformer(x, encoder_hidden_states=[B, 300, 32], encoder_attention_mask=[B, 300],
  timestep=t).sample`` (flow matching, ``t`` = sigma * 1000 * ``timestep_scale``; Gemma 2 states of the
  prompt after the pipeline's complex human instruction). Latents 4x8x8 and images 3x32x32: its DC-AE
  downsamples by 4, since SanaPipeline takes image sides in multiples of 32.
* ``pixel``: ``unet(x, t).sample`` (+ ``class_labels=[B]`` when
  ``num_class_embeds`` is set).
* ``wan`` / ``wan22`` (text-to-video): ``transformer(hidden_states=[B, 4, F, H, W],
  timestep=t, encoder_hidden_states=[B, 512, 32]).sample`` (flow matching, ``t`` = sigma *
  1000; latents 4 x 2 x 4 x 4 for 5 frames of 16 x 16); ``wan22`` adds ``transformer_2``
  for timesteps below ``boundary_ratio * 1000`` (Wan2.2's two experts).
* ``hunyuanvideo`` (text-to-video): ``transformer(hidden_states=[B, 4, F, H, W], timestep=t,
  encoder_hidden_states=[B, 256, 32], encoder_attention_mask=[B, 256],
  pooled_projections=[B, 32], guidance=[B]).sample`` (flow matching with shift 7, ``t`` = sigma *
  1000; Llama states of the prompt after the pipeline's template, CLIP's pooled output; ``guidance``
  = guidance_scale * 1000, HunyuanVideo's guidance-distilled layout; latents 4 x 2 x 4 x 4 for 5 frames
  of 16 x 16).
* ``flux``: ``transformer(hidden_states=[B, 16, 64], timestep=t / 1000,
  guidance=[B], pooled_projections=[B, 32], encoder_hidden_states=[B, 512, 32],
  txt_ids=[512, 3], img_ids=[16, 3]).sample`` -> ``[B, 16, 64]``: 16x8x8
  latents packed into 16 tokens of 2x2 patches (``stepdistill.diffusion.packed``);
  ``guidance`` only with ``guidance_embeds`` (the default, FLUX.1-dev's layout).
* ``qwenimage``: ``transformer(hidden_states=[B, 16, 64], timestep=t / 1000,
  encoder_hidden_states=[B, L, 32], encoder_hidden_states_mask=[B, L],
  img_shapes=[[(1, 4, 4)]] * B).sample`` -> ``[B, 16, 64]``.

The ``flux`` and ``qwenimage`` pipelines take any size; their ``default_sample_size``
is diffusers' 128 latents, so call them with ``height=width=16`` (the tiny configs
set ``teacher.sample_size: 8``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from .common import tiny_clip_tokenizer, tiny_t5_tokenizer
from .dit import make_tiny_dit
from .flux import make_tiny_flux
from .hunyuanvideo import make_tiny_hunyuanvideo, tiny_llama_tokenizer
from .pixart import make_tiny_pixart
from .pixel import make_tiny_pixel
from .qwenimage import make_tiny_qwenimage, tiny_qwen2_tokenizer
from .sd import make_tiny_sd
from .sana import make_tiny_sana, tiny_gemma_tokenizer
from .sd3 import make_tiny_sd3, make_tiny_sd35
from .sdxl import make_tiny_sdxl
from .wan import make_tiny_wan, make_tiny_wan22

__all__ = ["TINY_FAMILIES", "make_tiny_dit", "make_tiny_flux", "make_tiny_hunyuanvideo", "make_tiny_pixart",
           "make_tiny_pixel", "make_tiny_qwenimage", "make_tiny_sana", "make_tiny_sd", "make_tiny_sd3", "make_tiny_sd35",
           "make_tiny_sdxl", "make_tiny_wan", "make_tiny_wan22", "tiny_clip_tokenizer", "tiny_gemma_tokenizer",
           "tiny_llama_tokenizer", "tiny_qwen2_tokenizer", "tiny_t5_tokenizer"]

TINY_FAMILIES: dict[str, Callable[..., pathlib.Path]] = {
    "sd": make_tiny_sd,
    "sdxl": make_tiny_sdxl,
    "dit": make_tiny_dit,
    "pixart": make_tiny_pixart,
    "sd3": make_tiny_sd3,
    "sd35": make_tiny_sd35,
    "sana": make_tiny_sana,
    "pixel": make_tiny_pixel,
    "wan": make_tiny_wan,
    "wan22": make_tiny_wan22,
    "flux": make_tiny_flux,
    "qwenimage": make_tiny_qwenimage,
    "hunyuanvideo": make_tiny_hunyuanvideo,
}


def main(argv=None) -> None:
    """``python -m stepdistill.testing.tiny_pipelines OUT_DIR``: build every tiny family under OUT_DIR
    (the ``teacher.path`` of the configs under configs/tiny-*)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=pathlib.Path, nargs="?", default=pathlib.Path("runs/tiny-pipelines"))
    args = parser.parse_args(argv)
    for name, make in TINY_FAMILIES.items():
        print(make(args.out_dir / name))

