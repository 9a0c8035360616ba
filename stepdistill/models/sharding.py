"""Networks whose weights may be sharded over several processes (FSDP2): tell whether one is, read a
sharded tensor locally or whole, make a plain (unsharded) copy, load a whole state into one. The
methods use these on the networks they hold; the sharding itself is ``stepdistill.training.parallel``.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..diffusion.denoiser import unwrap


@dataclass
class _Plain:
    """How to make a plain copy of a sharded network: its structure on the meta device, and where the copy goes."""

    skeleton: nn.Module
    is_main: bool
    device: torch.device
    shard: Callable | None = None  # shards another network as this one was (a copy of it: models/sharded_load.py)


_PLAIN: "weakref.WeakKeyDictionary[nn.Module, _Plain]" = weakref.WeakKeyDictionary()


def remember_structure(module: nn.Module, is_main: bool, device, shard: Callable | None = None) -> None:
    """Called before ``module`` is sharded: keep its structure, so that :func:`plain_copy` can rebuild it
    (and ``shard(network, what)``, which shards a copy of it alike)."""
    _PLAIN[unwrap(module)] = _Plain(_skeleton(unwrap(module)), is_main, torch.device(device), shard)


def structure(module: nn.Module) -> _Plain:
    """What :func:`remember_structure` kept of a sharded network (KeyError for another network)."""
    return _PLAIN[unwrap(module)]


def skeleton(module: nn.Module) -> nn.Module:
    """A sharded network's structure with its parameters on the meta device (its buffers as they are)."""
    return copy.deepcopy(_PLAIN[unwrap(module)].skeleton)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(module).modules())


def fully_sharded(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is sharded (a DTensor); False for a module without parameters."""
    from torch.distributed.tensor import DTensor

    params = list(unwrap(module).parameters())
    return bool(params) and all(isinstance(p, DTensor) for p in params)


def placed(module: nn.Module, device) -> nn.Module:
    """``module`` on ``device``; a sharded network as it is (its shards are placed, and moving it would
    copy them again)."""
    return module if fully_sharded(module) else module.to(device)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (the whole tensor under ``ddp``); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure with its parameters on the meta device (no memory) and its
    buffers copied (some are not in the state dict): what :func:`plain_copy` fills. A part already sharded
    (a network in a bundle with its head) is the structure kept of it."""
    parts = [m for m in module.modules() if m is not module and m in _PLAIN]
    memo = {id(m): copy.deepcopy(_PLAIN[m].skeleton) for m in parts}
    inside = {id(p) for m in parts for p in m.parameters()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                 for p in module.parameters() if id(p) not in inside})
    return copy.deepcopy(module, memo)


def plain_copy(module: nn.Module, everywhere: bool = True) -> nn.Module | None:
    """An unsharded copy of a network with its current weights (collective under a parallel strategy;
    without one, a deep copy). With ``everywhere=False`` only the main process gets it (the weights are
    gathered there on the CPU) and the others get None."""
    module = unwrap(module)
    if module not in _PLAIN:
        # a container of sharded networks (a per-phase student's experts): its copy holds their plain copies
        inner = [m for m in module.modules() if m in _PLAIN]
        inner = [m for m in inner if not any(m is not o and m in set(o.modules()) for o in inner)]
        memo = {id(m): plain_copy(m, everywhere) for m in inner}
        if inner and not everywhere and not _PLAIN[inner[0]].is_main:
            return None
        return copy.deepcopy(module, memo)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain = _PLAIN[module]
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    if not everywhere and not plain.is_main:
        return None
    # a copy, never a view: the whole tensor of a replicated parameter (ddp) is the parameter's own storage
    state = {k: v.detach().clone() for k, v in state.items()}
    out = copy.deepcopy(plain.skeleton)
    out.load_state_dict(state, strict=True, assign=True)
    return out.to(plain.device if everywhere else "cpu")


def load_full_state(module: nn.Module, state: dict, strict: bool = True) -> None:
    """Load a whole (unsharded) state dict into a network, sharded or not (collective when sharded: each
    rank keeps its shards of it). A state taken from the sharded network itself (its DTensors: each rank's
    own shards, e.g. a fake score's snapshot made after it was built sharded) is copied shard to shard.
    ``strict=False``: ``state`` may hold only some of the network's entries (a LoRA network's adapters)."""
    module = unwrap(module)
    if not is_sharded(module) or any(isinstance(v, DTensor) for v in state.values()):
        module.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s parameters and buffers into ``target``, a network of the same structure (cast to
    its dtype), without a whole copy anywhere: shard to shard where both are sharded alike (the teacher and
    a network copied from it under FSDP; the teacher's shards may live in CPU memory), else as a whole
    state (``load_full_state``) made of ``source``'s own tensors."""
    src = unwrap(source).state_dict()
    dst = unwrap(target).state_dict()
    if src.keys() != dst.keys():
        raise ValueError(f"copy_weights: {type(unwrap(source)).__name__} and {type(unwrap(target)).__name__} differ "
                         f"in their entries ({sorted(src.keys() ^ dst.keys())[:3]})")
    alike = all(isinstance(s, DTensor) and isinstance(d, DTensor) and s.placements == d.placements
                and s.shape == d.shape and s.device_mesh.mesh.tolist() == d.device_mesh.mesh.tolist()
                for s, d in ((src[k], dst[k]) for k in dst) if isinstance(s, DTensor) or isinstance(d, DTensor))
    if alike:
        for k, d in dst.items():
            s = src[k]
            local = d.to_local() if isinstance(d, DTensor) else d
            local.copy_(s.to_local() if isinstance(s, DTensor) else s)
        return
    if any(isinstance(s, DTensor) for s in src.values()):  # a sharded source into another layout: gathered
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        src = get_model_state_dict(unwrap(source), options=StateDictOptions(full_state_dict=True))
    load_full_state(target, src)
