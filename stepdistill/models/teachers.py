"""Load a frozen teacher from a diffusers pipeline folder or hub id (or the exact oracle).

The pipeline's own ``encode_prompt`` does the text encoding, so every family encodes prompts exactly
as its diffusers pipeline does at sampling time; ``PIPELINE_FAMILIES`` holds one small entry per
pipeline class (how it encodes, what its unconditional branch is).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..diffusion.denoiser import MODEL_ADAPTERS, Cond, Denoiser, find_adapter, unwrap
from ..diffusion.process import NoiseProcess, process_from_scheduler_config
from ..errors import TeacherLoadError
from .nets import NoiseLevelExperts
from .oracle import OracleNet
from .shipped import is_shipped, quiet_text_encoder_type, shipped_path

DENOISER_COMPONENTS = ("unet", "transformer")
VIDEO_DENOISERS = ("WanTransformer3DModel",)  # networks of video latents (C, F, H, W), known before loading
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


# ------------------------------------------------------------------------------------------------
# pipeline families: how each pipeline class turns prompts into (cond, uncond)
# ------------------------------------------------------------------------------------------------
EncodeFn = Callable[["Teacher", Sequence[Any]], tuple[Cond, Cond]]
PIPELINE_FAMILIES: dict[str, EncodeFn] = {}
TEXT_FAMILIES: set[str] = set()  # pipelines whose conditioning is a text prompt


def register_pipeline(*class_names: str, text: bool = True) -> Callable[[EncodeFn], EncodeFn]:
    def deco(fn: EncodeFn) -> EncodeFn:
        for name in class_names:
            PIPELINE_FAMILIES[name] = fn
            if text:
                TEXT_FAMILIES.add(name)
        return fn

    return deco


@register_pipeline("StableDiffusionPipeline")
def _encode_sd(teacher: "Teacher", prompts):
    pe, npe = teacher.pipeline.encode_prompt(list(prompts), teacher.encoder_device, 1, True, negative_prompt=None)
    return Cond({"encoder_hidden_states": pe}), Cond({"encoder_hidden_states": npe})


@register_pipeline("StableDiffusionXLPipeline")
def _encode_sdxl(teacher: "Teacher", prompts):
    pipe = teacher.pipeline
    pe, npe, pooled, npooled = pipe.encode_prompt(list(prompts), device=teacher.encoder_device, do_classifier_free_guidance=True)
    size = tuple(teacher.sample_shape[-2:])
    size = (size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
    ids = ids.to(teacher.encoder_device).repeat(len(prompts), 1)
    return (
        Cond({"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}),
        Cond({"encoder_hidden_states": npe, "added_cond_kwargs": {"text_embeds": npooled, "time_ids": ids}}),
    )


@register_pipeline("PixArtAlphaPipeline", "PixArtSigmaPipeline")
def _encode_pixart(teacher: "Teacher", prompts):
    pe, mask, npe, nmask = teacher.pipeline.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="", device=teacher.encoder_device, clean_caption=False
    )
    return (
        Cond({"encoder_hidden_states": pe, "encoder_attention_mask": mask}),
        Cond({"encoder_hidden_states": npe, "encoder_attention_mask": nmask}),
    )


@register_pipeline("StableDiffusion3Pipeline")
def _encode_sd3(teacher: "Teacher", prompts):
    prompts = list(prompts)
    pe, npe, pooled, npooled = teacher.pipeline.encode_prompt(
        prompts, prompt_2=None, prompt_3=None, device=teacher.encoder_device, do_classifier_free_guidance=True
    )
    return (
        Cond({"encoder_hidden_states": pe, "pooled_projections": pooled}),
        Cond({"encoder_hidden_states": npe, "pooled_projections": npooled}),
    )


def call_default(pipeline, name: str):
    """The default of the pipeline ``__call__``'s argument ``name``: what a user's plain call encodes with."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


