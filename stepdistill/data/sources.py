"""Where captions and real images come from, at any size.

``data.prompts`` (captions to condition the student on) and ``data.images`` (real items: the data
x-source, DMD2's GAN real branch) each name one source:

- a caption file: ``.txt`` (one per line), ``.json`` (a list of strings, or a COCO ``captions_*.json``),
  ``.jsonl`` / ``.csv`` / ``.parquet`` (the ``data.caption_column``);
- an image folder (``<name>.txt`` captions beside the images, or class folders ``<label>/``);
- a COCO ``captions_*.json`` as images: every annotation is one (image, its caption) pair, the images
  under ``data.image_root`` (default: the ``train2017``-style folder named by the file);
- webdataset tar shards: a ``.tar`` path or a brace pattern (``shards-{000..009}.tar``), each sample an
  image (``jpg``/``png``/``webp``) with its ``txt`` caption or a ``json`` holding it;
- a Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk``, or ``hf:<hub id or path>``
  (``data.split``; ``data.streaming: true`` streams it).

Tabular sources are read through ``datasets`` (Arrow files, memory-mapped), so a million captions cost
a few megabytes of index, not a million Python strings. Real items by index are ``items.py``'s, drawn
with the counter-based generator (``data.BatchSource``); streaming sources are read in order
(``streaming.Stream``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from .files import image_captions, list_images, read_prompts

logger = logging.getLogger("stepdistill")
CAPTION_COLUMNS = ("caption", "text", "prompt", "txt", "captions")
IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp")
LABEL_COLUMNS = ("label", "cls", "class")
TABLE_SUFFIXES = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def is_shards(spec: str) -> bool:
    return isinstance(spec, str) and (spec.endswith(".tar") or (".tar" in spec and "{" in spec))


def expand_shards(spec: str, what: str) -> list[str]:
    """The tar files of a webdataset pattern, each checked to exist."""
    from braceexpand import braceexpand

    files = list(braceexpand(spec))
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"{what}: webdataset shard '{missing[0]}' does not exist ({len(missing)} of {len(files)} missing)")
    return files


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def kind_of(spec, what: str) -> str:
    """What a ``data.prompts`` / ``data.images`` value names: list, text, json (a list or COCO), table, shards,
    saved (a ``save_to_disk`` folder), hub, folder."""
    if isinstance(spec, (list, tuple)):
        return "list"
    spec = str(spec)
    if spec.startswith("hf:"):
        return "hub"
    if is_shards(spec):
        return "shards"
    path = Path(spec)
    if is_saved_dataset(path):
        return "saved"
    if path.suffix == ".json" and path.is_file():
        return "json"  # a list of prompts, or a COCO caption file (data.images; a dict with 'annotations')
    if path.suffix in TABLE_SUFFIXES:
        return "text" if path.suffix == ".txt" else "table"
    return "folder"


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def open_table(spec: str, cfg, what: str, streaming: bool = False):
    """A ``datasets`` Dataset (or IterableDataset when ``streaming``) for a tabular source."""
    ds_mod = _datasets()
    kind = kind_of(spec, what)
    split = cfg.split
    try:
        if kind == "hub":
            out = ds_mod.load_dataset(spec[3:], split=split, streaming=streaming)
        elif kind == "saved":
            out = ds_mod.load_from_disk(spec)
            if isinstance(out, ds_mod.DatasetDict):
                if split not in out:
                    raise DataError(f"{what}: dataset '{spec}' has no split '{split}' (it has {list(out)}); set data.split")
                out = out[split]
            if streaming:
                out = out.to_iterable_dataset(num_shards=max(1, min(64, len(out) // 1000)))
        elif kind == "shards":
            out = ds_mod.load_dataset("webdataset", data_files={"train": expand_shards(spec, what)}, split="train",
                                      streaming=streaming)
        else:
            path = Path(spec)
            if not path.is_file():
                raise DataError(f"{what}: file '{path}' " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
            out = ds_mod.load_dataset(TABLE_SUFFIXES[path.suffix], data_files={"train": str(path)}, split="train",
                                      streaming=streaming)
    except DataError:
        raise
    except Exception as exc:  # the datasets library's own errors: one line naming the source
        raise DataError(f"{what}: '{spec}' cannot be read as a dataset ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return out


def pick_column(columns: Sequence[str], asked: str | None, candidates: Sequence[str], what: str, role: str,
                required: bool = True) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise DataError(f"{what}: no column '{asked}' (data.{role}_column); the source has {list(columns)}")
        return asked
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise DataError(f"{what}: no {role} column among {list(columns)}; name it with data.{role}_column")
    return None


class Captions:
    """A caption list by index: a Python list (small sources) or a column of a memory-mapped Arrow
    table with the indices of its usable rows. ``fingerprint`` identifies the content."""

    def __init__(self, values, where: str, fingerprint: str, rows: np.ndarray | None = None):
        self.values, self.where, self.fingerprint, self.rows = values, where, fingerprint, rows

    def __len__(self) -> int:
        return len(self.values) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> str:
        j = int(i) if self.rows is None else int(self.rows[int(i)])
        v = self.values[j]
        return (v if isinstance(v, str) else v.as_py()).strip()  # as read_prompts keeps them

    def take(self, idx: Sequence[int]) -> list[str]:
        return [self[i] for i in idx]

    def small_list(self, limit: int) -> list[str] | None:
        """All captions as a list when there are at most ``limit``."""
        return [self[i] for i in range(len(self))] if len(self) <= limit else None


def usable_rows(column, where: str, skip_bad: bool, what: str = "prompt") -> np.ndarray | None:
    """Indices of the non-empty text rows of an Arrow column (None: all are usable); an empty or
    non-text row is an error naming it unless ``skip_bad``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise DataError(f"{where}: the {what} column holds {column.type}, not text")
    bad = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
    bad = pc.fill_null(bad, True).to_numpy(zero_copy_only=False)
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    if not skip_bad:
        raise DataError(f"{where}: {what} {first + 1} is empty or not text ({column[first].as_py()!r}); remove it or "
                        f"set data.skip_bad_items=true")
    rows = np.flatnonzero(~bad).astype(np.int64)
    if not len(rows):
        raise DataError(f"{where}: no usable {what}s")
    logger.warning("%s: skipped %d empty or non-text %ss of %d (data.skip_bad_items=true)", where,
                   int(bad.sum()), what, len(bad))
    return rows


