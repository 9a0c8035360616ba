"""Tiny, randomly initialised diffusers pipelines for offline tests.

Every ``make_tiny_<family>(path, **options)`` builds a complete pipeline from
local configs only (no Hub access: tokenizers are written by this module),
seeds ``torch.manual_seed`` before each model is created (inside
``torch.random.fork_rng``, so the caller's RNG state is left untouched), saves the pipeline
with ``save_pretrained(path)`` (safetensors) and returns ``pathlib.Path(path)``.
The folder reloads with ``DiffusionPipeline.from_pretrained(path)`` under
``HF_HUB_OFFLINE=1`` and the pipeline's own ``__call__`` runs.

Sizes: latents are 4x8x8 (images 3x16x16, VAE downsampling factor 2),
denoisers have 50K-270K parameters, text encoders have 2 layers (CLIP hidden
32, T5 d_model 32/96), every saved folder is under 2 MB.

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
* ``pixel``: ``unet(x, t).sample`` (+ ``class_labels=[B]`` when
  ``num_class_embeds`` is set).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import string
import tempfile
from collections.abc import Callable

import torch

__all__ = [
    "TINY_FAMILIES",
    "make_tiny_dit",
    "make_tiny_pixart",
    "make_tiny_pixel",
    "make_tiny_sd",
    "make_tiny_sd3",
    "make_tiny_sdxl",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]

# Shared tiny sizes.
_LATENT_SIZE = 8  # latent height/width; images are 16x16 (VAE factor 2)
_LATENT_CHANNELS = 4
_TEXT_HIDDEN = 32  # CLIP hidden size (and PixArt T5 d_model; SD3 T5 uses 96)
_TEXT_PROJ = 32  # CLIPTextModelWithProjection.projection_dim
_CLIP_MAX_LENGTH = 16  # tokenizer.model_max_length / max_position_embeddings
_WORDS = ("a", "an", "the", "of", "photo", "cat", "dog", "red", "blue", "painting")


# --------------------------------------------------------------------------- #
# tokenizers (written locally, no downloads)
# --------------------------------------------------------------------------- #
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges(words=_WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocab: 256 byte chars, their ``</w>`` variants, merges
    that build each of ``words`` left to right, then the two special tokens
    (last, like real CLIP, so ``eos`` is the largest id)."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        toks = list(word[:-1]) + [word[-1] + "</w>"]
        while len(toks) > 1:
            merge = f"{toks[0]} {toks[1]}"
            new = toks[0] + toks[1]
            if merge not in merges:
                merges.append(merge)
            if new not in vocab:
                vocab[new] = len(vocab)
            toks = [new] + toks[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def tiny_clip_tokenizer(model_max_length: int = _CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` loaded from a ``vocab.json``/``merges.txt`` pair
    written here (~525 tokens). bos = ``<|startoftext|>``, eos = pad =
    ``<|endoftext|>`` (largest id)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A ``T5Tokenizer`` (tokenizers-backed Unigram, transformers>=5 API) with a
    hand-written vocabulary: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁``, a few
    ``▁word`` pieces and single characters; no sentinel ``<extra_id_*>`` tokens.
    No sentencepiece model is needed."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in _WORDS]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------- #
# tiny model builders
# --------------------------------------------------------------------------- #
def _clip_config(vocab_size: int, bos_id: int, eos_id: int, projection_dim: int = _TEXT_PROJ):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _clip_pair(seed: int, with_projection: bool):
    """(text_encoder, tokenizer); the encoder is seeded with ``seed``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer()
    cfg = _clip_config(len(tok), tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval(), tok


def _t5_pair(seed: int, d_model: int, model_max_length: int = 32):
    """(T5EncoderModel, T5Tokenizer); the encoder is seeded with ``seed``."""
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer(model_max_length=model_max_length)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval(), tok


def _tiny_vae(seed: int, latent_channels: int = _LATENT_CHANNELS, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=2 * _LATENT_SIZE,
        **kwargs,
    ).eval()


def _keep_global_rng(fn):
    """Run a builder inside ``torch.random.fork_rng`` so its ``manual_seed``
    calls do not change the caller's global CPU RNG state."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


def _save(pipe, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _unet_cond(seed: int, cross_attention_dim: int, **kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # NB: UNet2DConditionModel's `attention_head_dim` is really the number
        # of heads (legacy naming): 2 and 4 heads -> head dim 8 everywhere.
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        **kwargs,
    ).eval()


# --------------------------------------------------------------------------- #
# families
# --------------------------------------------------------------------------- #
@_keep_global_rng
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
    unet = _unet_cond(seed, cross_attention_dim=_TEXT_HIDDEN, time_cond_proj_dim=time_cond_proj_dim)
    vae = _tiny_vae(seed + 1)
    text_encoder, tokenizer = _clip_pair(seed + 2, with_projection=False)
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
    return _save(pipe, path)


@_keep_global_rng
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
    unet = _unet_cond(
        seed,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + _TEXT_PROJ,
        use_linear_projection=True,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = _tiny_vae(seed + 1, force_upcast=False)
    text_encoder, tokenizer = _clip_pair(seed + 2, with_projection=False)
    text_encoder_2, tokenizer_2 = _clip_pair(seed + 3, with_projection=True)
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
    return _save(pipe, path)


@_keep_global_rng
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
        in_channels=_LATENT_CHANNELS,
        out_channels=2 * _LATENT_CHANNELS,
        num_layers=2,
        norm_num_groups=8,
        sample_size=_LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()
    vae = _tiny_vae(seed + 1)
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
    return _save(pipe, path)


@_keep_global_rng
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

    text_encoder, tokenizer = _t5_pair(seed + 2, d_model=_TEXT_HIDDEN)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=_LATENT_CHANNELS,
        out_channels=2 * _LATENT_CHANNELS,
        num_layers=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=_LATENT_SIZE,
        patch_size=2,
        caption_channels=_TEXT_HIDDEN,
        use_additional_conditions=False,
    ).eval()
    vae = _tiny_vae(seed + 1)
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
    return _save(pipe, path)


@_keep_global_rng
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
    joint_attention_dim = t5_dim if with_t5 else 2 * _TEXT_HIDDEN
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE,
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_PROJ,
        pos_embed_max_size=16,
    ).eval()
    vae = _tiny_vae(
        seed + 1,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder, tokenizer = _clip_pair(seed + 2, with_projection=True)
    text_encoder_2, tokenizer_2 = _clip_pair(seed + 3, with_projection=True)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        text_encoder_3, tokenizer_3 = _t5_pair(seed + 4, d_model=t5_dim, model_max_length=256)
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
    return _save(pipe, path)


@_keep_global_rng
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
    return _save(pipe, path)


TINY_FAMILIES: dict[str, Callable[..., pathlib.Path]] = {
    "sd": make_tiny_sd,
    "sdxl": make_tiny_sdxl,
    "dit": make_tiny_dit,
    "pixart": make_tiny_pixart,
    "sd3": make_tiny_sd3,
    "pixel": make_tiny_pixel,
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


if __name__ == "__main__":
    main()
