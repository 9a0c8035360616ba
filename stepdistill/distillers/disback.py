"""DisBack: distribution backtracking (Zhang et al. 2024, "Distribution Backtracking Builds a Faster
Convergence Trajectory for Diffusion Distillation").

Score distillation pulls the student from its initial distribution straight to the teacher's, whose
score is far from the student's samples at the start. DisBack walks a path between the two instead:

1. Degradation recording (``degradation_steps`` iterations, the student frozen): a copy of the teacher
   is fine-tuned toward the initial student's distribution with the teacher's denoising loss on the
   student's samples, and ``path_nodes`` snapshots of it are recorded at equal intervals along the way,
   the last one an interval before the end. The copy is the fake score itself (the same loss, the same
   initialisation), so at the end the fake score models the initial student, as its role in stage 2
   asks: it is the most degraded point of the path.
2. Distribution backtracking: the student is distilled with the distribution-matching update of DMD
   (``dmd.dm_loss``: the real score minus the fake score at noised student samples), the "real" score
   being the recorded nodes in reverse order, last snapshot first and the teacher itself last; the fake
   score keeps following the student. As in the authors' description (its algorithm: the fake score
   starts at the most degraded model and the first target is the node before it), no target equals the
   fake score's starting weights. The paper moves on to the next node once the student has converged to
   the current one and stays on the teacher to the end; here the nodes share ``1 - teacher_share`` of
   the stage-2 iterations equally and the teacher holds the rest.

Two starts. The default (every shipped config): the student and the fake score are teacher copies, no
GAN, and stage 2's fake score goes on from the end of stage 1. The official start (the authors' SDXL
scripts, built on DMD2's code): both stages begin from a trained DMD2 run. ``student.init`` takes that
run's ``student/``; stage 1, as in the official degradation script (which loads the generator alone),
degrades a fresh teacher copy toward that student and records the path; at stage 2's first iteration
the fake score (and the GAN head) takes the DMD2 run's trained weights from ``fake_init`` (the run folder,
whose ``fake_score/`` a run with ``save_fake_score`` writes, or that folder itself), with a fresh
optimiser state, as the official training script loads the DMD2 checkpoint's guidance model. That fake
score was trained on the DMD2 student's samples, so it models the initial student as the end of the
path would; the path's nodes are unchanged. ``gan: true`` adds DMD2's GAN head (``gan.py``): its
classifier loss in every fake-score update of both stages and the generator loss in the student's (the
official runs train with it; it needs real images).

Deviations: the paper backtracks on its own base update; here it is DMD's distribution-matching
gradient (with the two-time-scale rule of ``fake_updates``). Nodes switch on a fixed schedule rather than
on a convergence test. The nodes are kept on the CPU (one at a time on the device). The authors' public
code switches target on a step test that, as written, moves past at most one node and never returns to
the teacher, and whose load (``strict=False``, keys prefixed by the guidance model's attribute names)
matches no key of the real score, which stays the teacher; this module walks every node in turn as the
paper's and that README's algorithm describe (docs/METHODS.md, DisBack).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import check_range
from ..config.parse import expand_path
from ..data.batch import Batch
from ..diffusion.denoiser import Denoiser, unwrap
from ..models.sharding import load_full_state
from .base import Context
from .common import frozen_copy
from .dmd import DMDBase
from .fake_store import check_fake_init, load_fake_init, resolve_fake_init
from .gan import GANMixin, GANOptions
from .score import score_updates

logger = logging.getLogger("stepdistill")


@dataclass
class DisBackOptions(GANOptions):
    guidance_scale: float = 1.75  # CFG of the path's scores (the nodes and the teacher), diffusers convention
    lr: float = 1e-5
    degradation_steps: int = 500  # stage 1: iterations of the fake score alone on the initial student's samples
    # snapshots recorded along the degradation path, at equal intervals before its end (the stage-2 targets
    # before the teacher; the end of the path is the fake score's own start)
    path_nodes: int = 4
    # share of the stage-2 iterations that follow the teacher (the nodes split the rest equally)
    teacher_share: float = 0.5
    # a trained DMD2 run's folder (or its fake_score/ folder) whose fake score, and GAN head with gan: true,
    # the fake score takes when stage 2 starts (the official scripts' start; the student's is student.init,
    # e.g. that run's student/). None: the fake score goes on from the end of stage 1. Path, expanded
    fake_init: str | None = None

    def __post_init__(self):
        super().__post_init__()
        self.fake_init = expand_path("method_args.fake_init", self.fake_init)
        check_range("method_args.guidance_scale", self.guidance_scale, ge=0)
        check_range("method_args.lr", self.lr, gt=0)
        check_range("method_args.degradation_steps", self.degradation_steps, ge=1)
        check_range("method_args.path_nodes", self.path_nodes, ge=1)
        check_range("method_args.teacher_share", self.teacher_share, gt=0, lt=1)


class DisBack(GANMixin, DMDBase):
    name = "disback"
    Options = DisBackOptions
    shares_lora_base = False  # its path nodes are whole copies of the fake score's network

    @classmethod
    def cfg_options(cls, options):
        """CFG of the path's scores; with embedded guidance the nodes, the teacher and the student read the
        teacher's guidance instead."""
        return {"guidance_scale": options.guidance_scale}

    @classmethod
    def check_config(cls, config, options: DisBackOptions) -> None:
        if options.path_nodes >= options.degradation_steps:
            raise ValueError(f"method_args.path_nodes ({options.path_nodes}) must be below method_args.degradation_steps "
                             f"({options.degradation_steps}): one snapshot per stage-1 iteration at most, before the last")
        if options.degradation_steps >= config.train.max_steps:
            raise ValueError(f"method_args.degradation_steps ({options.degradation_steps}) leaves no iterations of "
                             f"train.max_steps ({config.train.max_steps}) for backtracking")
        if options.fake_init is not None:
            resolve_fake_init(options.fake_init)
            if options.fake_lora_rank:
                raise ValueError(f"method_args.fake_lora_rank: the fake score takes the whole network saved in "
                                 f"method_args.fake_init ('{options.fake_init}'); set fake_lora_rank=0")

    def __init__(self, ctx: Context, options: DisBackOptions):
        super().__init__(ctx, options)
        self.setup_gan(ctx, options)
        self.nodes: list[dict] = []  # CPU state dicts of the fake score along the degradation path
        self._active: tuple[int, Denoiser] | None = None  # (node index, its network on the device)
        # the trained fake score stage 2 starts from (checked now, loaded when stage 2 starts)
        self.fake_init = None if options.fake_init is None else resolve_fake_init(options.fake_init)
        if self.fake_init is not None:
            check_fake_init(self.fake_init, self.fake.model, self.head)

    def _node_due(self, k: int) -> int:
        """The number of stage-1 updates after which snapshot k (0-based) is taken: K snapshots at equal
        intervals, the last one an interval before the end of the path."""
        return (k + 1) * self.options.degradation_steps // (self.options.path_nodes + 1)

    def updates(self, iteration: int) -> list[str]:
        if iteration < self.options.degradation_steps:
            return ["fake"]
        return score_updates(iteration - self.options.degradation_steps, self.options.fake_updates)

    def reinitialised(self, iteration: int) -> list[str]:
        """With ``fake_init``, at stage 2's first iteration the fake score (and the GAN head) takes the
        trained weights saved there, and its optimiser state starts afresh."""
        if self.fake_init is None or iteration != self.options.degradation_steps:
            return []
        state, head = load_fake_init(self.fake_init, self.head is not None)
        with torch.no_grad():
            load_full_state(self.fake.model, state)  # sharded or not
            if head is not None:
                load_full_state(self.head, head)
        logger.info("disback: stage 2 starts with the fake score%s of %s", " and GAN head" if head else "",
                    self.fake_init)
        return ["fake"]

    def _record(self, iteration: int) -> None:
        """Snapshots whose stage-1 update count has been reached (the fake score's weights after them)."""
        opts = self.options
        while len(self.nodes) < opts.path_nodes and min(iteration, opts.degradation_steps) >= self._node_due(len(self.nodes)):
            copy = frozen_copy(self.fake)
            self.nodes.append({k: v.detach().cpu().clone() for k, v in unwrap(copy.model).state_dict().items()})

    def target_index(self, iteration: int) -> int:
        """Which score the student follows at a backtracking iteration: K - 1 ... 0 index the nodes
        (last snapshot first), -1 is the teacher."""
        total = self.ctx.config.train.max_steps - self.options.degradation_steps
        k, done = self.options.path_nodes, iteration - self.options.degradation_steps
        on_nodes = round(total * (1 - self.options.teacher_share))  # iterations spent on the nodes, then the teacher
        if done >= on_nodes:
            return -1
        return k - 1 - done * k // max(on_nodes, 1)

    def _real(self, iteration: int) -> Denoiser:
        k = self.target_index(iteration)
        if k < 0:
            return self.ctx.teacher.denoiser
        if self._active is None or self._active[0] != k:
            net = self._active[1] if self._active is not None else frozen_copy(self.fake)
            unwrap(net.model).load_state_dict(self.nodes[k])
            self._active = (k, net)
        return self._active[1]

    def loss(self, batch: Batch, iteration: int, update: str) -> dict:
        self._record(iteration)
        if update == "fake":
            with torch.no_grad():
                x, _ = self.sample(batch, grad=False)
            loss = self.fake_loss(batch, x)
            out = {"stage": torch.tensor(1.0 if iteration < self.options.degradation_steps else 2.0)}
            if self.head is not None:  # the head trains with the fake score in both stages (official code)
                out["denoise"] = loss.detach()
                out["gan_disc"] = self.gan_disc_loss(x, batch)
                loss = loss + self.options.gan_disc_weight * out["gan_disc"]
                out["gan_disc"] = out["gan_disc"].detach()
            return {"loss": loss, **out}
        x, _ = self.sample(batch, grad=True)
        loss = self.distribution_matching(x, batch, self._real(iteration))
        out = {"target_node": torch.tensor(float(self.target_index(iteration)))}
        if self.head is not None:
            out["dm"] = loss.detach()
            loss_g = self.gan_gen_loss(x, batch)
            loss = loss + self.options.gan_gen_weight * loss_g
            out["gan_gen"] = loss_g.detach()
        return {"loss": loss, **out}

    def state_dict(self) -> dict:
        return {"nodes": {str(i): node for i, node in enumerate(self.nodes)}}

    def load_state_dict(self, state: dict) -> None:
        nodes = state.get("nodes") or {}
        self.nodes = [nodes[str(i)] for i in range(len(nodes))]
        self._active = None
