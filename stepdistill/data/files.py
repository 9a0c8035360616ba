"""Files on disk as the data layer reads them: prompt lists (.txt, .json), image folders with
``<name>.txt`` captions or class folders, and images decoded to tensors. ``to_8bit`` is how every
image path (here, ``loading``, ``streaming``, the data cache, FID and CLIP score) reads an image's
pixels, whatever its mode."""

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
    if isinstance(exc, DataError):  # to_8bit's refusal already names the image and says why
        return " ".join(str(exc).split())
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


def _decoded(im, what: str):
    """The pixels of an image PIL opened, as an array (16-bit and float modes keep their values)."""
    import numpy as np

    arr = np.asarray(im)
    if arr.size == 0:
        raise DataError(f"{what} holds no pixels")
    return arr


def to_8bit(image, channels: int, what: str = "image"):
    """``image`` (any mode PIL opens) as 8 bits per channel, in mode "L" (``channels == 1``) or "RGB",
    mapped by the range its mode really holds, so every image path reads the same pixels:

    - "RGB" and "L" are returned exactly as ``image.convert(mode)`` gives them, so results made from
      ordinary 8-bit files do not change (a colour-key ``transparency`` of such a file is ignored);
    - "1", "P" (through its palette), "CMYK", "YCbCr", "LAB", "HSV": PIL's own conversion;
    - 16-bit modes ("I;16", "I;16B", "I;16L", "I;16N"): value / 257, rounded (0..65535 -> 0..255);
    - "I" (32-bit integers; how PIL opens many 16-bit PNG and TIFF files): values all within 0..255 are
      8-bit values as they are, else values within 0..65535 are 16-bit (/ 257, rounded); others refused;
    - "F" (float): values within [0, 1] are scaled by 255, else values within [0, 255] are kept (both
      rounded); others refused;
    - transparency ("LA", "La", "PA", "RGBA", "RGBa", "P" with a transparency entry or an RGBA palette):
      composited over white, then converted. White, not black, because transparent areas of real
      images (logos, cut-outs, scans) are meant to be seen on a page, and an unpremultiplied colour
      under alpha 0 is arbitrary; the same choice everywhere keeps training and evaluation alike.

    ``what`` names the image in the one-line DataError a refused value range raises."""
    import numpy as np
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    m = image.mode
    if m in ("RGB", "L"):
        return image.convert(mode)
    if m in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = _decoded(image, what).astype(np.uint32)  # (v + 128) // 257 is round(v / 257): 257 is odd, no ties
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8)).convert(mode)
    if m == "I":
        arr = _decoded(image, what).astype(np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"{what} has mode 'I' values {lo}..{hi}, outside 0..65535: neither 8- nor 16-bit, so "
                            f"it cannot be read as 8 bits")
        arr = arr if hi <= 255 else (arr + 128) // 257
        return Image.fromarray(arr.astype(np.uint8)).convert(mode)
    if m == "F":
        arr = _decoded(image, what).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if not (lo >= 0 and hi <= 255):  # NaN fails this too
            raise DataError(f"{what} has mode 'F' values {lo:g}..{hi:g}, outside [0, 1] and [0, 255], so it "
                            f"cannot be read as 8 bits")
        arr = arr * 255 if hi <= 1 else arr
        return Image.fromarray(np.floor(arr + 0.5).astype(np.uint8)).convert(mode)
    palette = getattr(image, "palette", None)
    if m in ("LA", "La", "PA", "RGBA", "RGBa") or (m == "P" and ("transparency" in image.info or
                                                              getattr(palette, "mode", None) == "RGBA")):
        rgba = image.convert("LA").convert("RGBA") if m == "La" else image.convert("RGBA")  # PIL has no La -> RGBA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(mode)
    if m == "LAB" and mode == "L":
        return image.convert("RGB").convert("L")  # PIL converts LAB to RGB only
    return image.convert(mode)


def load_images(files: Sequence[Path], size: int, channels: int, skip_bad: bool = False) -> tuple[torch.Tensor, list[Path]]:
    """Images resized (shorter side) and centre-cropped to ``size``, in [-1, 1], (N, C, size, size)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    out, kept = [], []
    for f in files:
        what = f"image '{f}'"
        try:
            with Image.open(f) as im:
                im = to_8bit(im, channels, what)
                im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
                out.append(TF.to_tensor(im) * 2 - 1)
                kept.append(f)
        except Exception as exc:
            # whatever PIL raises for a file (truncated, not an image, odd modes, bombs, a range to_8bit
            # refuses) is one bad item: PIL's plugins raise many exception types for broken data
            if not skip_bad:
                raise DataError(f"{unreadable(what, exc)}; {SKIP_HINT}") from exc
    if not out:
        raise DataError(f"data.images: none of the {len(files)} images can be read")
    return torch.stack(out), kept
