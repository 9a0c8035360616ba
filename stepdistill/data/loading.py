"""Real images of large sets, loaded per batch: decoded and cropped in ``DataLoader`` workers ahead of
the step that uses them, then VAE-encoded on the accelerator (or read from a data cache).

Image folders and COCO files of up to ``IN_MEMORY_ITEMS`` items, centre-cropped, keep the small-set
path: every image encoded once at start and held on the device (``data.BatchSource.x0_data``). Larger
sets, random crops, webdataset shards and datasets never sit in memory: a batch draws item
indices from its own counter-based stream (seed, step, micro), so the loader knows the indices of
every future batch and its workers decode them ahead, and a resumed run draws the same items.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque

import torch

from ..errors import DataError, InputError
from .files import SKIP_HINT, to_8bit, unreadable
from .seeds import TAGS, stream_seed

logger = logging.getLogger("stepdistill")
IN_MEMORY_ITEMS = 4096  # sets up to this many images are encoded once at start and held on the device
PREFETCH_STEPS = 4  # (step, micro) batches planned ahead of the one in use


def refuse_still_images(teacher: str, what: str) -> None:
    """Real data (folders, shards, datasets, data caches of items) are still images; a video teacher's
    latents have frames, so they cannot train it."""
    raise DataError(f"data.images: teacher {teacher} makes videos ({what}); real data here are still images, which "
                    f"cannot train it: distill it from data.prompts alone")


def image_geometry(teacher) -> tuple[int, int]:
    """(pixel size, channels) real images are cropped to: the teacher's sample size in pixels."""
    scale = getattr(teacher.pipeline, "vae_scale_factor", 1) if teacher.vae is not None else 1
    # AutoencoderKL's in_channels; Qwen-Image's video VAE names them input_channels
    channels = (getattr(teacher.vae.config, "in_channels", None) or teacher.vae.config.input_channels) \
        if teacher.vae is not None else teacher.sample_shape[0]
    return teacher.sample_shape[-1] * scale, channels


def transform(image, size: int, channels: int, crop: str, generator=None, what: str = "image"):
    """An image resized (shorter side) and cropped to ``size`` x ``size``, in [-1, 1], with the
    original (height, width) and the crop's (top, left) corner (SDXL's micro-conditioning), as the
    diffusers training scripts do: centre crop, or a random crop drawn from ``generator``. The image
    is read to 8 bits by ``files.to_8bit`` (``what`` names it if its values are refused)."""
    import torchvision.transforms.functional as TF

    im = to_8bit(image, channels, what)
    original = (im.height, im.width)
    im = TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if crop == "random":
        top = int(torch.randint(0, im.height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, im.width - size + 1, (1,), generator=generator))
    else:
        top, left = max(0, round((im.height - size) / 2)), max(0, round((im.width - size) / 2))
    im = TF.crop(im, top, left, size, size)
    return TF.to_tensor(im) * 2 - 1, original, (top, left)


class Decoded(torch.utils.data.Dataset):
    """What the loader workers run: item index -> (pixels, original size, crop corner, index). An
    unreadable image is an error naming it, or (``skip_bad``) replaced by the next readable item."""

    def __init__(self, items, size: int, channels: int, crop: str, seed: int, skip_bad: bool):
        self.items, self.size, self.channels, self.crop, self.seed, self.skip_bad = items, size, channels, crop, seed, skip_bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        line = ""
        for k in range(min(len(self.items), 64)):
            j = (int(i) + k) % len(self.items)
            name = self.items.name(j)
            try:
                g = torch.Generator().manual_seed(stream_seed(self.seed, j, TAGS["item_crop"]))  # the item's own random crop
                pixels, original, corner = transform(self.items.image(j), self.size, self.channels, self.crop, g, name)
                return pixels, torch.tensor(original), torch.tensor(corner), j
            except Exception as exc:
                # PIL's plugins raise many exception types for broken data; each is this item's fault
                line = unreadable(name, exc)
                if not self.skip_bad:
                    raise DataError(f"{line}; {SKIP_HINT}") from exc
                logger.warning("%s: using the next item (data.skip_bad_items=true)", line)
        raise DataError(f"{self.items.where}: 64 consecutive items cannot be read (the last: {line})")


class Failed:
    """What a loader worker hands back in place of a batch it could not make: the error as one line.
    Torch re-raises a worker's exception as a many-line "Caught ... in DataLoader worker process"
    message of another type; a record passes through the worker queue unchanged instead."""

    def __init__(self, exc: BaseException):
        line = " ".join(str(exc).split())  # one line, whatever the message held
        # bad input (Decoded makes every unreadable item a DataError) keeps its class; anything else
        # is a RuntimeError that says which exception it was
        self.kind = type(exc) if isinstance(exc, InputError) else RuntimeError
        self.line = line if isinstance(exc, InputError) else f"{type(exc).__name__}: {line}".rstrip(": ")

    def raise_(self):
        raise self.kind(self.line)


