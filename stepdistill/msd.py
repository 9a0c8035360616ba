"""Multi-student distillation (MSD, Song et al. 2024): several students, each distilled on one
partition of the conditions, and a router that sends every condition to its student at sampling time.

    stepdistill msd --config configs/mnist-sd/dmd_1step.yaml --students 2 [--out DIR] [KEY=VALUE ...]

The captions of ``data.prompts`` are partitioned by k-means (scikit-learn) on the teacher's own text
embedding of each caption (its conditioning tensors, averaged over tokens). Student k is an ordinary
run of the config on partition k's captions (``DIR/student_<k>``, with its checkpoints and resume);
``DIR/router.json`` holds the centroids. :class:`RoutedStudent` loads the folder and samples each row
with the student whose centroid is nearest to the row's conditioning, so one prompt always meets the
student trained on its cluster. Each student may be smaller than the teacher (``student.architecture``),
which is where MSD's speed comes from beyond the step count.

Partitions are of captions only: a config with real images (``data.images``) or a class-label teacher
is refused, since neither its images nor its labels would follow the partition.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import load_config, torch_dtype
from .data.sources import read_captions
from .diffusion.denoiser import Cond
from .distill import train
from .errors import ConfigError, InputError
from .models.student import Student
from .models.teachers import load_teacher
from .storage import claim_folder, write_json

ROUTER_FILE = "router.json"


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


def check_partition(captions: list[str], k: int) -> None:
    """k students need k >= 2 and at least k distinct captions."""
    if k < 2:
        raise InputError(f"--students must be >= 2, got {k}")
    unique = len(set(captions))
    if unique < k:
        raise InputError(f"data.prompts holds {unique} distinct captions, fewer than --students {k}")


def partition_captions(teacher, captions: list[str], k: int, seed: int = 0, chunk: int = 256):
    """(cluster index per caption, centroids) of k-means on the teacher's embedding of each caption."""
    from sklearn.cluster import KMeans

    check_partition(captions, k)
    unique = sorted(set(captions))
    vecs = torch.cat([condition_vectors(teacher.encode(unique[i:i + chunk])[0]) for i in range(0, len(unique), chunk)])
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(vecs.numpy())
    by_caption = dict(zip(unique, km.labels_.tolist()))
    return [by_caption[c] for c in captions], torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def train_students(config: str | Path, k: int, out: Path, overrides=()) -> Path:
    """Partition the config's captions into k clusters and distil one student per cluster; returns ``out``."""
    cfg = load_config(config, list(overrides))
    if cfg.data.images is not None:
        raise ConfigError("data.images: MSD partitions the captions; real images would not follow the partition "
                          "(set data.images=null, and method_args.gan=false for DMD2)")
    if cfg.data.prompts is None or cfg.teacher.path is None:
        raise ConfigError("data.prompts: MSD partitions the captions of a text-conditioned teacher (teacher.path and "
                          "data.prompts); class-label and oracle teachers are not supported")
    table = read_captions(cfg.data.prompts, cfg.data, cfg.data.skip_bad_items)  # any source distill reads
    captions = table.take(range(len(table)))
    check_partition(captions, k)
    claim_folder(out, "msd", {"config": str(config), "students": k, "overrides": list(overrides)},
                 legacy=lambda folder: (folder / ROUTER_FILE).is_file() or (folder / "prompts_0.txt").is_file())
    tc = cfg.teacher  # loaded as distill loads it (its encoders embed the captions)
    teacher = load_teacher(tc.path, dtype=torch_dtype(tc.dtype), null_label=tc.null_label,
                           allow_remote_code=tc.allow_remote_code, video_size=tc.video_size, sample_size=tc.sample_size,
                           guidance=tc.guidance)
    assignment, centroids = partition_captions(teacher, captions, k, cfg.train.seed)
    names = []
    for j in range(k):
        part = [c for c, a in zip(captions, assignment) if a == j]
        prompts = out / f"prompts_{j}.txt"  # a folder written before JSON partitions: its students' own file
        if not prompts.is_file():
            prompts = out / f"prompts_{j}.json"  # a JSON list keeps captions with line breaks whole
            write_json(prompts, part)
        name = f"student_{j}"
        run_cfg = load_config(config, [*overrides, f"data.prompts={prompts}", f"train.output_dir={out / name}"])
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
