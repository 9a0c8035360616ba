"""Export a distilled student as a diffusers pipeline folder of the teacher's own pipeline class.

    stepdistill export runs/sd15/dmd2_4step exported/sd15-dmd2-4step [--ema] [--lora]

The folder holds the teacher's components with the student in place of its UNet / transformer and a
stock diffusers scheduler configured so that the trained timesteps are used exactly:

- one step at t_init (any sampler): ``DDIMScheduler`` with "trailing" spacing (VP; for t_init below
  the last training step, the schedule's betas are cut after t_init so that its one step is at
  t_init), or ``FlowMatchEulerDiscreteScheduler`` with ``sigmas=[t_init]`` (flow);
- few-step re-noising (DMD2): ``LCMScheduler`` whose ``original_inference_steps`` reproduces the
  list, with boundary scalings c_skip = 0, c_out = 1 (VP), or ``FlowMatchLCMScheduler`` (flow);
- consistency students (LCM, any step count): ``LCMScheduler`` with the distillation's solver grid as
  ``original_inference_steps`` and its boundary scalings (VP), so ``num_inference_steps`` 1 to 8 all
  sample as the toolkit's ``Student.at_steps`` does; ``FlowMatchLCMScheduler`` with the sigmas (flow);
- deterministic few-step (progressive, guided): ``DDIMScheduler`` with "trailing" spacing (VP), or
  ``FlowMatchEulerDiscreteScheduler`` with the list as ``sigmas`` (flow). A flow teacher with
  resolution-dependent shifting (Flux, Qwen-Image) was distilled at one static shift
  (``diffusion/process.py``): the exported scheduler has that shift and ``use_dynamic_shifting`` off, so
  the ``mu`` their pipelines pass is not used, and the call arguments carry the trained height and width
  (and, for a network with a guidance input, the embedded ``guidance_scale`` it was distilled with, as
  for HunyuanVideo's);
- BOOT's one-step signal student: its network reads the noise at the clean end's time and its output
  is read as an x0 prediction at t_max (``models.student.signal_prediction``). It is exported as a network
  whose timestep input is folded away at that time (``nets.time_frozen_copy``) behind the one-step
  scheduler at t_max, which reads the output exactly so.

A pipeline whose ``__call__`` passes no ``sigmas`` to its scheduler (WanPipeline) runs the scheduler's
own grid: a flow student exports with ``FlowMatchEulerDiscreteScheduler`` (the teacher's shift, its
``shift_terminal`` at the student's last time, ``stochastic_sampling`` for re-noising students) when
that grid is the student's timesteps, and is refused naming a grid that is otherwise. Into WanPipeline
a student goes as ``transformer`` with no ``transformer_2`` (a two-expert teacher's second network is
dropped), or a 2-step per-step-expert student (Phased DMD) as both, switched between its two times.

Every pipeline starts from unit Gaussian latents, as the toolkit's own sampler does. The call
arguments that reproduce the trained sampler (steps, guidance scale, sigmas) are written to
``stepdistill_sampling.json`` and into the model card. A few-step BOOT student would read the initial
noise at every step, which no stock scheduler does: it is refused with that reason.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import yaml

from ..config import PRECISIONS, torch_dtype
from ..diffusion.denoiser import unwrap
from ..diffusion.process import is_flow_scheduler
from ..diffusion.packed import guidance_embedded, is_packed
from ..errors import ConfigError, ExportError, InputError
from ..models.nets import time_frozen_copy
from ..models.shipped import quiet_text_encoder_type
from ..models.student import SPEC_FILE, Student, StudentSpec
from ..models.teachers import find_denoiser, resolve_teacher_path
from ..storage import recover_swap, remove_dead_temporaries, swap_in, temporary_name, writing
from ..training.checkpoints import list_checkpoints
from ..training.run_folder import RunLock
from .card import SAMPLING_FILE, model_card, teacher_license
from .schedulers import UNCONDITIONAL_PIPELINES, check_student_network, scheduler_for, second_expert_slot

logger = logging.getLogger("stepdistill")
EXPORT_DIR = "pipeline"  # train.export: the final student as a diffusers pipeline folder in the run folder


def _read(path: Path, kind: str):
    """A run's ``config.yaml`` or a student's JSON file, or one ExportError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if kind == "yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ExportError(f"'{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          ) from None
    if not isinstance(data, dict):
        raise ExportError(f"'{path}' does not hold a mapping")
    return data