def folder_fingerprint(files: Sequence[Path]) -> str:
    """An image folder's listing: relative path, size and modification time of every image and caption."""
    import hashlib

    root = files[0].parent
    while not all(root in f.parents for f in files):
        root = root.parent
    listing = []
    for f in list(files) + [f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()]:
        st = f.stat()
        listing.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()[:16]


def table_fingerprint(table) -> str:
    """The fingerprint ``datasets`` gives a table (a hash of its files and transforms)."""
    return str(getattr(table, "_fingerprint", None) or "")[:16]


def _is_coco(path: Path) -> bool:
    """Whether a .json file is a dict (a COCO caption file) rather than a list of prompts."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "annotations" in doc


def read_captions(spec, cfg, skip_bad: bool = False) -> Captions:
    """The caption list of ``data.prompts``."""
    kind = kind_of(spec, "data.prompts")
    if kind == "json" and _is_coco(Path(spec)):
        kind = "coco"
    if kind in ("list", "json"):
        values = read_prompts(spec, skip_bad)
        import hashlib

        return Captions(values, "data.prompts", hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16])
    if kind == "coco":
        pairs = read_coco(Path(spec), None, skip_bad, need_images=False)
        return Captions(pairs.captions, str(spec), pairs.fingerprint)
    if kind == "folder":
        path = Path(spec)
        raise DataError(f"data.prompts: prompt file '{path}' " + ("is a folder, not a file" if path.is_dir()
                                                                  else "does not exist"))
    where = str(spec)
    if kind == "text":  # one prompt per line: the datasets text builder keeps empty lines as rows
        if not Path(spec).is_file():
            raise DataError(f"data.prompts: prompt file '{spec}' " + ("is a folder, not a file" if Path(spec).is_dir()
                                                                      else "does not exist"))
        _check_utf8(Path(spec))
    table = open_table(spec, cfg, "data.prompts")
    column = pick_column(table.column_names, cfg.caption_column, CAPTION_COLUMNS, where, "caption")
    col = table.data.column(column)
    rows = usable_rows(col, where, skip_bad)
    return Captions(col, where, table_fingerprint(table), rows)


def _check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise DataError(f"prompt file '{path}' is not UTF-8 text ({exc.reason} at byte {done + exc.start})") from None
            if not block:
                return
            done += len(block)


class CocoPairs:
    def __init__(self, files, captions, fingerprint):
        self.files, self.captions, self.fingerprint = files, captions, fingerprint


def read_coco(path: Path, image_root: str | None, skip_bad: bool, need_images: bool = True) -> CocoPairs:
    """The (image file, caption) pairs of a COCO ``captions_*.json``, one per annotation."""
    import hashlib

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"COCO caption file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise DataError(f"'{path}': a COCO caption file holds an 'annotations' list (and 'images'); this one does not")
    names = {im["id"]: im["file_name"] for im in doc.get("images", []) if isinstance(im, dict) and "id" in im}
    root = None
    if need_images:
        root = Path(image_root) if image_root else path.parent.parent / path.stem.split("_")[-1]
        if not root.is_dir():
            raise DataError(f"data.image_root: COCO image folder '{root}' does not exist (set data.image_root)")
    files, captions = [], []
    for k, ann in enumerate(doc["annotations"]):
        cap = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(cap, str) or not cap.strip() or (need_images and ann.get("image_id") not in names):
            if skip_bad:
                continue
            why = "has no caption" if not isinstance(cap, str) or not cap.strip() else \
                f"names image_id {ann.get('image_id')!r}, which 'images' does not list"
            raise DataError(f"'{path}': annotation {k + 1} {why}; fix it or set data.skip_bad_items=true")
        captions.append(cap.strip())
        if need_images:
            files.append(root / names[ann["image_id"]])
    if not captions:
        raise DataError(f"'{path}': no usable annotations")
    st = path.stat()
    fp = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{root}".encode()).hexdigest()[:16]
    return CocoPairs(files, captions, fp)


def check_images(cfg) -> None:
    """The cheap checks of ``data.images`` made before any work (``training.validate_inputs``)."""
    kind = kind_of(cfg.images, "data.images")
    if cfg.image_root is not None and kind != "json":
        raise DataError(f"data.image_root: names the image folder of a COCO caption file; data.images "
                        f"'{cfg.images}' is not one")
    if cfg.streaming and kind in ("folder", "json", "text", "list"):
        raise DataError(f"data.streaming: '{cfg.images}' is read by index, not streamed; streaming reads webdataset "
                        f"shards, parquet / jsonl / csv files, a saved dataset or hf:<hub id>")
    if kind == "folder":
        image_captions(list_images(cfg.images), cfg.skip_bad_items)  # every image captioned, or none
    elif kind == "json":
        read_coco(Path(cfg.images), cfg.image_root, cfg.skip_bad_items)
    elif kind == "shards":
        expand_shards(cfg.images, "data.images")
    elif kind in ("text", "list"):
        raise DataError(f"data.images: '{cfg.images}' is a caption file, not images (give a folder, webdataset "
                        f"shards, a COCO caption file or a dataset)")
    elif kind == "table" and not Path(cfg.images).is_file():
        raise DataError(f"data.images: file '{cfg.images}' does not exist")
