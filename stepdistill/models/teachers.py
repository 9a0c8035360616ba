"""Load a frozen teacher from a diffusers pipeline folder or hub id (or the exact oracle).

The pipeline's own ``encode_prompt`` does the text encoding, so every family encodes prompts exactly
as its diffusers pipeline does at sampling time; ``encoders.PIPELINE_FAMILIES`` holds one small entry
per pipeline class (how it encodes, what its unconditional branch is).

Networks that take any size (Flux, Qwen-Image: packed latent tokens) have no ``sample_size``: the
teacher's latent size is ``teacher.sample_size`` (default: the pipeline's ``default_sample_size``), and
their schedulers' resolution-dependent shift is made static at that size. A network with a guidance
input (FLUX.1-dev, HunyuanVideo) is fed ``teacher.guidance`` by its Denoiser (default: its pipeline's
default guidance scale, 3.5 for Flux and 6.0 for HunyuanVideo).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..diffusion.denoiser import MODEL_ADAPTERS, Cond, Denoiser, find_adapter, unwrap
from ..diffusion.packed import (GUIDANCE_INPUT_NETWORKS, default_embedded_guidance, guidance_embedded, is_packed,
                               latent_channels)
from ..diffusion.process import NoiseProcess, process_from_scheduler_config
from ..errors import TeacherLoadError
from .encoders import PIPELINE_FAMILIES, TEXT_FAMILIES, call_default, encode_labels, register_pipeline  # noqa: F401
from .nets import NoiseLevelExperts
from .oracle import OracleNet
from .sharded_load import hub_snapshot, meta_networks, pipeline_view
from .shipped import is_shipped, quiet_text_encoder_type, shipped_path

DENOISER_COMPONENTS = ("unet", "transformer")
VIDEO_DENOISERS = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")  # networks of video latents (C, F, H, W), known before loading
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
    video_size: tuple[int, int, int] | None = None  # a video teacher's (frames, height, width) in pixels

    @property
    def video(self) -> bool:
        """Whether the teacher makes videos: latents (C, F, H, W)."""
        return self.video_size is not None

    @property
    def device(self) -> torch.device:
        """Where the teacher computes: its weights' device, or for shards offloaded to the CPU
        (``teacher.offload``), the accelerator they are gathered onto."""
        p = next(unwrap(self.denoiser.model).parameters(), torch.zeros(()))
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None and mesh.device_type == "cuda" and p.device.type == "cpu":
            return torch.device("cuda", torch.cuda.current_device())
        return p.device

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
        latent sample draws from ``generator``, or is ``mean + std * noise`` when ``noise`` is given; a
        deterministic encoder (Sana's DC-AE: ``.latent``, no distribution) uses neither."""
        vae = self.vae
        if vae is None:
            return images
        x = images.to(vae.device, vae.dtype)
        frames = _one_frame(vae, x)
        encoded = vae.encode(x.unsqueeze(2) if frames else x)
        if not hasattr(encoded, "latent_dist"):  # a deterministic autoencoder (Sana's DC-AE)
            z = encoded.latent
        else:  # drawn as the VAE draws it (a video VAE: over the one frame), then the frame taken
            dist = encoded.latent_dist
            z = dist.sample(generator) if noise is None else \
                dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype).reshape(dist.mean.shape)
        z = z[:, :, 0] if frames else z
        shift, scale = _latent_scaling(vae, z)
        return ((z - shift) * scale).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Denoiser space -> images in [-1, 1]."""
        vae = self.vae
        if vae is None:
            return x
        x = x.to(vae.device, vae.dtype)
        shift, scale = _latent_scaling(vae, x)
        z = x / scale + shift
        if _one_frame(vae, z):
            return vae.decode(z.unsqueeze(2)).sample[:, :, 0].float().clamp(-1, 1)
        return vae.decode(z).sample.float().clamp(-1, 1)

    @classmethod
    def from_oracle(cls, gmm, process: NoiseProcess, name: str = "oracle") -> "Teacher":
        net = OracleNet.from_mixture(gmm, process)
        return cls(Denoiser(net, process).requires_grad_(False), process, (gmm.dim,), name, None, "oracle",
                   null_label=gmm.num_components)


def _per_channel(vae) -> bool:
    """Whether a VAE normalises its latents per channel (``latents_mean`` / ``latents_std``, no scaling
    factor): the video VAEs, AutoencoderKLWan and Qwen-Image's AutoencoderKLQwenImage."""
    cfg = vae.config
    return getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "scaling_factor", None) is None


def _one_frame(vae, x: torch.Tensor) -> bool:
    """Whether ``x`` are images (B, C, H, W) for a video VAE, which codes them as videos of one frame."""
    return _per_channel(vae) and x.ndim == 4


