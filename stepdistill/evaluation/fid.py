"""FID under the clean-fid protocol, with reference statistics computed once and reused.

Protocol (what the COCO-30K numbers of GigaGAN, DMD2, SiD-LSG and SwiftBrush follow):

1. every image, generated or real, is read to 8-bit RGB by its mode's real range
   (``stepdistill.data.files.to_8bit``: 16-bit greys are not clipped to white, transparency lies on
   white), centre-cropped to a square (side = its short edge) and resized to ``eval_size`` x
   ``eval_size`` with PIL's LANCZOS filter (:func:`center_crop_resize`);
2. clean-fid's ``clean`` mode then resizes each channel as float32 with PIL bicubic to 299 x 299
   (no uint8 quantisation in between) and feeds values in [0, 255] to the TorchScript Inception-v3
   of StyleGAN2-ADA / clean-fid (``inception-2015-12-05.pt``), normalised as ``(x - 128) / 128``;
3. the 2048-d pool features give a mean and a covariance (float64, ``np.cov`` with N - 1), and
   the Frechet distance between two such Gaussians is the FID (:func:`frechet_distance`).

The statistics file (``.npz``) stores ``mu``, ``sigma`` and the protocol (eval size, crop, filters,
the feature network's sha256, image count); ``calc`` refuses a reference made under another protocol.

Command line::

    stepdistill fid ref  IMAGES_DIR ref.npz  --eval-size 512 [--inception-weights PATH]
    stepdistill fid calc IMAGES_DIR --ref ref.npz [--json out.json]

Offline machines: download ``inception-2015-12-05.pt`` (URL in :data:`INCEPTION_URL`) once and
pass ``--inception-weights PATH`` (the file or its folder), or put it in the cache folder
(``$STEPDISTILL_CACHE``, default ``~/.cache/stepdistill``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.files import to_8bit, unreadable
from ..data.loading import InWorkers, failure, next_batch, worker_signals
from ..errors import EvalError
from ..storage import file_sha256, temporary_name, write_json

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# The fixed parts of the protocol; eval_size and the feature network's hash complete it.
PROTOCOL = {
    "crop": "center (short edge)",
    "resize": "PIL LANCZOS to eval_size, then clean-fid 'clean' (PIL bicubic, float32) to 299",
    "statistics": "float64 mean and np.cov (N - 1)",
}


def center_crop_resize(image, size: int | None, what: str = "image") -> np.ndarray:
    """Centre-crop ``image`` (PIL image of any mode, or HWC uint8 array) to a square of its short edge,
    then LANCZOS-resize it to ``size`` x ``size`` (no resize when ``size`` is None or already equal).
    Returns an HWC uint8 RGB array (``to_8bit``; ``what`` names the image if its values are refused)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = to_8bit(img, 3, what)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if size is not None and side != size:
        img = img.resize((size, size), resample=Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def cache_dir() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def resolve_inception(path: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """The Inception TorchScript file to use: ``path`` (a file, or a folder holding
    ``inception-2015-12-05.pt``), else the cache folder, downloading into it when online."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / INCEPTION_FILE
        if not p.is_file():
            raise EvalError(f"--inception-weights {path}: no such file (expected the TorchScript {INCEPTION_FILE})")
        return p
    p = cache_dir() / INCEPTION_FILE
    if p.is_file():
        return p
    download = (not _offline()) if download is None else download
    hint = f"download {INCEPTION_URL} and pass --inception-weights PATH (or put it at {p})"
    if not download:
        raise EvalError(f"Inception weights not found at {p} and this machine is offline; {hint}")
    try:
        from cleanfid.downloads_helper import check_download_inception

        p.parent.mkdir(parents=True, exist_ok=True)
        check_download_inception(fpath=str(p.parent))
    except Exception as exc:  # network errors come in many types
        Path(p).unlink(missing_ok=True)
        raise EvalError(f"could not download the Inception weights ({type(exc).__name__}: {exc}); {hint}") from exc
    return p


class InceptionFeatures(torch.nn.Module):
    """clean-fid's ``clean``-mode feature function for a TorchScript network with a ``layers``
    submodule: inputs are 299 x 299 float images in [0, 255], normalised to ``(x - 128) / 128``.
    The real file is StyleGAN2-ADA's Inception-v3; tests use small networks with the same interface."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        path = Path(path)
        try:
            with warnings.catch_warnings():  # TorchScript is the format the Inception file ships in
                warnings.simplefilter("ignore", FutureWarning)
                base = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvalError(f"--inception-weights {path}: not a TorchScript feature network ({first})") from exc
        if not hasattr(base, "layers"):
            raise EvalError(f"--inception-weights {path}: the TorchScript module has no 'layers' (not clean-fid's Inception)")
        self.base = base.eval()
        self.sha256 = file_sha256(path)
        self.path = path

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.layers((x - 128) / 128).reshape(x.shape[0], -1)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    return InceptionFeatures(resolve_inception(path)).to(device)


def protocol(eval_size: int | None, features_sha256: str) -> dict:
    """The settings a statistics file must share with the images it is compared to."""
    return {"eval_size": eval_size, **PROTOCOL, "features_sha256": features_sha256}


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); hidden files (unfinished writes) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
    if not files:
        raise EvalError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_features(files: Sequence[str | os.PathLike], extractor: InceptionFeatures, *, eval_size: int | None,
                   batch_size: int = 64, num_workers: int = 0, device: str | torch.device = "cpu",
                   desc: str = "inception features", verbose: bool = True) -> np.ndarray:
    """(N, D) features of image files under the protocol (see the module docstring)."""
    from tqdm.auto import tqdm

    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise EvalError(f"{len(missing)} image file(s) missing, first: {missing[0]}")
    loader = torch.utils.data.DataLoader(InWorkers(_ProtocolImages(files, eval_size)), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=num_workers, collate_fn=_stack,
                                         worker_init_fn=worker_signals)
    batches, feats = iter(loader), []
    for _ in tqdm(range(len(loader)), desc=desc, disable=not verbose):
        with torch.no_grad():
            feats.append(extractor(next_batch(batches).to(device)).detach().cpu().numpy())
    return np.concatenate(feats)


class _ProtocolImages(torch.utils.data.Dataset):
    """Image files as clean-fid's ``ResizeDataset`` gives them in ``clean`` mode (CHW float32 in
    [0, 255] at 299 x 299), but opened through ``to_8bit``: clean-fid opens files with
    ``convert("RGB")``, which turns a 16-bit grey to white. An unreadable file is one line naming it."""

    def __init__(self, files: Sequence[str | os.PathLike], eval_size: int | None):
        from cleanfid.resize import build_resizer

        self.files, self.eval_size, self.resize = [str(f) for f in files], eval_size, build_resizer("clean")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        what = f"image '{self.files[i]}'"
        try:
            with Image.open(self.files[i]) as im:
                x = self.resize(center_crop_resize(im, self.eval_size, what))
        except Exception as exc:  # PIL raises many exception types for broken data
            raise EvalError(unreadable(what, exc)) from exc
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # 'clean' resizes to float32, kept as is


def _stack(rows):
    return failure(rows) or torch.stack(rows)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvalError(f"FID needs at least 2 feature rows, got shape {tuple(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (similar to S1 S2), so no non-symmetric matrix square root and no
    complex round-off are involved; rank-deficient covariances (fewer images than features) are fine."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise EvalError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> Path:
    """Write statistics atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path).with_suffix(".npz")
    np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"reference statistics {path} do not exist (make them with the 'ref' command)")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except (KeyError, ValueError, OSError) as exc:
        raise EvalError(f"{path} is not a statistics file with mu and sigma ({exc})") from exc
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvalError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{path}: the statistics hold non-finite values (NaN or inf); compute them again with 'ref'")
    problem = covariance_problem(sigma)
    if problem:
        raise EvalError(f"{path}: sigma is not a covariance ({problem}); compute the statistics again with 'ref'")
    return mu, sigma, meta


def covariance_problem(sigma: np.ndarray) -> str | None:
    """Why ``sigma`` cannot be a covariance matrix (not symmetric, or a clearly negative eigenvalue), or
    None. Round-off of np.cov is allowed: an asymmetry or a negative eigenvalue within 1e-6 of the
    largest entry passes."""
    scale = max(float(np.abs(sigma).max()), 1e-30)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        return f"it is not symmetric (largest difference {asym:.3g})"
    low = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min())
    if low < -1e-6 * scale:
        return f"it has a negative eigenvalue ({low:.3g})"
    return None


def check_protocol(ref_meta: dict, ours: dict, ref_path) -> None:
    """Refuse a reference computed under another protocol, naming each difference."""
    keys = ["eval_size", *PROTOCOL, "features_sha256"]
    diffs = [f"{k}: {ref_meta.get(k)!r} (reference) vs {ours.get(k)!r}" for k in keys if ref_meta.get(k) != ours.get(k)]
    if diffs:
        raise EvalError(f"reference statistics {ref_path} were made under another protocol: " + "; ".join(diffs))


def folder_stats(files, extractor, eval_size, **kw) -> tuple[np.ndarray, np.ndarray, dict]:
    feats = image_features(files, extractor, eval_size=eval_size, **kw)
    mu, sigma = statistics(feats)
    return mu, sigma, {**protocol(eval_size, extractor.sha256), "num_images": len(files)}


def add_arguments(p) -> None:
    """The ``stepdistill fid`` command's options."""
    sub = p.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("ref", help="compute reference statistics of an image folder once")
    ref.add_argument("images", type=Path)
    ref.add_argument("out", type=Path, help="statistics file to write (.npz; an existing one needs --overwrite)")
    calc = sub.add_parser("calc", help="FID of an image folder against saved reference statistics")
    calc.add_argument("images", type=Path)
    calc.add_argument("--ref", type=Path, required=True, help="statistics file written by 'ref'")
    calc.add_argument("--json", type=Path, default=None, help="also write the result here (an existing file needs --overwrite)")
    for q in (ref, calc):
        q.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        q.add_argument("--eval-size", type=int, default=512, help="centre-crop + LANCZOS size (0: crop only)")
        q.add_argument("--inception-weights", default=None, help=f"local {INCEPTION_FILE} (file or folder)")
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--num-workers", type=int, default=0)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> str:
    if args.eval_size < 0:
        raise EvalError(f"--eval-size must be >= 0 (0: crop only), got {args.eval_size}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise EvalError(f"--num-workers must be >= 0, got {args.num_workers}")
    size = args.eval_size or None
    existing = args.out if args.cmd == "ref" else args.json
    if existing is not None and existing.exists() and not args.overwrite:
        raise EvalError(f"{existing} already exists (statistics of many images may have gone into it); pass "
                        f"--overwrite to replace it, or choose another file")
    extractor = load_inception(args.inception_weights, args.device)
    files = list_images(args.images)
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    if args.cmd == "ref":
        mu, sigma, meta = folder_stats(files, extractor, size, **kw)
        save_stats(args.out, mu, sigma, {**meta, "images": str(args.images)})
        return f"reference statistics of {len(files)} images written to {args.out}"
    mu_r, sigma_r, meta_r = load_stats(args.ref)
    check_protocol(meta_r, protocol(size, extractor.sha256), args.ref)
    mu, sigma, meta = folder_stats(files, extractor, size, **kw)
    fid = frechet_distance(mu, sigma, mu_r, sigma_r)
    result = {"fid": fid, "num_images": len(files), "images": str(args.images), "ref": str(args.ref),
              "ref_num_images": meta_r.get("num_images"), "protocol": protocol(size, extractor.sha256)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
    return f"FID {fid:.4f} ({len(files)} images vs {meta_r.get('num_images')} reference images)"
