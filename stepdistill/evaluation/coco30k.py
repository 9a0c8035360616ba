"""COCO-30K: FID and CLIP score of a text-to-image pipeline on 30,000 COCO-2014 validation captions.

The protocol DMD2, SiD-LSG and SwiftBrush report (after GigaGAN): 30,000 val2014 images drawn with
a seed, one of each image's captions drawn with the same generator, one generated image per
caption; FID (clean-fid protocol, images centre-cropped and LANCZOS-resized to --eval-size, see
stepdistill.evaluation.fid) against the statistics of the drawn val2014 images; CLIP score
(open_clip ViT-g-14 laion2b_s12b_b42k, "A photo depicts " + caption, mean cosine).

    accelerate launch -m stepdistill coco30k --pipeline exported_student/ --out runs/coco30k \\
        --coco-annotations coco/annotations/captions_val2014.json --coco-images coco/val2014 \\
        --ref-stats coco30k_ref_512.npz

* --pipeline: any diffusers pipeline folder (or cached hub id) that takes a text prompt. An
  exported student brings its call arguments (steps, timesteps, guidance) in
  stepdistill_sampling.json; for a teacher give --num-inference-steps and --guidance-scale.
* Captions: --coco-annotations (drawn with --caption-seed) or --captions (a .txt file, one per
  line, or a .json list of strings or of {"caption", "file_name"} records).
* Generation is sharded over the accelerate processes (caption i goes to process i mod N); image i
  is seeded with --seed + i, so the images do not depend on the process count. Re-running the
  same command skips images already written, and refuses if the settings changed.
* Reference statistics are computed once from --coco-images and written to --ref-stats, then
  reused by later runs; the metrics run on the main process.

Results go to OUT/results.json with every protocol setting; images to OUT/images/00000.png ...
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
from pathlib import Path

import torch

from ..config import torch_dtype
from ..errors import EvalError
from ..export import SAMPLING_FILE
from ..storage import FOLDER_MARKER, claim_folder, file_sha256, key_problem, write_json
from . import fid as fidlib
from .clip_score import DEFAULT_MODEL, DEFAULT_PREFIX, DEFAULT_PRETRAINED, CLIPScorer, check_clip_weights


def add_arguments(p) -> None:
    """The ``stepdistill coco30k`` command's options."""
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (or cached hub id)")
    p.add_argument("--out", type=Path, required=True, help="output folder (images/, captions.json, results.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco-annotations", type=Path, help="captions_val2014.json")
    src.add_argument("--captions", type=Path, help="caption file (.txt one per line, or .json)")
    p.add_argument("--num-captions", type=int, default=30000, help="images/captions to draw (default 30000)")
    p.add_argument("--caption-seed", type=int, default=2014, help="seed of the caption draw")
    p.add_argument("--skip-bad-captions", action="store_true",
                   help="leave out empty or non-text captions instead of stopping at the first")
    p.add_argument("--coco-images", type=Path, default=None, help="val2014 image folder (for the reference statistics)")
    p.add_argument("--ref-stats", type=Path, default=None,
                   help="reference statistics (.npz): reused if it exists, else computed from --coco-images "
                        "and written here (default OUT/ref_stats.npz)")
    p.add_argument("--eval-size", type=int, default=512, help="FID centre-crop + LANCZOS size (0: crop only)")
    p.add_argument("--inception-weights", default=None, help=f"local {fidlib.INCEPTION_FILE} (file or folder)")
    p.add_argument("--clip-model", default=DEFAULT_MODEL, help="open_clip model name, or a folder with open_clip_config.json")
    p.add_argument("--clip-pretrained", default=DEFAULT_PRETRAINED, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--clip-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--resolution", type=int, default=None, help="height = width of generated images (pipeline default)")
    p.add_argument("--seed", type=int, default=0, help="image i is generated with seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--metrics-batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="pipeline dtype (default: as saved)")


# ---------------------------------------------------------------- captions

def _caption(value, where: str, skip_bad: bool) -> str | None:
    """A caption with its whitespace collapsed. An empty, null or non-text one is one error naming
    ``where`` or, with ``skip_bad`` (--skip-bad-captions), None (left out), as training treats
    ``data.prompts`` (``data.skip_bad_items``)."""
    text = " ".join(value.split()) if isinstance(value, str) else ""
    if text:
        return text
    if skip_bad:
        return None
    raise EvalError(f"{where}: the caption is empty or not text ({value!r}); remove it or pass --skip-bad-captions")


def draw_coco_captions(annotations: Path, num: int, seed: int, skip_bad: bool = False) -> list[dict]:
    """``num`` distinct images drawn with ``random.Random(seed)`` from the sorted image ids, and for
    each one of its captions (sorted by annotation id) drawn with the same generator."""
    try:
        data = json.loads(annotations.read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        by_image: dict[int, list[tuple[int, str]]] = {}
        for ann in data["annotations"]:
            caption = _caption(ann["caption"], f"--coco-annotations {annotations}: annotation {ann['id']}", skip_bad)
            if caption is not None:
                by_image.setdefault(ann["image_id"], []).append((ann["id"], caption))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise EvalError(f"--coco-annotations {annotations}: not a COCO captions file ({type(exc).__name__}: {exc})") from exc
    ids = sorted(i for i in by_image if i in files)
    if num > len(ids):
        raise EvalError(f"--num-captions {num} exceeds the {len(ids)} captioned images in {annotations}")
    rng = random.Random(seed)
    chosen = rng.sample(ids, num)
    out = []
    for image_id in chosen:
        _, caption = rng.choice(sorted(by_image[image_id]))
        out.append({"caption": caption, "image_id": image_id, "file_name": files[image_id]})
    return out


def read_caption_file(path: Path, num: int, skip_bad: bool = False) -> list[dict]:
    """The first ``num`` captions of a .txt file (one per line) or a .json list (strings, or records with
    "caption" and optionally "file_name")."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
            if not isinstance(items, list):
                raise TypeError(f"top level is a {type(items).__name__}")
            rows = [{"caption": x} if not isinstance(x, dict) else
                    {"caption": x["caption"], **({"file_name": x["file_name"]} if "file_name" in x else {})}
                    for x in items]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvalError(f"--captions {path}: expected a JSON list of strings or of "
                            f"{{\"caption\", \"file_name\"}} records ({type(exc).__name__}: {exc})") from exc
        where = "item"
    else:
        rows = [{"caption": line} for line in text.splitlines()]
        where = "line"
    kept = []
    for i, row in enumerate(rows):
        caption = _caption(row["caption"], f"--captions {path}: {where} {i + 1}", skip_bad)
        if caption is not None:
            kept.append({**row, "caption": caption})
    if not kept:
        raise EvalError(f"--captions {path} holds no captions")
    return kept[:num]


# ---------------------------------------------------------------- settings and validation

def call_kwargs(args, pipeline_dir: Path | None) -> dict:
    kw = {}
    if pipeline_dir is not None and (pipeline_dir / SAMPLING_FILE).is_file():
        kw.update(json.loads((pipeline_dir / SAMPLING_FILE).read_text())["call_kwargs"])
    if args.num_inference_steps is not None:
        kw["num_inference_steps"] = args.num_inference_steps
        kw.pop("timesteps", None)
        kw.pop("sigmas", None)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.resolution is not None:
        kw["height"] = kw["width"] = args.resolution
    return kw


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def prepare(args) -> tuple[list[dict], dict, Path]:
    """Validate every input before anything is generated; returns captions, generation settings and
    the reference statistics path. Raises EvalError with one line naming the option."""
    if args.num_captions < 1:
        raise EvalError(f"--num-captions must be positive, got {args.num_captions}")
    for name in ("batch_size", "metrics_batch_size", "num_inference_steps", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_size < 0:
        raise EvalError(f"--eval-size must be >= 0 (0: crop only), got {args.eval_size}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise EvalError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}")
    pipe_dir = Path(args.pipeline)
    if pipe_dir.exists() and not (pipe_dir / "model_index.json").is_file():
        raise EvalError(f"--pipeline {args.pipeline}: no model_index.json (not a diffusers pipeline folder)")
    if not pipe_dir.exists() and (os.sep in args.pipeline or args.pipeline.startswith(".")):
        raise EvalError(f"--pipeline {args.pipeline}: no such folder")
    if args.out.exists() and not args.out.is_dir():
        raise EvalError(f"--out {args.out} exists and is not a folder")
    source = args.coco_annotations or args.captions
    if not source.is_file():
        raise EvalError(f"--{'coco-annotations' if args.coco_annotations else 'captions'} {source}: no such file")
    if args.coco_annotations:
        captions = draw_coco_captions(args.coco_annotations, args.num_captions, args.caption_seed,
                                      args.skip_bad_captions)
    else:
        captions = read_caption_file(args.captions, args.num_captions, args.skip_bad_captions)
    if len(captions) < 2:
        raise EvalError(f"FID needs at least 2 images; {source} gives {len(captions)} caption(s)")
    ref = args.ref_stats or args.out / "ref_stats.npz"
    if not ref.is_file():
        if args.coco_images is None:
            raise EvalError(f"reference statistics {ref} do not exist; pass --coco-images (the val2014 folder) "
                            f"to compute them, or --ref-stats to an existing file")
        if not args.coco_images.is_dir():
            raise EvalError(f"--coco-images {args.coco_images}: no such folder")
        if all("file_name" in c for c in captions):
            missing = [c["file_name"] for c in captions if not (args.coco_images / c["file_name"]).is_file()]
            if missing:
                raise EvalError(f"--coco-images {args.coco_images}: {len(missing)} of the drawn images are missing, "
                                f"first {missing[0]}")
    inception = fidlib.resolve_inception(args.inception_weights)
    if ref.is_file():  # a reference made under another protocol is refused now, not after generating
        fidlib.check_protocol(fidlib.load_stats(ref)[2],
                              fidlib.protocol(args.eval_size or None, file_sha256(inception)), ref)
    check_clip_weights(args.clip_model, args.clip_pretrained)
    settings = {
        "pipeline": str(pipe_dir.resolve()) if pipe_dir.exists() else args.pipeline,
        "call_kwargs": call_kwargs(args, pipe_dir if pipe_dir.exists() else None),
        "seed": args.seed,
        "dtype": args.dtype,
        "captions": {"source": str(source.resolve()), "num": len(captions),
                     "caption_seed": args.caption_seed if args.coco_annotations else None,
                     "sha256": _sha([c["caption"] for c in captions])},
    }
    old = args.out / "generation.json"  # a folder written before folder markers: compared by this record
    if old.is_file() and not (args.out / FOLDER_MARKER).is_file():
        problem = key_problem(json.loads(old.read_text()), settings)
        if problem:
            raise EvalError(f"{args.out} holds images made with other settings ({problem}); use a new --out folder")
    # nothing of the user's is overwritten or scored
    claim_folder(args.out, "coco30k", settings, legacy=lambda folder: (folder / "generation.json").is_file())
    return captions, settings, ref


# ---------------------------------------------------------------- generation

def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:05d}.png"


def load_pipeline(name: str, dtype: str | None, device):
    from diffusers import DiffusionPipeline

    weights_dtype = torch_dtype(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(name, **({"dtype": weights_dtype} if weights_dtype else {}))
    except (OSError, ValueError) as exc:
        raise EvalError(f"--pipeline {name}: could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if "prompt" not in inspect.signature(pipe.__call__).parameters:
        raise EvalError(f"--pipeline {name}: {type(pipe).__name__} takes no text prompt; COCO-30K needs a text-to-image pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, captions: list[dict], settings: dict, out: Path, rank: int, world: int, batch_size: int,
             device, show_progress: bool) -> int:
    """Write this process's images (index i with i % world == rank) that are not there yet."""
    from tqdm.auto import tqdm

    todo = [i for i in range(rank, len(captions), world) if not image_path(out, i).is_file()]
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    kwargs = settings["call_kwargs"]
    for start in tqdm(range(0, len(todo), batch_size), desc=f"generating (process {rank})", disable=not show_progress,
                      total=(len(todo) + batch_size - 1) // batch_size):
        batch = todo[start:start + batch_size]
        # Some pipelines (DiT, SD3) re-noise from torch's global RNG, not the generator.
        torch.manual_seed(settings["seed"] + batch[0])
        generators = [torch.Generator(gen_device).manual_seed(settings["seed"] + i) for i in batch]
        with torch.no_grad():
            images = pipe(prompt=[captions[i]["caption"] for i in batch], generator=generators, output_type="pil",
                          **kwargs).images
        for i, im in zip(batch, images):
            path = image_path(out, i)
            tmp = path.with_name(f".{path.name}.tmp.png")
            im.save(tmp)
            os.replace(tmp, path)
    return len(todo)


# ---------------------------------------------------------------- metrics

def metrics(args, captions: list[dict], settings: dict, ref_path: Path, device) -> dict:
    files = [image_path(args.out, i) for i in range(len(captions))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EvalError(f"{len(missing)} generated images are missing (first {missing[0]}); re-run the command")
    size = args.eval_size or None
    extractor = fidlib.load_inception(args.inception_weights, device)
    ours = fidlib.protocol(size, extractor.sha256)
    kw = dict(batch_size=args.metrics_batch_size, device=device)
    if ref_path.is_file():
        mu_r, sigma_r, meta_r = fidlib.load_stats(ref_path)
        fidlib.check_protocol(meta_r, ours, ref_path)
    else:
        paired = all("file_name" in c for c in captions)
        ref_files = [args.coco_images / c["file_name"] for c in captions] if paired else fidlib.list_images(args.coco_images)
        mu_r, sigma_r, meta_r = fidlib.folder_stats(ref_files, extractor, size, desc="reference features", **kw)
        meta_r.update(reference="the drawn val2014 images" if paired else f"every image in {args.coco_images}",
                      images=str(args.coco_images), captions_sha256=settings["captions"]["sha256"])
        fidlib.save_stats(ref_path, mu_r, sigma_r, meta_r)
    mu, sigma, _ = fidlib.folder_stats(files, extractor, size, desc="generated features", **kw)
    fid = fidlib.frechet_distance(mu, sigma, mu_r, sigma_r)
    scorer = CLIPScorer(args.clip_model, args.clip_pretrained, prefix=args.clip_prefix, device=device)
    clip = scorer.score_files(files, [c["caption"] for c in captions], batch_size=args.metrics_batch_size)
    return {
        "fid": fid,
        "clip_score": float(clip.mean()),
        "clip_score_std": float(clip.std()),
        "num_images": len(files),
        "generation": settings,
        "fid_protocol": {**ours, "reference_stats": str(ref_path.resolve()), "reference_num_images": meta_r.get("num_images"),
                         "reference": meta_r.get("reference")},
        "clip_protocol": scorer.settings,
    }


def run(args) -> str | None:
    captions, settings, ref_path = prepare(args)
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo for a multi-process CPU launch
    pipe = load_pipeline(settings["pipeline"], args.dtype, state.device)
    if state.is_main_process:
        (args.out / "images").mkdir(parents=True, exist_ok=True)
        write_json(args.out / "captions.json", captions)
        write_json(args.out / "generation.json", settings)
    state.wait_for_everyone()
    made = generate(pipe, captions, settings, args.out, state.process_index, state.num_processes, args.batch_size,
                    state.device, show_progress=state.is_local_main_process)
    print(f"process {state.process_index}: generated {made} images "
          f"({len(range(state.process_index, len(captions), state.num_processes)) - made} already there)")
    del pipe
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    result = metrics(args, captions, {**settings, "num_processes": state.num_processes}, ref_path, state.device)
    write_json(args.out / "results.json", result)
    return f"COCO-{len(captions)}: FID {result['fid']:.3f}, CLIP score {result['clip_score']:.4f} -> {args.out / 'results.json'}"
