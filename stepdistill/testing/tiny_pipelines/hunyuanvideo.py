"""The tiny ``hunyuanvideo`` family (``stepdistill.testing.tiny_pipelines``): HunyuanVideo's text-to-video
layout scaled down, with its guidance-distilled transformer (the guidance scale is a network input)."""

from __future__ import annotations

import os
import pathlib
import re
import string

import torch

from .common import TEXT_HIDDEN, WORDS, add_word_merges, clip_pair, keep_global_rng, save_pipeline

HV_LATENT_CHANNELS = 4  # latent_channels (16 in HunyuanVideo's VAE)
HV_VIDEO_SIZE = (5, 16, 16)  # (frames, height, width) the tiny configs sample: latents 4 x 2 x 4 x 4
HV_CLIP_LENGTH = 77  # the CLIP tokens HunyuanVideoPipeline always encodes (its max_sequence_length for CLIP)
# Llama 3's special tokens that the pipeline's prompt template uses, with its bos / eos, and an unknown token
LLAMA_SPECIAL = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>")


def _template_words() -> list[str]:
    """The words of HunyuanVideoPipeline's default prompt template (digits left out: Llama 3 splits a
    number from the space before it)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return re.findall(r"[A-Za-z]+", re.sub(r"<\|\w+\|>", " ", DEFAULT_PROMPT_TEMPLATE["template"]))


def tiny_llama_tokenizer():
    """A transformers ``LlamaTokenizer`` (``LlamaTokenizerFast`` is the same class in transformers 5: BPE
    with byte fallback, spaces as "▁") from a vocabulary written here: the special tokens of
    ``LLAMA_SPECIAL``, the 256 byte-fallback tokens, "\\n" and "\\n\\n", printable ASCII characters, one
    "▁word" piece for each word of ``WORDS`` and of the pipeline's prompt template, and the template's
    words that follow a special token ("system", "user", "Describe") without the "▁". The template before
    the prompt is then 95 tokens with the ``<|begin_of_text|>`` in front, as with Llama 3's tokenizer: the
    pipeline's ``crop_start`` (95) cuts exactly the template off. Padding on the right, with the eos token."""
    from transformers import LlamaTokenizer

    vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIAL)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["\n", "\u2581", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = [("\n", "\n")]
    vocab["\n\n"] = len(vocab)
    # the "▁word" merges first (lower ranks), so that the bare words' merges never split a word after a space
    words = ["\u2581" + w for w in dict.fromkeys([*WORDS, *_template_words()])] + ["system", "user", "Describe"]
    add_word_merges(vocab, merges, words)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", add_bos_token=True,
                         add_prefix_space=False, padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIAL[3:])})
    return tok


def tiny_llama(seed: int, tok):
    """A 3-layer ``LlamaModel`` (hidden 32, 4 query heads of 8 sharing 2 key-value heads), seeded with
    ``seed``: the pipeline reads the states of hidden layer -3, here the first layer's output."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaModel(cfg).eval()


def tiny_hunyuanvideo_transformer(seed: int, guidance_embeds: bool = True):
    """HunyuanVideo's HunyuanVideoTransformer3DModel config scaled down: 2 dual-stream and 2 single-stream
    blocks (20 and 40), 1 token-refiner block (2), 2 heads x 16 (24 x 128) with RoPE axes (4, 6, 6)
    ((16, 56, 56)), text states of 32 (4096) and a pooled projection of 32 (768); patch 2 x 2, temporal
    patch 1, RMS qk norm, mlp ratio 4 and ``guidance_embeds`` as in the public config."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=HV_LATENT_CHANNELS,
        out_channels=HV_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=guidance_embeds,
        text_embed_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        rope_theta=256.0,
        rope_axes_dim=(4, 6, 6),
    ).eval()


def tiny_hunyuanvideo_vae(seed: int):
    """An AutoencoderKLHunyuanVideo of three stages (8, 16, 16 channels; the public one has four of 128 to
    512), the first two halving space (spatial factor 4) and time (temporal factor 4: the causal VAE
    encodes frame 1, then groups of 4), 4 latent channels, HunyuanVideo's ``scaling_factor`` 0.476986."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        latent_channels=HV_LATENT_CHANNELS,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    ).eval()


@keep_global_rng
def make_tiny_hunyuanvideo(path: str | os.PathLike, *, guidance_embeds: bool = True, shift: float = 7.0,
                           seed: int = 0) -> pathlib.Path:
    """Tiny ``HunyuanVideoPipeline`` (text-to-video, HunyuanVideo's layout).

    * HunyuanVideoTransformer3DModel (:func:`tiny_hunyuanvideo_transformer`), seeded with ``seed``, with a
      guidance input (``guidance_embeds``; the pipeline feeds it ``guidance_scale`` x 1000, default 6).
    * AutoencoderKLHunyuanVideo (:func:`tiny_hunyuanvideo_vae`), seed ``seed + 1``.
    * LlamaModel (:func:`tiny_llama`) + LlamaTokenizer (:func:`tiny_llama_tokenizer`), seed ``seed + 2``;
      CLIPTextModel of 77 positions + CLIPTokenizer (``common.clip_pair``), seed ``seed + 3``.
    * FlowMatchEulerDiscreteScheduler with HunyuanVideo's ``shift`` 7.
    * ``__call__`` needs ``height`` and ``width`` divisible by 16 and ``num_frames`` = 4k + 1; the tiny
      configs use 5 frames of 16 x 16 (latents 4 x 2 x 4 x 4). Prompts are 256 Llama tokens after the
      template (``max_sequence_length``) and 77 CLIP tokens, as in the real pipeline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    transformer = tiny_hunyuanvideo_transformer(seed, guidance_embeds)
    vae = tiny_hunyuanvideo_vae(seed + 1)
    tokenizer = tiny_llama_tokenizer()
    text_encoder = tiny_llama(seed + 2, tokenizer)
    text_encoder_2, tokenizer_2 = clip_pair(seed + 3, with_projection=False, max_length=HV_CLIP_LENGTH)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return save_pipeline(pipe, path)