def _latent_scaling(vae, like: torch.Tensor) -> tuple[Any, Any]:
    """(shift, scale): the denoiser sees (z - shift) * scale of the VAE's latents z, as its pipeline decodes
    them. An AutoencoderKL scales by its ``scaling_factor`` after its ``shift_factor``; a video VAE by
    1 / std after the mean of each channel (pipeline_wan.py, pipeline_qwenimage.py), shaped to broadcast
    over ``like``."""
    cfg = vae.config
    if not _per_channel(vae):
        return getattr(cfg, "shift_factor", None) or 0.0, cfg.scaling_factor
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
        video_size = [call_default(pipe, k) for k in ("num_frames", "height", "width")]
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
    if is_hub_id(text):
        return text  # a hub id; from_pretrained resolves it (from the local cache when offline)
    raise TeacherLoadError(f"teacher path '{path}' does not exist")


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether a teacher path names a hub repository (not a local path, nor a shipped teacher)."""
    text = str(path)
    return (not is_shipped(text) and not Path(text).expanduser().exists() and bool(_HUB_ID.match(text))
            and not text.startswith((".", "~")))


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
    sample_size: int | None = None,
    guidance: float | None = None,
    meta: bool = False,
) -> Teacher:
    """Load a diffusers pipeline folder or hub id as a frozen teacher.

    ``dtype`` holds the frozen networks in lower precision (bf16/fp16); ``null_label`` is the class
    index of the unconditional branch for class-conditional pixel UNets (DiT uses its
    ``num_embeds_ada_norm``); ``video_size`` is a video teacher's (frames, height, width) in pixels
    (default: its pipeline's). A pipeline with a second network for low noise (Wan2.2's
    ``transformer_2`` and ``boundary_ratio``) is one denoiser of two experts (``NoiseLevelExperts``).
    ``sample_size`` (latent height = width) and ``guidance`` (the embedded guidance scale) are for the
    networks that take them (:func:`packed_geometry`, :func:`embedded_guidance`). ``meta``: the denoising networks are built on the meta
    device, their weights left in their files for the shards to read (``sharded_load.meta_networks``;
    loaded whole when that cannot be done)."""
    from diffusers import DiffusionPipeline

    src = name = resolve_teacher_path(path)
    try:
        if meta and not Path(src).is_dir():  # a hub id: its snapshot folder, whose networks can be built on meta
            src = hub_snapshot(src, allow_remote_code)
        built = meta_networks(src, dtype) if meta else {}
        with quiet_text_encoder_type(path), pipeline_view(src, built) as where:
            pipe = DiffusionPipeline.from_pretrained(where, dtype=dtype, trust_remote_code=allow_remote_code, **built)
        if built:
            pipe.register_to_config(_name_or_path=name)
    except Exception as exc:  # diffusers / hub errors are long; name the path and keep the cause
        where = "local folder" if Path(name).is_dir() else "hub id (not in the local cache, or offline)"
        raise TeacherLoadError(f"teacher '{path}' ({where}) could not be loaded: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    try:
        name, model = find_denoiser(pipe)
    except TypeError as exc:
        raise TeacherLoadError(f"teacher '{path}': {exc}") from exc
    for comp in pipe.components.values():
        if isinstance(comp, nn.Module):
            comp.requires_grad_(False).eval()
    if device is not None:  # (the networks on the meta device get their device when their shards are read)
        for comp in pipe.components.values() if built else [pipe]:
            if isinstance(comp, (nn.Module, DiffusionPipeline)) and not any(comp is b for b in built.values()):
                comp.to(device)
    cfg = model.config
    try:
        shape, seq_len, guidance = packed_geometry(model, pipe, sample_size, guidance)
    except ValueError as exc:
        raise TeacherLoadError(f"teacher '{path}': {exc}") from None
    video_size = video_size_of(pipe, video_size)
    if video_size is not None:
        shape = video_sample_shape(pipe, model, video_size)
    elif shape is None:
        size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (cfg.in_channels, *size)
    process = process_from_scheduler_config(pipe.scheduler, image_seq_len=seq_len)
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
    return Teacher(Denoiser(model, process, embedded_guidance=guidance), process, shape, str(path), pipe, family,
                   null_label, video_size)


def packed_geometry(model: nn.Module, pipe, sample_size: int | None, guidance: float | None):
    """(sample shape, image sequence length, embedded guidance) of a network that reads packed latent
    tokens (``diffusion/packed.py``): latents of ``sample_size`` (default: the pipeline's
    ``default_sample_size``). (None, None, guidance) for the other networks, which take no size. The
    guidance is ``guidance`` (default: the pipeline's, ``GUIDANCE_INPUT_NETWORKS``) for a network with a
    guidance input (:func:`embedded_guidance`), else None."""
    name = type(unwrap(model)).__name__
    guidance = embedded_guidance(model, guidance)
    if not is_packed(model):
        if sample_size is not None:
            raise ValueError(f"teacher.sample_size: {name} takes no sample_size option (it is for networks of any "
                             f"size, Flux and Qwen-Image)")
        return None, None, guidance
    size = int(sample_size if sample_size is not None else pipe.default_sample_size)
    if size < 2 or size % 2:
        raise ValueError(f"teacher.sample_size: {size} is not an even number >= 2; {name} packs 2x2 latent patches")
    return (latent_channels(model), size, size), (size // 2) ** 2, guidance


def embedded_guidance(model: nn.Module, guidance: float | None) -> float | None:
    """The guidance scale fed to a network with a guidance input (``guidance_embeds``: FLUX.1-dev,
    HunyuanVideo): ``guidance``, or its pipeline's default; None for the other networks, which refuse it."""
    if guidance_embedded(model):
        return default_embedded_guidance(model) if guidance is None else float(guidance)
    if guidance is not None:
        name = type(unwrap(model)).__name__
        if name in GUIDANCE_INPUT_NETWORKS:
            raise ValueError(f"teacher.guidance: {name} has no guidance input (guidance_embeds is false); "
                             f"classifier-free guidance is a method option (method_args)")
        raise ValueError(f"teacher.guidance: {name} takes no guidance option (it is the embedded guidance of "
                         f"the networks with a guidance input: FLUX.1-dev, HunyuanVideo)")
    return None


def guidance_embedded_folder(path: str) -> bool | None:
    """Whether a local pipeline folder's network takes the guidance scale as an input (its
    ``transformer/config.json`` says ``guidance_embeds: true``), read before loading; None for a hub id."""
    config = Path(path) / "transformer" / "config.json"
    if not (Path(path) / "model_index.json").is_file():
        return None
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return bool(data.get("guidance_embeds")) and data.get("_class_name") in GUIDANCE_INPUT_NETWORKS
