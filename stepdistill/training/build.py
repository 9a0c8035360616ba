"""Everything a run is built from, in the order the trainer builds it: the checks that need no
teacher, the teacher (a diffusers pipeline, or the exact oracle with its fitted network), the batch
source, the distiller, and one :class:`~stepdistill.training.update.TrainableState` per trainable."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import RunConfig, from_dict, to_dict, torch_dtype
from ..data.batch import BatchSource
from ..data.cache import DataCache, cache_key
from ..data.files import folder_labels, load_images
from ..data.items import FileItems, read_items
from ..data.loading import IN_MEMORY_ITEMS, RealData, image_geometry, refuse_still_images
from ..data.sources import check_images, read_captions
from ..data.streaming import Stream, StreamData
from ..diffusion.context_parallel import CP_FAMILIES
from ..diffusion.denoiser import Denoiser, base_network, class_name, unwrap
from ..diffusion.process import FlowProcess, process_from_scheduler_config
from ..distillers.base import Context, Distiller
from ..distillers.common import check_init_class, init_network_class, refuse_cfg_on_embedded_guidance
from ..distillers.fake_store import check_fake_init_class, resolve_fake_init
from ..distillers.registry import get_method
from ..errors import ConfigError, InputError
from ..models.nets import MLPDenoiser
from ..models.oracle import fit_network
from ..models.oracle_layouts import oracle_mixture, resolve_oracle
from ..models.sharded_load import hub_snapshot, is_meta
from ..models.sharding import fully_sharded
from ..models.shared_lora import own_parameters
from ..models.student import networks
from ..models.teachers import (VIDEO_DENOISERS, Teacher, denoiser_class_name, guidance_embedded_folder, is_hub_id,
                               load_teacher, resolve_teacher_path)
from ..storage import load_or_make
from .distributed import broadcast_from_main
from .parallel import Parallel
from .update import TrainableState

ORACLE_NETWORK = "oracle_network"  # in the run folder: the MLP fitted to the oracle's exact predictions

logger = logging.getLogger("stepdistill")


def validate_inputs(cfg: RunConfig, num_processes: int = 1, strategy: str | None = None) -> type[Distiller]:
    """Everything that can be checked before the teacher is loaded; returns the method class. ``strategy``:
    the run's parallel strategy (``training.parallel.resolve_strategy``), where it is known."""
    method = get_method(cfg.method)
    options = from_dict(method.Options, cfg.method_args, "method_args")
    tc = cfg.teacher
    if tc.offload != "none" and strategy is not None and strategy != "fsdp":
        how = "one process" if strategy == "none" else f"train.parallel={strategy}"
        raise ConfigError(f"teacher.offload: {tc.offload} offloads the shards of a sharded teacher, and this run is not "
                          f"sharded ({how}); launch with an accelerate FSDP config (configs/accelerate/fsdp.yaml) or "
                          f"leave teacher.offload at none")
    process = oracle_process(resolve_oracle(tc.oracle)) if tc.oracle is not None else None
    pipeline = resolve_teacher_path(tc.path) if tc.path is not None else None
    if pipeline is not None:
        scheduler = Path(pipeline) / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():  # a local pipeline: its time range is known before anything is loaded
            try:
                process = process_from_scheduler_config(json.loads(scheduler.read_text()))
            except (ValueError, TypeError):
                process = None  # the pipeline load names what is wrong with it
    if process is not None:
        check_timesteps(cfg.student.timesteps, process)
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: '{out}' exists and is not a folder")
    groups = check_context_parallel(cfg, options, num_processes, pipeline)
    if cfg.train.batch_size % (groups * cfg.train.gradient_accumulation_steps):
        streams = f"num_processes ({num_processes})" if groups == num_processes else \
            f"the {groups} context-parallel groups (num_processes {num_processes} / train.context_parallel)"
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not divide by {streams} "
                          f"x gradient_accumulation_steps ({cfg.train.gradient_accumulation_steps})")
    if num_processes > 1 and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 loss scaling is not supported with several processes "
                          "(sharded gradients); use bf16")
    try:
        method.check_config(cfg, options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if pipeline is not None and guidance_embedded_folder(pipeline):  # a hub id: checked once it is loaded
        refuse_cfg_on_embedded_guidance(method, options, denoiser_class_name(pipeline))
    teacher_class = MLPDenoiser.__name__ if pipeline is None else denoiser_class_name(pipeline)
    if cfg.student.init is not None:
        if teacher_class is None:  # a hub id: checked once the teacher is loaded
            init_network_class(cfg.student.init)
        else:
            check_init_class(cfg.student.init, teacher_class)
    # DisBack's trained fake score: its class now, its configuration and weights once the teacher is loaded
    if getattr(options, "fake_init", None) is not None and teacher_class is not None:
        try:
            check_fake_init_class(resolve_fake_init(options.fake_init), teacher_class)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if cfg.data.prompts is not None:
        read_captions(cfg.data.prompts, cfg.data, cfg.data.skip_bad_items)
    if cfg.data.images is not None:
        name = denoiser_class_name(pipeline) if pipeline is not None else None
        if name in VIDEO_DENOISERS:
            refuse_still_images(tc.path, f"its network is a {name}")
        check_images(cfg.data)
    if cfg.train.export and tc.path is None:
        raise ConfigError("train.export: the Gaussian-mixture oracle (teacher.oracle) has no diffusers pipeline to "
                          "export into")
    known = method.trainable_names(cfg, options)
    for name in cfg.optim:
        if name not in known:
            raise ConfigError(f"optim.{name}: method {cfg.method} has no trainable '{name}' (it has {list(known)})")
    return method


def check_context_parallel(cfg: RunConfig, options, num_processes: int, pipeline) -> int:
    """``train.context_parallel`` against the launch, the teacher and the method; returns the number of
    groups of processes that draw their own batches (``num_processes`` without context parallelism)."""
    k = cfg.train.context_parallel
    if k == 1:
        return num_processes
    if num_processes % k or num_processes == 1:
        raise ConfigError(f"train.context_parallel: {k} processes per sample need a launch whose number of processes "
                          f"is a multiple of {k} (this one has {num_processes})")
    if cfg.teacher.oracle is not None:
        raise ConfigError("train.context_parallel: the Gaussian-mixture oracle's networks have no token sequence to "
                          "split; set it to 1")
    if pipeline is not None:  # a hub id: checked once loaded (check_context_parallel_teacher)
        refuse_without_plan(denoiser_class_name(pipeline))
    if getattr(options, "gan", False):
        raise ConfigError("train.context_parallel: method_args.gan=true: the GAN head reads the fake score's features, "
                          "which context parallelism splits over the processes; set method_args.gan=false or "
                          "train.context_parallel=1")
    return num_processes // k


def check_context_parallel_teacher(cfg: RunConfig, teacher: Teacher) -> None:
    """Once the teacher is loaded (a hub id's class is known only then): its family has a plan."""
    if cfg.train.context_parallel > 1:
        refuse_without_plan(class_name(base_network(teacher.denoiser.model)))


def refuse_without_plan(name: str | None) -> None:
    """One line for a network class (None: not known yet) that has no context-parallel plan."""
    if name is not None and name not in CP_FAMILIES:
        raise ConfigError(f"train.context_parallel: {name} has no context-parallel plan; the families with one are "
                          f"{', '.join(CP_FAMILIES)}")


def oracle_process(spec):
    """The noise process of the Gaussian-mixture oracle (``teacher.oracle``)."""
    if spec.process == "flow":
        return FlowProcess(shift=spec.shift)
    from diffusers import DDIMScheduler

    return process_from_scheduler_config(DDIMScheduler(beta_schedule=spec.beta_schedule))


def build_teacher(cfg: RunConfig, device, run_dir: Path, is_main: bool, wait,
                  parallel: Parallel | None = None) -> tuple[Teacher, Denoiser, object]:
    """(teacher, init denoiser, oracle-or-None). For the oracle the init network is an MLP fitted to
    the exact predictions, cached in the run folder so that a resume starts from the same one. Under
    ``fsdp`` the teacher's network is built on the meta device and sharded, each rank reading its own
    shards (``models/sharded_load.py``), and the copies made of it later are sharded alike."""
    tc = cfg.teacher
    if tc.oracle is None:
        sharded = parallel is not None and parallel.strategy == "fsdp"
        if sharded and is_hub_id(tc.path):  # the main process downloads it; the others then read the cache
            if is_main:
                hub_snapshot(tc.path, tc.allow_remote_code)
            wait()
        teacher = load_teacher(tc.path, dtype=torch_dtype(tc.dtype), device=device, null_label=tc.null_label,
                               allow_remote_code=tc.allow_remote_code, video_size=tc.video_size, sample_size=tc.sample_size,
                               guidance=tc.guidance, meta=sharded)
        if sharded and is_meta(teacher.denoiser.model):
            parallel.shard_teacher(teacher.denoiser.model, tc.offload == "cpu")
        return teacher, teacher.denoiser, None
    spec = resolve_oracle(tc.oracle)  # a random layout's drawn dimension, modes and process
    gmm = oracle_mixture(spec)
    process = oracle_process(spec)
    teacher = Teacher.from_oracle(gmm, process)
    if not spec.conditional:
        teacher.null_label = None
    folder = run_dir / ORACLE_NETWORK
    pred = "flow" if process.kind == "flow" else "v_prediction"
    key = {**to_dict(spec), "seed": cfg.train.seed}  # what the fitted network depends on
    if is_main:
        load_or_make(folder, key, what="the oracle's fitted network", load=MLPDenoiser.from_pretrained,
                     make=lambda: fit_network(gmm, process, steps=spec.network_steps, hidden=spec.hidden,
                                              depth=spec.depth, conditional=spec.conditional, seed=cfg.train.seed)[0],
                     save=lambda net, tmp: net.save_pretrained(tmp))
    wait()
    net = MLPDenoiser.from_pretrained(folder).to(device).eval().requires_grad_(False)
    return teacher, Denoiser(net, process, pred), gmm


def build_source(cfg: RunConfig, teacher: Teacher, oracle, device, seed: int, rank: int = 0,
                 streams: int | None = None) -> BatchSource:
    """The batch source: captions, real images with their own captions or class labels (a small set
    encoded into the denoiser's space once; a large one per batch, ``loading.RealData``), a data
    cache (``data.cache``), the oracle."""
    text = teacher.conditional and teacher.null_label is None
    classes = teacher.null_label if teacher.conditional and teacher.null_label is not None else None
    d = cfg.data
    if d.images is not None and teacher.video:
        refuse_still_images(teacher.name, "latents " + " x ".join(map(str, teacher.sample_shape)))
    prompts = read_captions(d.prompts, d, d.skip_bad_items) if d.prompts is not None else None
    items = read_items(d, text, classes) if d.images is not None and not d.streaming else None
    size, channels = image_geometry(teacher)
    stream = None
    if d.streaming:  # one part of the stream per data rank (a context-parallel group reads one part)
        num = streams or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        stream = StreamData(Stream(d, text, classes, seed, rank, num), teacher, size=size, channels=channels,
                            crop=d.crop, seed=seed, device=device)
    cache = None
    if d.cache is not None:
        cache = DataCache(d.cache, cache_key(cfg, teacher, prompts if text else None, items, size))
    x0 = real = captions = labels = None
    small = isinstance(items, FileItems) and len(items) <= IN_MEMORY_ITEMS and d.crop == "center"
    if items is not None and cache is None and small:  # encoded once, held (random crops go per batch)
        files = [Path(f) for f in items.files]
        captions = None if items.captions is None else items.captions.values
        images, kept = load_images(files, size, channels, d.skip_bad_items)
        if len(kept) < len(files):
            logger.warning("data.images: skipped %d unreadable of %d images (data.skip_bad_items=true)",
                           len(files) - len(kept), len(files))
        if captions is not None:
            keep = set(kept)
            captions = [c for f, c in zip(files, captions) if f in keep]
        if classes is not None:
            labels = folder_labels(kept, classes)
        x0 = torch.cat([teacher.encode_images(images[i:i + 64].to(device), torch.Generator().manual_seed(seed + i))
                        for i in range(0, len(images), 64)]).to(device)
    elif items is not None:
        real = RealData(items, teacher, size=size, channels=channels, crop=d.crop, seed=seed, skip_bad=d.skip_bad_items,
                        num_workers=d.num_workers, device=device, cache=cache)
        captions, labels = items.captions, items.labels
    source = BatchSource(teacher, seed=seed, device=device, prompts=prompts, x0_data=x0, x0_captions=captions,
                         x0_labels=labels, oracle=oracle, rank=rank, real=real, cache=cache, stream=stream)
    if source.fully_cached and torch.device(device).type != "cpu":
        teacher.offload_text_encoders()  # every prompt's states are cached: the encoders leave the accelerator
    return source


def check_timesteps(timesteps, process) -> None:
    """``student.timesteps`` must lie in the teacher's sampling range, whatever the method."""
    if timesteps is None:
        return
    lo, hi = (0.0, process.t_max) if process.kind == "vp" else (0.0, 1.0)
    for t in timesteps:
        if not (lo <= t <= hi) or (process.kind == "flow" and t == 0.0):
            what = "diffusers timesteps of its scheduler" if process.kind == "vp" else "flow times t, 0 excluded"
            raise ConfigError(f"student.timesteps: {t:g} is outside the teacher's range [{lo:g}, {hi:g}] ({what})")


def build_distiller(method: type[Distiller], ctx: Context, options) -> Distiller:
    """The method's distiller; the checks its constructor makes become one-line config errors."""
    check_timesteps(ctx.config.student.timesteps, ctx.init.process)
    if ctx.init.embedded_guidance is not None:
        refuse_cfg_on_embedded_guidance(method, options, type(unwrap(ctx.init.model)).__name__)
    try:
        return method(ctx, options)
    except InputError:
        raise  # already names its input (a data problem met building the method stays a DataError)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device supports it (about 9x faster than foreach on CPU)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def make_optimizer(kind: str, params, fused: bool = True, **kwargs) -> torch.optim.Optimizer:
    """``train.optimizer``: torch's AdamW, or torchao's AdamW with 8-bit moments (``adamw8bit``); for
    bf16 weights, torchao's AdamW that rounds the bf16 update stochastically (an update smaller than
    bf16's resolution is kept on average instead of lost)."""
    bf16 = any(p.dtype == torch.bfloat16 for p in params)
    if kind == "adamw8bit":
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(params, bf16_stochastic_round=bf16, **kwargs)
    elif bf16:
        from torchao.optim import _AdamW

        opt = _AdamW(params, bf16_stochastic_round=True, **kwargs)
    elif not fused:  # sharded parameters (DTensors)
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    else:
        return adamw(params, **kwargs)
    opt.register_load_state_dict_post_hook(_tensor_lr)
    return opt


def _tensor_lr(optimizer) -> None:
    """torchao's optimisers keep each group's learning rate as a tensor; a loaded state gives floats."""
    for group in optimizer.param_groups:
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """diffusers' gradient checkpointing on a network (every expert of a per-phase student); a network
    without it is refused naming its class."""
    for net in networks(model):
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {type(net).__name__} has no gradient checkpointing")
        net.enable_gradient_checkpointing()


def schedule(cfg: RunConfig, opt, distiller: Distiller, name: str):
    """The learning-rate schedule of trainable ``name``: diffusers' ``train.lr_schedule`` over the loop's
    iterations times the method's own factor (``distiller.lr_factor``). It steps once per iteration,
    whatever the number of processes."""
    from diffusers.optimization import get_scheduler

    base = get_scheduler(cfg.train.lr_schedule, opt, num_warmup_steps=cfg.train.lr_warmup_steps,
                         num_training_steps=cfg.train.max_steps).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: base(i) * distiller.lr_factor(name, i))