@register_pipeline("SanaPipeline")
def _encode_sana(teacher: "Teacher", prompts):
    """As SanaPipeline's ``__call__`` encodes by default, so that the exported student sees the states it
    was trained on: its complex human instruction before each prompt (not before the empty negative
    prompt: ``encode_prompt`` leaves it out there), ``max_sequence_length`` tokens with their mask."""
    pipe = teacher.pipeline
    pe, mask, npe, nmask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="", device=teacher.encoder_device,
        clean_caption=False, max_sequence_length=call_default(pipe, "max_sequence_length"),
        complex_human_instruction=call_default(pipe, "complex_human_instruction"),
    )
    return (
        Cond({"encoder_hidden_states": pe, "encoder_attention_mask": mask}),
        Cond({"encoder_hidden_states": npe, "encoder_attention_mask": nmask}),
    )


@register_pipeline("WanPipeline")
def _encode_wan(teacher: "Teacher", prompts):
    """UMT5 states padded with zeros to the length ``__call__`` encodes with (its max_sequence_length
    default, 512), so that the exported pipeline's default call conditions the student identically."""
    pipe = teacher.pipeline
    pe, npe = pipe.encode_prompt(list(prompts), negative_prompt=None, do_classifier_free_guidance=True,
                                 max_sequence_length=call_default(pipe, "max_sequence_length"),
                                 device=teacher.encoder_device)
    return Cond({"encoder_hidden_states": pe}), Cond({"encoder_hidden_states": npe})


def _encode_labels(teacher: "Teacher", labels):
    """Class-conditional teachers: 'prompts' are class indices (DiT also takes its label names)."""
    if teacher.null_label is None:
        raise ValueError(f"teacher {teacher.name} is unconditional; it takes no prompts or labels")
    if teacher.pipeline is not None and hasattr(teacher.pipeline, "get_label_ids") and any(isinstance(p, str) for p in labels):
        labels = teacher.pipeline.get_label_ids(list(labels))
    labels = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long, device=teacher.device)
    if torch.any(labels < 0) or torch.any(labels >= teacher.null_label):
        raise ValueError(f"class labels must be in [0, {teacher.null_label}), got {labels.tolist()}")
    return Cond({"class_labels": labels}), Cond({"class_labels": torch.full_like(labels, teacher.null_label)})


register_pipeline("DiTPipeline", "DDPMPipeline", "DDIMPipeline", "oracle", text=False)(_encode_labels)


# ------------------------------------------------------------------------------------------------
# the teacher
# ------------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    """A frozen teacher: its denoiser, noise process, sample shape and encoders."""

    denoiser: Denoiser
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    name: str
    pipeline: Any = None  # the diffusers pipeline (None for the oracle)
    family: str = "oracle"
    null_label: int | None = None  # for class-conditional teachers: the label of the null branch
    video_size: tuple[int, int, int] | None = None  # a video teacher's (frames, height, width) in pixels

    @property
    def video(self) -> bool:
        """Whether the teacher makes videos: latents (C, F, H, W)."""
        return self.video_size is not None

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.denoiser.model).parameters(), torch.zeros(())).device

    @property
    def conditional(self) -> bool:
        return self.family in TEXT_FAMILIES or self.null_label is not None

    @property
    def encoder_device(self) -> torch.device:
        """Where the text encoders are (the CPU once :meth:`offload_text_encoders` moved them)."""
        enc = getattr(self.pipeline, "text_encoder", None) if self.pipeline is not None else None
        return next(enc.parameters()).device if isinstance(enc, nn.Module) else self.device

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (when every prompt's states are cached, the accelerator's
        memory is better spent on the networks that train); :meth:`encode` still works, on the CPU."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipeline, name, None) if self.pipeline is not None else None
            if isinstance(module, nn.Module):
                module.to("cpu")

    @torch.no_grad()
    def encode(self, prompts: Sequence[Any]) -> tuple[Cond, Cond]:
        """(cond, uncond) for a batch of prompts (text teachers) or class labels, on the teacher's
        device; the uncond branch is the empty prompt / null label, as the pipeline itself builds it."""
        if not self.conditional:
            raise ValueError(f"teacher {self.name} ({self.family}) is unconditional; it takes no prompts")
        fn = PIPELINE_FAMILIES.get(self.family, _encode_labels)
        cond, uncond = fn(self, prompts)
        return cond.to(self.device), uncond.to(self.device)

    # -- latents ----------------------------------------------------------------------------------
    @property
    def vae(self):
        return getattr(self.pipeline, "vae", None) if self.pipeline is not None else None

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the denoiser's input space (scaled latents, or the images). The VAE's
        latent sample draws from ``generator``, or is ``mean + std * noise`` when ``noise`` is given; a
        deterministic encoder (Sana's DC-AE: ``.latent``, no distribution) uses neither."""
        vae = self.vae
        if vae is None:
            return images
        encoded = vae.encode(images.to(vae.device, vae.dtype))
        if not hasattr(encoded, "latent_dist"):  # a deterministic autoencoder (Sana's DC-AE)
            z = encoded.latent
        else:
            dist = encoded.latent_dist
            z = dist.sample(generator) if noise is None else dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        stats = _channel_stats(vae, z)
        if stats is not None:
            return ((z - stats[0]) * stats[1]).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Denoiser space -> images in [-1, 1]."""
        vae = self.vae
        if vae is None:
            return x
        x = x.to(vae.device, vae.dtype)
        stats = _channel_stats(vae, x)
        if stats is not None:
            z = x / stats[1] + stats[0]
        else:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            z = x / vae.config.scaling_factor + shift
        return vae.decode(z).sample.float().clamp(-1, 1)

    @classmethod
    def from_oracle(cls, gmm, process: NoiseProcess, name: str = "oracle") -> "Teacher":
        net = OracleNet.from_mixture(gmm, process)
        return cls(Denoiser(net, process).requires_grad_(False), process, (gmm.dim,), name, None, "oracle",
                   null_label=gmm.num_components)


def _channel_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, 1 / std) of each latent channel for a VAE that normalises its latents per channel instead
    of by a scaling factor (AutoencoderKLWan: latents = (z - mean) / std, undone as pipeline_wan.py
    does, x / (1 / std) + mean), shaped to broadcast over ``like``; None for the image VAEs."""
    cfg = vae.config
    if getattr(cfg, "scaling_factor", None) is not None or getattr(cfg, "latents_mean", None) is None:
        return None
    shape = (1, -1) + (1,) * (like.ndim - 2)
    mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
    return mean, 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)


