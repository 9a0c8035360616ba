"""The run's checkpoints behind one object: the trainer calls :meth:`Checkpointer.save` and
:meth:`Checkpointer.load_latest`, and never touches a checkpoint file itself.

A checkpoint (``<output_dir>/checkpoints/checkpoint-<N>/``, its files described in
``training/checkpoints.py``) is written under ``checkpoint-N.tmp`` by every rank (accelerate's state,
and a parallel run's sharded state), completed by the main process (the training state and the
manifest), then swapped into place whole. Only then are the oldest good checkpoints beyond
``train.checkpoints_total_limit`` deleted, so the newest good checkpoint always survives; checkpoints
that failed verification never count toward the limit. :meth:`load_latest` first finishes or undoes
what a killed run left, then resumes from the newest checkpoint whose files match its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..diffusion.denoiser import unwrap
from ..errors import ConfigError
from ..storage import load_state, recover_swap, save_state, swap_in, writing
from .checkpoints import (
    CKPT_PREFIX,
    MANIFEST,
    SHARDED,
    TRAINING_STATE,
    check_resumable,
    checkpoint_problem,
    has_trainable,
    list_checkpoints,
    load_sharded,
    load_trainable,
    make_manifest,
    save_sharded,
    save_trainable,
)
from .distributed import on_main

logger = logging.getLogger("stepdistill")


class Checkpointer:
    """Writes, verifies, lists, chooses and resumes the checkpoints of one run.

    ``states`` are the run's trainables (:class:`~stepdistill.training.update.TrainableState`); the
    state of ``loop`` (the loop's counters) and ``distiller`` go into every checkpoint; ``stream`` is
    the data stream whose position every rank saves, or None; ``config`` the resolved run config the
    manifest records (resume compares against it)."""

    def __init__(self, accelerator, run_dir: Path, states: dict, distiller, loop, config: dict, limit: int | None,
                 stream=None, sharded: bool = False):
        self.accelerator, self.run_dir, self.states, self.distiller = accelerator, Path(run_dir), states, distiller
        self.parts = {"loop": loop, "distiller": distiller}
        self.config, self.limit, self.stream, self.sharded = config, limit, stream, sharded
        self.root = self.run_dir / "checkpoints"
        self.broken: set[Path] = set()  # checkpoints that failed verification (never counted by the limit)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # -- reading ------------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """The completed checkpoints, oldest first."""
        return list_checkpoints(self.run_dir)

    def latest_good(self, broken: list[Path] | None = None) -> Path | None:
        """The newest checkpoint whose files match its manifest; broken ones are skipped with a warning
        (and appended to ``broken``)."""
        for ckpt in reversed(self.list()):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            logger.warning("skipping checkpoint %s: %s; trying the previous one", ckpt, problem)
            if broken is not None:
                broken.append(ckpt)
        return None

    def recover(self) -> None:
        """Finish or undo what a killed run left: a checkpoint moved aside whose replacement never
        arrived comes back; half-written (``.tmp``) and half-deleted (``.del``) folders go."""
        if not self.root.is_dir():
            return
        for leftover in self.root.glob(f"{CKPT_PREFIX}*.old"):
            recover_swap(leftover.with_name(leftover.name[:-len(".old")]))
        for suffix in (".tmp", ".del"):
            for leftover in self.root.glob(f"{CKPT_PREFIX}*{suffix}"):
                shutil.rmtree(leftover, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` (collective: every rank calls it) and return its folder."""
        acc = self.accelerator
        final = self.root / f"{CKPT_PREFIX}{step}"
        tmp = self.root / f"{CKPT_PREFIX}{step}.tmp"
        self.broken.discard(final)  # a broken checkpoint of this step is replaced by a good one
        state = self._training_state()
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        with writing(tmp, f"checkpoint-{step}"):
            acc.save_state(str(tmp))
            if self.sharded:  # a parallel run's trainables: every rank its shards
                save_sharded(tmp / SHARDED, self.states)
        acc.wait_for_everyone()
        on_main(acc, lambda: self._complete(tmp, final, step, state), f"writing checkpoint-{step}")
        return final

    def _training_state(self) -> dict:
        """What the checkpoint holds beside the weights and optimisers: every part's state, each
        schedule's position, the EMAs (a parallel run's shadow weights go with its sharded state) and
        every rank's stream position."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state["schedules"] = {name: st.scheduler.state_dict() for name, st in self.states.items()}
        emas = {name: st.ema.state_dict() for name, st in self.states.items() if st.ema is not None}
        if self.sharded:
            emas = {name: {k: v for k, v in e.items() if k != "shadow_params"} for name, e in emas.items()}
        if emas:
            state["ema"] = emas
        if self.stream is not None:
            state["streams"] = self.stream.gathered_state()
        return state

    def _complete(self, tmp: Path, final: Path, step: int, state: dict) -> None:
        """The main process's part of :meth:`save`: training state, manifest, swap, limit."""
        with writing(tmp, f"checkpoint-{step}"):
            save_state(state, tmp, TRAINING_STATE)
        manifest = make_manifest(tmp, step, self.config, self.accelerator.num_processes)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        swap_in(tmp, final)  # the same step saved again (a resumed run) is kept until replaced
        if self.limit is not None:
            good = [c for c in self.list() if c not in self.broken]  # oldest first
            for stale in [c for c in good[:-self.limit] if c != final]:
                doomed = stale.with_name(stale.name + ".del")  # invisible first, then deleted
                os.replace(stale, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # -- resuming -----------------------------------------------------------------------------------
    def load_latest(self) -> Path | None:
        """Load the newest verified checkpoint into the trainables, the loop and the distiller, and
        return it (None without one). Config differences that would change the run are refused, naming
        each; safe ones (step budget, cadences, learning rates) are logged and take effect."""
        acc = self.accelerator

        def choose():  # on the main process: one verification, one decision for every rank
            self.recover()
            broken: list[Path] = []
            latest = self.latest_good(broken)
            safe = [] if latest is None else check_resumable(latest, self.config, acc.num_processes)
            return latest, broken, safe

        latest, broken, safe = on_main(acc, choose, "resume")
        self.broken = set(broken)
        if latest is None:
            return None
        if (latest / SHARDED).is_dir() and not self.sharded:
            # a parallel run's checkpoint on one process: accelerate holds none of its weights or optimiser
            # states (they are in sharded/, loaded below), only the random states, as for a parallel run
            models, optimizers = acc._models, acc._optimizers
            acc._models, acc._optimizers = [], []
            try:
                acc.load_state(str(latest))
            finally:
                acc._models, acc._optimizers = models, optimizers
        else:
            acc.load_state(str(latest))
        state = load_state(latest, TRAINING_STATE)
        for name, part in self.parts.items():
            if state.get(name):
                part.load_state_dict(state[name])
        if self.stream is not None:
            self.stream.restore(state.get("streams") or [], acc.num_processes, acc.process_index)
        self._load_emas(state.get("ema") or {})
        if (latest / SHARDED).is_dir():
            load_sharded(latest / SHARDED, self.states)
        loop = self.parts["loop"]
        for name, st in self.states.items():
            # a checkpoint without schedule states (an earlier version's) stepped them once per iteration
            # that was not skipped
            st.restore_schedule((state.get("schedules") or {}).get(name), loop.step - loop.nonfinite_skipped)
        if safe and acc.is_main_process:
            logger.warning("resuming from %s with changed settings: %s", latest, "; ".join(safe))
        if acc.is_main_process:
            logger.info("resumed from %s (step %d)", latest, loop.step)
        return latest

    def _load_emas(self, saved: dict) -> None:
        for name, st in self.states.items():
            if st.ema is None:
                continue
            if name not in saved:
                raise ConfigError(f"resume: the checkpoint holds no EMA of trainable '{name}' (train.ema_decay was off "
                                  f"or the method's trainables differ); use a new train.output_dir")
            if "shadow_params" not in saved[name]:  # a parallel run's: loaded with the sharded state
                saved[name]["shadow_params"] = st.ema.shadow_params
            st.ema.load_state_dict(saved[name])
            st.ema.to(self.accelerator.device, dtype=torch.float32)

    # -- accelerate's hooks -------------------------------------------------------------------------
    def _ours(self, models) -> list:
        """The trainable state of each model accelerate hands a hook, or [] if they are not all ours."""
        # by the module itself first: the views of one shared LoRA base (models/shared_lora.py) unwrap to one network
        by_id = {id(st.module): st for st in self.states.values()}
        by_net = {id(unwrap(st.module)): st for st in self.states.values()}
        found = [by_id.get(id(m)) or by_net.get(id(unwrap(m))) for m in models]
        return found if found and all(found) else []

    def _save_hook(self, models, weights, output_dir):
        """Each trainable's weights once, in its own folder (``save_trainable``), instead of accelerate's
        copy; and the student's schedule."""
        ours = self._ours(models)
        if ours:
            weights.clear()  # every rank: accelerate writes no second copy of the weights
        if not self.accelerator.is_main_process:
            return
        for st in ours:
            save_trainable(unwrap(st.module), st.params, Path(output_dir) / st.name)
        self.distiller.student.spec.save(Path(output_dir) / "student")

    def _load_hook(self, models, input_dir):
        """The weights :meth:`_save_hook` wrote (a checkpoint with accelerate's own model files is left
        to accelerate)."""
        ours = self._ours(models)
        if not ours or not all(has_trainable(Path(input_dir) / st.name) for st in ours):
            return
        for st in ours:
            load_trainable(unwrap(st.module), st.params, Path(input_dir) / st.name)
        models.clear()
