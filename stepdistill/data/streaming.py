"""Streaming real items (``data.streaming: true``): a source read in order, never whole, with a
position a checkpoint saves and a resume restores exactly.

The source is a ``datasets`` IterableDataset (``load_dataset(..., streaming=True)`` over webdataset
shards, parquet files or a hub dataset), split between the processes with ``split_dataset_by_node``.
Items are shuffled in windows: ``data.shuffle_buffer`` raw (undecoded) items are read, permuted with a
generator seeded by (seed, epoch, rank, window) and served in that order. The position is the
``datasets`` iterator's own state at the window's start plus the offset inside the window, so a
resume re-reads at most one window and then serves exactly the items an uninterrupted run would have.

What differs from map-style sources (say it where it matters):
- shuffling is within windows, not over the whole set (as any stream's buffer);
- each process reads its own part of the stream, so the global batch depends on the process count,
  and a checkpoint resumes only on the process count that wrote it (refused otherwise);
- one-off draws (validation prompts, the GAN head's probe) take the first items of the stream,
  not the position the loop is at.
"""

from __future__ import annotations

import copy

import torch

from ..errors import DataError
from .files import unreadable
from .loading import transform
from .seeds import TAGS, stream_seed
from .sources import CAPTION_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, open_table, pick_column


class Stream:
    """Items in stream order: ``take(n)`` -> n raw rows (dicts), ``state_dict()`` / ``load_state_dict``."""

    def __init__(self, cfg, text: bool, classes: int | None, seed: int, rank: int, world: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        spec = cfg.images
        where = f"data.images '{spec}'"
        table = open_table(spec, cfg, "data.images", streaming=True)
        cols = list(table.column_names or table.features or [])
        if not cols:
            raise DataError(f"{where}: the stream names no columns; give data.image_column and data.caption_column")
        self.image_column = pick_column(cols, cfg.image_column, IMAGE_COLUMNS, where, "image")
        self.caption_column = self.label_column = None
        if text:
            self.caption_column = pick_column(cols, cfg.caption_column, CAPTION_COLUMNS + ("json",), where, "caption")
        elif classes is not None:
            self.label_column = pick_column(cols, cfg.label_column, LABEL_COLUMNS, where, "label")
        feature = (table.features or {}).get(self.image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(self.image_column, datasets.Image(decode=False))
        self.first = table  # unsplit, for one-off draws
        self.table = split_dataset_by_node(table, rank=rank, world_size=world) if world > 1 else table
        self.window_size, self.seed, self.rank, self.world, self.where = cfg.shuffle_buffer, seed, rank, world, where
        self.epoch, self.window_index, self.pos = 0, 0, 0
        self.window_start = None  # the datasets iterator's state when the current window began (None: the start)
        self.next_start = None
        self._iter = None
        self._window: list = []

    def _read(self) -> list:
        if self._iter is None:
            if self.next_start is not None:
                self.table.load_state_dict(copy.deepcopy(self.next_start))
            self._iter = iter(self.table)
        self.window_start = self.next_start
        rows = [row for _, row in zip(range(self.window_size), self._iter)]
        self.next_start = copy.deepcopy(self.table.state_dict())  # where the next window begins
        return rows

    def _fill(self) -> None:
        rows = self._read()
        if not rows:  # the end of the stream: the next epoch starts from the beginning
            self.epoch, self.window_index, self._iter, self.next_start = self.epoch + 1, 0, None, None
            self.table.set_epoch(self.epoch)
            rows = self._read()
            if not rows:
                raise DataError(f"{self.where}: the stream (this process's part) holds no items")
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, self.rank, self.window_index, TAGS["stream_window"]))
        self._window = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self._window or self.pos >= len(self._window):
                if self._window:
                    self.window_index += 1
                self.pos = 0
                self._fill()
            k = min(n - len(out), len(self._window) - self.pos)
            out += self._window[self.pos:self.pos + k]
            self.pos += k
        return out

    def peek(self, n: int) -> list[dict]:
        """The first ``n`` items of the whole stream (one-off draws; the position does not move)."""
        rows = [row for _, row in zip(range(n), iter(self.first))]
        while len(rows) < n:
            rows += rows[:n - len(rows)]
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window_index, "pos": self.pos, "start": self.window_start,
                "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world:
            raise DataError(f"resume: the checkpoint's stream position was saved by {state['world']} processes and "
                            f"this run has {self.world}; a streaming source (data.streaming) resumes only on the "
                            f"process count that wrote it")
        self.epoch, self.window_index = state["epoch"], state["window"]
        self.table.set_epoch(self.epoch)
        self._iter, self._window, self.next_start = None, [], state["start"]
        if state["pos"]:  # re-read the window the run was in, served from the same offset
            self._fill()
        self.pos = state["pos"]

    def caption(self, row: dict) -> str:
        value = row[self.caption_column]
        if isinstance(value, dict):  # a webdataset json member
            value = next((value[k] for k in CAPTION_COLUMNS if k in value), None)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{self.where}: item {row.get('__key__', '?')} has no caption")
        return value.strip()

    def name(self, row: dict) -> str:
        """The row's image as an error line names it: a webdataset shard and member where known."""
        value = row.get(self.image_column)
        member = value.get("path") if isinstance(value, dict) else None
        if "__url__" in row:
            member = member or f"{row.get('__key__')}.{self.image_column}"
            return f"webdataset shard '{row['__url__']}' member '{member}'"
        return f"{self.where} image" + (f" '{member}'" if member else "")

    def image(self, row: dict):
        import io

        from PIL import Image

        value = row[self.image_column]
        if isinstance(value, dict):
            im = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            im = Image.open(io.BytesIO(value))
        else:
            im = value
        im.load()
        return im


