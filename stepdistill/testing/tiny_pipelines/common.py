"""What the tiny families share: sizes, locally written tokenizers, tiny text encoders and VAE, and
the seeding and saving conventions (``stepdistill.testing.tiny_pipelines``)."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import string
import tempfile

import torch

# Shared tiny sizes.
LATENT_SIZE = 8  # latent height/width; images are 16x16 (VAE factor 2)
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32  # CLIP hidden size (and PixArt T5 d_model; SD3 T5 uses 96)
TEXT_PROJ = 32  # CLIPTextModelWithProjection.projection_dim
CLIP_MAX_LENGTH = 16  # tokenizer.model_max_length / max_position_embeddings
WORDS = ("a", "an", "the", "of", "photo", "cat", "dog", "red", "blue", "painting")


# --------------------------------------------------------------------------- #
# tokenizers (written locally, no downloads)
# --------------------------------------------------------------------------- #
def bytes_to_unicode() -> dict[int, str]:
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


def clip_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocab: 256 byte chars, their ``</w>`` variants, merges
    that build each of ``words`` left to right, then the two special tokens
    (last, like real CLIP, so ``eos`` is the largest id)."""
    chars = list(bytes_to_unicode().values())
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


def add_word_merges(vocab: dict[str, int], merges: list[tuple[str, str]], words) -> None:
    """Extend a BPE ``vocab`` and ``merges`` (in place) so that each of ``words`` is one token: its
    characters merged left to right, each merge added once."""
    for word in words:
        pieces = list(word)
        while len(pieces) > 1:
            pair, new = (pieces[0], pieces[1]), pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(new, len(vocab))
            pieces = [new, *pieces[2:]]


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A ``CLIPTokenizer`` loaded from a ``vocab.json``/``merges.txt`` pair
    written here (~525 tokens). bos = ``<|startoftext|>``, eos = pad =
    ``<|endoftext|>`` (largest id)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
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
    vocab += [("\u2581" + w, -3.0) for w in WORDS]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------- #
# tiny model builders
# --------------------------------------------------------------------------- #
def clip_config(vocab_size: int, bos_id: int, eos_id: int, projection_dim: int = TEXT_PROJ,
                max_length: int = CLIP_MAX_LENGTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def clip_pair(seed: int, with_projection: bool, max_length: int = CLIP_MAX_LENGTH):
    """(text_encoder, tokenizer) of ``max_length`` tokens; the encoder is seeded with ``seed``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer(max_length)
    cfg = clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, max_length=max_length)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval(), tok


def t5_pair(seed: int, d_model: int, model_max_length: int = 32, umt5: bool = False):
    """(T5EncoderModel, T5Tokenizer); the encoder is seeded with ``seed``. ``umt5``: Wan's UMT5 encoder of
    the same layout (UMT5EncoderModel) with the same tokenizer."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer(model_max_length=model_max_length)
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = config_cls(
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
    return model_cls(cfg).eval(), tok


def tiny_vae(seed: int, latent_channels: int = LATENT_CHANNELS, **kwargs):
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
        sample_size=2 * LATENT_SIZE,
        **kwargs,
    ).eval()


def keep_global_rng(fn):
    """Run a builder inside ``torch.random.fork_rng`` so its ``manual_seed``
    calls do not change the caller's global CPU RNG state."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


def save_pipeline(pipe, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def unet_cond(seed: int, cross_attention_dim: int, **kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
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
