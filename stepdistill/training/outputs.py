"""What a run leaves for people: sample grids during training, and at the end the student (and its
EMA) as diffusers model folders, and the loss history and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..diffusion.denoiser import Denoiser, unwrap
from ..models.shared_lora import is_view
from ..models.student import Student, fused_copy, save_lora_adapters
from .figures import plot_losses, save_sample_figure, save_sample_video


@torch.no_grad()
def validation_samples(student: Student, teacher, source, n: int, seed: int):
    """(samples, batch): ``n`` samples of the student on the validation stream, so every validation
    shows the same prompts and noise."""
    model = student.model if is_view(student.model) else unwrap(student.model)  # a view: its adapter on the base
    den = Denoiser(model, student.process, student.denoiser.prediction_type,
                   student.denoiser.embedded_guidance)
    b = source.draw("validation", n)
    noise = b.randn(n, *teacher.sample_shape)
    return student.sample(noise, b.cond, generator=torch.Generator().manual_seed(seed), denoiser=den), b


@torch.no_grad()
def save_samples(x: torch.Tensor, batch, teacher, oracle, path: Path) -> dict:
    """The samples as a PNG grid (images; videos: a row of frames per sample, and beside it the clip,
    ``figures.save_sample_video``) or scatter plot (vector data) at ``path``; with the oracle, their
    metrics."""
    metrics = {}
    if oracle is not None:
        ev = oracle.evaluate(x, labels=batch.labels)
        metrics = {"val/energy": ev["energy"], "val/floor": ev["floor"], "val/min_mode_mass": ev["min_mode_mass"]}
    labels = batch.prompts or (None if batch.labels is None else batch.labels.tolist())
    images = teacher.decode(x)
    save_sample_figure(images, path, oracle=oracle, labels=labels)
    if images.ndim == 5:  # videos: the clip beside the grid of their frames
        save_sample_video(images, path.with_suffix(""))
    return metrics


def log_image(accelerator, path: Path, step: int) -> None:
    """A PNG to the run's trackers (tensorboard, wandb)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", arr, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(arr)}, step=step)


def save_student(student: Student, folder: Path, model=None) -> None:
    """The student (or ``model``, an unsharded copy of its network) as a plain diffusers model folder
    (LoRA fused) with its schedule, plus its LoRA adapters for ``load_lora_weights`` when it has them."""
    model = student.model if model is None else model
    student.save(folder, fused_copy(model))
    save_lora_adapters(model, folder)


def save_history(history: list[dict], run_dir: Path) -> None:
    """``history.json`` and ``losses.png``."""
    (run_dir / "history.json").write_text(json.dumps(history))
    plot_losses(history, run_dir / "losses.png")
