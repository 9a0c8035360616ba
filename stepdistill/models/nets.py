"""Networks the toolkit defines itself: a small MLP for vector data (the Gaussian-mixture oracle)
and guidance-conditioned versions of the diffusers transformers (w-conditioned students of guided
distillation). All are diffusers ``ModelMixin`` classes, so ``save_pretrained``, ``EMAModel`` and
LoRA (peft, via diffusers' ``add_adapter``) work on them exactly as on a UNet."""

from __future__ import annotations

import copy
import functools

import torch
from diffusers import (ConfigMixin, DiTTransformer2DModel, ModelMixin, PixArtTransformer2DModel, SanaTransformer2DModel,
                       SD3Transformer2DModel)
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from torch import nn

from ..diffusion.denoiser import GUIDANCE_EMBED_DIM, class_name, guidance_sinusoid, unwrap


def _guidance_conditioned(base: type) -> type:
    """``base`` (a diffusers transformer) with a guidance-scale input, built the way a UNet's
    ``time_cond_proj_dim`` works: a bias-free projection of the guidance sinusoid is added to the input
    of every timestep embedder (the ``TimestepEmbedding`` modules named ``timestep_embedder``: one per
    DiT block, PixArt's ``adaln_single.emb``, Sana's ``time_embed.emb``, SD3's ``time_text_embed``; not
    PixArt's size embedders). Zero-initialised, the network is exactly ``base``. The constructor takes ``base``'s arguments, so
    configs and ``from_pretrained`` are unchanged."""

    class GuidanceConditioned(base):
        @functools.wraps(base.__init__)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            embedders = [m for name, m in self.named_modules()
                         if name.split(".")[-1] == "timestep_embedder" and isinstance(m, TimestepEmbedding)]
            if not embedders:
                raise ValueError(f"{base.__name__} has no timestep embedder to condition on the guidance scale")
            self.guidance_proj = nn.Linear(GUIDANCE_EMBED_DIM, embedders[0].linear_1.in_features, bias=False)
            self._guidance_input = None
            for m in embedders:
                m.register_forward_pre_hook(self._add_guidance)

        def _add_guidance(self, module, args):
            if self._guidance_input is None:
                return None
            return (args[0] + self._guidance_input.to(args[0].dtype), *args[1:])

        def forward(self, *args, guidance: torch.Tensor | None = None, **kwargs):
            if guidance is None:
                raise ValueError(f"{type(self).__name__} is guidance-conditioned: pass guidance")
            w = guidance_sinusoid(guidance).to(self.guidance_proj.weight.device)
            self._guidance_input = self.guidance_proj(w.to(self.guidance_proj.weight.dtype))
            try:
                return super().forward(*args, **kwargs)
            finally:
                self._guidance_input = None

    GuidanceConditioned.__name__ = GuidanceConditioned.__qualname__ = f"Guided{base.__name__}"
    GuidanceConditioned.__module__ = __name__
    return GuidanceConditioned


GuidedDiTTransformer2DModel = _guidance_conditioned(DiTTransformer2DModel)
GuidedPixArtTransformer2DModel = _guidance_conditioned(PixArtTransformer2DModel)
GuidedSD3Transformer2DModel = _guidance_conditioned(SD3Transformer2DModel)
GuidedSanaTransformer2DModel = _guidance_conditioned(SanaTransformer2DModel)


class _Block(nn.Module):
    def __init__(self, hidden: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.emb = nn.Linear(emb, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(self.norm(h) + self.emb(e)))))


class MLPDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Residual MLP ``(x, timestep, class_labels, guidance) -> prediction`` for d-dimensional data.

    ``num_classes`` > 0 adds a class embedding with one extra row (index ``num_classes``) for the
    null label of classifier-free guidance. ``guidance_cond`` adds an embedding of the guidance
    scale, the vector-data counterpart of a UNet's ``time_cond_proj_dim``.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 64,
        num_classes: int = 0,
        guidance_cond: bool = False,
    ):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # like a UNet's time_cond_proj: one bias-free projection, so a zero init leaves the net unchanged
        self.guid = nn.Linear(emb_dim, emb_dim, bias=False) if guidance_cond else None
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, timestep, class_labels=None, guidance=None):
        d = self.config.emb_dim
        e = self.time(get_timestep_embedding(timestep.reshape(-1).float(), d).to(x.dtype))
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            e = e + self.label(class_labels)
        if self.guid is not None:
            if guidance is None:
                raise ValueError("this MLPDenoiser is guidance-conditioned: pass guidance")
            e = e + self.guid(get_timestep_embedding((guidance.reshape(-1).float() - 1) * 1000, d).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(nn.functional.silu(self.out_norm(h)))


class PhasedExperts(ModelMixin, ConfigMixin):
    """A few-step student made of one expert network per sampling step (Phased DMD's mixture of
    experts): expert k serves the times t with ``boundaries[k + 1] < t <= boundaries[k]`` (the last
    expert every time below ``boundaries[-1]``). Each expert is a network of ``expert_class`` built
    from ``expert_config``; the Denoiser adapter routes each row to its expert."""

    @register_to_config
    def __init__(self, boundaries: list[float], expert_class: str, expert_config: dict):
        super().__init__()
        if any(b >= a for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"PhasedExperts boundaries must be strictly descending, got {boundaries}")
        cls = network_class(expert_class)
        self.experts = nn.ModuleList(cls.from_config(expert_config) for _ in boundaries)

    @classmethod
    def from_experts(cls, experts: list[nn.Module], boundaries: list[float]) -> "PhasedExperts":
        """Wrap existing networks (e.g. trainable copies of a teacher), which are used as they are."""
        from accelerate import init_empty_weights

        if len(experts) != len(boundaries):
            raise ValueError(f"PhasedExperts: {len(experts)} experts for {len(boundaries)} boundaries")
        first = experts[0]
        config = {k: v for k, v in dict(first.config).items() if not k.startswith("_")}
        with init_empty_weights():  # the placeholder experts take no memory; they are replaced at once
            model = cls(list(boundaries), class_name(first), config)
        model.experts = nn.ModuleList(experts)
        return model

    def expert_index(self, t: torch.Tensor) -> torch.Tensor:
        """The expert serving each time in ``t`` (B,)."""
        bounds = torch.tensor(self.config.boundaries, dtype=torch.float32, device=t.device)
        return (t.float()[:, None] <= bounds[None, 1:]).sum(1)

    def forward(self, *args, **kwargs):
        raise TypeError("PhasedExperts is called through stepdistill.diffusion.denoiser.Denoiser, which routes rows to experts")


class NoiseLevelExperts(ModelMixin, ConfigMixin):
    """A teacher made of two networks that split the noise range (Wan2.2's mixture of experts): expert 0
    serves network times >= ``boundary_timestep`` (high noise), expert 1 the times below, as
    pipeline_wan.py runs ``transformer`` at timesteps >= ``boundary_ratio * num_train_timesteps`` and
    ``transformer_2`` below. The Denoiser adapter routes each row; copies of it (a fake score) copy both."""

    @register_to_config
    def __init__(self, boundary_timestep: float, expert_class: str, expert_config: dict):
        super().__init__()
        cls = network_class(expert_class)
        self.experts = nn.ModuleList(cls.from_config(expert_config) for _ in range(2))

    @classmethod
    def from_experts(cls, experts: list[nn.Module], boundary_timestep: float) -> "NoiseLevelExperts":
        """Wrap the pipeline's two networks (high noise first), which are used as they are."""
        from accelerate import init_empty_weights

        configs = [{k: v for k, v in dict(e.config).items() if not k.startswith("_")} for e in experts]
        if len(experts) != 2 or type(experts[0]) is not type(experts[1]) or configs[0] != configs[1]:
            raise ValueError("NoiseLevelExperts: two networks of one class and config (Wan2.2's transformer and "
                             "transformer_2), got " + ", ".join(type(e).__name__ for e in experts))
        with init_empty_weights():  # placeholders, replaced at once
            model = cls(float(boundary_timestep), class_name(experts[0]), configs[0])
        model.experts = nn.ModuleList(experts)
        return model

    def expert_index(self, model_t: torch.Tensor) -> torch.Tensor:
        """The expert serving each network time in ``model_t`` (B,): 0 at or above the boundary, else 1."""
        return (model_t < self.config.boundary_timestep).long()

    def forward(self, *args, **kwargs):
        raise TypeError("NoiseLevelExperts is called through stepdistill.diffusion.denoiser.Denoiser, which routes "
                        "rows to experts")


def expert_at(model: nn.Module, t: float, process) -> nn.Module:
    """The network of ``model`` that serves process time ``t``: the expert of a :class:`NoiseLevelExperts`
    teacher (how a student copied from a two-expert teacher picks its start: the expert of its t_init, or
    of each step's time for per-step experts), else the model itself."""
    net = unwrap(model)
    if not isinstance(net, NoiseLevelExperts):
        return model
    which = net.expert_index(process.model_time(torch.tensor([float(t)], dtype=torch.float32)))
    return net.experts[int(which[0])]


def network_class(name: str) -> type:
    """A network class by its saved ``_class_name``: one of this module's, or a diffusers model."""
    import diffusers

    cls = globals().get(name) if isinstance(globals().get(name), type) else getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown network class {name} (neither stepdistill.models.nets nor diffusers has it)")
    return cls


# the (projection, embedding) child pairs that carry a network's timestep: a UNet's time_proj /
# time_embedding, the diffusers embedding modules' time_proj / timestep_embedder (DiT blocks, PixArt's
# adaln_single, SD3's time_text_embed), Wan's timesteps_proj / time_embedder (its per-block modulation,
# time_proj, is computed from the folded embedding); not the size / time-id embedders (SDXL, PixArt)
_TIME_PAIRS = (("time_proj", "time_embedding"), ("time_proj", "timestep_embedder"),
               ("timesteps_proj", "time_embedder"))  # Wan's condition embedder


def time_frozen_copy(model: nn.Module, model_time: float) -> nn.Module:
    """A copy of a diffusers network whose output no longer depends on the timestep it is given: each
    timestep embedding's first linear layer is folded at ``model_time`` (its weight zeroed, its bias set
    to its output at the projection of ``model_time``). The copy is the same diffusers class, so a stock
    pipeline runs it; it is how a BOOT student, which reads its input at one fixed time, is exported."""
    from diffusers.models.embeddings import GaussianFourierProjection, Timesteps

    net = copy.deepcopy(model)
    folded = 0
    for parent in net.modules():
        kids = dict(parent.named_children())
        for proj_name, emb_name in _TIME_PAIRS:
            proj, emb = kids.get(proj_name), kids.get(emb_name)
            if not (isinstance(proj, (Timesteps, GaussianFourierProjection)) and isinstance(emb, TimestepEmbedding)):
                continue
            if emb.cond_proj is not None:
                raise ValueError(f"{type(model).__name__} has a guidance input in its time embedding; its timestep "
                                 f"cannot be folded away")
            lin = emb.linear_1
            if lin.bias is None:
                raise ValueError(f"{type(model).__name__}: its time embedding has no bias to fold the timestep into")
            with torch.no_grad():
                t = torch.tensor([float(model_time)], dtype=torch.float32, device=lin.weight.device)
                value = lin(proj(t).to(lin.weight.dtype))[0]
                lin.weight.zero_()
                lin.bias.copy_(value)
            folded += 1
    if not folded:
        raise ValueError(f"{type(model).__name__} has no timestep embedding (time_proj + TimestepEmbedding) to fold")
    return net