def video_size_of(pipe, video_size=None) -> tuple[int, int, int] | None:
    """A video pipeline's (frames, height, width) in pixels: ``video_size``, or its ``__call__``'s defaults
    (Wan: 81 x 480 x 832); None for an image pipeline (it has no temporal VAE factor)."""
    if getattr(pipe, "vae_scale_factor_temporal", None) is None:
        if video_size is not None:
            raise TeacherLoadError(f"teacher.video_size: {type(pipe).__name__} makes images, not videos")
        return None
    if video_size is None:
        params = inspect.signature(type(pipe).__call__).parameters
        video_size = [params[k].default for k in ("num_frames", "height", "width")]
    return tuple(int(v) for v in video_size)


def video_sample_shape(pipe, model, video_size: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The latents (C, F, H, W) of a video pipeline at ``video_size``: (frames - 1) / temporal factor + 1
    latent frames (the VAE encodes the first frame alone, then groups), height and width over the spatial
    factor. Sizes the pipeline would round are refused."""
    frames, height, width = video_size
    tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    patch = model.config.patch_size
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (1, patch, patch)
    # the pipeline rounds a size that its patches do not tile; pipeline_wan.py also wants multiples of 16
    hw = (math.lcm(16, sf * patch[1]), math.lcm(16, sf * patch[2]))
    if frames < 1 or (frames - 1) % tf or height % hw[0] or width % hw[1] or min(height, width) < 1:
        raise TeacherLoadError(f"teacher.video_size [{frames}, {height}, {width}]: {type(pipe).__name__} takes "
                               f"{tf}k + 1 frames and heights of multiples of {hw[0]}, widths of multiples of {hw[1]}")
    return (model.config.in_channels, (frames - 1) // tf + 1, height // sf, width // sf)


def resolve_teacher_path(path: str | os.PathLike) -> str:
    """A local pipeline folder (checked to hold model_index.json), a shipped teacher's folder, or a hub id."""
    if is_shipped(path):  # stepdistill:<name>, a teacher this project ships
        try:
            path = shipped_path(path)
        except FileNotFoundError as exc:
            raise TeacherLoadError(str(exc)) from exc
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise TeacherLoadError(f"teacher path '{p}' is a folder but has no model_index.json: not a diffusers pipeline folder")
        return str(p)
    if p.exists():
        raise TeacherLoadError(f"teacher path '{p}' is a file; give a diffusers pipeline folder or hub id")
    text = str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text  # a hub id; from_pretrained resolves it (from the local cache when offline)
    raise TeacherLoadError(f"teacher path '{path}' does not exist")


def denoiser_class_name(path: str) -> str | None:
    """The class of a local pipeline folder's denoising network, read from its ``model_index.json``
    (None for a hub id, known only once loaded)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    entries = json.loads(index.read_text())
    for name in DENOISER_COMPONENTS:
        entry = entries.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            return entry[1]
    return None


def find_denoiser(pipeline) -> tuple[str, nn.Module]:
    """The pipeline's denoising network (its ``unet`` or ``transformer``), if it has a supported one."""
    for name in DENOISER_COMPONENTS:
        model = getattr(pipeline, name, None)
        if isinstance(model, nn.Module):
            find_adapter(model)  # raises naming the class when unsupported
            return name, model
    comps = {k: type(v).__name__ for k, v in pipeline.components.items() if v is not None}
    raise TeacherLoadError(
        f"pipeline {type(pipeline).__name__} has no supported denoiser (components: {comps}; "
        f"supported model classes: {sorted(MODEL_ADAPTERS)})"
    )


def load_teacher(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    null_label: int | None = None,
    allow_remote_code: bool = False,
    video_size: tuple[int, int, int] | None = None,
) -> Teacher:
    """Load a diffusers pipeline folder or hub id as a frozen teacher.

    ``dtype`` holds the frozen networks in lower precision (bf16/fp16); ``null_label`` is the class
    index of the unconditional branch for class-conditional pixel UNets (DiT uses its
    ``num_embeds_ada_norm``); ``video_size`` is a video teacher's (frames, height, width) in pixels
    (default: its pipeline's). A pipeline with a second network for low noise (Wan2.2's
    ``transformer_2`` and ``boundary_ratio``) is one denoiser of two experts (``NoiseLevelExperts``)."""
    from diffusers import DiffusionPipeline

    src = resolve_teacher_path(path)
    try:
        with quiet_text_encoder_type(path):
            pipe = DiffusionPipeline.from_pretrained(src, dtype=dtype, trust_remote_code=allow_remote_code)
    except Exception as exc:  # diffusers / hub errors are long; name the path and keep the cause
        where = "local folder" if Path(src).is_dir() else "hub id (not in the local cache, or offline)"
        raise TeacherLoadError(f"teacher '{path}' ({where}) could not be loaded: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    try:
        name, model = find_denoiser(pipe)
    except TypeError as exc:
        raise TeacherLoadError(f"teacher '{path}': {exc}") from exc
    for comp in pipe.components.values():
        if isinstance(comp, nn.Module):
            comp.requires_grad_(False).eval()
    if device is not None:
        pipe.to(device)
    process = process_from_scheduler_config(pipe.scheduler)
    cfg = model.config
    video_size = video_size_of(pipe, video_size)
    if video_size is not None:
        shape = video_sample_shape(pipe, model, video_size)
    else:
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (cfg.in_channels, *size)
    second, ratio = getattr(pipe, "transformer_2", None), pipe.config.get("boundary_ratio")
    if isinstance(second, nn.Module) and ratio is not None:  # the boundary pipeline_wan.py compares timesteps with
        model = NoiseLevelExperts.from_experts([model, second], ratio * pipe.scheduler.config.num_train_timesteps)
    family = type(pipe).__name__
    if null_label is None:
        if getattr(cfg, "num_embeds_ada_norm", None) and type(model).__name__ == "DiTTransformer2DModel":
            null_label = int(cfg.num_embeds_ada_norm)
        elif getattr(cfg, "num_class_embeds", None):
            null_label = int(cfg.num_class_embeds) - 1
    if family not in PIPELINE_FAMILIES:
        family = "unconditional" if null_label is None else "labels"
    return Teacher(Denoiser(model, process), process, shape, str(path), pipe, family, null_label, video_size)