class InWorkers(torch.utils.data.Dataset):
    """``dataset`` for DataLoader workers: any exception of an item's decode comes back as a Failed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except Exception as exc:  # noqa: BLE001  (the record carries it to the main process, raised there)
            return Failed(exc)


def worker_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader: a worker leaves SIGINT to the main process (a Ctrl-C
    reaches the whole process group) and dies on SIGTERM as a plain process does, instead of running
    the handlers it inherited (the command's stop, the loop's checkpoint-then-stop), which belong to
    the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def failure(rows) -> "Failed | None":
    """The first item of a batch whose decode failed in a worker, or None."""
    return next((r for r in rows if isinstance(r, Failed)), None)


def collate(rows):
    failed = failure(rows)
    if failed is not None:
        return failed
    pixels, original, corner, idx = zip(*rows)
    return torch.stack(pixels), torch.stack(original), torch.stack(corner), torch.tensor(idx)


def next_batch(batches):
    """The next batch of a DataLoader over ``InWorkers``; an item's error is raised here, in the main
    process, as the one line (a DataError for an unreadable item) the worker met."""
    batch = next(batches)
    if isinstance(batch, Failed):
        batch.raise_()
    return batch


class _Planned(torch.utils.data.Sampler):
    """The index lists of the planned batches, in order (the loader's batch sampler)."""

    def __init__(self, plan):
        self.plan = plan

    def __iter__(self):
        return iter(self.plan)


class RealData:
    """Real items drawn by index and turned into the denoiser's space per batch. ``prefetch(keys, fn)``
    plans the (step, micro) batches to come (``fn(key)``: that batch's item indices) and starts
    ``DataLoader`` workers decoding them; a request for a planned batch takes the workers' result, any
    other request decodes on the spot. Which items a batch holds never depends on the prefetching."""

    def __init__(self, items, teacher, *, size: int, channels: int, crop: str, seed: int, skip_bad: bool,
                 num_workers: int, device, cache=None):
        self.items, self.teacher, self.cache, self.device = items, teacher, cache, torch.device(device)
        self.decoded = Decoded(items, size, channels, crop, seed, skip_bad)
        self.num_workers = max(0, min(int(num_workers), os.cpu_count() or 1))
        self._keys: deque = deque()
        self._iter = None
        self._recent: dict = {}  # key -> latents of the last batches (every update of a step asks again)

    def __len__(self) -> int:
        return len(self.items)

    def prefetch(self, keys, fn) -> None:
        """Plan the batches ``keys`` (an iterator of (step, micro)), ``fn(key)`` giving each one's indices."""
        if self.cache is not None:
            return  # latents are read from the cache: nothing to decode
        keys = iter(keys)
        planned = self._keys

        def plan():
            for key in keys:
                planned.append(key)
                yield fn(key).tolist()

        loader = torch.utils.data.DataLoader(InWorkers(self.decoded), batch_sampler=_Planned(plan()),
                                             num_workers=self.num_workers, collate_fn=collate,
                                             worker_init_fn=worker_signals,
                                             prefetch_factor=PREFETCH_STEPS if self.num_workers else None,
                                             persistent_workers=False)
        self._iter = iter(loader)

    def _pixels(self, key, idx: torch.Tensor):
        while self._iter is not None and self._keys and self._keys[0] < key:
            self._keys.popleft()  # a planned batch nobody asked for (cannot happen in the loop; kept safe)
            next_batch(self._iter)
        if self._iter is not None and self._keys and self._keys[0] == key:
            self._keys.popleft()
            return next_batch(self._iter)  # (skip_bad may have replaced an unreadable item by the next one)
        return collate([self.decoded[int(i)] for i in idx])

    def latents(self, key, idx: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The items ``idx`` in the denoiser's space: from the cache, or decoded and VAE-encoded with the
        latent sample ``mean + std * noise``."""
        if self.cache is not None:
            return self.cache.latents(idx).to(self.device)
        if key in self._recent and torch.equal(self._recent[key][0], idx):
            return self._recent[key][1].clone()
        pixels = self._pixels(key, idx)[0]
        z = self.teacher.encode_images(pixels.to(self.device), noise=noise).to(self.device)
        if len(self._recent) >= 8:
            self._recent.pop(next(iter(self._recent)))
        self._recent[key] = (idx.clone(), z)
        return z.clone()
