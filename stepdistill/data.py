"""Batches: conditioning (prompts, class labels), real data when the source has it, and the
per-step random stream.

Real images come paired with their own conditioning: a caption in ``<name>.txt`` beside each image
(text teachers), or the integer name of the image's folder (class-conditional teachers). A batch's
``x0`` and ``x0_cond`` are rows of the same items, so no code path pairs a real image with another
item's caption.

Every batch is a pure function of (seed, step, micro-batch): noise, times and prompt choice come from
a generator seeded by those numbers, so a resumed run sees exactly the batches an uninterrupted run
would (no data-loader state to save). With several processes every rank draws the global micro-batch
and keeps its own rows (``Batch.per_sample``), so a run's batches do not depend on how many processes
share them: 2 processes see exactly the 1-process run's global batch, split in two.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .denoiser import Cond
from .errors import DataError

logger = logging.getLogger("stepdistill")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixing several integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1 << 32, 1], dtype=np.uint64)) & ((1 << 63) - 1))


@dataclass
class Batch:
    size: int  # this rank's rows
    generator: torch.Generator  # CPU generator for this (step, micro-batch), the same on every rank
    device: torch.device
    cond: Cond | None = None
    uncond: Cond | None = None
    labels: torch.Tensor | None = None
    prompts: list | None = None
    x0: torch.Tensor | None = None  # real data (denoiser space) when the source has it
    x0_cond: Cond | None = None  # the conditioning of those real items (their own captions or labels)
    offset: int = 0  # this rank's first row in the global micro-batch
    total: int | None = None  # the global micro-batch's rows (all ranks); None: this batch's size

    def per_sample(self, draw) -> torch.Tensor:
        """``draw(n)`` (a per-sample draw from ``self.generator``, n rows) made for the global micro-batch,
        this rank's rows of it: every rank advances the generator alike, and the rows do not depend on
        the number of processes."""
        total = self.total or self.size
        out = draw(total)
        return out if total == self.size else out[self.offset:self.offset + self.size]

    def _draw(self, fn, shape) -> torch.Tensor:
        if shape and shape[0] == self.size:  # one row per sample: the global draw, sliced
            return self.per_sample(lambda n: fn((n, *shape[1:]), generator=self.generator)).to(self.device)
        return fn(shape, generator=self.generator).to(self.device)  # a draw for the whole batch: every rank alike

    def randn(self, *shape: int) -> torch.Tensor:
        return self._draw(torch.randn, shape)

    def rand(self, *shape: int) -> torch.Tensor:
        return self._draw(torch.rand, shape)

    def times(self, process, lo: float, hi: float) -> torch.Tensor:
        """One time per sample, uniform in [lo, hi] (``process.sample_uniform``), on the batch's device."""
        return self.per_sample(lambda n: process.sample_uniform(n, lo, hi, generator=self.generator)).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """One integer in [low, high) per sample (on the CPU)."""
        return self.per_sample(lambda n: torch.randint(low, high, (n,), generator=self.generator))

    def fork(self, tag: int) -> "Batch":
        """The same batch with an independent random stream (for a second phase of the step)."""
        g = torch.Generator().manual_seed(stream_seed(self.generator.initial_seed(), tag))
        return Batch(self.size, g, self.device, self.cond, self.uncond, self.labels, self.prompts, self.x0, self.x0_cond,
                     self.offset, self.total)


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


