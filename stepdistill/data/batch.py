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

import itertools
import logging
from dataclasses import dataclass

import torch

from ..diffusion.denoiser import Cond
from ..errors import DataError
from .seeds import STREAMS, TAGS, stream_seed

logger = logging.getLogger("stepdistill")


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


PROMPT_CACHE_LIMIT = 512  # prompt lists up to this many distinct prompts are encoded once, at start


class PromptTable:
    """Text conditioning of a caption list, by index. A short list (<= PROMPT_CACHE_LIMIT distinct
    prompts) is run through the text encoder once and rows are looked up; rows of a data cache
    (``stepdistill.data.cache``) are read from disk; other lists are encoded batch by batch."""

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
        self.rank = rank  # this process's data rank (data streams differ per rank; a context-parallel group shares one)
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
        return torch.Generator().manual_seed(stream_seed(self.seed, step, TAGS["batch"], micro))

    def image_generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The stream of the large-set path's item indices and VAE noise (``real``)."""
        return torch.Generator().manual_seed(stream_seed(self.seed, step, TAGS["items"], micro))

    def item_rows(self, step: int, micro: int, size: int, offset: int, total: int) -> torch.Tensor:
        """The item indices of this rank's rows of (step, micro) on the large-set path."""
        rows = Batch(size, self.image_generator(step, micro), self.device, offset=offset, total=total)
        return rows.randint(0, len(self.real))

    def prefetch(self, start: int, micro_batches: int, rank: int, size: int, num_ranks: int) -> None:
        """Plan the loop's batches from ``start`` on, so that loader workers decode their images ahead."""
        if self.real is None:
            return
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
