"""The student: a trainable copy of the teacher (full or LoRA) that samples in one or a few steps.

Its timestep list (first entry = t_init) and sampler kind are part of its saved config
(``student_config.json`` beside the weights), so export and evaluation use exactly the schedule it
was trained for. Sampler kinds:

- ``deterministic``: DDIM / Euler between the listed times (progressive, guided students);
- ``renoise``: x0 at each listed time, re-noised with fresh noise to the next one (DMD2 / LCM style);
  a consistency student (``consistency`` in its config) outputs c_skip(t) x + c_out(t) x0 at each time,
  LCM's boundary parameterisation (:func:`boundary_scalings`), and samples at any step count
  (:meth:`Student.at_steps`);
- ``signal``: BOOT's student, which reads the initial noise eps at every time and outputs the
  trajectory's signal y_t; the sample is y at the (single) listed time.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..diffusion.denoiser import W_CONDITIONED, Cond, Denoiser, unwrap
from ..diffusion.packed import guidance_embedded
from ..diffusion.process import NoiseProcess, process_from_scheduler_config
from . import nets
from .nets import network_class
from .sharded_load import adapters_made_for_real, shard_copy
from .sharding import is_sharded, plain_copy, skeleton
from .shared_lora import adapter_name, fused_view_copy, is_view, peft_init
from .spec import SAMPLERS, SPEC_FILE, StudentSpec  # noqa: F401  (the student's schedule, read with it)


def w_conditioned_class(model: nn.Module) -> tuple[type, dict]:
    """(class, config changes) of ``model`` rebuilt with a guidance-scale input (``W_CONDITIONED``)."""
    name = type(unwrap(model)).__name__
    if name not in W_CONDITIONED:
        raise ValueError(f"{name} has no guidance-scale input; supported: {sorted(W_CONDITIONED)}")
    cls_name, updates = W_CONDITIONED[name]
    return (type(unwrap(model)) if cls_name is None else getattr(nets, cls_name)), updates


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` in ``dtype`` (through ``float()`` / ``bfloat16()``: diffusers warns on ``.to(dtype)``)."""
    if dtype == torch.float32:
        return module.float()
    if dtype == torch.bfloat16:
        return module.bfloat16()
    return module.to(dtype)


# config entries that name layers of one of the network's layer lists, by index: (config key, the list, the config
# key of its length). A student layer must be of the kind of the teacher layer it starts from, else its weights
# would start fresh or go unused, so these follow the layer map instead of being copied.
LAYER_INDEX_KEYS = {"SD3Transformer2DModel": [("dual_attention_layers", "transformer_blocks", "num_layers")]}


def layer_index_config(src: nn.Module, config: dict, architecture: dict,
                       layer_map: dict[str, list[int]] | None) -> dict:
    """The student's values of ``LAYER_INDEX_KEYS`` (SD3.5's dual-attention blocks): student layer j is
    listed iff the teacher layer it starts from (``layer_map``, default j) is. A value given in
    ``architecture`` that says otherwise is refused."""
    entries = next((LAYER_INDEX_KEYS[c.__name__] for c in type(src).__mro__ if c.__name__ in LAYER_INDEX_KEYS), [])
    out = {}
    for key, layers, count_key in entries:
        if key not in config:
            continue
        n = int({**config, **architecture}[count_key])
        picks = list((layer_map or {}).get(layers, range(n)))
        teacher = sorted(int(i) for i in config[key])
        derived = [j for j in range(min(n, len(picks))) if picks[j] in teacher]
        if key in architecture and sorted(int(i) for i in architecture[key]) != derived:
            raise ValueError(f"student.architecture.{key} {list(architecture[key])}: student {layers} j starts from "
                             f"teacher layer {picks[:n]}[j] and the teacher's {key} are {teacher}, so the student's are "
                             f"{derived} (another kind of layer would start with fresh or unused weights); leave "
                             f"{key} out and it is derived")
        out[key] = derived
    return out


