"""Files on disk as the data layer reads them: prompt lists (.txt, .json), image folders with
``<name>.txt`` captions or class folders, and images decoded to tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DataError
from ..models.shipped import image_folder

logger = logging.getLogger("stepdistill")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{what} '{path}' cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from None


def read_prompts(spec: str | Sequence[str], skip_bad: bool = False) -> list[str]:
    """Prompts from an inline list, a .txt file (one per line) or a .json list of strings."""
    if isinstance(spec, (list, tuple)):
        prompts, where = list(spec), "data.prompts"
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"data.prompts: prompt file '{path}' " + ("is a folder, not a file" if path.is_dir()
                                                                      else "does not exist"))
        where = str(path)
        text = _read_text(path, "prompt file")
        if path.suffix == ".json":
            try:
                prompts = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"prompt file '{path}' is not valid JSON: {exc}") from exc
            if not isinstance(prompts, list):
                raise DataError(f"prompt file '{path}' must hold a JSON list of strings")
        else:
            prompts = text.splitlines()
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            if skip_bad:
                continue
            raise DataError(f"{where}: prompt {i + 1} is empty or not text ({p!r}); remove it or set data.skip_bad_items=true")
        out.append(p.strip())
    if not out:
        raise DataError(f"{where}: no usable prompts")
    if len(out) < len(prompts):
        logger.warning("%s: skipped %d empty or non-text prompts of %d (data.skip_bad_items=true)", where,
                       len(prompts) - len(out), len(prompts))
    return out


SKIP_HINT = "remove it or set data.skip_bad_items=true"


def unreadable(what: str, exc: BaseException) -> str:
    """The one line that says the image ``what`` cannot be read because of ``exc``."""
    return f"{what} cannot be read ({type(exc).__name__})"


def list_images(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (``data.images``; ``stepdistill:<name>`` names shipped real images)."""
    try:
        folder = image_folder(folder)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    if not folder.is_dir():
        raise DataError(f"data.images: image folder '{folder}' " + ("is a file, not a folder" if folder.exists()
                                                                     else "does not exist"))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.images: image folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def image_captions(files: Sequence[Path], skip_bad: bool = False) -> tuple[list[Path], list[str] | None]:
    """(files, captions): each image's caption from ``<name>.txt`` beside it, or None when no image has
    one. Once any image has a caption, every image needs one (``skip_bad``: images without are dropped)."""
    sidecars = [f.with_suffix(".txt") for f in files]
    if not any(c.is_file() for c in sidecars):
        return list(files), None
    kept, captions = [], []
    for f, c in zip(files, sidecars):
        text = _read_text(c, "caption file").strip() if c.is_file() else ""
        if not text:
            if skip_bad:
                continue
            raise DataError(f"image '{f}' has no caption ('{c.name}' {'is empty' if c.is_file() else 'is missing'}) while "
                            f"other images have one; add it or set data.skip_bad_items=true")
        kept.append(f)
        captions.append(text)
    if not kept:
        raise DataError("data.images: no image with a caption")
    return kept, captions


def folder_labels(files: Sequence[Path], num_classes: int) -> list[int]:
    """Class labels from the images' folder names (``<label>/<name>.png``), each in [0, num_classes)."""
    labels = []
    for f in files:
        name = f.parent.name
        if not name.isdigit() or int(name) >= num_classes:
            raise DataError(f"image '{f}': a class-conditional teacher's real images sit in folders named by their "
                            f"class (0..{num_classes - 1}), not '{name}'")
        labels.append(int(name))
    return labels


def load_images(files: Sequence[Path], size: int, channels: int, skip_bad: bool = False) -> tuple[torch.Tensor, list[Path]]:
    """Images resized (shorter side) and centre-cropped to ``size``, in [-1, 1], (N, C, size, size)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    out, kept = [], []
    for f in files:
        what = f"image '{f}'"
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
                out.append(TF.to_tensor(im) * 2 - 1)
                kept.append(f)
        except Exception as exc:
            # whatever PIL raises for a file (truncated, not an image, odd modes, bombs) is one bad
            # item: PIL's plugins raise many exception types for broken data
            if not skip_bad:
                raise DataError(f"{unreadable(what, exc)}; {SKIP_HINT}") from exc
    if not out:
        raise DataError(f"data.images: none of the {len(files)} images can be read")
    return torch.stack(out), kept
