"""Load a frozen teacher from a diffusers pipeline folder or hub id (or the exact oracle).

The pipeline's own ``encode_prompt`` does the text encoding, so every family encodes prompts exactly
as its diffusers pipeline does at sampling time; ``encoders.PIPELINE_FAMILIES`` holds one small entry
per pipeline class (how it encodes, what its unconditional branch is).

Networks that take any size (Flux, Qwen-Image: packed latent tokens) have no ``sample_size``: the
teacher's latent size is ``teacher.sample_size`` (default: the pipeline's ``default_sample_size``), and
their schedulers' resolution-dependent shift is made static at that size. A network with a guidance
input (FLUX.1-dev) is fed ``teacher.guidance`` (default 3.5) by its Denoiser.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..diffusion.denoiser import MODEL_ADAPTERS, Cond, Denoiser, find_adapter, unwrap
from ..diffusion.packed import DEFAULT_EMBEDDED_GUIDANCE, PACKED_NETWORKS, guidance_embedded, is_packed, latent_channels
from ..diffusion.process import NoiseProcess, process_from_scheduler_config
from ..errors import TeacherLoadError
from .encoders import PIPELINE_FAMILIES, TEXT_FAMILIES, encode_labels, register_pipeline  # noqa: F401
from .oracle import OracleNet
from .shipped import is_shipped, quiet_text_encoder_type, shipped_path

DENOISER_COMPONENTS = ("unet", "transformer")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


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
        fn = PIPELINE_FAMILIES.get(self.family, encode_labels)
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
        latent sample draws from ``generator``, or is ``mean + std * noise`` when ``noise`` is given."""
        vae = self.vae
        if vae is None:
            return images
        shift, scale, frames = _latent_scaling(vae)
        x = images.to(vae.device, vae.dtype)
        dist = vae.encode(x.unsqueeze(2) if frames else x).latent_dist
        if frames:  # one frame of a video VAE: its sample drawn as the VAE draws it, then the frame taken
            z = dist.sample(generator)[:, :, 0] if noise is None else \
                dist.mean[:, :, 0] + dist.std[:, :, 0] * noise.to(dist.mean.device, dist.mean.dtype)
        else:
            z = dist.sample(generator) if noise is None else dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        return ((z - shift) * scale).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Denoiser space -> images in [-1, 1]."""
        vae = self.vae
        if vae is None:
            return x
        shift, scale, frames = _latent_scaling(vae)
        z = x.to(vae.device, vae.dtype) / scale + shift
        if frames:
            return vae.decode(z.unsqueeze(2)).sample[:, :, 0].float().clamp(-1, 1)
        return vae.decode(z).sample.float().clamp(-1, 1)

    @classmethod
    def from_oracle(cls, gmm, process: NoiseProcess, name: str = "oracle") -> "Teacher":
        net = OracleNet.from_mixture(gmm, process)
        return cls(Denoiser(net, process).requires_grad_(False), process, (gmm.dim,), name, None, "oracle",
                   null_label=gmm.num_components)


def _latent_scaling(vae) -> tuple[Any, Any, bool]:
    """(shift, scale, frames): the denoiser sees (z - shift) * scale of the VAE's latents z. An
    AutoencoderKL scales by its ``scaling_factor`` after its ``shift_factor``; Qwen-Image's video VAE
    (``latents_mean`` / ``latents_std`` per channel, images as one frame: ``frames``) by 1 / std after the
    mean, the factors its pipeline decodes with."""
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "z_dim", None) is not None:
        param = next(vae.parameters())
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(param.device, param.dtype)
        scale = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(param.device, param.dtype)
        return mean, scale, True
    return getattr(cfg, "shift_factor", None) or 0.0, cfg.scaling_factor, False


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
    sample_size: int | None = None,
    guidance: float | None = None,
) -> Teacher:
    """Load a diffusers pipeline folder or hub id as a frozen teacher.

    ``dtype`` holds the frozen networks in lower precision (bf16/fp16); ``null_label`` is the class
    index of the unconditional branch for class-conditional pixel UNets (DiT uses its
    ``num_embeds_ada_norm``). ``sample_size`` (latent height = width) and ``guidance`` (the embedded
    guidance scale) are for the networks that take them (:func:`packed_geometry`)."""
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
    cfg = model.config
    try:
        shape, seq_len, guidance = packed_geometry(model, pipe, sample_size, guidance)
    except ValueError as exc:
        raise TeacherLoadError(f"teacher '{path}': {exc}") from None
    if shape is None:
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (cfg.in_channels, *size)
    process = process_from_scheduler_config(pipe.scheduler, image_seq_len=seq_len)
    family = type(pipe).__name__
    if null_label is None:
        if getattr(cfg, "num_embeds_ada_norm", None) and type(model).__name__ == "DiTTransformer2DModel":
            null_label = int(cfg.num_embeds_ada_norm)
        elif getattr(cfg, "num_class_embeds", None):
            null_label = int(cfg.num_class_embeds) - 1
    if family not in PIPELINE_FAMILIES:
        family = "unconditional" if null_label is None else "labels"
    return Teacher(Denoiser(model, process, embedded_guidance=guidance), process, shape, str(path), pipe, family,
                   null_label)


def packed_geometry(model: nn.Module, pipe, sample_size: int | None, guidance: float | None):
    """(sample shape, image sequence length, embedded guidance) of a network that reads packed latent
    tokens (``diffusion/packed.py``): latents of ``sample_size`` (default: the pipeline's
    ``default_sample_size``), and ``guidance`` (default 3.5) for a network with a guidance input.
    (None, None, None) for the other networks, which take neither option."""
    name = type(unwrap(model)).__name__
    if not is_packed(model):
        for key, value in (("sample_size", sample_size), ("guidance", guidance)):
            if value is not None:
                raise ValueError(f"teacher.{key}: {name} takes no {key} option (it is for networks of any size, "
                                 f"Flux and Qwen-Image; the embedded guidance of FLUX.1-dev)")
        return None, None, None
    size = int(sample_size if sample_size is not None else pipe.default_sample_size)
    if size < 2 or size % 2:
        raise ValueError(f"teacher.sample_size: {size} is not an even number >= 2; {name} packs 2x2 latent patches")
    if guidance_embedded(model):
        guidance = DEFAULT_EMBEDDED_GUIDANCE if guidance is None else float(guidance)
    elif guidance is not None:
        raise ValueError(f"teacher.guidance: {name} has no guidance input (guidance_embeds is false); classifier-free "
                         f"guidance is a method option (method_args)")
    return (latent_channels(model), size, size), (size // 2) ** 2, guidance


def guidance_embedded_folder(path: str) -> bool | None:
    """Whether a local pipeline folder's network takes the guidance scale as an input (its
    ``transformer/config.json`` says ``guidance_embeds: true``), read before loading; None for a hub id."""
    config = Path(path) / "transformer" / "config.json"
    if not (Path(path) / "model_index.json").is_file():
        return None
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return bool(data.get("guidance_embeds")) and data.get("_class_name") in PACKED_NETWORKS