def smaller_copy(model: nn.Module, architecture: dict, layer_map: dict[str, list[int]] | None = None,
                 cls: type | None = None, config_updates: dict | None = None) -> tuple[nn.Module, list[str]]:
    """A network of ``model``'s class (or ``cls``) with ``architecture`` changing its config (fewer
    blocks, fewer channels), initialised from ``model``'s weights: each tensor of the same name is cut to
    the new shape (its leading rows / channels, i.e. the first heads and channels), and layer i of a
    list named in ``layer_map`` starts from the teacher's layer ``layer_map[name][i]`` (default: layer
    i, the first layers), as a layer of its kind (:func:`layer_index_config`). Returns (network, names
    of the tensors the teacher had no source for)."""
    src = unwrap(model)
    cls = cls or type(src)
    config = {k: v for k, v in dict(src.config).items() if not k.startswith("_")}
    unknown = sorted(set(architecture) - set(config))
    if unknown:
        raise ValueError(f"student.architecture: {unknown} are not config keys of {type(src).__name__} "
                         f"(its keys: {sorted(config)})")
    new = cls.from_config({**config, **(config_updates or {}), **architecture,
                           **layer_index_config(src, config, architecture, layer_map)})
    teacher_state = src.state_dict()
    layer_map = layer_map or {}

    def source_name(name: str) -> str:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in layer_map and parts[i + 1].isdigit():
                picks, j = layer_map[part], int(parts[i + 1])
                if j >= len(picks):
                    raise ValueError(f"student.layer_map.{part} names {len(picks)} teacher layers; the student has "
                                     f"layer {j}")
                parts[i + 1] = str(picks[j])
        mapped = ".".join(parts)
        if mapped != name and mapped not in teacher_state:
            raise ValueError(f"student.layer_map: the teacher has no {mapped} (for the student's {name})")
        return mapped

    fresh = []
    with torch.no_grad():
        for name, p in new.state_dict().items():
            t = teacher_state.get(source_name(name))
            if t is None or t.dim() != p.dim() or any(a > b for a, b in zip(p.shape, t.shape)):
                fresh.append(name)
                continue
            p.copy_(t[tuple(slice(0, n) for n in p.shape)])
    return new, fresh


# LoRA target modules by default (``student.lora_targets`` unset): the attention projections, and for LCM-LoRA
# the set of diffusers' train_lcm_distill_lora_sd_wds.py (attention, transformer in/out projections, feed-forward,
# resnet convolutions, down/up samplers, time-embedding projections). Targets a network lacks are dropped.
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def copy_for_training(model: nn.Module, *, lora_rank: int = 0, lora_alpha: float | None = None,
                      lora_targets=ATTENTION_LORA_TARGETS, w_conditioned: bool = False,
                      dtype: torch.dtype = torch.float32, architecture: dict | None = None,
                      layer_map: dict[str, list[int]] | None = None, lora_init: str = "default") -> nn.Module:
    """A trainable copy of a (frozen) network in ``dtype`` (float32 by default, or bfloat16 with
    ``train.trainable_dtype``): all weights, or LoRA adapters only (peft, through diffusers'
    ``add_adapter``; ``lora_init`` as :func:`~stepdistill.models.shared_lora.peft_init` reads it).
    ``w_conditioned`` rebuilds the network with a guidance-scale input (:func:`w_conditioned_class`);
    weights it did not have are zero-initialised, so the copy starts as the teacher. ``architecture``
    makes a smaller network of the same class (:func:`smaller_copy`). A two-expert network
    (:class:`~stepdistill.models.nets.NoiseLevelExperts`, e.g. a fake score initialised as a Wan2.2 teacher)
    is copied expert by expert, both trainable. Of a network sharded over several
    processes (FSDP) the copy is sharded alike, built without a whole copy on any rank
    (``models/sharded_load.py``; a smaller or w-conditioned copy is made from the whole network, gathered)."""
    src = unwrap(model)
    if getattr(src, "peft_config", None) and getattr(src, "_stepdistill_shared", False):
        raise ValueError(f"a trainable copy of {type(src).__name__} with the adapters of a shared LoRA base "
                         f"({sorted(src.peft_config)}): copies are made before adapters are added")
    sharded = is_sharded(src) and not isinstance(src, nets.NoiseLevelExperts)
    if sharded and (architecture is not None or w_conditioned):
        src, sharded = plain_copy(src), False
    if isinstance(src, nets.NoiseLevelExperts):
        experts = [copy_for_training(e, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                                     w_conditioned=w_conditioned, dtype=dtype, architecture=architecture,
                                     layer_map=layer_map, lora_init=lora_init) for e in src.experts]
        return nets.NoiseLevelExperts.from_experts(experts, src.config.boundary_timestep).train()
    if architecture is not None:  # a smaller network of the same class (w-conditioned: with its new input)
        cls, updates = w_conditioned_class(src) if w_conditioned else (type(src), {})
        new, fresh = smaller_copy(src, architecture, layer_map, cls, updates)
        missing = [n for n in fresh if n not in src.state_dict()]  # the guidance input, if any
        params = dict(new.named_parameters())
        with torch.no_grad():
            for name in missing:  # starts at zero, as below
                if w_conditioned and name in params:
                    params[name].zero_()
        student = _cast(new, dtype)
    elif w_conditioned:
        cls, config_updates = w_conditioned_class(src)
        new = cls.from_config({**src.config, **config_updates})
        missing, unexpected = new.load_state_dict(src.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"rebuilt {type(src).__name__} lost weights {unexpected[:3]}")
        params = dict(new.named_parameters())
        with torch.no_grad():
            for name in missing:
                params[name].zero_()
        student = _cast(new, dtype)
    else:
        student = _cast(skeleton(src) if sharded else copy.deepcopy(src), dtype)
    student.train()
    if lora_rank:
        from peft import LoraConfig

        if not hasattr(student, "add_adapter"):
            raise ValueError(f"a LoRA (rank {lora_rank}) on {type(src).__name__}: diffusers has no LoRA support for this "
                             f"class (it is not a PeftAdapterMixin); train this network in full (LoRA rank 0: "
                             f"student.lora_rank, or method_args.fake_lora_rank for a fake score)")
        student.requires_grad_(False)
        targets = [t for t in lora_targets if any(n.endswith(t) for n, _ in student.named_modules())]
        if not targets:
            raise ValueError(f"student.lora_targets {list(lora_targets)} match no module of {type(src).__name__}")
        with adapters_made_for_real(student, dtype) if sharded else contextlib.nullcontext():
            student.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=targets,
                                           init_lora_weights=peft_init(lora_init)))
        if w_conditioned:  # the new guidance embedding is trained in full beside the LoRA
            for name, p in student.named_parameters():
                if name in missing:
                    p.requires_grad_(True)
    else:
        student.requires_grad_(True)
    return shard_copy(src, student, f"a trainable copy of {type(src).__name__}") if sharded else student


