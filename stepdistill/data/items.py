"""Real items (``data.images``) by index: an image and its own caption or class label from the same
row, for image folders, COCO caption files (``FileItems``), webdataset shards and ``datasets``
tables (``TableItems``). Where the sources are named and read: ``stepdistill/data/sources.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .files import folder_labels, image_captions, list_images
from .sources import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    Captions,
    folder_fingerprint,
    kind_of,
    open_table,
    pick_column,
    read_coco,
    table_fingerprint,
    usable_rows,
)


class Items:
    """Map-style real items: ``image(i)`` (a PIL image) and ``name(i)`` (the item as an error line names
    it: a file, a webdataset shard and member, a table's row); ``captions[i]``
    (a Captions or None) and ``labels[i]`` (an int array or None) are item i's own conditioning."""

    def __init__(self, where: str, n: int, fingerprint: str, captions: Captions | None = None,
                 labels: np.ndarray | None = None):
        self.where, self.n, self.fingerprint, self.captions, self.labels = where, n, fingerprint, captions, labels

    def __len__(self) -> int:
        return self.n

    def image(self, i: int):
        raise NotImplementedError


class FileItems(Items):
    """Items whose images are files (an image folder, a COCO annotation file)."""

    def __init__(self, files: Sequence[Path], where: str, fingerprint: str, captions: list[str] | None = None,
                 labels: Sequence[int] | None = None):
        caps = None if captions is None else Captions(list(captions), where, fingerprint)
        super().__init__(where, len(files), fingerprint, caps, None if labels is None else np.asarray(labels))
        self.files = [str(f) for f in files]

    def image(self, i: int):
        from PIL import Image

        with Image.open(self.files[int(i)]) as im:
            im.load()
            return im

    def name(self, i: int) -> str:
        return f"image '{self.files[int(i)]}'"


class TableItems(Items):
    """Items of a ``datasets`` table (webdataset shards, parquet, a saved or hub dataset)."""

    def __init__(self, table, where: str, image_column: str, caption_column: str | None, label_column: str | None,
                 skip_bad: bool):
        import datasets

        feature = table.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(image_column, datasets.Image(decode=False))  # decoded per draw, in the workers
        keep = caps = labels = None
        if caption_column is not None:  # an item without a caption is an error, or dropped (skip_bad)
            col = table.data.column(caption_column)
            keep = usable_rows(col, where, skip_bad, "caption")
            caps = Captions(col, where, table_fingerprint(table), keep)
        if label_column is not None:
            labels = np.asarray(table.data.column(label_column).to_numpy(zero_copy_only=False)).astype(np.int64)
            labels = labels if keep is None else labels[keep]
        super().__init__(where, len(table) if keep is None else len(keep), table_fingerprint(table), caps, labels)
        self.table, self.image_column, self.keep = table, image_column, keep

    def _row(self, i: int) -> int:
        return int(i) if self.keep is None else int(self.keep[int(i)])

    def image(self, i: int):
        import io

        from PIL import Image

        j = self._row(i)
        value = self.table.data.column(self.image_column)[j].as_py()
        if isinstance(value, dict):
            data = value.get("bytes")
            path = value.get("path")
            im = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        else:
            im = Image.open(io.BytesIO(value))
        im.load()
        return im

    def name(self, i: int) -> str:
        """A webdataset item by its shard file and member (what a user finds with ``tar tf``), any
        other table's by its item number."""
        j, data = self._row(i), self.table.data
        if "__url__" not in data.column_names:
            return f"{self.where} item {int(i)}"
        value = data.column(self.image_column)[j]  # the path field alone: the image's bytes stay in the table
        member = value["path"].as_py() if value.type.num_fields and value.type.get_field_index("path") >= 0 else None
        if not member and "__key__" in data.column_names:
            member = f"{data.column('__key__')[j].as_py()}.{self.image_column}"
        return f"webdataset shard '{data.column('__url__')[j].as_py()}' member '{member}'"


class LabelPrompts:
    """Each item's caption from its class label: ``template`` with ``{label}`` replaced by the label's
    name (``names``) or number; computed per access, never held as a list."""

    def __init__(self, template: str, labels: np.ndarray, names: Sequence[str] | None = None):
        self.template, self.labels, self.names = template, labels, names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> str:
        label = int(self.labels[int(i)])
        return self.template.format(label=self.names[label] if self.names else label)


def read_items(cfg, teacher_text: bool, num_classes: int | None) -> Items:
    """The real items of ``data.images``, with their own captions (text teachers) or labels."""
    spec, skip = cfg.images, cfg.skip_bad_items
    kind = kind_of(spec, "data.images")
    if kind == "folder":
        found = files = list_images(spec)
        if teacher_text and cfg.label_prompt:  # class folders: the folder name is the label
            captions = [cfg.label_prompt.format(label=f.parent.name) for f in files]
        else:
            files, captions = image_captions(files, skip)
        labels = folder_labels(files, num_classes) if num_classes is not None else None
        return FileItems(files, f"data.images '{spec}'", folder_fingerprint(found), captions, labels)
    if kind == "json":  # a COCO caption file (anything else is refused naming what it lacks)
        pairs = read_coco(Path(spec), cfg.image_root, skip)
        if num_classes is not None:
            raise DataError("data.images: a COCO caption file pairs images with captions; this teacher is class-conditional")
        return FileItems(pairs.files, f"data.images '{spec}'", pairs.fingerprint, pairs.captions)
    if kind in ("text", "list"):
        raise DataError(f"data.images: '{spec}' is a caption file, not images (give a folder, webdataset shards, "
                        f"a COCO caption file or a dataset)")
    where = f"data.images '{spec}'"
    table = open_table(spec, cfg, "data.images")
    cols = table.column_names
    image_col = pick_column(cols, cfg.image_column, IMAGE_COLUMNS, where, "image")
    cap_col = label_col = None
    if teacher_text:
        cap_col = pick_column(cols, cfg.caption_column, CAPTION_COLUMNS, where, "caption", required=False)
        if cap_col is None and cfg.label_prompt:
            label_col = pick_column(cols, cfg.label_column, LABEL_COLUMNS, where, "label")
            items = TableItems(table, where, image_col, None, label_col, skip)
            names = getattr(table.features[label_col], "names", None)
            items.captions = Captions(LabelPrompts(cfg.label_prompt, items.labels, names), where, items.fingerprint)
            items.labels = None  # a text teacher: the label's prompt is the conditioning
            return items
        if cap_col is None and "json" in cols:
            table = _captions_from_json(table, cfg.caption_column, where)
            cap_col = "caption"
        if cap_col is None:
            raise DataError(f"{where}: teacher is text-conditioned, so its real images need their own captions: no "
                            f"caption column among {cols} (name it with data.caption_column, or give class-labelled "
                            f"items a data.label_prompt)")
    elif num_classes is not None:
        label_col = pick_column(cols, cfg.label_column, LABEL_COLUMNS, where, "label")
    items = TableItems(table, where, image_col, cap_col, label_col, skip)
    if items.labels is not None and num_classes is not None:
        bad = np.flatnonzero((items.labels < 0) | (items.labels >= num_classes))
        if len(bad):
            raise DataError(f"{where}: item {int(bad[0]) + 1} has label {int(items.labels[bad[0]])}, outside "
                            f"0..{num_classes - 1}")
    return items


def _captions_from_json(table, key: str | None, where: str):
    """A webdataset ``json`` member's caption (``key``, or the first of CAPTION_COLUMNS) as a column."""

    def pick(row):
        doc = row["json"]
        if isinstance(doc, (bytes, str)):
            doc = json.loads(doc)
        keys = [key] if key else CAPTION_COLUMNS
        for k in keys:
            if isinstance(doc, dict) and k in doc:
                return {"caption": doc[k]}
        return {"caption": None}

    return table.map(pick, desc=None, load_from_cache_file=True)