def build_trainables(accelerator, distiller: Distiller, cfg: RunConfig, parallel: Parallel,
                     teacher: Teacher) -> dict[str, TrainableState]:
    """Per trainable: the module (identical on every rank; sharded under a parallel strategy, the
    frozen teacher too under fsdp), its optimiser (AdamW; ``optim.<name>`` overrides the method's
    settings), its learning-rate schedule and, for student trainables with ``train.ema_decay``, an EMA."""
    acc = accelerator
    trainables = distiller.trainables()
    declared = distiller.trainable_names(cfg, distiller.options)
    if sorted(trainables) != sorted(declared):
        raise ConfigError(f"method {cfg.method}: trainables() returned {sorted(trainables)} but trainable_names() "
                          f"declares {sorted(declared)}")
    states = {}
    for name, tr in trainables.items():
        oc = cfg.optim.get(name)
        lr = oc.lr if oc and oc.lr else tr.lr
        if not any(p.requires_grad for p in tr.module.parameters()):
            raise ConfigError(f"trainable '{name}' has no parameters that require grad")
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(tr.module if not isinstance(tr.module, torch.nn.ModuleDict) else tr.module["net"])
        if parallel.active:
            # sharded in place (the distiller keeps its reference); accelerate only places it. A copy of a
            # sharded teacher is sharded already, its parts read alike on every rank (the same seed for LoRA)
            module = tr.module
            if not fully_sharded(module):  # (moving a sharded network would copy its shards again)
                module = module.to(acc.device)
                broadcast_from_main(acc, module)  # every rank starts from rank 0's weights (not its shards)
                parallel.shard(module, f"trainable '{name}'")
        else:
            module = acc.prepare_model(tr.module, device_placement=True, evaluation_mode=True)
        module.train()
        # what this trainable's updates train (LoRA: the adapters only), fixed before any requires_grad toggling
        params = [p for p in own_parameters(module) if p.requires_grad]  # (a view of a shared base: its adapter's)
        betas = tuple(oc.betas) if oc and oc.betas else (tr.betas or (0.9, 0.999))
        decay = oc.weight_decay if oc and oc.weight_decay is not None else cfg.train.weight_decay
        opt = make_optimizer(cfg.train.optimizer, params, lr=lr, betas=betas, weight_decay=decay,
                             fused=not parallel.active)
        # the schedule runs on the loop's iteration, for every trainable alike, whether or not the trainable
        # is updated in that iteration (as DMD2's own loop does): a fake score updated N times per student
        # update anneals with the student, not N times faster. The loop steps it (accelerate does not: it
        # would step a prepared schedule once per process), and checkpoints hold its state.
        sched = schedule(cfg, opt, distiller, name)
        if not parallel.active:
            opt = acc.prepare_optimizer(opt)  # one process: nothing to reduce, no wrapper
        if tr.on_prepared is not None:
            tr.on_prepared(module)
        states[name] = TrainableState(name, tr, module, opt, sched, params, lr)
    teacher_net = getattr(teacher.denoiser, "model", None)
    if parallel.strategy == "fsdp" and isinstance(teacher_net, torch.nn.Module) and any(True for _ in teacher_net.parameters()) \
            and not fully_sharded(teacher_net):
        parallel.shard(teacher_net.to(acc.device), "the teacher", cfg.teacher.offload == "cpu")
    # an EMA of each student trainable (several for a student made of per-phase experts), stepped after
    # that trainable's own updates
    if cfg.train.ema_decay:
        from diffusers.training_utils import EMAModel

        for st in states.values():
            if st.trainable.is_student:
                st.ema = EMAModel(st.params, decay=cfg.train.ema_decay)
                st.ema.to(acc.device, dtype=torch.float32)  # a bf16 average would not move: its steps are below bf16's resolution
    return states