SIGMA_DATA = 0.5  # LCM's sigma_data (fixed in diffusers' LCMScheduler)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at discrete time t (Luo et al. 2023, eq. 9, as diffusers' LCMScheduler computes
    them): c_skip = s_d^2 / ((k t)^2 + s_d^2), c_out = k t / sqrt((k t)^2 + s_d^2) with k the timestep
    scaling; at t = 0 the output is the input. ``None``: (0, 1), for processes whose x0 prediction already
    equals the input at the clean end (flow)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if timestep_scaling is None:
        return torch.zeros_like(t), torch.ones_like(t)
    scaled = timestep_scaling * t
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def lcm_timesteps(num_train_timesteps: int, num_steps: int, solver_steps: int) -> list[float]:
    """The timesteps diffusers' LCMScheduler samples with for ``num_steps`` steps when
    ``original_inference_steps`` is the distillation's ``solver_steps`` (e.g. 999, 759, 499, 259 for 4 of 50)."""
    from diffusers import LCMScheduler

    if not 1 <= num_steps <= solver_steps:
        raise ValueError(f"a consistency student of a {solver_steps}-step solver grid samples in 1 to {solver_steps} "
                         f"steps, not {num_steps}")
    sched = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=solver_steps)
    sched.set_timesteps(num_steps)
    return [float(t) for t in sched.timesteps.tolist()]


def signal_prediction(den: Denoiser, eps: torch.Tensor, t: torch.Tensor, cond: Cond | None = None,
                      guidance=None) -> torch.Tensor:
    """BOOT's y(eps, t): the network reads the initial noise with time t, and its raw output is read
    as an x0 prediction *at t_max* (fixed skip/output coefficients). Reading it at t itself would pin
    y = eps at the clean end, where every parameterisation returns its input."""
    proc = den.process
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=eps.device).reshape(-1).expand(eps.shape[0])
    raw = den.raw(eps, t, cond, guidance)
    t_ref = torch.full_like(t, proc.t_max)
    return proc.to_x0_eps(raw, eps.float(), t_ref, den.prediction_type)[0]


