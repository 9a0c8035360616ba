"""CLIP score with open_clip: the mean cosine similarity between each image and its caption.

Defaults follow the COCO-30K reports (GigaGAN, DMD2, SiD-LSG): ViT-g-14 with the
``laion2b_s12b_b42k`` weights, each caption prefixed with ``"A photo depicts "``, the score reported
as the plain mean cosine (not x100, not clipped at 0).

Where the weights come from:

* ``model="ViT-g-14", pretrained="laion2b_s12b_b42k"``: open_clip's own lookup, which reads the
  Hugging Face cache (and downloads when online);
* ``pretrained="/path/open_clip_pytorch_model.bin"``: a local checkpoint for a built-in model name;
* ``model="/path/folder"`` (or ``local-dir:/path/folder``): a folder with ``open_clip_config.json``
  and the weights, e.g. a snapshot of ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.files import to_8bit
from .fid import EvalError

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s12b_b42k"
DEFAULT_PREFIX = "A photo depicts "


def _model_id(model: str) -> str:
    if model.startswith(("local-dir:", "hf-hub:")):
        return model
    if os.sep in model or Path(model).is_dir():
        return f"local-dir:{model}"
    return model


def check_clip_weights(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED) -> None:
    """Fail early, with one line naming the option, when the CLIP weights cannot be had
    (cheap: checks files and the Hugging Face cache, loads nothing)."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    mid = _model_id(model)
    if mid.startswith("local-dir:"):
        folder = Path(mid[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise EvalError(f"--clip-model {model}: no open_clip_config.json in that folder")
        return
    if mid.startswith("hf-hub:"):
        return  # resolved by open_clip at load time
    if mid not in open_clip.list_models():
        raise EvalError(f"--clip-model {model!r} is neither an open_clip model name nor a folder")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise EvalError(f"--clip-pretrained {pretrained}: no such file")
        return
    cfg = get_pretrained_cfg(mid, pretrained or "")
    if not cfg:
        raise EvalError(f"--clip-pretrained {pretrained!r} is not a known tag for {mid} "
                        f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(mid))}) nor a file")
    try:
        download_pretrained(cfg)
    except Exception as exc:  # hub errors come in many types
        raise EvalError(f"CLIP weights {mid}/{pretrained} are not in the cache and cannot be downloaded "
                        f"({type(exc).__name__}); pass --clip-pretrained PATH to a local checkpoint "
                        f"or --clip-model FOLDER holding open_clip_config.json") from exc


class CLIPScorer:
    """Cosine similarity of open_clip image and text embeddings, caption prefixed."""

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, *,
                 prefix: str = DEFAULT_PREFIX, device: str | torch.device = "cpu"):
        import open_clip

        check_clip_weights(model, pretrained)
        mid = _model_id(model)
        kw = {} if mid.startswith(("local-dir:", "hf-hub:")) else {"pretrained": pretrained}
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(mid, device=device, **kw)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(mid)
        self.device = torch.device(device)
        self.prefix = prefix
        self.settings = {"clip_model": model, "clip_pretrained": None if kw == {} else pretrained,
                         "clip_prefix": prefix, "clip_score": "mean cosine similarity"}

    @torch.no_grad()
    def cosine(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        """Per-pair cosine similarity of image i and ``prefix + captions[i]``."""
        if len(images) != len(captions):
            raise EvalError(f"{len(images)} images but {len(captions)} captions")
        pixels = torch.stack([self.preprocess(to_8bit(im, 3)) for im in images]).to(self.device)
        tokens = self.tokenizer([self.prefix + c for c in captions]).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (img * txt).sum(-1).cpu().numpy().astype(np.float64)

    def score_files(self, files: Sequence[str | os.PathLike], captions: Sequence[str], batch_size: int = 32,
                    verbose: bool = True) -> np.ndarray:
        from tqdm.auto import tqdm

        if len(files) != len(captions):
            raise EvalError(f"{len(files)} images but {len(captions)} captions")
        out = []
        for i in tqdm(range(0, len(files), batch_size), desc="CLIP score", disable=not verbose):
            ims = []
            for f in files[i:i + batch_size]:
                with Image.open(f) as im:
                    ims.append(to_8bit(im, 3, f"image '{f}'"))
            out.append(self.cosine(ims, captions[i:i + batch_size]))
        return np.concatenate(out) if out else np.zeros(0)
