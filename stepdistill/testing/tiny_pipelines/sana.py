"""The tiny ``sana`` family (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import string

import torch

from .common import LATENT_CHANNELS, LATENT_SIZE, TEXT_HIDDEN, WORDS, add_word_merges, keep_global_rng, save_pipeline

GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, in Gemma's order
SANA_LATENT_FACTOR = 4  # the tiny DC-AE's downsampling: SanaPipeline wants image sides divisible by 32


def _instruction_words() -> list[str]:
    """The words of SanaPipeline's default complex human instruction, which its ``__call__`` puts before
    every prompt: with a merge each, the instruction is ~250 tokens instead of ~940 single characters."""
    from diffusers import SanaPipeline

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return sorted(set(re.findall(r"[A-Za-z]+", "\n".join(chi or []))))


def tiny_gemma_tokenizer():
    """A real transformers ``GemmaTokenizer`` (BPE with byte fallback, spaces as "▁", a ``<bos>`` in front)
    built from a vocabulary written here: Gemma's five special tokens, the 256 byte-fallback tokens
    ``<0x00>``-``<0xFF>``, "▁", printable ASCII characters, and one "▁word" piece (with the merges that
    build it) for each word of ``WORDS`` and of the pipeline's default instruction. Text outside the
    vocabulary falls back to bytes, as Gemma's does; no sentencepiece model or download is needed."""
    from transformers import GemmaTokenizer

    vocab = {tok: i for i, tok in enumerate(GEMMA_SPECIAL)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    add_word_merges(vocab, merges, ["\u2581" + word for word in dict.fromkeys([*WORDS, *_instruction_words()])])
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=8192)


def tiny_gemma2(seed: int, vocab_size: int):
    """A 2-layer ``Gemma2Model`` (hidden 32, 2 query heads sharing 1 key/value head of 16, Gemma 2's
    soft-capping and alternating sliding-window layers from the config defaults), seeded with ``seed``."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)
    torch.manual_seed(seed)
    return Gemma2Model(cfg).eval()


def tiny_dc_ae(seed: int, latent_channels: int = LATENT_CHANNELS):
    """A 3-stage ``AutoencoderDC`` (spatial factor 4; Sana's DC-AE f32c32 has 6 stages), with its
    residual stages followed by an EfficientViT (linear attention) stage, pixel (un)shuffle resampling,
    RMS-norm decoder and DC-AE f32c32's ``scaling_factor``. The encoder is deterministic (``.latent``)."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=4,
        encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()


@keep_global_rng
def make_tiny_sana(path: str | os.PathLike, *, flow_shift: float = 3.0, seed: int = 0) -> pathlib.Path:
    """Tiny ``SanaPipeline`` (SanaTransformer2DModel + Gemma2Model + GemmaTokenizer + AutoencoderDC +
    DPMSolverMultistepScheduler on flow sigmas, the scheduler Sana ships with).

    * SanaTransformer2DModel as Sana 1600M scaled down: patch size 1, linear self-attention of 2 heads
      x 16, cross-attention of 2 heads x 16 onto the Gemma states (``caption_channels = 32``), 2 blocks,
      ``mlp_ratio=2.5``, ``sample_size=8``; ``timestep_scale=1`` (the pipeline multiplies by it).
    * Latents 4x8x8, images 3x32x32 (DC-AE factor 4; the pipeline wants multiples of 32).
    * DPMSolverMultistepScheduler(``use_flow_sigmas=True``, ``flow_shift``, ``flow_prediction``),
      Sana's own configuration: a flow-matching process with shift ``flow_shift``.
    * Calling the pipeline needs ``use_resolution_binning=False`` (binning exists for sample sizes
      16/32/64/128 and asks for 512-4096px images) and ``height``/``width`` (default 1024), e.g. 32.
      Its default ``complex_human_instruction`` is prepended to each prompt (not to the negative one);
      text states are ``max_sequence_length`` (300) tokens: the first and the last 299.
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=TEXT_HIDDEN, mlp_ratio=2.5, sample_size=LATENT_SIZE, patch_size=1,
    ).eval()
    vae = tiny_dc_ae(seed + 1)
    tokenizer = tiny_gemma_tokenizer()
    text_encoder = tiny_gemma2(seed + 2, len(tokenizer))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=flow_shift, algorithm_type="dpmsolver++",
                                            solver_order=2)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    return save_pipeline(pipe, path)
