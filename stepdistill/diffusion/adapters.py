"""The adapters of the diffusers networks (and the toolkit's own): how each class is called with a
:class:`~stepdistill.diffusion.denoiser.ModelCall`, the way its diffusers pipeline calls it, returning the
raw prediction. Importing this module registers them in ``MODEL_ADAPTERS``; the packed-token families
(Flux, Qwen-Image) are in ``packed.py``. A new family registers its own with ``register_adapter``."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from . import context_parallel
from .denoiser import Cond, ModelCall, find_adapter, guidance_sinusoid, register_adapter, unwrap
from .packed import embedded_guidance_input


def _learned_sigma_split(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """DiT / PixArt-alpha predict (eps, variance) stacked on channels; keep the mean part."""
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def guidance_embedding(model: nn.Module, guidance: torch.Tensor) -> torch.Tensor | None:
    """The ``timestep_cond`` of a w-conditioned UNet, as diffusers' pipelines build it (None for a UNet
    without the input)."""
    dim = getattr(unwrap(model).config, "time_cond_proj_dim", None)
    if dim is None:
        return None
    return guidance_sinusoid(guidance, dim)


def _guidance_kwargs(model: nn.Module, c: ModelCall) -> dict:
    """``guidance=`` for the guidance-conditioned transformers of stepdistill.models.nets."""
    return {"guidance": c.guidance} if c.guidance is not None and hasattr(unwrap(model), "guidance_proj") else {}


@register_adapter("UNet2DModel")
def _unet2d(model, c: ModelCall):
    return model(c.x, c.model_t, class_labels=c.cond.get("class_labels")).sample


@register_adapter("UNet2DConditionModel")
def _unet2d_condition(model, c: ModelCall):
    timestep_cond = None
    if c.guidance is not None:
        timestep_cond = guidance_embedding(model, c.guidance)
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(c.x.dtype)
    return model(
        c.x,
        c.model_t,
        encoder_hidden_states=c.cond.get("encoder_hidden_states"),
        class_labels=c.cond.get("class_labels"),
        timestep_cond=timestep_cond,
        encoder_attention_mask=c.cond.get("encoder_attention_mask"),
        added_cond_kwargs=c.cond.get("added_cond_kwargs"),
    ).sample


@register_adapter("DiTTransformer2DModel")
def _dit(model, c: ModelCall):
    out = model(c.x, timestep=c.model_t, class_labels=c.cond["class_labels"], **_guidance_kwargs(model, c)).sample
    return _learned_sigma_split(out, c.x)


@register_adapter("PixArtTransformer2DModel")
def _pixart(model, c: ModelCall):
    added = c.cond.get("added_cond_kwargs") or {"resolution": None, "aspect_ratio": None}
    out = model(
        c.x,
        encoder_hidden_states=c.cond["encoder_hidden_states"],
        encoder_attention_mask=c.cond.get("encoder_attention_mask"),
        timestep=c.model_t,
        added_cond_kwargs=added,
        **_guidance_kwargs(model, c),
    ).sample
    return _learned_sigma_split(out, c.x)


@register_adapter("SD3Transformer2DModel")
def _sd3(model, c: ModelCall):
    return model(
        hidden_states=c.x,
        encoder_hidden_states=c.cond["encoder_hidden_states"],
        pooled_projections=c.cond["pooled_projections"],
        timestep=c.model_t,
        **_guidance_kwargs(model, c),
    ).sample


@register_adapter("SanaTransformer2DModel")
def _sana(model, c: ModelCall):
    """As SanaPipeline calls it: the scheduler's timestep times the network's ``timestep_scale``, the text
    states with their token mask (the pipeline's padding), learned-sigma channels dropped."""
    out = model(
        c.x,
        encoder_hidden_states=c.cond["encoder_hidden_states"],
        encoder_attention_mask=c.cond.get("encoder_attention_mask"),
        timestep=c.model_t * unwrap(model).config.timestep_scale,
        **_guidance_kwargs(model, c),
    ).sample
    return _learned_sigma_split(out, c.x)


@register_adapter("OracleNet")
def _oracle(model, c: ModelCall):
    return model(c.x, c.t, class_labels=c.cond.get("class_labels"))


@register_adapter("MLPDenoiser")
def _mlp(model, c: ModelCall):
    return model(c.x, c.model_t, class_labels=c.cond.get("class_labels"), guidance=c.guidance)


@register_adapter("WanTransformer3DModel")
def _wan(model, c: ModelCall):
    """Video latents (B, C, F, H, W) and UMT5 text states, called as pipeline_wan.py calls it."""
    context_parallel.prepare(model)
    return model(hidden_states=c.x, timestep=c.model_t, encoder_hidden_states=c.cond["encoder_hidden_states"],
                 return_dict=False)[0]


@register_adapter("HunyuanVideoTransformer3DModel")
def _hunyuan_video(model, c: ModelCall):
    """Video latents (B, C, F, H, W), Llama states with their mask and CLIP's pooled output, called as
    pipeline_hunyuan_video.py calls it: the scheduler's timestep as is, and the embedded guidance scale
    times 1000 in the network's dtype (``guidance_embeds``: the teacher's ``teacher.guidance``)."""
    guidance = embedded_guidance_input(model, c)
    if guidance is not None:
        guidance = guidance.to(c.x.dtype) * 1000.0
    return model(hidden_states=c.x, timestep=c.model_t, encoder_hidden_states=c.cond["encoder_hidden_states"],
                 encoder_attention_mask=c.cond["encoder_attention_mask"].to(c.x.dtype),
                 pooled_projections=c.cond["pooled_projections"], guidance=guidance, return_dict=False)[0]


@register_adapter("PhasedExperts")
def _phased_experts(model, c: ModelCall):
    """Each row goes to the expert of its time (one call per expert present in the batch)."""
    return _route(unwrap(model).experts, unwrap(model).expert_index(c.t.to(c.x.device)), c)


@register_adapter("NoiseLevelExperts")
def _noise_level_experts(model, c: ModelCall):
    """Each row goes to the expert of its network time: the first at times >= the boundary (high noise),
    the second below, the comparison pipeline_wan.py makes between its timestep and boundary_ratio * T."""
    return _route(unwrap(model).experts, unwrap(model).expert_index(c.model_t.to(c.x.device)), c)


def _route(experts, which: torch.Tensor, c: ModelCall) -> torch.Tensor:
    """Rows of ``c`` through ``experts[which[row]]``: one call per expert present in the batch.

    Experts sharded by FSDP2 each gather their shards with every process, and other processes' batches
    may route elsewhere: there every expert runs on every process, one with no rows here on this batch's
    first row, its output added at weight 0 (so its backward, if any, runs everywhere too)."""
    present = which.unique().tolist()
    sharded = any(isinstance(unwrap(e), FSDPModule) for e in experts)
    if len(present) == 1 and not sharded:
        expert = experts[present[0]]
        return find_adapter(expert)(expert, c)
    out, idle = None, []
    for k in range(len(experts)) if sharded else present:
        rows = (which == k).nonzero().flatten()
        if len(rows) == 0:
            rows = torch.zeros(1, dtype=torch.long, device=which.device)
        sub = ModelCall(c.x[rows], c.t[rows], c.model_t[rows], Cond(c.cond)[rows].kwargs,
                        None if c.guidance is None else c.guidance[rows])
        pred = find_adapter(experts[k])(experts[k], sub)
        if k not in present:
            idle.append(pred)
            continue
        out = pred.new_zeros((c.x.shape[0], *pred.shape[1:])) if out is None else out
        out[rows] = pred
    for pred in idle:
        out = out + 0.0 * pred.sum()
    return out