def _resolve_source(source: Path, use_ema: bool, running_ok: bool = False) -> tuple[Path, dict | None]:
    """(student folder, run config or None) for a run folder or a student folder. A run that is still
    training is refused (its student/ is the last finished run's, or missing), unless ``running_ok``:
    the run exporting itself at its end."""
    holder = None if running_ok or (source / SPEC_FILE).is_file() else RunLock(source).holder()
    if holder is not None:
        raise ExportError(f"run '{source}' is still training ({holder}); export it when it has finished")
    if (source / SPEC_FILE).is_file():
        run_cfg = source.parent / "config.yaml"
        return source, (_read(run_cfg, "yaml") if run_cfg.is_file() else None)
    if not (source / "config.yaml").is_file():
        raise ExportError(f"'{source}' is neither a run folder (config.yaml) nor a student folder ({SPEC_FILE})")
    cfg = _read(source / "config.yaml", "yaml")
    folder = source / ("student_ema" if use_ema else "student")
    if not (folder / SPEC_FILE).is_file():
        if use_ema and (source / "student" / SPEC_FILE).is_file():
            raise ExportError(f"run '{source}' has no student_ema/: it was trained without train.ema_decay")
        ckpts = list_checkpoints(source)
        last = ckpts[-1].name if ckpts else "none"
        raise ExportError(f"run '{source}' is unfinished: no {folder.name}/ yet (latest checkpoint: {last}, "
                          f"train.max_steps={cfg.get('train', {}).get('max_steps')}); re-run its command to finish it")
    return folder, cfg


# the config keys that fix how a pipeline calls its UNet / transformer (inputs, conditioning, sizes); a
# smaller student may differ in everything else (widths, depths)
INTERFACE_KEYS = ("in_channels", "out_channels", "sample_size", "patch_size", "cross_attention_dim", "encoder_hid_dim",
                  "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                  "class_embed_type", "num_class_embeds", "num_embeds_ada_norm", "joint_attention_dim",
                  "pooled_projection_dim", "caption_channels", "text_dim", "image_dim", "added_kv_proj_dim",
                  "guidance_embeds")
# keys of INTERFACE_KEYS that are a width inside these classes: Sana's cross-attention reads the output of its
# own caption projection (caption_channels -> the inner width), so a narrower student narrows it too
INTERNAL_KEYS = {"SanaTransformer2DModel": ("cross_attention_dim",)}


def check_slot(spec: StudentSpec, network: dict, slot, scheduler, teacher: str) -> None:
    """The student must fit the pipeline it goes into: the network class of the pipeline's UNet /
    transformer, the same interface (``INTERFACE_KEYS``), and a process of the scheduler's kind. A
    two-expert student is checked by its experts' class and config."""
    if network.get("_class_name") == "PhasedExperts":
        network = {"_class_name": network.get("expert_class"), **(network.get("expert_config") or {})}
    want = type(slot).__name__
    if network.get("_class_name") != want:
        raise ExportError(f"the student is a {network.get('_class_name')} but {teacher}'s pipeline takes a {want}; "
                          f"export into the pipeline of the teacher it was distilled from")
    keys = [k for k in INTERFACE_KEYS if k not in INTERNAL_KEYS.get(want, ())]
    diffs = [f"{k}: {network.get(k)!r} (student) vs {slot.config.get(k)!r}" for k in keys
             if k in slot.config and network.get(k) != slot.config.get(k)]
    if diffs:
        raise ExportError(f"the student's {want} does not fit {teacher}'s: {'; '.join(diffs)}")
    kind = "flow" if is_flow_scheduler(type(scheduler).__name__, scheduler.config) else "vp"
    if spec.process["kind"] != kind:
        raise ExportError(f"the student was trained on a {spec.process['kind']} process but {teacher}'s scheduler "
                          f"({type(scheduler).__name__}) is {kind}")


