"""Large networks under FSDP without a whole copy on any rank (``train.parallel=fsdp``).

The teacher's denoising network is built on the meta device from its ``config.json`` (accelerate's
``init_empty_weights``: the parameters take no memory, the buffers are built as usual), sharded per block
(``stepdistill/training/parallel.py``), and then every rank reads only its own rows of each weight from
the safetensors files (``safe_open(...).get_slice``), at the dtype diffusers would load it at (the
teacher's dtype, float32 for a class's ``_keep_in_fp32_modules``). A trainable copy of a sharded network
(the student, a fake score) is its structure on the meta device, cast to the trainable dtype, given its
LoRA adapters, sharded alike, and filled from the source's local shards: no communication and no whole
copy. The text encoders and the VAE are loaded whole on every rank as before (a small share of the weights
next to the denoiser).

A hub id is first brought into the local hub cache by diffusers' own ``DiffusionPipeline.download`` (the
main process first, the others then find it there; offline, the cache is read) and built from that
snapshot folder like any local folder. A pipeline whose network cannot be built so (weights not in
safetensors, a class outside diffusers, tensor names other than the network's) is loaded whole and then
sharded, as before; so is every network when ``STEPDISTILL_WHOLE_LOAD=1`` (the benchmark's baseline).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..diffusion.denoiser import unwrap
from .sharding import local, structure

WHOLE_LOAD = "STEPDISTILL_WHOLE_LOAD"  # "1": build every network whole and shard it then (the old path)
DENOISER_NAMES = ("unet", "transformer", "transformer_2")  # the pipeline components built on the meta device

logger = logging.getLogger("stepdistill")


def whole_load() -> bool:
    return os.environ.get(WHOLE_LOAD, "") not in ("", "0")


@dataclass
class WeightFiles:
    """Where a network built on the meta device reads its weights: each tensor's safetensors file, and the
    dtype it is loaded at."""

    files: dict[str, str]
    dtypes: dict[str, torch.dtype]


_FILES: "weakref.WeakKeyDictionary[nn.Module, WeightFiles]" = weakref.WeakKeyDictionary()


def safetensors_files(folder: Path) -> dict[str, str] | None:
    """Each tensor's file in a diffusers model folder (one file, or several with an index); None without safetensors."""
    from safetensors import safe_open

    index, single = folder / "diffusion_pytorch_model.safetensors.index.json", folder / "diffusion_pytorch_model.safetensors"
    if index.is_file():
        return {k: str(folder / v) for k, v in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: str(single) for k in f.keys()}
    return None


def _read(files: dict[str, str], name: str, offset=(), shape=None) -> torch.Tensor:
    """Tensor ``name``, or its block of ``shape`` at ``offset``, read from its file (only those bytes)."""
    from safetensors import safe_open

    with safe_open(files[name], framework="pt") as f:
        if shape is None or len(shape) == 0:
            return f.get_tensor(name)
        return f.get_slice(name)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _replace(model: nn.Module, name: str, tensor: torch.Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if parameter:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = tensor


def meta_network(folder: Path, dtype: torch.dtype | None) -> tuple[nn.Module | None, str]:
    """(the network of a diffusers model folder with its parameters on the meta device, '') or (None, why
    it cannot be). Its persistent buffers are read whole; its parameters are read by :func:`load_shards`."""
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        return None, f"{config.get('_class_name')} is not a diffusers model class"
    files = safetensors_files(folder)
    if files is None:
        return None, f"{folder} has no diffusion_pytorch_model.safetensors"
    previous = torch.get_default_dtype()
    if dtype is not None:  # as diffusers builds it (its buffers too)
        torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(cls.load_config(folder))
    finally:
        torch.set_default_dtype(previous)
    missing = sorted(set(model.state_dict()) - set(files))
    if missing:
        return None, f"{folder} lacks {missing[:3]} (tensor names other than {cls.__name__}'s)"
    keep32 = cls._keep_in_fp32_modules or []
    dtypes = {}
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        target = t.dtype
        if dtype is not None and t.is_floating_point():  # diffusers' load_model_dict_into_meta
            target = torch.float32 if any(m in name.split(".") for m in keep32) else dtype
        dtypes[name] = target
        is_param = isinstance(t, nn.Parameter)
        if is_param and target != t.dtype:
            _replace(model, name, torch.empty_like(t, dtype=target), True)
        elif not is_param and name in files:  # a persistent buffer: whole
            _replace(model, name, _read(files, name).to(target), False)
    model.requires_grad_(False).eval()
    model.register_to_config(_name_or_path=str(folder))
    _FILES[model] = WeightFiles(files, dtypes)
    return model, ""


def meta_networks(pipeline_folder: str, dtype: torch.dtype | None) -> dict[str, nn.Module]:
    """The denoising networks of a local pipeline folder built on the meta device (component name ->
    network), to be passed to the pipeline instead of loaded; empty when one of them cannot be built so
    (logged: the pipeline is then loaded whole, as without FSDP)."""
    folder = Path(pipeline_folder)
    if whole_load():
        return {}
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"'{pipeline_folder}' has no model_index.json (a hub id is built from its snapshot folder, "
                         "hub_snapshot)")
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name in DENOISER_NAMES:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            model, why = meta_network(folder / name, dtype)
            if model is None:
                logger.warning("teacher %s: loaded whole on every rank, then sharded (%s)", name, why)
                return {}
            out[name] = model
    return out


