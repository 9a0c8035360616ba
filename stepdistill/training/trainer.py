"""The training loop: builds a run (``build``), then for each iteration lets the distiller name its
updates and applies them (``update``), logs, validates and checkpoints (``checkpointer``), and at
the end writes the student (``outputs``). docs/ARCHITECTURE.md shows one iteration's data flow.

Re-running the same command resumes from the newest verified checkpoint. SIGTERM / SIGINT finish
the iteration, write a checkpoint and raise :class:`~stepdistill.errors.Interrupted`; too many
non-finite iterations in a row raise :class:`~stepdistill.errors.NonFiniteError`. The library never
exits the process: ``stepdistill.cli`` maps these to exit statuses.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, dump_config, from_dict, to_dict
from ..diffusion import context_parallel
from ..distillers.base import Context
from ..errors import ConfigError, Interrupted, NonFiniteError
from ..models.sharding import is_sharded, plain_copy
from ..models.student import networks
from ..storage import claim_folder, mark_folder, writing
from . import outputs
from .build import (build_distiller, build_source, build_teacher, build_trainables, check_context_parallel_teacher,
                    validate_inputs)
from .checkpointer import Checkpointer
from .checkpoints import list_checkpoints
from .distributed import any_rank, mean_over_ranks, on_main, verify_rank_sync
from .parallel import Parallel, resolve_strategy
from .run_folder import RunLock, check_run_record, data_fingerprint, is_run_folder, write_run_record
from .update import apply_update, ema_weights, select

logger = logging.getLogger("stepdistill")


@dataclass
class LoopState:
    """Loop counters saved with every checkpoint."""

    step: int = 0  # iterations done
    nonfinite_skipped: int = 0  # iterations whose updates were skipped for a NaN/inf loss or gradient

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_skipped": self.nonfinite_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))


@contextlib.contextmanager
def preemption_signals():
    """SIGTERM / SIGINT ask the loop to finish its iteration and stop with a checkpoint (a second one
    acts as usual). Yields a function telling whether a stop was requested."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        logger.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        signal.signal(signum, previous[signum])

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield lambda: bool(received)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class Trainer:
    """Builds a run from its config and trains it with :meth:`fit`."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        tcfg = cfg.train
        self.run_dir = Path(tcfg.output_dir)
        self.accelerator = acc = accelerator or Accelerator(
            # without CUDA, cpu=True is what makes a multi-process launch use gloo (MULTI_CPU)
            cpu=not torch.cuda.is_available(),
            mixed_precision=tcfg.mixed_precision,
            log_with=None if tcfg.report_to == "none" else tcfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        strategy = resolve_strategy(acc, tcfg.parallel)
        method = validate_inputs(cfg, acc.num_processes, strategy)
        self.options = from_dict(method.Options, cfg.method_args, "method_args")
        self.fingerprint = data_fingerprint(cfg.data)
        self.resolved = {**cfg.to_dict(), "method_args": to_dict(self.options), "data_fingerprint": self.fingerprint}
        self.lock = RunLock(self.run_dir)
        on_main(acc, self._take_folder, f"train.output_dir '{self.run_dir}'")
        try:
            # random initialisations (LoRA adapters, GAN heads) are the same on every rank and every run;
            # per-iteration randomness comes from stepdistill.data's per-(step, rank) streams instead
            set_seed(tcfg.seed)
            self.parallel = Parallel(acc, strategy, tcfg.context_parallel)
            self.teacher, init, self.oracle = build_teacher(cfg, acc.device, self.run_dir, acc.is_main_process,
                                                            acc.wait_for_everyone, self.parallel)
            check_context_parallel_teacher(cfg, self.teacher)
            self.source = build_source(cfg, self.teacher, self.oracle, acc.device, tcfg.seed, self.parallel.group_rank,
                                       self.parallel.groups)
            ctx = Context(self.teacher, init, self.source, cfg, acc.device)
            self.distiller = build_distiller(method, ctx, self.options)
            self.states = build_trainables(acc, self.distiller, cfg, self.parallel, self.teacher)
            for teacher_net in networks(self.teacher.denoiser.model):  # (both experts of a two-expert teacher)
                if tcfg.gradient_checkpointing and getattr(teacher_net, "_supports_gradient_checkpointing", False):
                    teacher_net.enable_gradient_checkpointing()  # SiD back-propagates through the teacher too
        except BaseException:
            self.lock.release()
            raise
        self.loop = LoopState()
        self.finishers: list = []  # callables run on the main process once the final student is written
        self.checkpointer = Checkpointer(acc, self.run_dir, self.states, self.distiller, self.loop, self.resolved,
                                         tcfg.checkpoints_total_limit, stream=self.source.stream,
                                         sharded=self.parallel.active)

    def close(self) -> None:
        """Release the run folder (``fit`` does so itself when it ends)."""
        self.lock.release()

    def _take_folder(self) -> None:
        """Claim the run folder (a new or empty folder, or one a run wrote: ``storage.claim_folder``), lock
        it for this run, refuse it when it holds another run, and mark it as this run's."""
        try:
            claim_folder(self.run_dir, "distill", option="train.output_dir", legacy=is_run_folder, mark=False)
            self.lock.acquire()
        except OSError as exc:  # a path that cannot be a folder, a read-only or full disk: one line naming it
            verb = "write into" if self.run_dir.is_dir() else "create"
            raise ConfigError(f"train.output_dir: cannot {verb} '{self.run_dir}' ({type(exc).__name__}: "
                              f"{exc.strerror or exc})") from None
        try:
            if not list_checkpoints(self.run_dir):  # with checkpoints, resume compares against them
                check_run_record(self.run_dir, self.resolved, self.cfg.to_dict())
            mark_folder(self.run_dir, "distill")
        except BaseException:
            self.lock.release()
            raise

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> Path:
        """Train to ``train.max_steps`` (resuming first) and return the student folder. ``stop_after``
        stops with a checkpoint after that iteration, as a preemption would. The run folder's lock is
        released at the end, however the run ends."""
        # a second fit() of this trainer takes the folder again (the first released it at its end)
        on_main(self.accelerator, lambda: None if self.lock.held else self.lock.acquire(),
                f"train.output_dir '{self.run_dir}'")
        try:
            return self._fit(stop_after)
        finally:
            self.lock.release()

    def _fit(self, stop_after: int | None) -> Path:
        from tqdm.auto import tqdm

        acc, tcfg = self.accelerator, self.cfg.train
        if tcfg.export and not self.finishers and acc.is_main_process:
            logger.warning("train.export: a Trainer alone does not export; the distill command "
                           "(stepdistill.distill.train) adds the export when the run ends")
        start = self.resume()  # before anything is written: a refused resume leaves the run folder as it was
        if acc.is_main_process:
            # the config as run: method_args with the method's defaults filled in and every value typed
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg, method_args=to_dict(self.options)))
            write_run_record(self.run_dir, self.resolved)
        if acc.trackers == [] and tcfg.report_to != "none":
            acc.init_trackers("stepdistill", config={"method": self.cfg.method, "steps": tcfg.max_steps})
        par = self.parallel  # the ranks of a context-parallel group draw one stream: `groups` streams in all
        micro = tcfg.batch_size // (par.groups * tcfg.gradient_accumulation_steps)
        bar = tqdm(total=tcfg.max_steps, initial=start, disable=not (acc.is_main_process and tcfg.progress),
                   desc=self.cfg.method, dynamic_ncols=True)
        history, window, t_last = [], {}, time.time()  # window: every update's values since the last log line
        in_a_row = 0  # consecutive iterations skipped for non-finite values
        self.source.prefetch(start, tcfg.gradient_accumulation_steps, par.group_rank, micro, par.groups)
        # the training loop and its validations run context-parallel (the final student's export, on the main
        # process alone, does not)
        with preemption_signals() as stop_requested, context_parallel.using(self.parallel.context_mesh):
            for iteration in range(start, tcfg.max_steps):
                skipped = self._iteration(iteration, micro, window)
                done = self.loop.step = iteration + 1
                if skipped is None:
                    in_a_row = 0
                else:
                    in_a_row += 1
                    self.loop.nonfinite_skipped += 1
                    logger.warning("step %d: non-finite loss or gradient in the update of '%s'; update skipped (%d in "
                                   "a row, %d in all)", done, skipped, in_a_row, self.loop.nonfinite_skipped)
                    if in_a_row >= tcfg.max_nonfinite_steps:
                        bar.close()
                        raise NonFiniteError(
                            f"{in_a_row} steps in a row (up to step {done}) had a non-finite loss or gradient "
                            f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); stopped without saving. "
                            f"Last good checkpoint: {self.checkpointer.latest_good() or 'none yet'}")
                if done % tcfg.log_every == 0 or done == tcfg.max_steps:
                    logs = mean_over_ranks(acc, {k: sum(v) / len(v) for k, v in window.items()})
                    logs["it_per_s"] = tcfg.log_every / max(time.time() - t_last, 1e-9)
                    logs["nonfinite_skipped"] = self.loop.nonfinite_skipped
                    t_last, window = time.time(), {}
                    acc.log(logs, step=done)
                    history.append({"step": done, **logs})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
                bar.update(1)
                if done % tcfg.validate_every == 0 or done == tcfg.max_steps:
                    self.validate(done)
                if tcfg.verify_rank_sync and self.parallel.strategy != "fsdp":  # fsdp: each rank holds other shards
                    verify_rank_sync(acc, {n: st.params for n, st in self.states.items()}, done,
                                     self.run_dir / "rank_sync.json")
                interrupt = (stop_after is not None and done >= stop_after) or any_rank(acc, stop_requested())
                if done % tcfg.checkpoint_every == 0 or done == tcfg.max_steps or interrupt:
                    checkpoint = self.checkpointer.save(done)
                if interrupt and done < tcfg.max_steps:
                    bar.close()
                    self._end()
                    raise Interrupted(done, checkpoint)
        bar.close()
        out = self.finish(history)
        self._end()
        return out

    def _end(self) -> None:
        """Trackers closed; with several processes, every rank waits for the others before the process
        group goes (a rank leaving while another still uses it can abort in gloo's teardown)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def _iteration(self, iteration: int, micro: int, window: dict) -> str | None:
        """The distiller's updates of this iteration, then one step of every learning-rate schedule.
        Returns the update whose loss or gradient was non-finite (the iteration's later updates and the
        schedules are then skipped), or None."""
        for name in self.distiller.reinitialised(iteration):
            self.states[name].optimizer.state.clear()  # re-initialised weights start without old moments
        for name in self.distiller.updates(iteration):
            values, finite = self._update(name, iteration, micro)
            if not finite:
                return name
            for key, val in values.items():
                window.setdefault(key, []).append(val)
        for st in self.states.values():
            st.scheduler.step()
        return None

    def _update(self, name: str, iteration: int, micro: int) -> tuple[dict, bool]:
        """One optimiser update of trainable ``name``; each micro-batch has its own stream per update."""
        acc = self.accelerator
        select(self.states, name)

        def micro_loss(k: int) -> dict:
            par = self.parallel
            batch = self.source.batch(iteration, par.group_rank, micro, micro=k, num_ranks=par.groups)
            batch = batch.fork(zlib.crc32(name.encode()))
            with acc.autocast():
                return self.distiller.loss(batch, iteration, name)

        return apply_update(acc, self.states[name], micro_loss, self.cfg.train.gradient_accumulation_steps,
                            self.cfg.train.grad_clip, self.parallel)

    def validate(self, step: int) -> None:
        """A grid of the student's samples (with its EMA weights when kept), logged with its metrics."""
        acc = self.accelerator
        # sharded networks, or networks whose tokens are split over ranks: every rank runs them
        if not acc.is_main_process and self.parallel.strategy != "fsdp" and self.parallel.context == 1:
            return
        student = self.distiller.student
        with ema_weights(self.states), acc.autocast():
            x, batch = outputs.validation_samples(student, self.teacher, self.source, self.cfg.train.num_validation,
                                                  self.cfg.train.seed)
        if not acc.is_main_process:
            return
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        metrics = outputs.save_samples(x, batch, self.teacher, self.oracle, path)
        outputs.log_image(acc, path, step)
        if metrics:
            acc.log(metrics, step=step)

    def resume(self) -> int:
        """Load the newest verified checkpoint, if any, and return its step (0 without one)."""
        self.checkpointer.load_latest()
        return self.loop.step

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, history: list[dict]) -> Path:
        """The final student (and its EMA) as diffusers folders with the schedule, the method's other final
        networks (``Distiller.final_parts``: DMD's ``fake_score/``), and the loss history and its plot."""
        out = self.run_dir / "student"
        student = self.distiller.student
        has_ema = any(st.ema is not None for st in self.states.values())
        # whole copies of a sharded student are gathered first (every rank takes part), then written
        sharded = is_sharded(student.model)
        model = plain_copy(student.model, everywhere=False) if sharded else None
        ema_model = None
        if has_ema and sharded:
            with ema_weights(self.states):
                ema_model = plain_copy(student.model, everywhere=False)
        # the method's other networks (DMD's fake score): whole copies, gathered like the student's
        parts = {name: plain_copy(m, everywhere=False) if is_sharded(m) else m
                 for name, m in self.distiller.final_parts().items()}

        def write():
            outputs.save_student(student, out, model)
            if has_ema and sharded:
                outputs.save_student(student, self.run_dir / "student_ema", ema_model)
            elif has_ema:
                with ema_weights(self.states):
                    outputs.save_student(student, self.run_dir / "student_ema")
            if parts:
                self.distiller.save_final(self.run_dir, parts)
            if history:
                outputs.save_history(history, self.run_dir)
            for finisher in self.finishers:
                finisher()

        def write_checked():
            with writing(self.run_dir, "the final student"):
                write()

        on_main(self.accelerator, write_checked, "writing the final student")
        return out