def save_lora_adapters(model: nn.Module, folder: str | Path) -> bool:
    """Write a LoRA model's adapters (peft's naming, ``<layer>.lora_A.weight``, which ``load_lora_weights``
    reads for every layer kind) and their peft config to ``folder/lora``; returns False for a model without
    adapters. (diffusers' ``convert_state_dict_to_diffusers`` renames only attention layers, to the old
    ``lora.down`` form; a file mixing both forms loads without its attention adapters.)"""
    name = adapter_name(model)  # a view of a shared base: its own adapter
    model = unwrap(model)
    if not getattr(model, "peft_config", None):
        return False
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(folder) / "lora"
    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in layers.items()}, str(out / "adapter_model.safetensors"))
    config = model.peft_config[name].to_dict()
    (out / "adapter_config.json").write_text(json.dumps(config, default=list, indent=1))
    return True


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks of a student: itself, or the experts of a PhasedExperts student."""
    model = unwrap(model)
    return [unwrap(e) for e in model.experts] if hasattr(model, "experts") else [model]


def fused_copy(model: nn.Module) -> nn.Module:
    """The model as a plain diffusers model: a LoRA model (or per-phase experts with LoRA) is copied
    with its adapters merged into the base weights (peft through diffusers' PeftAdapterMixin); anything
    else is returned as it is; a view of a shared LoRA base (``shared_lora``), as a copy of the base with
    its adapter alone merged."""
    if is_view(model):
        return fused_view_copy(model)
    model = unwrap(model)
    if not any(getattr(m, "peft_config", None) for m in networks(model)):
        return model
    fused = copy.deepcopy(model)
    for m in networks(fused):
        if getattr(m, "peft_config", None):
            m.fuse_lora()
            m.unload_lora()
    return fused


class Student:
    """A trainable denoiser and the schedule it samples with."""

    def __init__(self, denoiser: Denoiser, spec: StudentSpec):
        self.denoiser = denoiser
        self.spec = spec

    @property
    def process(self) -> NoiseProcess:
        return self.denoiser.process

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    def times(self) -> torch.Tensor:
        return torch.tensor(self.spec.timesteps, dtype=torch.float32)

    def _guidance(self, guidance):
        return self.spec.guidance_scale if guidance is None else guidance

    def sample(self, noise: torch.Tensor, cond: Cond | None = None, *, generator: torch.Generator | None = None,
               guidance: float | torch.Tensor | None = None, denoiser: Denoiser | None = None) -> torch.Tensor:
        """Draw samples from unit Gaussian ``noise`` with the student's own schedule. ``generator``
        supplies the fresh noise of the ``renoise`` sampler."""
        den = denoiser or self.denoiser
        proc, times, g = self.process, self.times(), self._guidance(guidance)
        if self.spec.sampler == "signal":
            return signal_prediction(den, noise, times[0].expand(noise.shape[0]).to(noise.device), cond, g)
        scaling = (self.spec.consistency or {}).get("timestep_scaling")
        x = noise  # unit noise at t_init, as diffusers pipelines start (init_noise_sigma = 1)
        for i, t in enumerate(times):
            x0 = den(x, t.expand(noise.shape[0]), cond, guidance=g)
            if self.spec.consistency is not None:
                c_skip, c_out = boundary_scalings(t, scaling)
                x0 = c_skip.to(x0.device) * x.float() + c_out.to(x0.device) * x0
            if i + 1 == len(times):
                return x0
            s = times[i + 1]
            if self.spec.sampler == "deterministic":
                x = proc.ode_step(x, x0, t, s)
            else:
                eps = den.noise(x0.shape, generator).to(x0.device)  # in the layout the pipeline draws it
                x = proc.add_noise(x0, eps, s.expand(noise.shape[0]))
        return x

    def at_steps(self, num_steps: int) -> "Student":
        """A consistency student on the schedule for ``num_steps`` steps (VP: LCMScheduler's for its solver
        grid; flow: the process's grid), sharing this one's network."""
        if self.spec.consistency is None:
            raise ValueError(f"a {self.spec.method} student samples with its trained {len(self.spec.timesteps)}-step "
                             f"schedule only; consistency students sample at any step count")
        proc = self.process
        if proc.kind == "vp":
            times = lcm_timesteps(proc.num_train_timesteps, num_steps, int(self.spec.consistency["solver_steps"]))
        else:
            times = proc.grid(num_steps).tolist()
        return Student(self.denoiser, replace(self.spec, timesteps=times))

    def save(self, folder: str | Path, model: nn.Module | None = None) -> None:
        """Write the network as a diffusers model folder (safetensors) plus ``student_config.json``."""
        m = unwrap(model or self.model)
        m.save_pretrained(folder, safe_serialization=True)
        self.spec.save(folder)

    @classmethod
    def load(cls, folder: str | Path, device=None) -> "Student":
        """A student saved by :meth:`save`: the final ``student/`` of a run, or a checkpoint's ``student/``
        when the student is one full network (a LoRA student's checkpoint holds its adapters only)."""
        spec = StudentSpec.load(folder)
        model_cls = network_class(json.loads((Path(folder) / "config.json").read_text())["_class_name"])
        model = model_cls.from_pretrained(folder).to(device).eval().requires_grad_(False)
        process = process_from_scheduler_config(spec.process["scheduler"])
        # a network with a guidance input (FLUX.1-dev) samples with the guidance it was distilled with
        embedded = spec.guidance_scale if guidance_embedded(model) else None
        return cls(Denoiser(model, process, spec.prediction_type, embedded), spec)

    @classmethod
    def load_run(cls, run_dir: str | Path, device=None) -> "Student":
        """A finished run's student: its ``student_ema/`` where the run kept an EMA
        (``train.ema_decay``), else its ``student/``."""
        run_dir = Path(run_dir)
        return cls.load(run_dir / ("student_ema" if (run_dir / "student_ema").is_dir() else "student"), device)
