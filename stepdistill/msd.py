"""Multi-student distillation (MSD, Song et al. 2024): several students, each distilled on one
partition of the conditions, and a router that sends every condition to its student at sampling time.

    stepdistill msd --config configs/mnist-sd/dmd_1step.yaml --students 2 [--out DIR] [KEY=VALUE ...]

The captions are clustered by k-means (scikit-learn) on the teacher's own text embedding of each
distinct caption (its conditioning tensors, averaged over tokens): the captions of ``data.prompts``, or
without it those of the real images. Student k is an ordinary run of the config on cluster k
(``DIR/student_<k>``, with its checkpoints and resume); ``DIR/prompts_<k>.json`` lists its captions
(its ``data.prompts`` when the config has them). ``DIR/router.json`` holds the centroids.
:class:`RoutedStudent` loads the folder and samples each row with the student whose centroid is nearest
to the row's conditioning, so one prompt always meets the student trained on its cluster. Each student
may be smaller than the teacher (``student.architecture``), which is where MSD's speed comes from
beyond the step count.

Real images (``data.images``) follow their captions: every (image, caption) pair goes to the cluster
of its caption (the nearest centroid where the caption was not clustered, i.e. is not in
``data.prompts``), and student k reads only its pairs, from ``DIR/images_<k>.json``: a COCO caption
file of them (each annotation's ``item`` is the pair's index in the source as the data layer reads
it), with ``data.image_root`` set to the folder their names are relative to. So DMD2's GAN head
(``method_args.gan=true``) sees only the student's own cluster. The pairs are read from an image
folder (``<name>.txt`` captions, or class folders with ``data.label_prompt``) or a COCO caption file;
sources read as tables (webdataset shards, parquet / jsonl / csv, ``datasets`` folders, hub datasets,
streams) and a data cache are refused before any work, naming the source's kind.

Class-label and unconditional teachers are refused: there are no captions to cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import load_config, torch_dtype
from .data.items import read_items
from .data.sources import check_images, kind_of, read_captions
from .diffusion.denoiser import Cond
from .distill import train
from .errors import ConfigError, InputError
from .models.student import Student
from .models.teachers import load_teacher
from .storage import claim_folder, mark_folder, write_json

ROUTER_FILE = "router.json"
# what kind_of calls the data.images sources MSD cannot partition, in words
OTHER_SOURCES = {"shards": "webdataset shards", "table": "a table file", "saved": "a saved datasets folder",
                 "hub": "a hub dataset", "text": "a caption file", "list": "a caption list"}


def condition_vectors(cond: Cond) -> torch.Tensor:
    """One vector per row of a conditioning: each tensor averaged over its token axis (if any) and
    flattened, concatenated in key order."""
    parts = []
    for key in sorted(cond.kwargs):
        value = cond.kwargs[key]
        for t in (value.values() if isinstance(value, dict) else [value]):
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            t = t.float()
            parts.append((t.mean(1) if t.ndim >= 3 else t).flatten(1))
    if not parts:
        raise ValueError("the conditioning holds no text embedding to route by (a class-label or unconditional teacher)")
    return torch.cat(parts, 1).cpu()


def check_partition(captions: list[str], k: int, what: str = "data.prompts") -> None:
    """k students need k >= 2 and at least k distinct captions."""
    if k < 2:
        raise InputError(f"--students must be >= 2, got {k}")
    unique = len(set(captions))
    if unique < k:
        raise InputError(f"{what} holds {unique} distinct captions, fewer than --students {k}")


def embed(teacher, captions: list[str], chunk: int = 256) -> torch.Tensor:
    """The routing vector (:func:`condition_vectors`) of each caption."""
    return torch.cat([condition_vectors(teacher.encode(captions[i:i + chunk])[0]) for i in range(0, len(captions), chunk)])


def partition_captions(teacher, captions: list[str], k: int, seed: int = 0, chunk: int = 256):
    """(cluster index per caption, centroids) of k-means on the teacher's embedding of each caption."""
    from sklearn.cluster import KMeans

    check_partition(captions, k)
    unique = sorted(set(captions))
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(embed(teacher, unique, chunk).numpy())
    by_caption = dict(zip(unique, km.labels_.tolist()))
    return [by_caption[c] for c in captions], torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def assign_captions(teacher, captions: list[str], known: dict[str, int], centroids: torch.Tensor) -> list[int]:
    """The cluster of each caption: its own where it was clustered (``known``), else the nearest centroid's."""
    new = sorted(set(captions) - known.keys())
    nearest = torch.cdist(embed(teacher, new), centroids).argmin(1).tolist() if new else []
    found = {**dict(zip(new, nearest)), **known}
    return [found[c] for c in captions]