def list_images(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (``data.images``; ``stepdistill:<name>`` names shipped real images)."""
    from .shipped import image_folder

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
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.functional as TF

    out, kept = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
                out.append(TF.to_tensor(im) * 2 - 1)
                kept.append(f)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # every way PIL refuses a file (truncated, not an image, odd modes, bombs) is one bad item
            if not skip_bad:
                raise DataError(f"image '{f}' cannot be read ({type(exc).__name__}); remove it or set data.skip_bad_items=true") from exc
    if not out:
        raise DataError(f"data.images: none of the {len(files)} images can be read")
    return torch.stack(out), kept


# one-off draws outside the loop (teacher-sample pools, DMD's regression pairs, the GAN head's probe,
# validation samples) have named streams at negative positions of the (step, rank) space, which loop
# iterations never reach
STREAMS = {"pool": -1, "gan_probe": -3, "regression_pairs": -7, "validation": -10**9}
PROMPT_CACHE_LIMIT = 512  # prompt lists up to this many distinct prompts are encoded once, at start


class PromptTable:
    """Text conditioning of a caption list, by index. A short list (<= PROMPT_CACHE_LIMIT distinct
    prompts) is run through the text encoder once and rows are looked up; rows of a data cache
    (``stepdistill.cache``) are read from disk; other lists are encoded batch by batch."""

    def __init__(self, teacher, prompts, cache_rows=None):
        self.teacher, self.prompts = teacher, prompts
        self.cached = None  # (index of each prompt, cond of the distinct prompts, uncond row), on the CPU
        self.cache_rows = cache_rows  # (rows(idx) -> Cond, uncond Cond) from a data cache
        small = prompts if isinstance(prompts, list) else prompts.small_list(8 * PROMPT_CACHE_LIMIT)
        if cache_rows is None and small is not None and len(set(small)) <= PROMPT_CACHE_LIMIT:
            distinct = list(dict.fromkeys(small))
            parts = [teacher.encode(distinct[i:i + 64]) for i in range(0, len(distinct), 64)]
            where = {p: i for i, p in enumerate(distinct)}
            self.cached = (torch.tensor([where[p] for p in small]), Cond.cat_all([c for c, _ in parts]).to("cpu"),
                           parts[0][1][:1].to("cpu"))

    def __len__(self) -> int:
        return len(self.prompts)

    def encode(self, idx: torch.Tensor, device) -> tuple[Cond, Cond, list[str]]:
        """(cond, uncond, prompts) of the prompts at ``idx``."""
        prompts = [self.prompts[i] for i in idx.tolist()]
        if self.cache_rows is not None:
            rows, empty = self.cache_rows
            return rows(idx).to(device), empty.to(device).expand_to(len(prompts)), prompts
        if self.cached is None:
            cond, uncond = self.teacher.encode(prompts)
            return cond, uncond, prompts
        rows, table, empty = self.cached  # the text encoder's own states, stored at start
        return table[rows[idx]].to(device), empty.to(device).expand_to(len(prompts)), prompts


class BatchSource:
    """Makes the batch for (step, rank, micro) from a teacher and the data config: conditioning drawn
    from the prompt list (or class labels), and real items (images in the denoiser's space with their
    own captions or labels, or exact oracle samples) when the source has them. Without a prompt list,
    a text teacher's generation prompts are the drawn real items' captions.

    Real items come as ``x0_data`` (a small set, encoded once and held on the device) or ``real``
    (``loading.RealData``: a large set decoded and encoded per batch, or read from a data cache), whose
    item indices come from a stream of their own (``image_generator``) so that they can be planned
    ahead. ``cache`` (``cache.DataCache``) supplies the captions' and items' text states."""

    def __init__(self, teacher, *, seed: int, device, prompts=None,
                 x0_data: torch.Tensor | None = None, x0_captions=None,
                 x0_labels=None, oracle=None, conditional: bool | None = None, rank: int = 0,
                 real=None, cache=None, stream=None):
        self.teacher = teacher
        self.rank = rank  # this process's index (data streams differ per rank)
        self.seed = seed
        self.device = torch.device(device)
        self.prompts = prompts
        self.x0_data = x0_data
        self.real = real
        self.stream = stream  # streaming.StreamData: real items read in stream order
        self.oracle = oracle  # a GaussianMixture: exact data samples
        self.conditional = teacher.conditional if conditional is None else conditional
        text = self.conditional and teacher.null_label is None
        if (x0_data is not None or real is not None) and self.conditional and oracle is None:
            if text and x0_captions is None:
                raise DataError(f"data.images: teacher {teacher.name} is text-conditioned, so its real images need "
                                f"their own captions: put <name>.txt beside each image")
            if not text and x0_labels is None:
                raise DataError(f"data.images: teacher {teacher.name} is class-conditional, so its real images need "
                                f"their labels: put them in folders named by class")
        if text and not prompts and x0_captions is None and stream is None:
            raise DataError(f"data.prompts: teacher {teacher.name} is text-conditioned; give prompts (a .txt/.json file "
                            f"or a list) or captioned images (data.images)")
        self.prompt_table = PromptTable(teacher, prompts, cache and cache.prompt_rows()) if text and prompts else None
        self.caption_table = (PromptTable(teacher, x0_captions, cache and cache.item_rows())
                              if text and x0_captions is not None else None)
        self.x0_labels = None if x0_labels is None else torch.as_tensor(x0_labels)

    @property
    def has_real(self) -> bool:
        """Whether batches carry real data items (images or exact oracle samples)."""
        return self.x0_data is not None or self.real is not None or self.oracle is not None or self.stream is not None

    @property
    def fully_cached(self) -> bool:
        """Whether every prompt and caption this source draws was encoded at start or is read from a
        data cache (no text encoder runs per batch)."""
        tables = [t for t in (self.prompt_table, self.caption_table) if t is not None]
        return bool(tables) and all(t.cached is not None or t.cache_rows is not None for t in tables)

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(self.seed, step, 0, micro))  # (0: the former rank slot)

    def image_generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The stream of the large-set path's item indices and VAE noise (``real``)."""
        return torch.Generator().manual_seed(stream_seed(self.seed, step, 1, micro))

    def item_rows(self, step: int, micro: int, size: int, offset: int, total: int) -> torch.Tensor:
        """The item indices of this rank's rows of (step, micro) on the large-set path."""
        rows = Batch(size, self.image_generator(step, micro), self.device, offset=offset, total=total)
        return rows.randint(0, len(self.real))

    def prefetch(self, start: int, micro_batches: int, rank: int, size: int, num_ranks: int) -> None:
        """Plan the loop's batches from ``start`` on, so that loader workers decode their images ahead."""
        if self.real is None:
            return
        import itertools

        keys = ((s, k) for s in itertools.count(start) for k in range(micro_batches))
        self.real.prefetch(keys, lambda key: self.item_rows(key[0], key[1], size, rank * size, size * num_ranks))

    def conditioning(self, rows: Batch):
        """(cond, uncond, labels, prompts) of random draws from the prompt list or the classes, one per row."""
        if not self.conditional:
            return None, None, None, None
        t, g = self.teacher, rows.generator
        if t.null_label is not None:
            if self.oracle is not None:
                weights = self.oracle.weights.float()
                labels = rows.per_sample(lambda n: torch.multinomial(weights, n, replacement=True, generator=g))
            else:
                labels = rows.randint(0, t.null_label)
            cond, uncond = t.encode(labels.to(self.device))
            return cond, uncond, labels, None
        idx = rows.randint(0, len(self.prompt_table))
        cond, uncond, prompts = self.prompt_table.encode(idx, self.device)
        return cond, uncond, None, prompts

    def item_conditioning(self, idx: torch.Tensor):
        """(cond, uncond, labels, prompts) of the real items at ``idx``: their own captions or labels."""
        if not self.conditional:
            return None, None, None, None
        if self.caption_table is not None:
            cond, uncond, prompts = self.caption_table.encode(idx, self.device)
            return cond, uncond, None, prompts
        labels = self.x0_labels[idx]
        cond, uncond = self.teacher.encode(labels.to(self.device))
        return cond, uncond, labels, None

    def draw(self, stream: str, size: int, index: int = 0) -> Batch:
        """A batch of the named one-off stream (``STREAMS``; rank 0's, so every rank draws the same);
        ``index`` moves along a stream that is drawn in several pieces."""
        return self.batch(STREAMS[stream] - index, 0, size)

    def batch(self, step: int, rank: int, size: int, micro: int = 0, num_ranks: int = 1) -> Batch:
        """Rank ``rank``'s ``size`` rows of micro-batch ``micro`` of ``step``, whose global size is
        ``size * num_ranks``."""
        g = self.generator(step, micro)
        rows = Batch(size, g, self.device, offset=rank * size, total=size * num_ranks)
        x0 = x0_cond = None
        if self.stream is not None:  # items in stream order with their own conditioning
            x0, icond, iuncond, ilabels, iprompts = self.stream.fetch((step, micro), size, self.image_generator(step, micro))
            x0_cond = icond
            if self.conditional and self.prompt_table is None and self.teacher.null_label is None:
                cond, uncond, labels, prompts = icond, iuncond, ilabels, iprompts
            else:
                cond, uncond, labels, prompts = self.conditioning(rows)
        elif self.real is not None:
            # a large set: item indices and VAE noise from the items' own stream
            irows = Batch(size, self.image_generator(step, micro), self.device, offset=rows.offset, total=rows.total)
            idx = irows.randint(0, len(self.real))
            noise = irows.randn(size, *self.teacher.sample_shape) if self.teacher.vae is not None else None
            x0 = self.real.latents((step, micro), idx, noise)
            icond, iuncond, ilabels, iprompts = self.item_conditioning(idx)
            x0_cond = icond
            if self.conditional and self.prompt_table is None and self.teacher.null_label is None:
                cond, uncond, labels, prompts = icond, iuncond, ilabels, iprompts
            else:
                cond, uncond, labels, prompts = self.conditioning(rows)
        elif self.x0_data is not None and self.oracle is None and self.conditional and self.prompt_table is None \
                and self.teacher.null_label is None:
            # no prompt list: the real items' own captions are the batch's prompts
            idx = rows.randint(0, len(self.x0_data))
            cond, uncond, labels, prompts = self.item_conditioning(idx)
            x0, x0_cond = self.x0_data[idx], cond
        else:
            cond, uncond, labels, prompts = self.conditioning(rows)
            if self.oracle is not None:
                # the exact samples of the global batch's labels (drawn with them), this rank's rows
                x0 = self.oracle.sample_rows(rows, labels)
                x0_cond = cond  # each exact sample is drawn from the class it is conditioned on
            elif self.x0_data is not None:
                idx = rows.randint(0, len(self.x0_data))
                x0 = self.x0_data[idx]
                x0_cond = self.item_conditioning(idx)[0]
        return Batch(size, g, self.device, cond, uncond, labels, prompts,
                     None if x0 is None else x0.to(self.device), x0_cond, rows.offset, rows.total)
