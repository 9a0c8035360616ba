"""The fake score a finished score-method run leaves when asked, and DisBack's start from it.

A finished run of a score method (``dmd``, ``dmd2``, ``disback``, ``sid``, ``vsd``) with
``method_args.save_fake_score: true`` writes its trained fake score beside the student as
``<output_dir>/fake_score/``: a plain diffusers model folder of the teacher's network class (config and
safetensors, loadable with ``from_pretrained``; a LoRA fake score with its adapters merged), and, when
the run trained DMD2's GAN head (``method_args.gan``), that head's weights in
``fake_score/gan_head.safetensors``. Checkpoints hold the fake score too, but only as a trainable to
resume (a GAN run's network and head in one file, a LoRA's adapters alone); ``fake_score/`` is the one
to start from. DisBack's ``method_args.fake_init`` names such a folder, or a run folder holding one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..diffusion.denoiser import unwrap
from ..models.student import fused_copy

FAKE_SCORE = "fake_score"  # in a finished run folder
GAN_HEAD = "gan_head.safetensors"  # in FAKE_SCORE, with the GAN head
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file (or its shards, with an index beside them)
KEY = "method_args.fake_init"


def save_fake_score(folder: Path, network: nn.Module, head: nn.Module | None = None) -> None:
    """``network`` (a whole, unsharded fake score) as a diffusers model folder, and ``head`` beside it."""
    from safetensors.torch import save_file

    unwrap(fused_copy(network)).save_pretrained(folder, safe_serialization=True)
    if head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in unwrap(head).state_dict().items()},
                  str(Path(folder) / GAN_HEAD))


def resolve_fake_init(path: str | Path) -> Path:
    """The fake-score folder ``method_args.fake_init`` names: the folder itself when it holds a model
    (``config.json``), else a run folder's ``fake_score/``. One ValueError naming the key and the path
    when it is neither."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{KEY}: '{path}' does not exist")
    folder = p if (p / "config.json").is_file() else p / FAKE_SCORE
    if not (folder / "config.json").is_file():
        raise ValueError(f"{KEY}: '{path}' is neither a fake-score folder (a model folder with config.json) nor a "
                         f"run folder with {FAKE_SCORE}/ (a finished run with method_args.save_fake_score=true writes it)")
    if not weight_files(folder):
        raise ValueError(f"{KEY}: '{folder}' holds no {WEIGHTS} (a diffusers model folder saved with safetensors)")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder: the one file, or the shards its index lists."""
    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [folder / WEIGHTS] if (folder / WEIGHTS).is_file() else []


def saved_class(folder: Path) -> str | None:
    return json.loads((folder / "config.json").read_text()).get("_class_name")


def check_fake_init_class(folder: Path, teacher_class: str) -> None:
    """Before the teacher is loaded: ``folder`` must hold a network of the teacher network's class (a
    two-expert teacher's fake score is a NoiseLevelExperts, checked once the teacher is loaded)."""
    name = saved_class(folder)
    if name not in (teacher_class, "NoiseLevelExperts"):
        raise ValueError(f"{KEY}: '{folder}' holds a {name}; the teacher's network is a {teacher_class}")


def check_fake_init(folder: Path, network: nn.Module, head: nn.Module | None) -> None:
    """``folder`` must hold a fake score that loads into ``network`` (this run's fake score, a copy of the
    teacher's network): its class, its config (every entry both have) and every weight's name and shape
    (read from the files' headers, nothing loaded); and, when ``head`` is given (``method_args.gan``), a
    GAN head of ``head``'s shapes. One ValueError naming the key, the folder and the first difference."""
    from safetensors import safe_open

    net = unwrap(network)
    name = type(net).__name__
    if saved_class(folder) != name:
        raise ValueError(f"{KEY}: '{folder}' holds a {saved_class(folder)}; this run's fake score, a copy of the "
                         f"teacher's network, is a {name}")
    saved = json.loads((folder / "config.json").read_text())
    own = json.loads(net.to_json_string()) if hasattr(net, "to_json_string") else {}
    differ = sorted(k for k in saved.keys() & own.keys() if not k.startswith("_") and saved[k] != own[k])
    if differ:
        k = differ[0]
        raise ValueError(f"{KEY}: '{folder}' holds a {name} of another configuration than the teacher's ({k}: "
                         f"{saved[k]!r}, the teacher's {own[k]!r}); it is not a fake score of this teacher")

    def compare(files, module, what):
        shapes = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if shapes != want:
            missing, extra = sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys())
            wrong = sorted(k for k in want.keys() & shapes.keys() if want[k] != shapes[k])
            raise ValueError(f"{KEY}: '{folder}' {what} does not match this run's (missing {missing[:3]}, unexpected "
                             f"{extra[:3]}, other shapes {wrong[:3]})")

    compare(weight_files(folder), net, "weights")
    if head is not None:
        if not (folder / GAN_HEAD).is_file():
            raise ValueError(f"{KEY}: '{folder}' has no {GAN_HEAD} (its run trained no GAN head) and "
                             f"method_args.gan=true; set method_args.gan=false or start from a run with the GAN")
        compare([folder / GAN_HEAD], unwrap(head), f"{GAN_HEAD}")


def load_fake_init(folder: Path, gan: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the fake score's weights, the GAN head's weights or None), on the CPU."""
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(folder):
        state.update(load_file(str(f)))
    return state, load_file(str(folder / GAN_HEAD)) if gan else None
