"""One adapter over every denoising network: ``D(x_t, t, cond) -> x0`` (or eps / v / flow).

Distillers only ever call a :class:`Denoiser`. How a family's ``forward`` is called (UNet vs DiT vs
SD3 vs Wan keyword names, image or video latents, learned-variance channels, guidance embeddings) lives in one small entry of
``MODEL_ADAPTERS``; adding a family is one ``@register_adapter`` function (k-diffusion's
``external.py`` shape). The families whose networks read packed latent tokens (Flux, Qwen-Image) are
in ``packed.py``, registered when the ``stepdistill.diffusion`` package is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .process import NoiseProcess


# ------------------------------------------------------------------------------------------------
# conditioning
# ------------------------------------------------------------------------------------------------
def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _tree_zip(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"conditionings have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: _tree_zip(fn, a[k], b[k]) for k in a}
    if a != b:
        raise ValueError(f"conditionings differ in a non-tensor value: {a!r} vs {b!r}")
    return a


@dataclass
class Cond:
    """Keyword inputs of the network for one batch (tensors batched on dim 0, nested dicts allowed,
    e.g. SDXL's ``added_cond_kwargs``). Keys use diffusers' names: ``encoder_hidden_states``,
    ``encoder_attention_mask``, ``pooled_projections``, ``added_cond_kwargs``, ``class_labels``."""

    kwargs: dict[str, Any] = field(default_factory=dict)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Cond":
        return Cond(_tree_map(fn, self.kwargs))

    def to(self, device=None, dtype=None) -> "Cond":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return self.map(move)

    def __getitem__(self, idx) -> "Cond":
        return self.map(lambda t: t[idx])

    def expand_to(self, batch: int) -> "Cond":
        """Broadcast a batch-1 conditioning (e.g. the empty prompt) to ``batch`` rows."""
        return self.map(lambda t: t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t)

    def where(self, mask: torch.Tensor, other: "Cond") -> "Cond":
        """Rows of ``self`` where ``mask`` (B,) is true, else rows of ``other`` (e.g. prompt dropout)."""

        def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.to(x.device).reshape(-1, *[1] * (x.ndim - 1)), x, y)

        return Cond(_tree_zip(pick, self.kwargs, other.kwargs))

    @staticmethod
    def cat(a: "Cond", b: "Cond") -> "Cond":
        return Cond(_tree_zip(lambda x, y: torch.cat([x, y]), a.kwargs, b.kwargs))

    @staticmethod
    def cat_all(conds: list["Cond"]) -> "Cond":
        out = conds[0]
        for c in conds[1:]:
            out = Cond.cat(out, c)
        return out

    def batch_size(self) -> int | None:
        sizes: list[int] = []
        _tree_map(lambda t: sizes.append(t.shape[0]) or t, self.kwargs)
        return sizes[0] if sizes else None


# ------------------------------------------------------------------------------------------------
# model adapters: one entry per family
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelCall:
    """Everything an adapter entry needs to call its network once."""

    x: torch.Tensor  # (B, ...) in the network's dtype
    t: torch.Tensor  # (B,) process time
    model_t: torch.Tensor  # (B,) the timestep value the network expects
    cond: dict[str, Any]
    guidance: torch.Tensor | None  # (B,) guidance scale (diffusers convention) for w-conditioned nets


AdapterFn = Callable[[nn.Module, ModelCall], torch.Tensor]
MODEL_ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(*class_names: str) -> Callable[[AdapterFn], AdapterFn]:
    """Register how networks of these classes are called. The function returns the raw output in
    the network's own prediction type."""

    def deco(fn: AdapterFn) -> AdapterFn:
        for name in class_names:
            MODEL_ADAPTERS[name] = fn
        return fn

    return deco


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def base_network(model: nn.Module) -> nn.Module:
    """The diffusers network inside ``model``: unwrapped, and the first expert of a network made of experts
    of one class (per-phase ``PhasedExperts``, per-noise-level ``NoiseLevelExperts``), which share its
    class, interface and config."""
    net = unwrap(model)
    while isinstance(getattr(net, "experts", None), nn.ModuleList) and len(net.experts):
        net = unwrap(net.experts[0])
    return net


def class_name(model: nn.Module) -> str:
    """The class name of the network inside any wrapper; of a network sharded by FSDP2 (whose class it
    makes ``FSDP<name>``), its own class's: what the name-keyed tables here are keyed by."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(unwrap(model))
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls.__name__


def find_adapter(model: nn.Module) -> AdapterFn:
    for cls in type(unwrap(model)).__mro__:
        if cls.__name__ in MODEL_ADAPTERS:
            return MODEL_ADAPTERS[cls.__name__]
    raise TypeError(
        f"no denoiser adapter for {type(unwrap(model)).__name__}; supported: {sorted(MODEL_ADAPTERS)} "
        "(add one with stepdistill.diffusion.denoiser.register_adapter)"
    )


# how each family is rebuilt with a guidance-scale input (a w-conditioned student, Meng et al. 2023):
# (the class of the rebuilt network in stepdistill.models.nets, or None for the same class; config changes)
W_CONDITIONED: dict[str, tuple[str | None, dict]] = {
    "UNet2DConditionModel": (None, {"time_cond_proj_dim": 256}),  # diffusers' own timestep_cond input
    "MLPDenoiser": (None, {"guidance_cond": True}),
    "DiTTransformer2DModel": ("GuidedDiTTransformer2DModel", {}),
    "PixArtTransformer2DModel": ("GuidedPixArtTransformer2DModel", {}),
    "SD3Transformer2DModel": ("GuidedSD3Transformer2DModel", {}),
    "SanaTransformer2DModel": ("GuidedSanaTransformer2DModel", {}),
}


# the bottleneck each family exposes to DMD2's GAN head (a module whose output is the feature map)
FEATURE_MODULES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "UNet2DConditionModel": lambda m: m.mid_block,
    "UNet2DModel": lambda m: m.mid_block,
    "DiTTransformer2DModel": lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2],
    "PixArtTransformer2DModel": lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2],
    "SD3Transformer2DModel": lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2],
    "SanaTransformer2DModel": lambda m: m.transformer_blocks[len(m.transformer_blocks) // 2],
    "WanTransformer3DModel": lambda m: m.blocks[len(m.blocks) // 2],
    "MLPDenoiser": lambda m: m.blocks[-1],
}


# how a family draws unit Gaussian latents of a (B, C, H, W) shape when its pipeline draws them in another
# layout (packed tokens, packed.py), so that re-noising matches the exported pipeline's draws; others: torch.randn
NOISE_LAYOUTS: dict[str, Callable[[tuple[int, ...], torch.Generator | None], torch.Tensor]] = {}


def feature_module(model: nn.Module) -> nn.Module:
    name = class_name(model)
    if name not in FEATURE_MODULES:
        raise ValueError(f"{name} has no registered bottleneck for the GAN head; add it to FEATURE_MODULES")
    return FEATURE_MODULES[name](unwrap(model))


GUIDANCE_EMBED_DIM = 256  # the sinusoidal embedding of the guidance scale (UNet time_cond_proj_dim)


def guidance_sinusoid(guidance: torch.Tensor, dim: int = GUIDANCE_EMBED_DIM) -> torch.Tensor:
    """The sinusoidal embedding of (guidance_scale - 1) * 1000 (LCM convention, Luo et al. 2023),
    computed by the Stable Diffusion pipeline's own method, so that an exported w-conditioned UNet
    sees bit-identical inputs (its arguments reach ~1e3 radians, where another order of float32
    operations changes the embedding by ~1e-4)."""
    from diffusers import StableDiffusionPipeline

    # the method uses no pipeline state and builds its frequencies on the CPU, as the pipeline calls it
    w = guidance.detach().reshape(-1).float().cpu() - 1
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).to(guidance.device)


# ------------------------------------------------------------------------------------------------
# the denoiser
# ------------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """A network and its noise process behind one call: ``denoiser(x_t, t, cond) -> x0``.

    ``guidance_scale`` applies classifier-free guidance in the diffusers convention
    ``u + w (c - u)`` with one batched forward of [uncond, cond]; ``guidance`` feeds the guidance
    scale to a w-conditioned network (``timestep_cond``). ``output`` picks the parameterisation
    returned: ``x0`` (alias ``sample``), ``epsilon``, ``v_prediction`` or ``flow``.

    ``embedded_guidance`` is the guidance scale fed to a network that takes it as an input
    (FLUX.1-dev's ``guidance_embeds``, ``packed.py``) whenever a call gives no ``guidance``; such a
    network's guidance is not classifier-free, and ``guidance_scale`` other than 1 is refused.
    """

    def __init__(self, model: nn.Module, process: NoiseProcess, prediction_type: str | None = None,
                 embedded_guidance: float | None = None):
        super().__init__()
        self.model = model
        self.process = process
        self.adapter = find_adapter(model)
        if prediction_type is None:
            prediction_type = "sample" if type(unwrap(model)).__name__ == "OracleNet" else process.prediction_type
        self.prediction_type = prediction_type
        self.embedded_guidance = None if embedded_guidance is None else float(embedded_guidance)

    @property
    def dtype(self) -> torch.dtype:
        return next(unwrap(self.model).parameters(), torch.zeros(())).dtype

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own prediction (its prediction type), float32."""
        dtype = self.dtype
        if guidance is None and self.embedded_guidance is not None:
            guidance = torch.full((x_t.shape[0],), self.embedded_guidance, dtype=torch.float32, device=x_t.device)
        call = ModelCall(
            x=x_t.to(dtype),
            t=t,
            model_t=self.process.model_time(t).to(x_t.device),
            cond=(cond or Cond()).to(x_t.device, dtype).kwargs,
            guidance=guidance,
        )
        return self.adapter(self.model, call).float()

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        cond: Cond | None = None,
        *,
        guidance_scale: float | torch.Tensor | None = None,
        uncond: Cond | None = None,
        guidance: float | torch.Tensor | None = None,
        output: str = "x0",
    ) -> torch.Tensor:
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(b)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).reshape(-1).expand(b)
        x32 = x_t.float()
        if guidance_scale is None:
            pred = self.raw(x_t, t, cond, guidance)
            x0, eps = self.process.to_x0_eps(pred, x32, t, self.prediction_type)
        else:
            if uncond is None or cond is None:
                raise ValueError("guidance_scale needs both cond and uncond")
            if self.embedded_guidance is not None and not bool(torch.all(torch.as_tensor(guidance_scale) == 1)):
                raise ValueError(f"classifier-free guidance (scale {guidance_scale}) on {type(unwrap(self.model)).__name__}, "
                                 f"whose guidance scale is a network input (embedded guidance "
                                 f"{self.embedded_guidance:g}); use a scale of 1")
            both = Cond.cat(uncond.expand_to(b), cond.expand_to(b))
            g2 = None if guidance is None else torch.cat([guidance, guidance])
            pred = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), both, g2)
            x0_both, _ = self.process.to_x0_eps(pred, torch.cat([x32, x32]), torch.cat([t, t]), self.prediction_type)
            x0_u, x0_c = x0_both.chunk(2)
            w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x_t.device).reshape(-1)
            w = w.reshape(w.shape + (1,) * (x0_c.ndim - 1)) if w.numel() > 1 else w.squeeze()
            x0 = x0_u + w * (x0_c - x0_u)
            eps = None
        if output in ("x0", "sample"):
            return x0
        if eps is None:
            eps = self.process.to_x0_eps(x0, x32, t, "sample")[1]
        return self.process.from_x0_eps(x0, eps, t, output)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Unit Gaussian latents of ``shape``, drawn on the CPU from ``generator`` in the layout the network's
        pipeline draws them in (``NOISE_LAYOUTS``; plain ``torch.randn`` for most families)."""
        layout = NOISE_LAYOUTS.get(class_name(base_network(self.model)))
        if layout is None:
            return torch.randn(tuple(shape), generator=generator, device="cpu")
        return layout(tuple(shape), generator)

    def requires_grad_(self, requires_grad: bool = True) -> "Denoiser":
        self.model.requires_grad_(requires_grad)
        return self