def read_pairs(d) -> tuple[list[Path], list[str]]:
    """(image file, caption) of every real item of ``data.images``: an image folder or a COCO caption file;
    the sources read as tables are refused naming their kind."""
    kind = kind_of(d.images, "data.images")
    if kind in OTHER_SOURCES or d.streaming:
        raise ConfigError(f"data.images: MSD partitions the (image, caption) pairs of an image folder or a COCO "
                          f"caption file; '{d.images}' is {OTHER_SOURCES.get(kind, 'read as a stream')}, which it "
                          f"cannot partition (write its pairs as an image folder with <name>.txt captions)")
    check_images(d)
    items = read_items(d, True, None)
    if items.captions is None:
        raise ConfigError(f"data.images: MSD partitions the images by their captions; the images of '{d.images}' have "
                          f"none (put <name>.txt beside each image, or give class folders a data.label_prompt)")
    return [Path(f) for f in items.files], items.captions.take(range(len(items)))


def write_pairs(path: Path, files: list[Path], captions: list[str], items: list[int]) -> Path:
    """The pairs as a COCO caption file at ``path``; returns the image root its file names are relative to."""
    root = Path(os.path.commonpath([str(f.absolute().parent) for f in files]))
    ids: dict[Path, int] = {}
    for f in files:
        ids.setdefault(f, len(ids))
    write_json(path, {"images": [{"id": i, "file_name": f.absolute().relative_to(root).as_posix()} for f, i in ids.items()],
                      "annotations": [{"id": n, "image_id": ids[f], "caption": c, "item": item}
                                      for n, (f, c, item) in enumerate(zip(files, captions, items))]})
    return root