def hub_snapshot(hub_id: str, trust_remote_code: bool = False) -> str:
    """The local folder of a hub pipeline's files, downloaded into the hub cache if they are not there yet
    (diffusers' ``DiffusionPipeline.download``: the files a pipeline loads, safetensors preferred; offline
    (``HF_HUB_OFFLINE=1``) it only reads the cache)."""
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.download(hub_id, trust_remote_code=trust_remote_code))


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is on the meta device (built by :func:`meta_network`, not yet read)."""
    return any(local(p).is_meta for p in unwrap(module).parameters())


@contextlib.contextmanager
def pipeline_view(folder: str, built: dict[str, nn.Module]):
    """The pipeline folder, or with networks ``built``, a view of it (links to its parts) whose
    ``model_index.json`` lists them as absent, so that ``DiffusionPipeline.from_pretrained(view, **built)``
    takes them as given and never reads their weights (it would load a component of an optional ``__init__``
    argument, such as Wan's ``transformer``, although it is passed)."""
    if not built:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="stepdistill-pipeline-") as tmp:
        for entry in Path(folder).iterdir():
            if entry.name != "model_index.json":
                (Path(tmp) / entry.name).symlink_to(entry.resolve())
        index = json.loads((Path(folder) / "model_index.json").read_text())
        index.update({name: [None, None] for name in built})
        (Path(tmp) / "model_index.json").write_text(json.dumps(index))
        yield tmp


def _offset(t: torch.Tensor) -> tuple[int, ...]:
    """Where a tensor's local part starts in the whole tensor (zeros for a plain tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return (0,) * t.dim()
    return tuple(compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1])


def materialise(module: nn.Module, device, fill: Callable[[str, torch.Tensor, tuple[int, ...]], None]) -> None:
    """Give a (sharded) network's meta parameters memory on ``device`` and ``fill(name, local part, its
    offset)`` each; its other tensors (buffers, LoRA adapters made for real) keep their values."""
    module = unwrap(module)
    named = lambda: chain(module.named_parameters(), module.named_buffers())  # noqa: E731
    if not any(local(t).is_meta for _, t in named()):
        return
    kept = {n: local(t).detach() for n, t in named() if not local(t).is_meta}
    module.to_empty(device=device)  # FSDP2 re-registers the (padded) local shards
    with torch.no_grad():
        for name, t in named():
            part = local(t)
            if name in kept:
                part.copy_(kept[name])
            elif part.numel():
                fill(name, part, _offset(t))


def load_shards(module: nn.Module, device) -> None:
    """Fill every network in ``module`` that :func:`meta_network` built: each rank reads its own parts."""
    for net in list(unwrap(module).modules()):
        source = _FILES.get(net)
        if source is not None:
            def fill(name, part, offset, source=source):
                part.copy_(_read(source.files, name, offset, part.shape).to(source.dtypes[name]))
            materialise(net, device, fill)


def shard_copy(source: nn.Module, copy: nn.Module, what: str) -> nn.Module:
    """Shard ``copy`` (built on the meta device from ``source``'s structure, LoRA adapters made for real)
    as ``source`` is sharded, and fill its parameters from ``source``'s local shards, which line up: the
    same blocks over the same mesh."""
    kept = structure(source)
    kept.shard(copy, what)
    params = dict(unwrap(source).named_parameters())

    def fill(name, part, offset):
        src = params.get(name.replace(".base_layer.", "."))
        if src is None or local(src).shape != part.shape:
            raise RuntimeError(f"{what}: no local shard of {name} in the network it copies")
        part.copy_(local(src))

    materialise(copy, kept.device, fill)
    return copy


@contextlib.contextmanager
def adapters_made_for_real(model: nn.Module, dtype: torch.dtype):
    """Around peft's ``add_adapter`` on a network whose weights are on the meta device: peft draws the
    adapters on the CPU and then moves them after their base layers, onto the meta device, so their values
    are lost. They are drawn again, in memory: from the same random state, layer by layer in peft's order
    (each layer made, then ``reset_lora_parameters`` with the initialisation the adapter's config names,
    ``student.lora_init``), so they equal those of a whole copy and leave
    the random state where peft left it; then cast to ``dtype``, as peft casts them."""
    from peft.tuners.lora import LoraLayer

    before = torch.get_rng_state()
    yield
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            for name in layer.lora_A:
                for part in (layer.lora_A[name], layer.lora_B[name]):
                    part.to_empty(device="cpu")
                    part.reset_parameters()
                init = model.peft_config[name].init_lora_weights
                layer.reset_lora_parameters(name, init)
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
    if not torch.equal(torch.get_rng_state(), after):
        logger.warning("LoRA adapters of a sharded copy: drawn otherwise than this peft version drew them")
    torch.set_rng_state(after)