class StreamData:
    """Batches of streamed items in the denoiser's space with their own conditioning: ``fetch(key,
    n, generator)`` -> (x0, cond, uncond, labels, prompts). Every update of a step asks for the same
    key; the stream moves once per key (one-off draws, at negative steps, peek at its start)."""

    def __init__(self, stream: Stream, teacher, *, size: int, channels: int, crop: str, seed: int, device):
        self.stream, self.teacher, self.size, self.channels, self.crop = stream, teacher, size, channels, crop
        self.seed, self.device = seed, torch.device(device)
        self._recent: dict = {}

    def gathered_state(self) -> list[dict]:
        """Every rank's stream position, by rank (for the checkpoint; call on every rank)."""
        from accelerate.utils import gather_object

        return gather_object([self.stream.state_dict()])

    def restore(self, states: list[dict], num_processes: int, rank: int) -> None:
        if len(states) != num_processes:
            raise DataError(f"resume: the checkpoint holds {len(states)} stream positions and this run has "
                            f"{num_processes} processes; a streaming source (data.streaming) resumes only on the "
                            f"process count that wrote it")
        self.stream.load_state_dict(states[rank])

    def fetch(self, key, n: int, generator: torch.Generator):
        if key in self._recent:
            return self._recent[key]
        rows = self.stream.peek(n) if key[0] < 0 else self.stream.take(n)
        pixels = []
        for j, row in enumerate(rows):
            g = torch.Generator().manual_seed(stream_seed(self.seed, *key, j, TAGS["item_crop"]))
            name = self.stream.name(row)
            try:
                pixels.append(transform(self.stream.image(row), self.size, self.channels, self.crop, g, name)[0])
            except Exception as exc:  # PIL raises many exception types for broken data
                # data.skip_bad_items is not applied to a stream: the item has to be removed
                raise DataError(f"{unreadable(name, exc)}; remove it from the source") from exc
        noise = torch.randn(n, *self.teacher.sample_shape, generator=generator) if self.teacher.vae is not None else None
        x0 = self.teacher.encode_images(torch.stack(pixels).to(self.device), noise=noise).to(self.device)
        labels = prompts = None
        if self.stream.caption_column is not None:
            prompts = [self.stream.caption(r) for r in rows]
            cond, uncond = self.teacher.encode(prompts)
        elif self.stream.label_column is not None:
            labels = torch.tensor([int(r[self.stream.label_column]) for r in rows])
            cond, uncond = self.teacher.encode(labels.to(self.device))
        else:
            cond = uncond = None
        out = (x0, cond, uncond, labels, prompts)
        if len(self._recent) >= 8:
            self._recent.pop(next(iter(self._recent)))
        self._recent[key] = out
        return out
