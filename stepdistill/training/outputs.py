"""What a run leaves for people: sample grids during training, and at the end the student (and its
EMA) as diffusers model folders, the loss history and its plot, and optionally the exported pipeline."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..denoiser import Denoiser, unwrap
from ..generator import Student, fused_copy, save_lora_adapters

logger = logging.getLogger("stepdistill")
EXPORT_DIR = "pipeline"  # train.export: the final student as a diffusers pipeline folder


@torch.no_grad()
def validation_samples(student: Student, teacher, source, n: int, seed: int):
    """(samples, batch): ``n`` samples of the student on the validation stream, so every validation
    shows the same prompts and noise."""
    den = Denoiser(unwrap(student.model), student.process, student.denoiser.prediction_type)
    b = source.draw("validation", n)
    noise = b.randn(n, *teacher.sample_shape)
    return student.sample(noise, b.cond, generator=torch.Generator().manual_seed(seed), denoiser=den), b


@torch.no_grad()
def save_samples(x: torch.Tensor, batch, teacher, oracle, path: Path) -> dict:
    """The samples as a PNG grid (images) or scatter plot (vector data) at ``path``; with the oracle,
    their metrics."""
    from ..evaluation.grids import save_sample_figure

    metrics = {}
    if oracle is not None:
        ev = oracle.evaluate(x, labels=batch.labels)
        metrics = {"val/energy": ev["energy"], "val/floor": ev["floor"], "val/min_mode_mass": ev["min_mode_mass"]}
    labels = batch.prompts or (None if batch.labels is None else batch.labels.tolist())
    save_sample_figure(teacher.decode(x), path, oracle=oracle, labels=labels)
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
    from ..evaluation.grids import plot_losses

    (run_dir / "history.json").write_text(json.dumps(history))
    plot_losses(history, run_dir / "losses.png")


def export_pipeline(run_dir: Path, teacher_path: str, use_ema: bool) -> Path:
    """``<run_dir>/pipeline``: the final student (its EMA when kept) in the teacher's diffusers
    pipeline, replacing an earlier export of this run only once the new one is complete."""
    from ..export import export

    final = run_dir / EXPORT_DIR
    new, old = final.with_name(EXPORT_DIR + ".new"), final.with_name(EXPORT_DIR + ".old")
    if old.is_dir() and not final.exists():  # an earlier export died between its two renames
        os.replace(old, final)
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    export(run_dir, new, teacher=teacher_path, use_ema=use_ema)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("exported the student as a diffusers pipeline: %s", final)
    return final