def train_students(config: str | Path, k: int, out: Path, overrides=()) -> Path:
    """Partition the config's captions (and its real images' pairs with them) into k clusters and distil
    one student per cluster; returns ``out``."""
    cfg = load_config(config, list(overrides))
    d = cfg.data
    if cfg.teacher.path is None or (d.prompts is None and d.images is None):
        raise ConfigError("data.prompts: MSD partitions the captions of a text-conditioned teacher (teacher.path, and "
                          "data.prompts or captioned data.images); class-label and oracle teachers are not supported")
    if d.cache is not None:
        raise ConfigError("data.cache: a data cache holds the rows of the whole source, and each MSD student reads a "
                          "part of it; set data.cache=null")
    files = pair_captions = None
    if d.images is not None:
        files, pair_captions = read_pairs(d)
    if d.prompts is not None:
        table = read_captions(d.prompts, d, d.skip_bad_items)  # any source distill reads
        captions = table.take(range(len(table)))
        check_partition(captions, k)
    else:
        captions = pair_captions
        check_partition(captions, k, "data.images")
    settings = {"config": str(config), "students": k, "overrides": list(overrides)}
    claim_folder(out, "msd", settings, mark=False,  # marked once the teacher and the partition pass their checks
                 legacy=lambda folder: (folder / ROUTER_FILE).is_file() or (folder / "prompts_0.txt").is_file())
    tc = cfg.teacher  # loaded as distill loads it (its encoders embed the captions)
    teacher = load_teacher(tc.path, dtype=torch_dtype(tc.dtype), null_label=tc.null_label,
                           allow_remote_code=tc.allow_remote_code, video_size=tc.video_size, sample_size=tc.sample_size,
                           guidance=tc.guidance)
    if not teacher.conditional or teacher.null_label is not None:
        raise ConfigError(f"teacher.path: teacher {teacher.name} is not text-conditioned; MSD partitions captions, so "
                          f"class-label and unconditional teachers are not supported")
    assignment, centroids = partition_captions(teacher, captions, k, cfg.train.seed)
    pair_parts = None
    if files is not None:
        pair_parts = assign_captions(teacher, pair_captions, dict(zip(captions, assignment)), centroids)
        empty = [j for j in range(k) if j not in set(pair_parts)]
        if empty:
            raise InputError(f"data.images: no image's caption falls in cluster {empty[0]} of data.prompts' {k} "
                             f"clusters, so its student would have no real images; use fewer --students")
    mark_folder(out, "msd", settings)
    names = []
    for j in range(k):
        data = []
        if d.prompts is not None:
            part = [c for c, a in zip(captions, assignment) if a == j]
            prompts = out / f"prompts_{j}.txt"  # a folder written before JSON partitions: its students' own file
            if not prompts.is_file():
                prompts = out / f"prompts_{j}.json"  # a JSON list keeps captions with line breaks whole
                write_json(prompts, part)
            data.append(f"data.prompts={prompts}")
        else:
            write_json(out / f"prompts_{j}.json", sorted({c for c, a in zip(captions, assignment) if a == j}))
        if files is not None:  # the student's (image, caption) pairs, as a COCO caption file
            mine = [i for i, a in enumerate(pair_parts) if a == j]
            pairs = out / f"images_{j}.json"
            root = write_pairs(pairs, [files[i] for i in mine], [pair_captions[i] for i in mine], mine)
            data += [f"data.images={pairs}", f"data.image_root={root}"]
        name = f"student_{j}"
        run_cfg = load_config(config, [*overrides, *data, f"train.output_dir={out / name}"])
        train(run_cfg)
        names.append(name)
    write_json(out / ROUTER_FILE, {"students": names, "centroids": centroids.tolist(), "teacher": str(cfg.teacher.path),
                                   "config": str(config), "overrides": list(overrides)})
    return out


class RoutedStudent:
    """MSD's students behind one ``sample``: each row goes to the student whose centroid is nearest to
    its conditioning (:func:`condition_vectors`)."""

    def __init__(self, students: list, centroids: torch.Tensor):
        if len(students) != len(centroids):
            raise ValueError(f"{len(students)} students for {len(centroids)} centroids")
        self.students, self.centroids = students, centroids

    @classmethod
    def load(cls, folder: str | Path, device=None) -> "RoutedStudent":
        folder = Path(folder)
        path = folder / ROUTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"'{folder}' has no {ROUTER_FILE}: not an MSD folder (stepdistill msd)")
        router = json.loads(path.read_text())
        students = []
        for name in router["students"]:
            students.append(Student.load_run(folder / name, device))
        return cls(students, torch.tensor(router["centroids"], dtype=torch.float32))

    def route(self, cond: Cond) -> torch.Tensor:
        return torch.cdist(condition_vectors(cond), self.centroids).argmin(1)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Cond, *, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        which = self.route(cond).to(noise.device)
        out = torch.empty_like(noise, dtype=torch.float32)
        for j, student in enumerate(self.students):
            rows = (which == j).nonzero().flatten()
            if len(rows):
                out[rows] = student.sample(noise[rows], cond[rows], generator=generator, **kwargs).float()
        return out


INTERMIXED = True  # options may stand between the key=value overrides


def add_arguments(parser) -> None:
    """The ``stepdistill msd`` command's options."""
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--students", required=True, type=int, help="the number of students (caption clusters)")
    parser.add_argument("--out", type=Path, default=None, help="default: <train.output_dir>_msd<K>")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every student")


def run(args) -> str:
    out = args.out or Path(f"{load_config(args.config, args.overrides).train.output_dir}_msd{args.students}")
    train_students(args.config, args.students, out, args.overrides)
    return f"{args.students} students and their router written to {out}"
