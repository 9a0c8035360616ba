"""What the export tests share: each family's teacher at its tiny size, the call that samples its exported
stock pipeline, the toolkit's ``Student.sample`` in the same form, and ``stock_samples``, which runs the
pipelines in a process of its own (tests/helpers/stock_sample.py) that never imports stepdistill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers.video import VIDEO
from safetensors.torch import load_file

HELPERS = Path(__file__).resolve().parent
PACKED = {"flux", "qwenimage"}  # any size: their tiny teachers are distilled at 8x8 latents (teacher.sample_size)
VIDEO_FAMILIES = {"wan", "wan22", "hunyuanvideo"}
PROMPTS = ["a red cube", "two cats"]
# pipelines whose stochastic schedulers re-noise from torch's global generator (the others from the call's)
GLOBAL_STREAM = ("DiTPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "QwenImagePipeline", "WanPipeline",
                 "HunyuanVideoPipeline")


def family_teacher(tiny_pipelines, family):
    from stepdistill.models.teachers import load_teacher

    size = {"sample_size": 8} if family in PACKED else {"video_size": VIDEO} if family in VIDEO_FAMILIES else {}
    return load_teacher(tiny_pipelines[family], **size)


def stock_call(folder: Path, teacher, family: str) -> dict:
    """The JSON call arguments that sample ``folder`` (an exported pipeline) at the teacher's size, as
    latents (decoded images in [0, 1] for DiT, which has no latent output); the generator is the sampler's."""
    from stepdistill.export import sampling_kwargs

    name = type(teacher.pipeline).__name__
    call = dict(sampling_kwargs(folder))
    if name == "DiTPipeline":
        return {**call, "class_labels": [1, 2], "output_type": "np"}
    call.update(prompt=PROMPTS, output_type="latent")
    if family in VIDEO_FAMILIES:
        call.update(dict(zip(("num_frames", "height", "width"), VIDEO)))
    else:
        size = teacher.sample_shape[-1] * teacher.pipeline.vae_scale_factor
        call.update(height=size, width=size)
    if name.startswith(("PixArt", "Sana")):
        call.update(use_resolution_binning=False)
    return call


def toolkit_sample(student, teacher, family: str) -> torch.Tensor:
    """``Student.sample`` from the first draw of ``Generator().manual_seed(7)``, re-noising from the stream
    the stock pipeline draws from, in the form of the pipeline's output (``stock_call``)."""
    name = type(teacher.pipeline).__name__
    cond = teacher.encode([1, 2] if name == "DiTPipeline" else PROMPTS)[0]
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, *teacher.sample_shape, generator=g)
    torch.manual_seed(123)
    ref = student.sample(noise, cond, generator=torch.default_generator if name in GLOBAL_STREAM else g).float()
    if name == "DiTPipeline":
        ref = (teacher.decode(ref) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return ref


def as_latents(got: torch.Tensor, teacher, family: str, call: dict) -> torch.Tensor:
    """A packed family's latent output (tokens) unpacked by the pipeline class's own method."""
    if family not in PACKED:
        return got
    cls = type(teacher.pipeline)
    return cls._unpack_latents(got, call["height"], call["width"], teacher.pipeline.vae_scale_factor).reshape(
        got.shape[0], *teacher.sample_shape)


def stock_samples(jobs: list[dict], workdir: Path) -> list[torch.Tensor]:
    """Runs each job (tests/helpers/stock_sample.py) in one fresh process without stepdistill; the outputs."""
    workdir.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(jobs):
        job["out"] = str(workdir / f"sample_{i}.safetensors")
    (workdir / "jobs.json").write_text(json.dumps(jobs, default=str))
    r = subprocess.run([sys.executable, str(HELPERS / "stock_sample.py"), str(workdir / "jobs.json")], cwd=workdir,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"sampled {len(jobs)} without stepdistill" in r.stdout
    return [load_file(job["out"])["sample"] for job in jobs]
