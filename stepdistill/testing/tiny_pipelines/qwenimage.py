"""The tiny ``qwenimage`` family (``stepdistill.testing.tiny_pipelines``): Qwen-Image's layout scaled down,
with a tiny Qwen2.5-VL text encoder and a locally written Qwen2 (byte-level BPE) tokenizer."""

from __future__ import annotations

import os
import pathlib

import torch

from .common import LATENT_SIZE, TEXT_HIDDEN, WORDS, bytes_to_unicode, keep_global_rng, save_pipeline

QWEN_LATENT_CHANNELS = 16  # AutoencoderKLQwenImage's z_dim; the transformer sees 2x2 patches: 64 features per token
# Qwen2.5-VL's chat and vision markers: the pipeline's prompt template uses the first two, the model config the rest
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>")


def tiny_qwen2_tokenizer():
    """A ``Qwen2Tokenizer`` (byte-level BPE, the class Qwen-Image ships) with a hand-written vocabulary:
    the 256 byte characters, merges that build each of ``WORDS`` and each after a space (``Ġ``), then
    the special tokens of ``QWEN_SPECIAL``. No download and no tokenizer file is needed."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        toks = list(word)
        while len(toks) > 1:
            pair = (toks[0], toks[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    for word in WORDS:  # a word after a space: the space's byte character, then the whole word
        merges.append(("\u0120", word))
        vocab.setdefault("\u0120" + word, len(vocab))
    for token in QWEN_SPECIAL:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    return tok


def tiny_qwen_text_encoder(seed: int, tok):
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` (hidden 32, 4 heads of 8 with 2 key-value heads,
    multimodal RoPE sections 1 + 1 + 2 = head_dim / 2) with a 1-block vision tower, seeded with ``seed``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": TEXT_HIDDEN, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": TEXT_HIDDEN, "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae(seed: int):
    """``AutoencoderKLQwenImage`` (Qwen-Image's causal 3D VAE, images as one frame) with 16 latent channels,
    one spatial downsampling (``vae_scale_factor`` 2) and Qwen-Image's per-channel latent mean and std."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=QWEN_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                  attn_scales=[], temperal_downsample=[False]).eval()


@keep_global_rng
def make_tiny_qwenimage(path: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Tiny ``QwenImagePipeline``.

    * QwenImageTransformer2DModel: 2 blocks, 2 heads x 16 (RoPE axes 4 + 6 + 6), ``patch_size=2``,
      ``in_channels = 64`` (packed 2x2 patches of 16 latent channels), ``out_channels = 16``,
      ``joint_attention_dim = 32`` (the text encoder's hidden size), no guidance input (as Qwen-Image).
    * Qwen2_5_VLForConditionalGeneration (:func:`tiny_qwen_text_encoder`) + the local ``Qwen2Tokenizer``
      (:func:`tiny_qwen2_tokenizer`). The pipeline's prompt template is tokenised character by
      character here, so its fixed cut of 34 template tokens keeps part of the template: harmless for a
      random encoder, and the pipeline's own behaviour.
    * AutoencoderKLQwenImage (:func:`tiny_qwen_vae`): latents 16x8x8 for 16x16 images. The pipeline's
      ``default_sample_size`` is fixed at 128 by diffusers: call it with ``height=width=16`` (the toolkit's
      ``teacher.sample_size: 8``).
    * FlowMatchEulerDiscreteScheduler with Qwen-Image's config (exponential dynamic shifting with
      ``base_shift`` 0.5 / ``max_shift`` 0.9 over 256..8192 tokens, ``shift_terminal`` 0.02).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = tiny_qwen_vae(seed + 1)
    tokenizer = tiny_qwen2_tokenizer()
    text_encoder = tiny_qwen_text_encoder(seed + 2, tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    return save_pipeline(pipe, path)


TINY_QWEN_SIZE = LATENT_SIZE  # the latent height = width the tiny configs distil at (teacher.sample_size)
