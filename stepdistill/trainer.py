"""The Accelerate loop that drives any distiller.

Per iteration, for each phase the distiller names (e.g. fake score, then student, TTUR by
``method_args.fake_updates``): only that phase's trainable requires grad, micro-batches accumulate gradients,
the ranks' gradients are averaged (one flat all-reduce; the networks are not DDP-wrapped because
distillers call them in many ways within a phase), gradients are clipped, the phase's optimiser
steps, and the student's EMA follows its updates. Checkpoints are ``accelerator.save_state`` folders whose hooks also write
diffusers model folders; re-running the same command resumes from the latest complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig, dump_config, from_dict, to_dict
from .data import BatchSource, DataError, list_images, load_images, read_prompts
from .denoiser import Denoiser, unwrap
from .distillers.base import Context, get_method
from .generator import save_lora_adapters
from .state_io import load_state, save_state
from .teachers import Teacher, load_teacher

logger = logging.getLogger("stepdistill")
CKPT_PREFIX = "checkpoint-"
INTERRUPTED_EXIT = 3  # exit status of a run stopped early, with a checkpoint to resume from
MANIFEST = "manifest.json"
TRAINING_STATE = "training_state"  # loop counters, distiller state, EMA (JSON + safetensors)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# checks that need no teacher
# ------------------------------------------------------------------------------------------------
def validate_inputs(cfg: RunConfig, num_processes: int = 1) -> type:
    """Everything that can be checked before the teacher is loaded; returns the method class."""
    try:
        method = get_method(cfg.method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    from_dict(method.Options, cfg.method_args, "method_args")
    tc = cfg.teacher
    if tc.path is not None:
        from .teachers import _resolve_path

        _resolve_path(tc.path)
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: '{out}' exists and is not a folder")
    if cfg.train.batch_size % (num_processes * cfg.train.gradient_accumulation_steps):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not divide by num_processes ({num_processes}) "
                          f"x gradient_accumulation_steps ({cfg.train.gradient_accumulation_steps})")
    if cfg.data.prompts is not None:
        read_prompts(cfg.data.prompts, cfg.data.skip_bad_items)
    if cfg.data.images is not None:
        list_images(cfg.data.images)
    if cfg.train.export and tc.path is None:
        raise ConfigError("train.export: the Gaussian-mixture oracle (teacher.oracle) has no diffusers pipeline to "
                          "export into")
    known = getattr(method, "TRAINABLES", None)  # plug-ins without it are checked once built
    for name in cfg.optim:
        if known is not None and name not in known:
            raise ConfigError(f"optim.{name}: method {cfg.method} has no trainable '{name}' (it has {list(known)})")
    return method


# ------------------------------------------------------------------------------------------------
# teacher and data
# ------------------------------------------------------------------------------------------------
def build_teacher(cfg: RunConfig, device, run_dir: Path, is_main: bool, wait) -> tuple[Teacher, Denoiser, object]:
    """(teacher, init denoiser, oracle-or-None). For the oracle the init network is an MLP fitted to
    the exact predictions, cached in the run folder so that a resume starts from the same one."""
    tc = cfg.teacher
    if tc.oracle is None:
        teacher = load_teacher(tc.path, dtype=DTYPES[tc.dtype], device=device, null_label=tc.null_label,
                               allow_remote_code=tc.allow_remote_code)
        return teacher, teacher.denoiser, None
    from .nets import MLPDenoiser
    from .oracle import GaussianMixture, fit_network
    from .process import FlowProcess, process_from_scheduler_config

    oc = tc.oracle
    gmm = GaussianMixture.ring(oc.components, oc.dim, oc.radius, oc.std)
    if oc.process == "flow":
        process = FlowProcess(shift=oc.shift)
    else:
        from diffusers import DDIMScheduler

        process = process_from_scheduler_config(DDIMScheduler(beta_schedule=oc.beta_schedule))
    teacher = Teacher.from_oracle(gmm, process)
    if not oc.conditional:
        teacher.null_label = None
    cache = run_dir / "oracle_network"
    pred = "flow" if process.kind == "flow" else "v_prediction"
    if is_main and not (cache / "config.json").is_file():
        net, pred = fit_network(gmm, process, steps=oc.network_steps, hidden=oc.hidden, depth=oc.depth,
                                conditional=oc.conditional, seed=cfg.train.seed)
        tmp = run_dir / "oracle_network.tmp"
        net.save_pretrained(tmp)
        os.replace(tmp, cache)
    wait()
    net = MLPDenoiser.from_pretrained(cache).to(device).eval().requires_grad_(False)
    return teacher, Denoiser(net, process, pred), gmm


def build_source(cfg: RunConfig, teacher: Teacher, oracle, device, seed: int, rank: int = 0) -> BatchSource:
    prompts = read_prompts(cfg.data.prompts, cfg.data.skip_bad_items) if cfg.data.prompts is not None else None
    x0 = None
    if cfg.data.images is not None:
        files = list_images(cfg.data.images)
        scale = getattr(teacher.pipeline, "vae_scale_factor", 1) if teacher.vae is not None else 1
        channels = teacher.vae.config.in_channels if teacher.vae is not None else teacher.sample_shape[0]
        images, kept = load_images(files, teacher.sample_shape[-1] * scale, channels, cfg.data.skip_bad_items)
        if len(kept) < len(files):
            logger.warning("data.images: skipped %d unreadable of %d images (data.skip_bad_items=true)",
                           len(files) - len(kept), len(files))
        x0 = torch.cat([teacher.encode_images(images[i:i + 64].to(device), torch.Generator().manual_seed(seed + i))
                        for i in range(0, len(images), 64)]).to(device)
    return BatchSource(teacher, seed=seed, device=device, prompts=prompts, x0_data=x0, oracle=oracle, rank=rank)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that were completed (renamed into place with a manifest), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        suffix = p.name[len(CKPT_PREFIX):]
        if p.name.startswith(CKPT_PREFIX) and suffix.isdigit() and (p / MANIFEST).is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path, step: int, config: dict, num_processes: int) -> dict:
    files = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    return {"step": step, "config": config, "num_processes": num_processes, "files": files}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing, truncated or altered files), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    for rel, meta in files.items():
        f = folder / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    return None


# train.* keys that may change between a run and its resume (logged); every other difference is refused
RESUME_SAFE = ("train.output_dir", "train.max_steps", "train.checkpoint_every", "train.checkpoints_total_limit",
               "train.log_every", "train.validate_every", "train.num_validation", "train.report_to", "train.progress",
               "train.verify_rank_sync", "train.max_nonfinite_steps", "train.export")
EXPORT_DIR = "pipeline"  # train.export: the final student as a diffusers pipeline folder


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))  # an empty mapping adds nothing
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between a checkpoint's config and this run's, as 'key: old -> new'."""
    a, b = _flat(old), _flat(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        last = key.rsplit(".", 1)[-1]
        is_lr = key.split(".")[0] in ("optim", "method_args") and (last == "lr" or last.endswith("_lr"))
        (safe if key in RESUME_SAFE or is_lr else unsafe).append(line)
    return unsafe, safe


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient; the message names the last good checkpoint."""


@dataclass
class _Counter:
    """Loop state saved with the checkpoint (accelerate custom object)."""

    step: int = 0
    nonfinite_skipped: int = 0  # steps whose update was skipped for a NaN/inf loss or gradient

    def state_dict(self):
        return {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        tcfg = cfg.train
        self.run_dir = Path(tcfg.output_dir)
        log_with = None if tcfg.report_to == "none" else tcfg.report_to
        self.accelerator = accelerator or Accelerator(
            # without CUDA, cpu=True is what makes a multi-process launch use gloo (MULTI_CPU)
            cpu=not torch.cuda.is_available(),
            mixed_precision=tcfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        acc = self.accelerator
        self.method_cls = validate_inputs(cfg, acc.num_processes)
        self.options = from_dict(self.method_cls.Options, cfg.method_args, "method_args")
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        # random initialisations (LoRA adapters, GAN heads) are the same on every rank and every run;
        # per-step randomness comes from stepdistill.data's per-(step, rank) streams instead
        from accelerate.utils import set_seed

        set_seed(tcfg.seed)
        self.teacher, init, oracle = build_teacher(cfg, acc.device, self.run_dir, acc.is_main_process, acc.wait_for_everyone)
        self.oracle = oracle
        self.source = build_source(cfg, self.teacher, oracle, acc.device, tcfg.seed, acc.process_index)
        ctx = Context(self.teacher, init, self.source, cfg, acc.device)
        try:
            self.distiller = self.method_cls(ctx, self.options)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if tcfg.export:
            self._check_exportable()
        self._setup_optim()
        self.counter = _Counter()  # loop, distiller and EMA state: see _training_state (no pickle)
        acc.register_save_state_pre_hook(self._save_hook)

    def _check_exportable(self):
        """train.export: fail before training when the student will have no pipeline form."""
        from .export import ExportError, check_student_network, scheduler_for

        student = self.distiller.student
        spec = student.spec
        try:
            check_student_network(type(unwrap(student.model)).__name__)
            scheduler_for(spec, self.teacher.pipeline.scheduler.config, spec.prediction_type or self.teacher.process.prediction_type)
        except ExportError as exc:
            raise ConfigError(f"train.export: {exc}") from exc

    # -- optimisers, EMA --------------------------------------------------------------------------
    def _setup_optim(self):
        acc, cfg = self.accelerator, self.cfg
        self.trainables = self.distiller.trainables()
        unknown = set(cfg.optim) - set(self.trainables)
        if unknown:
            raise ConfigError(f"optim.{sorted(unknown)[0]}: method {cfg.method} has no trainable of that name "
                              f"(it has {sorted(self.trainables)})")
        self.optimizers, self.schedulers, self.modules, self.names_by_id, self.train_params = {}, {}, {}, {}, {}
        self.lrs = {}
        self.emas = {}
        for name, tr in self.trainables.items():
            oc = cfg.optim.get(name)
            lr = oc.lr if oc and oc.lr else tr.lr
            self.lrs[name] = lr
            params = [p for p in tr.module.parameters() if p.requires_grad]
            if not params:
                raise ConfigError(f"trainable '{name}' has no parameters that require grad")
            betas = tuple(oc.betas) if oc and oc.betas else (tr.betas or (0.9, 0.999))
            opt = _adamw(params, lr=lr, betas=betas, weight_decay=oc.weight_decay if oc else 0.0)
            from diffusers.optimization import get_scheduler

            # the schedule runs on the loop's step, for every trainable alike, whether or not the trainable
            # is updated in that step (as DMD2's own loop does): a fake score updated N times per student
            # update anneals with the student, not N times faster. accelerate steps a prepared scheduler
            # once per process, hence the lengths in process-steps (as in the diffusers training scripts).
            sched = get_scheduler(cfg.train.lr_schedule, opt,
                                  num_warmup_steps=cfg.train.lr_warmup_steps * acc.num_processes,
                                  num_training_steps=cfg.train.max_steps * acc.num_processes)
            # no DDP wrapper: distillers call their networks in many ways per phase (frozen inside other
            # phases, several forwards per backward), so gradients are averaged explicitly instead
            module = acc.prepare_model(tr.module, device_placement=True, evaluation_mode=True).train()
            opt, sched = acc.prepare(opt, sched)
            self.schedulers[name] = sched
            if tr.on_prepared is not None:
                tr.on_prepared(module)
            self.modules[name], self.optimizers[name] = module, opt
            self.names_by_id[id(unwrap(module))] = name
            # what this phase trains (LoRA: the adapters only), fixed before any requires_grad toggling
            self.train_params[name] = [p for p in unwrap(module).parameters() if p.requires_grad]
            self._broadcast_from_main(unwrap(module))
        # an EMA of each student trainable (several for a student made of per-phase experts), stepped
        # after that trainable's own updates
        if cfg.train.ema_decay:
            from diffusers.training_utils import EMAModel

            for name, tr in self.trainables.items():
                if tr.is_student:
                    self.emas[name] = EMAModel(self.train_params[name], decay=cfg.train.ema_decay)
                    self.emas[name].to(acc.device)

    def _set_phase(self, phase: str):
        """Only the phase's trainable requires grad (others are used frozen inside the phase)."""
        for name in self.modules:
            for p in self.train_params[name]:
                p.requires_grad_(name == phase)

    # -- checkpoint hooks (diffusers folders beside accelerate's state) ----------------------------
    def _save_hook(self, models, weights, output_dir):
        if not self.accelerator.is_main_process:
            return
        for model in models:
            m = unwrap(model)
            name = self.names_by_id.get(id(m))
            if name and hasattr(m, "save_pretrained") and not getattr(m, "peft_config", None):
                m.save_pretrained(os.path.join(output_dir, name), safe_serialization=True)
        if hasattr(self.distiller, "student"):
            self.distiller.student.spec.save(os.path.join(output_dir, "student"))

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoint-<step>.tmp``, add its manifest, then rename it into place: a checkpoint is
        visible only once complete, and older ones are deleted (to the limit) only after that."""
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        final = root / f"{CKPT_PREFIX}{step}"
        tmp = root / f"{CKPT_PREFIX}{step}.tmp"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        self.counter.step = step
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_state(self._training_state(), tmp, TRAINING_STATE)
            manifest = _manifest(tmp, step, self.resolved_config(), acc.num_processes)
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if final.exists():  # the same step saved again (e.g. a resumed run): keep it until replaced
                old = root / f"{CKPT_PREFIX}{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            limit = self.cfg.train.checkpoints_total_limit
            if limit is not None:
                for stale in list_checkpoints(self.run_dir)[:-limit]:
                    doomed = stale.with_name(stale.name + ".del")  # invisible first, then deleted
                    os.replace(stale, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resolved_config(self) -> dict:
        """The run config with method_args as the method resolves them (defaults filled in)."""
        return {**self.cfg.to_dict(), "method_args": to_dict(self.options)}

    def _training_state(self) -> dict:
        state = {"loop": self.counter.state_dict()}
        if hasattr(self.distiller, "state_dict"):
            state["distiller"] = self.distiller.state_dict()
        if self.emas:
            state["ema"] = {name: ema.state_dict() for name, ema in self.emas.items()}
        return state

    def _load_training_state(self, state: dict):
        self.counter.load_state_dict(state["loop"])
        if "distiller" in state:
            self.distiller.load_state_dict(state["distiller"])
        saved = state.get("ema") or {}
        if "shadow_params" in saved:  # written before students could have several trainables
            saved = {name: saved for name in self.emas} if len(self.emas) == 1 else {}
        for name, ema in self.emas.items():
            if name not in saved:
                raise ConfigError(f"resume: the checkpoint holds no EMA of trainable '{name}' (train.ema_decay was off "
                                  f"or the method's trainables differ); use a new train.output_dir")
            ema.load_state_dict(saved[name])
            ema.to(self.accelerator.device)

    def latest_good_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; broken ones are skipped with a warning."""
        for ckpt in reversed(list_checkpoints(self.run_dir)):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            logger.warning("skipping checkpoint %s: %s; trying the previous one", ckpt, problem)
        return None

    def resume(self) -> int:
        root = self.run_dir / "checkpoints"
        if self.accelerator.is_main_process and root.is_dir():  # saves, renames, deletions that never finished
            for leftover in root.glob(f"{CKPT_PREFIX}*.old"):
                step_dir = root / leftover.name[:-len(".old")]
                if not step_dir.exists():  # killed between the two renames: the old copy is the good one
                    os.replace(leftover, step_dir)
            for leftover in list(root.glob(f"{CKPT_PREFIX}*.tmp")) + list(root.glob(f"{CKPT_PREFIX}*.del")) + \
                    list(root.glob(f"{CKPT_PREFIX}*.old")):
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        latest = self.latest_good_checkpoint()
        if latest is None:
            return 0
        manifest = json.loads((latest / MANIFEST).read_text())
        unsafe, safe = config_changes(manifest["config"], self.resolved_config())
        if unsafe:
            raise ConfigError(f"resume: {latest} was written with a different config: {'; '.join(unsafe)}. Restore "
                              f"those values or use a new train.output_dir")
        if manifest["num_processes"] != self.accelerator.num_processes:
            raise ConfigError(f"resume: {latest} was written by {manifest['num_processes']} processes, this run has "
                              f"{self.accelerator.num_processes}; per-rank data streams would differ, so the result "
                              f"would not equal an uninterrupted run. Launch with --num_processes "
                              f"{manifest['num_processes']} or use a new train.output_dir")
        self.accelerator.load_state(str(latest))
        self._load_training_state(load_state(latest, TRAINING_STATE))
        if safe:
            logger.warning("resuming from %s with changed settings: %s", latest, "; ".join(safe))
            self._apply_learning_rates()
        logger.info("resumed from %s (step %d)", latest, self.counter.step)
        return self.counter.step

    def _apply_learning_rates(self):
        """After loading a checkpoint, use this run's learning rates (the schedule's position is kept)."""
        for name, sched in self.schedulers.items():
            inner = getattr(sched, "scheduler", sched)
            lr = self.lrs[name]
            inner.base_lrs = [lr for _ in inner.base_lrs]
            for group, fn in zip(inner.optimizer.param_groups, inner.lr_lambdas):
                group["initial_lr"] = lr
                group["lr"] = lr * fn(inner.last_epoch)

    # -- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        from .evaluation.grids import save_sample_figure

        acc = self.accelerator
        if not acc.is_main_process:
            return {}
        n = self.cfg.train.num_validation
        student = self.distiller.student
        den = Denoiser(unwrap(student.model), student.process, student.denoiser.prediction_type)
        b = self.source.batch(step=-10**9, rank=0, size=n)
        noise = b.randn(n, *self.teacher.sample_shape)
        with self.ema_weights(), acc.autocast():
            x = student.sample(noise, b.cond, generator=torch.Generator().manual_seed(self.cfg.train.seed), denoiser=den)
        metrics = {}
        if self.oracle is not None:
            ev = self.oracle.evaluate(x, labels=b.labels)
            metrics = {"val/energy": ev["energy"], "val/floor": ev["floor"], "val/min_mode_mass": ev["min_mode_mass"]}
        images = self.teacher.decode(x)
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        save_sample_figure(images, path, oracle=self.oracle, labels=b.prompts or (None if b.labels is None else b.labels.tolist()))
        self._log_image(path, step)
        return metrics

    @contextlib.contextmanager
    def ema_weights(self):
        """The student holds its EMA weights inside the block (no-op without EMA)."""
        for name, ema in self.emas.items():
            ema.store(self.train_params[name])
            ema.copy_to(self.train_params[name])
        try:
            yield
        finally:
            for name, ema in self.emas.items():
                ema.restore(self.train_params[name])

    def _log_image(self, path: Path, step: int):
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", arr, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"samples": wandb.Image(arr)}, step=step)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        tcfg = cfg.train
        start = self.resume()  # before anything is written: a refused resume leaves the run folder as it was
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if acc.trackers == [] and tcfg.report_to != "none":
            acc.init_trackers("stepdistill", config={"method": cfg.method, "steps": tcfg.max_steps})
        micro = tcfg.batch_size // (acc.num_processes * tcfg.gradient_accumulation_steps)
        bar = tqdm(total=tcfg.max_steps, initial=start, disable=not (acc.is_main_process and tcfg.progress),
                   desc=f"{cfg.method}", dynamic_ncols=True)
        history = []
        t_last = time.time()
        window: dict[str, list[float]] = {}  # every phase's values since the last log line
        in_a_row = 0  # consecutive steps skipped for non-finite values
        stop_after = int(os.environ.get("STEPDISTILL_STOP_AFTER", 0))  # tests: a deterministic interruption
        with self._preemption_signals() as stop_requested:
            for step in range(start, tcfg.max_steps):
                skipped = None
                for name in getattr(self.distiller, "fresh_optimizers", lambda s: [])(step):
                    self.optimizers[name].state.clear()  # re-initialised weights start without old moments
                for phase in self.distiller.phases(step):
                    values, finite = self._run_phase(phase, step, micro)
                    if not finite:  # no optimiser, scheduler or EMA update; the step's later phases are dropped
                        skipped = phase
                        break
                    for key, val in values.items():
                        window.setdefault(key, []).append(val)
                done = step + 1
                if skipped is None:
                    in_a_row = 0
                    for sched in self.schedulers.values():
                        sched.step()
                    if hasattr(self.distiller, "on_step_end"):
                        self.distiller.on_step_end(step)
                else:
                    in_a_row += 1
                    self.counter.nonfinite_skipped += 1
                    logger.warning("step %d: non-finite loss or gradient in phase '%s'; update skipped (%d in a row, "
                                   "%d in all)", done, skipped, in_a_row, self.counter.nonfinite_skipped)
                    if in_a_row >= tcfg.max_nonfinite_steps:
                        bar.close()
                        last = self.latest_good_checkpoint()
                        raise NonFiniteError(
                            f"{in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient "
                            f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); stopped without saving. "
                            f"Last good checkpoint: {last or 'none yet'}")
                if done % tcfg.log_every == 0 or done == tcfg.max_steps:
                    logs = {k: sum(v) / len(v) for k, v in window.items()}
                    logs["it_per_s"] = tcfg.log_every / max(time.time() - t_last, 1e-9)
                    logs["nonfinite_skipped"] = self.counter.nonfinite_skipped
                    t_last, window = time.time(), {}
                    acc.log(logs, step=done)
                    history.append({"step": done, **logs})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
                bar.update(1)
                if done % tcfg.validate_every == 0 or done == tcfg.max_steps:
                    metrics = self.validate(done)
                    if metrics:
                        acc.log(metrics, step=done)
                if tcfg.verify_rank_sync:
                    self._verify_rank_sync(done)
                interrupt = (stop_after and done == stop_after) or self._any_rank(stop_requested())
                if done % tcfg.checkpoint_every == 0 or done == tcfg.max_steps or interrupt:
                    self.save_checkpoint(done)
                if interrupt and done < tcfg.max_steps:
                    bar.close()
                    acc.end_training()
                    logger.warning("stopped at step %d with a checkpoint; re-run the same command to continue", done)
                    raise SystemExit(INTERRUPTED_EXIT)
        bar.close()
        out = self.finish(history)
        acc.end_training()
        return out

    @contextlib.contextmanager
    def _preemption_signals(self):
        """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and exit with INTERRUPTED_EXIT
        (a second one acts as usual). Yields a function telling whether a stop was requested."""
        received: list[int] = []

        def handler(signum, frame):
            received.append(signum)
            logger.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
            signal.signal(signum, previous[signum])

        previous = {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield lambda: bool(received)
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any (ranks must agree before a collective save)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _broadcast_from_main(self, module: nn.Module):
        """Start every rank from rank 0's weights (what DDP does when it wraps a module)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def _average_grads(self, phase: str):
        """Data parallelism: the mean of every rank's gradient, in one flat all-reduce."""
        if self.accelerator.num_processes == 1:
            return
        params = self.train_params[phase]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _verify_rank_sync(self, step: int):
        """All-gather a checksum of each trainable and fail if the ranks disagree."""
        acc = self.accelerator
        sums = []
        for n in sorted(self.train_params):
            flat = torch.cat([p.detach().double().flatten() for p in self.train_params[n]])
            probe = torch.sin(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
            sums += [flat.sum(), (flat * probe).sum()]
        sums = torch.stack(sums).to(acc.device)
        gathered = acc.gather(sums[None]).reshape(acc.num_processes, -1)
        spread = float((gathered - gathered[0]).abs().max())
        if spread != 0.0:
            raise RuntimeError(f"step {step}: trainable weights differ across ranks (max checksum difference {spread})")
        if acc.is_main_process:
            log = self.run_dir / "rank_sync.json"
            done = json.loads(log.read_text()) if log.is_file() else []
            log.write_text(json.dumps(done + [{"step": step, "ranks": acc.num_processes, "checksums": gathered[0].tolist()}]))

    def _run_phase(self, phase: str, step: int, micro: int) -> tuple[dict, bool]:
        """One optimiser update of ``phase``; returns its logged values and whether the loss and
        gradients were finite on every rank (if not, nothing was updated)."""
        acc, tcfg = self.accelerator, self.cfg.train
        opt = self.optimizers[phase]
        self._set_phase(phase)
        accum = tcfg.gradient_accumulation_steps
        totals: dict[str, float] = {}
        finite = True
        for k in range(accum):
            batch = self.source.batch(step, acc.process_index, micro, micro=k).fork(zlib.crc32(phase.encode()))
            with acc.autocast():
                out = self.distiller.step(batch, step, phase)
                loss = out["loss"] / accum
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            acc.backward(loss)
            for key, val in out.items():
                v = float(val.detach().mean()) if torch.is_tensor(val) else float(val)
                totals[f"{phase}/{key}"] = totals.get(f"{phase}/{key}", 0.0) + v / accum
        self._average_grads(phase)
        params = self.train_params[phase]
        norm = None
        if acc.scaler is not None:
            # fp16 loss scaling: the scaler skips steps whose gradients overflow; a non-finite loss is
            # skipped here, before clipping unscales (an unscale without a step would break the scaler)
            if not self._all_ranks(finite):
                opt.zero_grad(set_to_none=True)
                return totals, False
            if tcfg.grad_clip is not None:
                norm = acc.clip_grad_norm_(params, tcfg.grad_clip)
        else:
            # the total gradient norm, computed once: clipping returns it (NaN/inf when any gradient is)
            if tcfg.grad_clip is not None:
                norm = acc.clip_grad_norm_(params, tcfg.grad_clip)
            else:
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if not self._all_ranks(finite and (norm is None or bool(torch.isfinite(norm)))):
                opt.zero_grad(set_to_none=True)
                return totals, False
        if tcfg.grad_clip is not None:
            totals[f"{phase}/grad_norm"] = float(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phase in self.emas:
            self.emas[phase].step(params)
        return totals, True

    def _all_ranks(self, flag: bool) -> bool:
        return not self._any_rank(not flag)

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, history: list[dict]) -> Path:
        """Save the final student (and its EMA) as diffusers folders with the schedule, and a loss plot."""
        acc = self.accelerator
        out = self.run_dir / "student"
        if acc.is_main_process:
            student = self.distiller.student
            student.save(out, _plain(student.model))
            save_lora_adapters(student.model, out)  # LoRA students: the adapters too, for load_lora_weights
            if self.emas:
                with self.ema_weights():
                    student.save(self.run_dir / "student_ema", _plain(student.model))
            if history:
                (self.run_dir / "history.json").write_text(json.dumps(history))
                from .evaluation.grids import plot_losses

                plot_losses(history, self.run_dir / "losses.png")
            if self.cfg.train.export:
                self.export_pipeline()
        acc.wait_for_everyone()
        return out

    def export_pipeline(self) -> Path:
        """``<output_dir>/pipeline``: the final student (its EMA when kept) in the teacher's diffusers
        pipeline, replacing an earlier export of this run only once the new one is complete."""
        from .export import export

        final = self.run_dir / EXPORT_DIR
        new, old = final.with_name(EXPORT_DIR + ".new"), final.with_name(EXPORT_DIR + ".old")
        if old.is_dir() and not final.exists():  # an earlier export died between its two renames
            os.replace(old, final)
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        export(self.run_dir, new, teacher=self.cfg.teacher.path, use_ema=bool(self.emas))
        if final.exists():
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("exported the student as a diffusers pipeline: %s", final)
        return final


def _adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device supports it (about 9x faster than foreach on CPU)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def _plain(model: nn.Module) -> nn.Module:
    """The model as a plain diffusers model: a LoRA model (or per-phase experts with LoRA) is copied
    with its adapters merged into the base weights (peft through diffusers' PeftAdapterMixin); anything
    else is returned as it is."""
    import copy

    def networks(m):  # a student network, or the experts of a PhasedExperts student
        return [unwrap(e) for e in m.experts] if hasattr(m, "experts") else [m]

    model = unwrap(model)
    if not any(getattr(m, "peft_config", None) for m in networks(model)):
        return model
    fused = copy.deepcopy(model)
    for m in networks(fused):
        if getattr(m, "peft_config", None):
            m.fuse_lora()
            m.unload_lora()
    return fused


def train(cfg: RunConfig) -> Path:
    return Trainer(cfg).fit()


__all__ = ["Trainer", "train", "validate_inputs", "list_checkpoints", "checkpoint_problem", "config_changes",
           "NonFiniteError", "DataError"]
