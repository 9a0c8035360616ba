"""The model card of an exported pipeline folder (its README.md): hub metadata, the schedule, and the
call that reproduces the trained sampler."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..models.student import StudentSpec
from .schedulers import UNCONDITIONAL_PIPELINES

SAMPLING_FILE = "stepdistill_sampling.json"


def teacher_license(teacher: str) -> str | None:
    """The ``license`` of a local teacher folder's model card (its README's YAML front matter), if any."""
    card = Path(teacher) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def model_card(pipe_cls: str, spec: StudentSpec, call: dict, teacher: str, lora: bool, metrics: dict | None,
               license: str | None = None, video: bool = False, scheduler: str = "DDIMScheduler") -> str:
    """README.md of an exported folder; ``video``: a text-to-video pipeline, whose frames the example
    writes with diffusers' ``export_to_video``; ``scheduler``: the class of the exported scheduler (the LoRA
    recipe loads it by name: the teacher's own class may be another, e.g. Sana's or Wan's solver)."""
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    prompt = "" if pipe_cls in UNCONDITIONAL_PIPELINES else ("class_labels=[0], " if pipe_cls == "DiTPipeline"
                                                              else "\"a photo of a cat\", ")
    tag = "unconditional-image-generation" if pipe_cls in UNCONDITIONAL_PIPELINES + ("DiTPipeline",) else "text-to-image"
    meta = {"library_name": "diffusers", "base_model": teacher, **({"license": license} if license else {}),
            "pipeline_tag": "text-to-video" if video else tag, "tags": ["stepdistill", "step-distillation", spec.method]}
    if metrics:
        meta["stepdistill_metrics"] = metrics
    if video:  # the pipeline's re-noising steps, if any, draw from torch's global generator
        example = ["from diffusers.utils import export_to_video", "",
                   "pipe = DiffusionPipeline.from_pretrained(\"<this folder>\")", "torch.manual_seed(0)",
                   f"frames = pipe({prompt}{args}, generator=torch.Generator().manual_seed(0)).frames[0]",
                   "export_to_video(frames, \"sample.mp4\", fps=16)"]
    else:
        example = ["", "pipe = DiffusionPipeline.from_pretrained(\"<this folder>\")",
                   f"images = pipe({prompt}{args}, generator=torch.Generator().manual_seed(0)).images"]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {spec.method} student of `{teacher}` ({len(spec.timesteps)}-step)", "",
        f"Distilled with stepdistill (method `{spec.method}`).", "",
        f"- pipeline: `{pipe_cls}`",
        f"- steps: {len(spec.timesteps)}; sampler: {spec.sampler}; timesteps (first = t_init): {spec.timesteps}",
        f"- guidance: {'w = ' + str(spec.guidance_scale) + ' (an input of the network)' if spec.guidance_scale is not None else 'none (guidance_scale=1.0; the teacher guidance is distilled in)'}",
        f"- metrics: {json.dumps(metrics) if metrics else 'not measured yet'}", "",
        "```python", "import torch", "from diffusers import DiffusionPipeline", *example, "```", "",
        f"These arguments ({SAMPLING_FILE}) reproduce the trained schedule exactly.",
    ]
    if lora:
        lines += ["", "The student as a LoRA on the teacher (`lora/`):", "", "```python",
                  f"pipe = DiffusionPipeline.from_pretrained(\"{teacher}\")",
                  "pipe.load_lora_weights(\"<this folder>/lora\")",
                  f"from diffusers import {scheduler}",
                  f"pipe.scheduler = {scheduler}.from_pretrained(\"<this folder>\", subfolder=\"scheduler\")", "```"]
    return "\n".join(lines) + "\n"