def _call_kwargs(pipe, spec: StudentSpec, kwargs: dict, video_size=None) -> dict:
    """The call that reproduces the trained sampler; a video student's ``video_size`` (frames, height, width)
    from its run config."""
    name = type(pipe).__name__
    shape = spec.sample_shape
    if getattr(pipe, "vae_scale_factor_temporal", None) is not None:
        if video_size is None and shape is not None and len(shape) == 4:  # the video's pixels, from its latents
            tf, sf = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
            video_size = ((shape[1] - 1) * tf + 1, shape[2] * sf, shape[3] * sf)
        if video_size is not None:
            kwargs = {**kwargs, **dict(zip(("num_frames", "height", "width"), map(int, video_size)))}
    if name in UNCONDITIONAL_PIPELINES:
        if spec.guidance_scale is not None:
            raise ExportError(f"{name} has no guidance input for a w-conditioned student")
        return {k: v for k, v in kwargs.items() if k != "sigmas"}
    _, slot = find_denoiser(pipe)
    embedded = guidance_embedded(slot)  # FLUX.1-dev, HunyuanVideo: the pipeline's guidance_scale is the input's
    if embedded and spec.guidance_scale is None:
        raise ExportError(f"the student of a {type(slot).__name__} with a guidance input records no guidance scale "
                          f"to sample with (student_config.json: guidance_scale)")
    if is_packed(slot):  # Flux, Qwen-Image: any size; the student's (and its static shift's) is recorded
        if shape is not None and len(shape) == 3:  # latents (C, H, W) -> pixels
            size = {"height": shape[1] * pipe.vae_scale_factor, "width": shape[2] * pipe.vae_scale_factor}
        else:  # a folder from before the shape was recorded: the side its dynamic shift was resolved at
            seq = spec.process.get("image_seq_len")
            side = math.isqrt(int(seq)) if seq is not None else None
            size = {"height": 2 * side * pipe.vae_scale_factor, "width": 2 * side * pipe.vae_scale_factor} \
                if side is not None and side * side == seq else {}
        size["true_cfg_scale"] = 1.0  # their CFG (with a negative prompt) off: the student is the whole sampler
        if not embedded:  # their pipelines' guidance_scale is the embedded one only
            return {**kwargs, **size}
        return {**kwargs, **size, "guidance_scale": float(spec.guidance_scale)}
    # the student is the whole sampler: no classifier-free guidance on top unless it takes w itself (a
    # w-conditioned student); HunyuanVideoPipeline's guidance_scale is its network's embedded guidance, and
    # its classifier-free guidance (true_cfg_scale, with a negative prompt) is kept off
    if embedded and "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters:
        kwargs = {**kwargs, "true_cfg_scale": 1.0}
    return {**kwargs, "guidance_scale": float(spec.guidance_scale) if spec.guidance_scale is not None else 1.0}


def _save_lora(pipe, component: str, student_folder: Path, out: Path):
    """The LoRA adapters of a LoRA student, in the file format ``pipe.load_lora_weights`` reads."""
    from safetensors.torch import load_file

    src = student_folder / "lora" / "adapter_model.safetensors"
    if not src.is_file():
        raise ExportError(f"'{student_folder}' holds no LoRA adapters (lora/adapter_model.safetensors): the student "
                          f"was trained in full (student.lora_rank=0) or before LoRA files were written")
    if not hasattr(type(pipe), "save_lora_weights"):
        raise ExportError(f"{type(pipe).__name__} has no LoRA loader in diffusers; export the fused student instead")
    layers = load_file(str(src))
    kwargs = {f"{component}_lora_layers": layers, "safe_serialization": True}
    meta_key = f"{component}_lora_adapter_metadata"
    if meta_key in inspect.signature(type(pipe).save_lora_weights).parameters:  # keeps lora_alpha / rank
        kwargs[meta_key] = json.loads((src.parent / "adapter_config.json").read_text())
    type(pipe).save_lora_weights(out, **kwargs)


