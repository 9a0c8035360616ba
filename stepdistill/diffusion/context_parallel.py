"""Context (sequence) parallelism: the tokens of one sample split over ``k`` processes
(``train.context_parallel``).

A video DiT at 480p and 81 frames runs 32,760 tokens through every block; even with gradient
checkpointing, one pass keeps about 15 GB of activations per GPU for Wan-14B (docs/RESULTS.md, memory at
the real sizes). Context parallelism gives each of ``k`` processes ``1/k`` of the tokens, so each keeps
``1/k`` of the activations and of the attention's working memory.

It is diffusers' own context parallelism (``ModelMixin.enable_parallelism`` with a
``ContextParallelConfig``), which is built on torch's device meshes and functional collectives: the
network's ``_cp_plan`` splits its token sequence after the patch embedding and gathers it at
``proj_out``; attention runs Ulysses-style, an all-to-all that gives each process all tokens of ``1/k``
of the heads, with diffusers' backward for training. The families whose networks carry a plan here are
Flux, Qwen-Image and Wan (2.1 and both experts of 2.2).

What the training loop does around it (``stepdistill.training``):

- the ``k`` processes of a group draw the same batch and the same noise (one data stream per group), so
  every network sees the same sample split over the group;
- each process's backward then yields the gradient of its own tokens; the sum over the group is the whole
  gradient, so the loss is scaled by ``k`` before the ranks' gradients are averaged;
- every network a method calls (teacher, student, fake score, the frozen copies of progressive rounds)
  is made context-parallel at its first call (:func:`prepare`).

A copy of a context-parallel network would still run the original's weights (diffusers' hooks keep a
reference to the module they were registered on), so such a copy is refused with an error rather
than run; the toolkit's own copies of sharded networks are rebuilt from their unhooked structure.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .denoiser import class_name, unwrap

_MESH: list = [None]  # the ("ring", "ulysses") mesh of this process's group while a run uses it


@contextlib.contextmanager
def using(mesh):
    """Inside the block, the networks the adapters call run context-parallel over ``mesh`` (None: off)."""
    before, _MESH[0] = _MESH[0], mesh
    try:
        yield
    finally:
        _MESH[0] = before


# the network classes whose diffusers plan (_cp_plan) the adapters here use (diffusers has none for the other
# adapted networks, HunyuanVideoTransformer3DModel among them: those are refused)
CP_FAMILIES = ("FluxTransformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel")


def build_mesh(device_type: str, world: int, k: int):
    """A (groups, 1, k) mesh over ``world`` processes; each process's ("ring", "ulysses") sub-mesh is
    its group of ``k`` consecutive ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // k, 1, k), mesh_dim_names=("cp_group", "ring", "ulysses"))
    return mesh["ring", "ulysses"]


def _enable(net: nn.Module, mesh) -> None:
    """diffusers' ``enable_parallelism`` over our own group's mesh. diffusers resolves its config from
    the global rank and the accelerator's device count (zero on a CPU-only machine, where it would divide
    by it), so the config is resolved here from ``mesh`` and handed over as already resolved."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    k = mesh.size()
    heads = getattr(net.config, "num_attention_heads", None)
    if heads is not None and heads % k:
        raise ValueError(f"train.context_parallel={k}: {class_name(net)} has {heads} attention heads, which do "
                         f"not divide by {k} (each process of a group takes heads / k of them)")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=k, mesh=mesh))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = next(net.parameters()).device
    if device.type == "meta":
        device = torch.device("cpu")

    def resolved(_config):
        config.setup(rank, world, device, mesh=mesh)
        net._parallel_config = config
        return config

    net._resolve_parallel_config = resolved
    try:
        net.enable_parallelism(config=config.context_parallel_config)
    finally:
        del net._resolve_parallel_config
    net._stepdistill_cp_owner = id(net)
    net.register_forward_pre_hook(_check_tokens, with_kwargs=True)


def _check_tokens(module: nn.Module, args: tuple, kwargs: dict):
    """Before diffusers splits them: every sequence the plan splits divides by the group size (diffusers
    only asserts it), named with its length."""
    k = module._parallel_config.context_parallel_config.ulysses_degree
    split = {key for entry in type(module)._cp_plan.values() if isinstance(entry, dict) for key in entry}
    for name, value in kwargs.items():
        if name not in split or name not in ("hidden_states", "encoder_hidden_states") or not torch.is_tensor(value):
            continue
        if value.ndim == 3:  # packed tokens (Flux, Qwen-Image), or the text's
            n, what = value.shape[1], "tokens"
        elif value.ndim == 5 and name == "hidden_states":  # video latents, split after the patch embedding
            pf, ph, pw = module.config.patch_size
            n, what = (value.shape[2] // pf) * (value.shape[3] // ph) * (value.shape[4] // pw), "patches"
        else:
            continue
        if n % k:
            raise ValueError(f"train.context_parallel={k}: {class_name(module)}'s {name} has {n} {what}, "
                             f"which do not divide by {k}")
    return None


def prepare(net: nn.Module) -> None:
    """Make the network an adapter is about to call context-parallel, once, while a run has it on (the
    adapters of the families with a plan call this first)."""
    mesh = _MESH[0]
    if mesh is None:
        return
    net = unwrap(net)
    owner = getattr(net, "_stepdistill_cp_owner", None)
    if owner == id(net):
        return
    if owner is not None or getattr(net, "_parallel_config", None) is not None:
        raise RuntimeError(f"a copy of a context-parallel {class_name(net)} was called; its diffusers hooks still "
                           f"run the original's weights. Copy networks before they are first called.")
    _enable(net, mesh)
