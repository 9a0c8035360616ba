"""Data caches: a run's captions encoded with the teacher's own text encoders and its real images
encoded with the teacher's VAE, once, to sharded safetensors files on disk.

    stepdistill cache --config CONFIG [key=value ...]                        # writes data.cache
    accelerate launch -m stepdistill cache --config CONFIG ...               # several processes share the shards

A run whose ``data.cache`` names the folder reads its text states and latents from it and never runs
the text encoders or the VAE. The folder holds ``manifest.json`` (what the cache was made from: a
hash of the teacher's text encoders, tokenizers and VAE, the precision, the resolution and crop, the
data's fingerprints) and ``prompts/NNNNN.safetensors`` / ``items/NNNNN.safetensors``, ``--shard-rows``
rows each, written to a temporary name and renamed, so a shard on disk is complete. Re-running the
command after an interruption (even kill -9) encodes only the missing shards; a folder made from
another teacher, resolution or data is refused. Item shards also record each image's original size
and crop corner (SDXL's micro-conditioning), as the diffusers SDXL scripts do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..config import load_config, torch_dtype
from ..diffusion.denoiser import Cond
from ..errors import DataError, InputError
from ..models.teachers import load_teacher, resolve_teacher_path
from ..storage import (
    file_problem,
    file_records,
    key_problem,
    records_problem,
    temporary_name,
    valid_record,
    write_json,
    writing,
)
from .items import read_items
from .loading import Decoded, InWorkers, collate, image_geometry, next_batch, refuse_still_images, worker_signals
from .seeds import TAGS, stream_seed
from .sources import read_captions

logger = logging.getLogger("stepdistill")
CACHE_VERSION = 1
SHARD_ROWS = 1024
MANIFEST = "manifest.json"
NOT_HASHED = ("unet", "transformer", "scheduler", "prior", "decoder")  # components a cache does not depend on


def teacher_hash(path: str) -> str:
    """sha256 of every file of the pipeline's text encoders, tokenizers and VAE (the parts whose
    outputs a cache holds): the same hash for a fine-tuned UNet over the same encoders."""
    folder = Path(resolve_teacher_path(path))
    if not folder.is_dir():  # a hub id: its local snapshot (offline)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(path), local_files_only=True))
    index = json.loads((folder / "model_index.json").read_text())
    h = hashlib.sha256()
    for name in sorted(k for k, v in index.items() if isinstance(v, list) and k not in NOT_HASHED):
        for f in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(folder)}:{f.stat().st_size}:".encode())
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def flatten(kwargs: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v.contiguous()
    return out


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def cache_key(cfg, teacher, captions, items, resolution: int) -> dict:
    """What a cache is made from; a run reads a cache only when its own key is the same."""
    return {"version": CACHE_VERSION, "teacher": teacher_hash(cfg.teacher.path), "dtype": cfg.teacher.dtype,
            "resolution": resolution, "crop": cfg.data.crop, "seed": cfg.train.seed,
            "prompts": None if captions is None else captions.fingerprint,
            "prompt_rows": None if captions is None else len(captions),
            "images": None if items is None else items.fingerprint, "image_rows": None if items is None else len(items)}


def read_manifest(folder: Path) -> dict:
    """A cache folder's manifest, checked for the fields a reader relies on; one error naming the
    folder otherwise."""
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"data.cache: '{folder}' is not a data cache (no {MANIFEST}); write it with "
                        f"stepdistill cache --config <this config>")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"data.cache: '{path}' cannot be read ({type(exc).__name__})") from None
    rows = manifest.get("shard_rows") if isinstance(manifest, dict) else None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), dict) or not isinstance(rows, int) or \
            isinstance(rows, bool) or rows < 1 or not isinstance(files, dict) or \
            not all(valid_record(rel, meta) for rel, meta in files.items()):
        raise DataError(f"data.cache: '{path}' is malformed (it needs key, shard_rows >= 1 and a size and sha256 per "
                        f"shard); write the cache again into a new folder")
    return manifest


class DataCache:
    """Reads a finished cache: rows of the caption and item text states, and item latents."""

    def __init__(self, folder: str | Path, want: dict | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if want is not None:
            problem = key_problem(self.manifest["key"], want)
            if problem:
                raise DataError(f"data.cache: '{self.folder}' was made for other data or another teacher ({problem}); "
                                f"give another data.cache folder")
        if not self.manifest.get("complete"):
            raise DataError(f"data.cache: '{self.folder}' is unfinished; re-run stepdistill cache to complete it")
        if not isinstance(self.manifest.get("files"), dict):
            raise DataError(f"data.cache: '{self.folder}' records no checksums of its shards; re-run stepdistill "
                            f"cache on it to add them")
        self._verify()
        self.rows = self.manifest["shard_rows"]
        self._open: dict = {}
        self.reads = 0

    def _verify(self) -> None:
        """Every file against the manifest's size and checksum, before the first read: a shard that was
        truncated, deleted or altered after caching is one error naming it, never trained on. With
        several processes the main one checks (threads hash several files at once) and the verdict
        goes to every rank, so all stop alike."""
        import torch.distributed as dist

        parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        problem = records_problem(self.folder, self.manifest["files"]) if not parallel or dist.get_rank() == 0 else None
        if parallel:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem:
            raise DataError(f"data.cache: '{self.folder}': {problem}; run stepdistill cache again to rewrite it")

    def _handle(self, part: str, shard: int):
        from safetensors import safe_open

        key = (part, shard)
        if key not in self._open:
            if len(self._open) > 16:
                self._open.clear()
            self._open[key] = safe_open(str(self.folder / part / f"{shard:05d}.safetensors"), "pt")
        return self._open[key]

    def _rows(self, part: str, idx: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        self.reads += 1
        out: dict[str, list] = {}
        for i in idx.tolist():
            f = self._handle(part, i // self.rows)
            r = i % self.rows
            for k in f.keys():
                if k.startswith(prefix):
                    out.setdefault(k[len(prefix):], []).append(f.get_slice(k)[r:r + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    def _uncond(self) -> Cond:
        from safetensors.torch import load_file

        return Cond(unflatten(load_file(str(self.folder / "uncond.safetensors"))))

    def prompt_rows(self):
        """(rows(idx) -> Cond, uncond) of the caption list, or None when the cache holds none."""
        if not self.manifest["key"].get("prompt_rows"):
            return None
        return (lambda idx: Cond(unflatten(self._rows("prompts", idx, "cond.")))), self._uncond()

    def item_rows(self):
        """(rows(idx) -> Cond, uncond) of the items' own captions, or None (no captions)."""
        if not self.manifest.get("item_captions"):
            return None
        return (lambda idx: Cond(unflatten(self._rows("items", idx, "cond.")))), self._uncond()

    def latents(self, idx: torch.Tensor) -> torch.Tensor:
        return self._rows("items", idx, "latents")[""].float()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with writing(path.parent, f"the cache shard '{path}'"):
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half shard left behind
        raise
    os.replace(tmp, path)


