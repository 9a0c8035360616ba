"""Data fixtures built offline for tests and the data benchmark: webdataset tar shards, a parquet
caption file, a ``save_to_disk`` dataset folder, a COCO caption file with its images, a large caption
file and a large image folder. Item ``i``'s caption is ``caption_of(i)`` and its image a flat colour
drawn from ``i``, so a test can tell which item a batch row came from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

WORDS = ("red", "blue", "green", "small", "large", "round", "square", "old", "new", "bright")


def caption_of(i: int) -> str:
    return f"{i} a {WORDS[i % 10]} {WORDS[(i // 10) % 10]}"  # the number first: tiny CLIPs keep 16 tokens


def image_of(i: int, size: int = 24):
    from PIL import Image

    return Image.new("RGB", (size + i % 7, size), ((37 * i) % 256, (91 * i) % 256, (153 * i) % 256))


def png_bytes(i: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    image_of(i, size).save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_webdataset(folder: Path, n: int = 1000, shards: int = 2, caption_as: str = "txt") -> str:
    """``n`` (png, caption) samples in ``shards`` tar files; the caption in a ``txt`` member or in a
    ``json`` member's ``caption`` key. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"{i:07d}"
                _add(tf, f"{key}.png", png_bytes(i))
                text = caption_of(i) if caption_as == "txt" else json.dumps({"caption": caption_of(i)})
                _add(tf, f"{key}.{caption_as}", text.encode())
    return str(folder / f"shard-{{000..{shards - 1:03d}}}.tar")


def write_parquet_captions(path: Path, n: int = 100, column: str = "caption") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: [caption_of(i) for i in range(n)], "id": list(range(n))}), path)
    return path


def write_saved_dataset(folder: Path, n: int = 60, labels: bool = False) -> Path:
    """A ``datasets`` folder (``save_to_disk``) with an image column and a text (or label) column."""
    import datasets

    cols = {"image": [{"bytes": png_bytes(i), "path": None} for i in range(n)]}
    feats = {"image": datasets.Image()}
    if labels:
        cols["label"], feats["label"] = [i % 10 for i in range(n)], datasets.Value("int64")
    else:
        cols["text"], feats["text"] = [caption_of(i) for i in range(n)], datasets.Value("string")
    datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).save_to_disk(str(folder))
    return folder


def write_coco(root: Path, n_images: int = 20, per_image: int = 2) -> Path:
    """COCO layout: ``annotations/captions_train2017.json`` and ``train2017/<id>.png``; image ``k``'s
    captions are items ``k * per_image + j``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(n_images):
        name = f"{k:012d}.png"
        image_of(k).save(root / "train2017" / name)
        images.append({"id": 1000 + k, "file_name": name, "height": 24, "width": 24 + k % 7})
        for j in range(per_image):
            anns.append({"id": len(anns), "image_id": 1000 + k, "caption": f"{caption_of(k)} view {j}"})
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def write_caption_lines(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(caption_of(i) + "\n")
    return path


def write_image_folder(folder: Path, n: int, size: int = 24) -> Path:
    """``n`` captioned images (``<i>.png`` with ``<i>.txt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image_of(i, size).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption_of(i))
    return folder
