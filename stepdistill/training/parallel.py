"""Data parallelism over several processes with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every network is sharded per block (UNet down/mid/up blocks, transformer blocks, or the classes an
accelerate FSDP config names in ``fsdp_transformer_layer_cls_to_wrap``) and then as a whole, so its
gradients are reduced block by block during the backward pass, overlapping the backward of the blocks
before it. Two strategies (``train.parallel``):

- ``ddp``: FSDP2 on a 2-D mesh (replicas x shards of size 1), i.e. hybrid sharding with one shard: every
  rank keeps whole weights and the gradients are all-reduced per block in the backward pass. This is
  how the score methods, which call a network several times per update and use the other trainables
  frozen inside an update, get DDP's overlapped reduction: FSDP2 reduces what each backward through a
  block produced, however many forwards there were, and a parameter whose ``requires_grad`` is off is
  not reduced. (torch's ``DistributedDataParallel`` refuses a second forward before the backward.)
- ``fsdp``: FSDP2 on a 1-D mesh: weights, gradients and optimiser state sharded across the ranks; the
  frozen teacher is sharded too. Under ``mixed_precision: bf16`` the blocks compute in bf16 from
  gathered bf16 copies and reduce gradients in fp32 (the sharded weights keep ``train.trainable_dtype``).

accelerate's own FSDP2 path prepares exactly one model per ``prepare`` call ("Only one model is
supported when using FSDP2", accelerate 1.16), and a distillation run has up to three networks with
separate optimisers, so the networks are sharded here directly; accelerate still launches the
processes, places the devices, runs autocast, and saves the schedulers and random states. Checkpoints
of a parallel run are written with torch distributed checkpoint (``training/checkpoints.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.context_parallel import build_mesh
from ..diffusion.denoiser import unwrap
from ..errors import ConfigError
from ..models.sharded_load import load_shards
from ..models.sharding import fully_sharded, remember_structure

# the ModuleList attributes (and single blocks) of diffusers networks that are sharded one by one
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
BLOCK_SINGLES = ("mid_block",)

def launched_with_fsdp(accelerator) -> bool:
    """Whether the run was launched with an accelerate FSDP config. On a machine without CUDA the
    Accelerator is built with ``cpu=True`` (what selects gloo) and then reports ``MULTI_CPU`` and no FSDP
    plugin whatever the config said, so the launcher's own flag (``ACCELERATE_USE_FSDP``) is read too."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    return accelerator.distributed_type == DistributedType.FSDP or parse_flag_from_env("ACCELERATE_USE_FSDP")


def fsdp_plugin(accelerator):
    """The FSDP settings of the launch: the Accelerator's plugin, or one read from the launcher's
    ``FSDP_*`` variables where the Accelerator has none (on the CPU, see :func:`launched_with_fsdp`)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and launched_with_fsdp(accelerator):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    return plugin


def resolve_strategy(accelerator, requested: str) -> str:
    """``none`` with one process; ``auto`` is ``fsdp`` under an accelerate FSDP config, else ``ddp``."""
    if accelerator.num_processes == 1:
        return "none"
    if requested == "auto":
        return "fsdp" if launched_with_fsdp(accelerator) else "ddp"
    return requested


class Parallel:
    """The strategy of a run, its device mesh and the sharding of its networks (``none``: nothing)."""

    def __init__(self, accelerator, strategy: str, context: int = 1):
        self.strategy = strategy
        self.accelerator = accelerator
        self.mesh = None
        # context parallelism (train.context_parallel): groups of `context` consecutive ranks share each sample
        self.context = context
        self.group_rank = accelerator.process_index // context  # which data stream this rank draws
        self.groups = accelerator.num_processes // context
        self.context_mesh = None
        if strategy == "none":
            return
        if context > 1:
            self.context_mesh = build_mesh(accelerator.device.type, accelerator.num_processes, context)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        world, dev = accelerator.num_processes, accelerator.device.type
        if strategy == "ddp":
            self.mesh = init_device_mesh(dev, (world, 1), mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(dev, (world,), mesh_dim_names=("shard",))
        plugin = fsdp_plugin(accelerator)
        reshard = getattr(plugin, "reshard_after_forward", True)
        self.reshard_after_forward = reshard if isinstance(reshard, bool) else True
        self.block_classes = set(getattr(plugin, "transformer_cls_names_to_wrap", None) or [])
        bf16 = accelerator.mixed_precision == "bf16"
        self.policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                           reduce_dtype=torch.float32 if bf16 else None)

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    # -- sharding ---------------------------------------------------------------------------------
    def _blocks(self, net: nn.Module) -> list[nn.Module]:
        if self.block_classes:
            return [m for m in net.modules() if type(m).__name__ in self.block_classes and m is not net]
        out = []
        for name in BLOCK_LISTS:
            blocks = getattr(net, name, None)
            if isinstance(blocks, nn.ModuleList):
                out += list(blocks)
        out += [getattr(net, name) for name in BLOCK_SINGLES if isinstance(getattr(net, name, None), nn.Module)]
        return out

    @staticmethod
    def _roots(module: nn.Module) -> list[nn.Module]:
        """The modules that are called: a bundle's parts (a network and its head), a per-phase student's
        experts, or the module itself."""
        if isinstance(module, nn.ModuleDict):
            return list(module.values())
        if isinstance(getattr(module, "experts", None), nn.ModuleList):
            return list(module.experts)
        return [module]

    def shard(self, module: nn.Module, what: str, offload: bool = False) -> nn.Module:
        """Shard ``module`` in place (per block, then each root) and remember how to make a plain copy
        of it, and how to shard a copy of each root alike; every parameter must end up sharded (a parameter
        outside every root would not be reduced). A root already sharded (a network built sharded, in a
        bundle with its head) is left as it is. ``offload``: the shards live in CPU memory (FSDP2's
        ``CPUOffloadPolicy``), copied to the device block by block (``teacher.offload: cpu``)."""
        if not self.active:
            return module
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        module = unwrap(module)
        is_main, device = self.accelerator.is_main_process, self.accelerator.device
        roots = [r for r in self._roots(module) if not fully_sharded(r)]
        for root in roots:  # (a copy of a network is sharded alike, never offloaded)
            remember_structure(root, is_main, device, lambda m, w: self.shard(m, w))
        if not any(r is module for r in roots):
            remember_structure(module, is_main, device)
        kw = dict(mesh=self.mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=self.policy)
        if offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        for root in roots:
            for block in self._blocks(root):
                fully_shard(block, **kw)
            fully_shard(root, **kw)
        loose = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
        if loose:
            raise ConfigError(f"train.parallel={self.strategy}: {what} has parameters outside the modules it calls "
                              f"({loose[:3]}), which would not be reduced")
        return module

    def shard_teacher(self, module: nn.Module, offload: bool) -> nn.Module:
        """Shard the frozen teacher (``fsdp``); a network built on the meta device then reads its shards."""
        self.shard(module, "the teacher", offload)
        load_shards(module, "cpu" if offload else self.accelerator.device)
        return module

    def gradient_sync(self, module: nn.Module, sync: bool) -> None:
        """Reduce gradients in this backward (``sync``) or keep accumulating them locally."""
        from torch.distributed.fsdp import FSDPModule

        for m in unwrap(module).modules():
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(sync, recurse=False)