def build_cache(cfg, out: Path | None = None, shard_rows: int = SHARD_ROWS) -> Path:
    """Encode ``cfg``'s captions and real images into ``out`` (default ``data.cache``); finished shards
    are kept (a shard that no longer matches the manifest's checksum is encoded again), shards are
    shared among the processes of an accelerate launch."""
    from accelerate import PartialState

    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise InputError(f"--shard-rows must be an integer >= 1, got {shard_rows!r}")
    state = PartialState(cpu=not torch.cuda.is_available())  # without CUDA, cpu=True makes a launch use gloo
    if cfg.teacher.path is None:
        raise InputError("teacher.path: a data cache needs a diffusers teacher (the oracle has no encoders)")
    out = Path(out or cfg.data.cache or "")
    if not str(out) or str(out) == ".":
        raise InputError("data.cache: name the cache folder (data.cache=<folder>)")
    teacher = load_teacher(cfg.teacher.path, dtype=torch_dtype(cfg.teacher.dtype), device=state.device,
                           null_label=cfg.teacher.null_label, allow_remote_code=cfg.teacher.allow_remote_code,
                           video_size=cfg.teacher.video_size, sample_size=cfg.teacher.sample_size,
                           guidance=cfg.teacher.guidance)
    text = teacher.conditional and teacher.null_label is None
    captions = read_captions(cfg.data.prompts, cfg.data, cfg.data.skip_bad_items) if cfg.data.prompts and text else None
    items = None
    if cfg.data.images is not None:
        if teacher.video:
            refuse_still_images(teacher.name, "latents " + " x ".join(map(str, teacher.sample_shape)))
        items = read_items(cfg.data, text, teacher.null_label if teacher.conditional else None)
    if captions is None and items is None:
        raise InputError("data: nothing to cache (give data.prompts or data.images)")
    size, channels = image_geometry(teacher)
    key = cache_key(cfg, teacher, captions, items, size)
    manifest = out / MANIFEST
    if state.is_main_process:
        if manifest.is_file():
            saved = read_manifest(out)
            problem = key_problem(saved["key"], key)
            if problem:
                raise DataError(f"data.cache: '{out}' holds a cache of other data or another teacher ({problem}); "
                                f"give another folder")
        elif out.exists() and any(out.iterdir()):
            raise DataError(f"data.cache: '{out}' exists and is not a data cache; give an empty or new folder")
        else:
            out.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({"key": key, "shard_rows": shard_rows, "complete": False,
                                            "item_captions": bool(items is not None and items.captions is not None)},
                                           indent=1))
        if text and not (out / "uncond.safetensors").is_file():
            _write_shard(out / "uncond.safetensors", flatten(teacher.encode([""])[1][:1].kwargs))
    state.wait_for_everyone()
    recorded = read_manifest(out)  # an unfinished cache keeps its own shard_rows
    shard_rows = recorded["shard_rows"]
    work = []
    if captions is not None:
        work += [("prompts", s) for s in range(-(-len(captions) // shard_rows))]
    if items is not None:
        work += [("items", s) for s in range(-(-len(items) // shard_rows))]
    mine = [w for k, w in enumerate(work) if k % state.num_processes == state.process_index]
    done = 0
    decoded = None if items is None else Decoded(items, size, channels, cfg.data.crop, cfg.train.seed, cfg.data.skip_bad_items)
    for part, shard in mine:
        rel = f"{part}/{shard:05d}.safetensors"
        path = out / rel
        if path.is_file():
            meta = recorded.get("files", {}).get(rel)
            problem = None if meta is None else file_problem(out, rel, meta)
            if problem is None:
                continue  # finished by an earlier (possibly killed) run
            logger.warning("data cache: %s; encoding it again", problem)
        lo = shard * shard_rows
        hi = min(lo + shard_rows, len(captions) if part == "prompts" else len(items))
        tensors: dict[str, list] = {}
        loader = None if part == "prompts" else iter(torch.utils.data.DataLoader(
            InWorkers(decoded), batch_size=64, sampler=range(lo, hi), collate_fn=collate,
            worker_init_fn=worker_signals,
            num_workers=min(cfg.data.num_workers, os.cpu_count() or 1)))  # the shard's images, 64 at a time
        for a in range(lo, hi, 64):
            b = min(a + 64, hi)
            rows = {}
            if part == "prompts":
                rows.update(flatten(teacher.encode(captions.take(range(a, b)))[0].kwargs, "cond."))
            else:
                pixels, original, corner, _ = next_batch(loader)
                noise = torch.stack([torch.randn(teacher.sample_shape, generator=torch.Generator().manual_seed(
                    stream_seed(cfg.train.seed, i, TAGS["cache_noise"]))) for i in range(a, b)])
                rows["latents"] = teacher.encode_images(pixels.to(state.device), noise=noise)
                rows["original_size"], rows["crop_top_left"] = original, corner
                if items.captions is not None:
                    rows.update(flatten(teacher.encode(items.captions.take(range(a, b)))[0].kwargs, "cond."))
            for k, v in rows.items():
                tensors.setdefault(k, []).append(v.detach().cpu())
        _write_shard(path, {k: torch.cat(v) for k, v in tensors.items()})
        done += 1
        logger.info("data cache: %s shard %d (%d rows) written", part, shard, hi - lo)
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [f"{p}/{s:05d}" for p, s in work if not (out / p / f"{s:05d}.safetensors").is_file()]
        if missing:
            raise DataError(f"data.cache: shards {missing[:3]} are missing after every process finished")
        doc = json.loads(manifest.read_text())
        shards = sorted(p for p in out.rglob("*.safetensors") if not p.name.startswith("."))
        doc.update(complete=True, files=file_records(out, shards))  # each shard's size and sha256, for readers
        write_json(manifest, doc)
    logger.info("data cache '%s': %d shards encoded here, %d in all", out, done, len(work))
    return out


INTERMIXED = True  # options may stand between the key=value overrides


def add_arguments(parser) -> None:
    """The ``stepdistill cache`` command's options."""
    parser.add_argument("--config", type=Path, required=True, help="the run's YAML config")
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: data.cache)")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="rows per shard file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for the distill command")


def run(args) -> str:
    return f"data cache written to {build_cache(load_config(args.config, args.overrides), args.out, args.shard_rows)}"
