"""Small, locally built stand-ins for the evaluation models and data, for offline tests.

* :func:`make_tiny_inception`: a TorchScript feature network with the interface of clean-fid's
  Inception file (a ``layers`` submodule taking 299 x 299 images normalised to [-1, 1]).
* :func:`make_tiny_open_clip`: an open_clip model folder (``open_clip_config.json`` plus
  ``open_clip_model.safetensors``) that ``open_clip.create_model_and_transforms("local-dir:...")`` loads.
* :func:`make_tiny_coco`: a COCO-2014-format folder: ``val2014/COCO_val2014_<id>.jpg`` images of
  mixed sizes and ``annotations/captions_val2014.json`` with several captions per image.

All are seeded and deterministic; none needs the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_CAPTION_WORDS = ["a", "red", "blue", "cat", "dog", "sitting", "on", "the", "table", "grass", "bus", "street"]


class _TinyFeatureNet(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, kernel_size=7, stride=4), torch.nn.GELU(),
            torch.nn.Conv2d(8, 16, kernel_size=5, stride=4), torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 128) / 128)


def make_tiny_inception(path, dim: int = 16, seed: int = 0) -> Path:
    """Save a TorchScript feature net with clean-fid Inception's interface to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _TinyFeatureNet(dim).eval()
    torch.jit.script(net).save(str(path))
    return path


def make_tiny_open_clip(folder, seed: int = 0) -> Path:
    """Save a randomly initialised tiny open_clip model as a ``local-dir`` folder."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP_CONFIG,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def make_tiny_coco(folder, num_images: int = 6, captions_per_image: int = 3, seed: int = 0) -> Path:
    """A COCO-2014-format fixture: images (mixed sizes, some not square) and a captions json."""
    from PIL import Image

    folder = Path(folder)
    (folder / "val2014").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for k in range(num_images):
        image_id = 100 + 7 * k
        w, h = [(40, 32), (32, 48), (36, 36)][k % 3]
        base = rng.integers(0, 256, size=3)
        pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / "val2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for j in range(captions_per_image):
            words = rng.choice(_CAPTION_WORDS, size=5)
            annotations.append({"id": 1000 * image_id + j, "image_id": image_id, "caption": " ".join(words) + " ."})
    (folder / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"info": {"description": "tiny COCO fixture"}, "images": images, "annotations": annotations}))
    return folder