def export(source: str | Path, out: str | Path, *, teacher: str | None = None, use_ema: bool = False,
           lora: bool = False, dtype: torch.dtype | None = None, running_ok: bool = False,
           replace: bool = False) -> Path:
    """Write the pipeline folder ``out`` and return it. ``out`` must not exist yet, unless ``replace``
    (a run's own ``pipeline/``, swapped in whole once the new one is complete). ``running_ok``: the
    source run is the caller's own, exporting itself at its end (otherwise a run still training is
    refused)."""
    from diffusers import DiffusionPipeline  # imported here: loading diffusers' pipelines takes seconds

    source, out = Path(source), Path(out)
    if replace:
        recover_swap(out)  # an earlier export that died between its two renames
    elif out.exists():
        raise ExportError(f"export destination '{out}' already exists; choose a new folder (nothing was written)")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise ExportError(f"export destination '{out}': its folder cannot be created ('{ancestor}' is "
                          f"{'not a folder' if not ancestor.is_dir() else 'not writable'})")
    folder, run_cfg = _resolve_source(source, use_ema, running_ok)
    try:
        spec = StudentSpec.parse(_read(folder / SPEC_FILE, "json"), folder / SPEC_FILE)
    except InputError as exc:
        raise ExportError(str(exc)) from None
    net_config = _read(folder / "config.json", "json")
    network = net_config.get("_class_name")
    if not isinstance(network, str):
        raise ExportError(f"'{folder / 'config.json'}' names no network class (_class_name)")
    check_student_network(network, net_config, two_slots=True)  # checked against the pipeline once loaded
    if lora and network == "PhasedExperts":
        raise ExportError("--lora: a two-expert student is exported fused (one LoRA file loads into one network)")
    if lora and spec.sampler == "signal":
        raise ExportError("--lora: a BOOT student is exported with its timestep input folded away, which a LoRA on the "
                          "teacher cannot express; export it without --lora")
    tcfg = (run_cfg or {}).get("teacher") or {}
    if not isinstance(tcfg, dict):
        raise ExportError(f"'{source}': the run config's teacher section is not a mapping")
    if teacher is None:
        if tcfg.get("oracle") is not None:
            raise ExportError(f"'{source}' distilled the Gaussian-mixture oracle, which has no diffusers pipeline")
        teacher = tcfg.get("path")
        if teacher is None:
            raise ExportError(f"'{folder}' has no run config naming its teacher; pass the teacher (--teacher)")
        if not isinstance(teacher, str):
            raise ExportError(f"'{source / 'config.yaml'}': teacher.path {teacher!r} is not a pipeline folder or hub id")
    with quiet_text_encoder_type(teacher):
        pipe = DiffusionPipeline.from_pretrained(resolve_teacher_path(teacher), dtype=dtype)
    component, slot = find_denoiser(pipe)
    two_slots = second_expert_slot(type(pipe))
    if lora and two_slots and getattr(pipe, "transformer_2", None) is not None:
        raise ExportError(f"--lora: {teacher} has two experts ({component} and transformer_2); a LoRA file loads into "
                          f"one of them, so the teacher's pipeline with it would not sample as the student; export "
                          f"without --lora")
    check_student_network(network, net_config, two_slots)
    check_slot(spec, net_config, slot, pipe.scheduler, teacher)
    student = Student.load(folder)
    model = student.model
    if spec.sampler == "signal":  # BOOT: the network reads its input at one fixed time
        t = student.process.model_time(torch.tensor([spec.timesteps[0]]))
        try:
            model = time_frozen_copy(model, float(t[0]))
        except ValueError as exc:
            raise ExportError(f"BOOT student: {exc}") from None
    model = model.to(dtype) if dtype is not None else model
    pred = spec.prediction_type or student.process.prediction_type
    sched, kwargs = scheduler_for(spec, pipe.scheduler.config, pred, type(pipe).__name__, takes_sigmas(pipe))
    call = _call_kwargs(pipe, spec, kwargs, tcfg.get("video_size"))
    modules = {component: model, "scheduler": sched}
    if two_slots:  # WanPipeline: the student's two experts, or one network (no teacher's transformer_2 left behind)
        modules.update(expert_slots(model, spec, component))
        pipe.register_to_config(boundary_ratio=modules.pop("boundary_ratio"))
    pipe.register_modules(**modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out)  # what an export killed while writing here left
    tmp = temporary_name(out)  # this process's own: nothing of the user's is written over or deleted
    try:
        with writing(tmp, f"the pipeline '{out}'"):
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / SAMPLING_FILE).write_text(json.dumps({"call_kwargs": call, "student": json.loads((folder / SPEC_FILE).read_text())},
                                                    indent=2))
        if lora:
            _save_lora(pipe, component, folder, tmp / "lora")
        metrics = None
        if (folder.parent / "metrics.json").is_file():
            metrics = json.loads((folder.parent / "metrics.json").read_text())
        card = model_card(type(pipe).__name__, spec, call, str(teacher), lora, metrics,
                          teacher_license(resolve_teacher_path(teacher)),
                          video=getattr(pipe, "vae_scale_factor_temporal", None) is not None,
                          scheduler=type(sched).__name__)
        (tmp / "README.md").write_text(card)
        if replace:
            swap_in(tmp, out)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def takes_sigmas(pipe) -> bool:
    """Whether a pipeline's ``__call__`` passes ``sigmas`` to its scheduler (SD3 does, WanPipeline not)."""
    return "sigmas" in inspect.signature(type(pipe).__call__).parameters


def expert_slots(model, spec: StudentSpec, component: str) -> dict:
    """What goes into a two-expert pipeline (WanPipeline): a 2-step per-step-expert student as ``transformer``
    (step 0) and ``transformer_2`` (step 1) with the boundary between the two steps' times (the pipeline
    runs ``transformer`` at timesteps >= boundary_ratio * T), or one network and no second expert."""
    if type(unwrap(model)).__name__ != "PhasedExperts":
        return {"transformer_2": None, "boundary_ratio": None}
    if spec.process.get("kind") != "flow":
        raise ExportError("a two-expert student exports into WanPipeline's two slots only from a flow teacher")
    first, second = unwrap(model).experts
    t0, t1 = spec.timesteps
    return {component: first, "transformer_2": second, "boundary_ratio": (t0 + t1) / 2}


def sampling_kwargs(folder: str | Path) -> dict:
    """The call arguments an exported folder was written with (steps, guidance, sigmas)."""
    return json.loads((Path(folder) / SAMPLING_FILE).read_text())["call_kwargs"]


def check_exportable(distiller, teacher) -> None:
    """``train.export``: fail before training when the student will have no pipeline form."""
    student = distiller.student
    spec = student.spec
    net = unwrap(student.model)
    try:
        check_student_network(type(net).__name__, dict(net.config) if hasattr(net, "config") else None,
                              second_expert_slot(type(teacher.pipeline)))
        scheduler_for(spec, teacher.pipeline.scheduler.config, spec.prediction_type or teacher.process.prediction_type,
                      type(teacher.pipeline).__name__, takes_sigmas(teacher.pipeline))
    except ExportError as exc:
        raise ConfigError(f"train.export: {exc}") from exc


def export_run(run_dir: Path, teacher_path: str, use_ema: bool) -> Path:
    """``<run_dir>/pipeline``: the final student (its EMA when kept) in the teacher's diffusers
    pipeline (``train.export``), replacing an earlier export of this run only once the new one is
    complete."""
    final = export(run_dir, Path(run_dir) / EXPORT_DIR, teacher=teacher_path, use_ema=use_ema, running_ok=True,
                   replace=True)
    logger.info("exported the student as a diffusers pipeline: %s", final)
    return final


def add_arguments(parser) -> None:
    """The ``stepdistill export`` command's options."""
    parser.add_argument("source", type=Path, help="a run folder (train.output_dir) or a student folder")
    parser.add_argument("out", type=Path, help="the pipeline folder to write (must not exist)")
    parser.add_argument("--ema", action="store_true", help="export student_ema/ instead of student/")
    parser.add_argument("--lora", action="store_true", help="also write the LoRA adapters for pipe.load_lora_weights")
    parser.add_argument("--teacher", default=None, help="teacher pipeline folder or hub id (default: the run's)")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None, help="weights dtype (default: as trained)")


def run(args) -> str:
    out = export(args.source, args.out, teacher=args.teacher, use_ema=args.ema, lora=args.lora,
                 dtype=torch_dtype(args.dtype))
    return f"pipeline written to {out}; sample with {json.dumps(sampling_kwargs(out))}"
