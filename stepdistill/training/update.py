"""One optimiser update of one trainable: accumulate the micro-batches' gradients (with several
processes FSDP2 averages them over the ranks in the last micro-batch's backward), clip, skip the update when anything is non-finite, step the optimiser and the EMA.

Each trainable the distiller names is one :class:`TrainableState`: its module (as accelerate prepared
it), optimiser, learning-rate schedule, the parameters it trains and its EMA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..distillers.base import Trainable
from ..models.sharding import full
from .distributed import all_ranks
from .parallel import Parallel


@dataclass
class TrainableState:
    """A trainable and everything the loop keeps for it."""

    name: str
    trainable: Trainable  # what the distiller declared (module, learning rate, student or not)
    module: nn.Module  # the accelerate-prepared module
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per iteration by the loop
    params: list[nn.Parameter]  # what its updates train (LoRA: the adapters only)
    lr: float  # the base learning rate (method default or optim.<name>.lr)
    ema: Any = None  # diffusers EMAModel of a student trainable when train.ema_decay is set

    def restore_schedule(self, saved: dict | None, position: int) -> None:
        """After a resume: the learning-rate schedule at its saved state (without one, after ``position``
        steps), with this run's learning rate and schedule, either of which may differ from the
        checkpoint's (resume-safe changes: ``optim`` rates, ``train.max_steps`` for a decaying schedule).
        The current rate is recomputed from them; unchanged, it is the rate the checkpoint holds."""
        sched = self.scheduler
        if saved is not None:
            sched.load_state_dict(saved)
        else:
            sched.last_epoch = position
        sched.base_lrs = [self.lr for _ in sched.base_lrs]
        for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = self.lr
            lr = self.lr * fn(sched.last_epoch)
            if torch.is_tensor(group["lr"]):  # torchao's optimisers keep it as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


def select(states: dict[str, TrainableState], name: str) -> None:
    """Only ``name``'s parameters require grad; the other trainables are used frozen in its update."""
    for other, st in states.items():
        for p in st.params:
            p.requires_grad_(other == name)


def apply_update(accelerator, st: TrainableState, micro_loss: Callable[[int], dict], accumulation: int,
                 grad_clip: float | None, parallel: Parallel) -> tuple[dict, bool]:
    """One optimiser step of ``st`` over ``accumulation`` micro-batches (``micro_loss(k)`` returns the
    distiller's losses of micro-batch k). Returns the logged values (``<name>/<key>``, averaged over the
    micro-batches) and whether loss and gradients were finite on every rank; if not, nothing was updated
    (optimiser, EMA) and the gradients are cleared."""
    acc, opt = accelerator, st.optimizer
    totals: dict[str, float] = {}
    finite = True
    for k in range(accumulation):
        if parallel.active:
            parallel.gradient_sync(st.module, k == accumulation - 1)  # reduce once, in the last backward
        out = micro_loss(k)
        loss = out["loss"] / accumulation
        finite = finite and bool(torch.isfinite(loss.detach()).all())
        # context parallelism: each rank's backward gives its own tokens' share of the gradient, and the ranks
        # average; the sum over a group is the sample's gradient, so each share counts `context` times
        acc.backward(loss * parallel.context if parallel.context > 1 else loss)
        for key, val in out.items():
            v = float(val.detach().mean()) if torch.is_tensor(val) else float(val)
            totals[f"{st.name}/{key}"] = totals.get(f"{st.name}/{key}", 0.0) + v / accumulation
    norm = None
    if acc.scaler is not None:
        # fp16 loss scaling: the scaler skips steps whose gradients overflow; a non-finite loss is
        # skipped here, before clipping unscales (an unscale without a step would break the scaler)
        if not all_ranks(acc, finite):
            opt.zero_grad(set_to_none=True)
            return totals, False
        if grad_clip is not None:
            norm = acc.clip_grad_norm_(st.params, grad_clip)
    else:
        # the total gradient norm, computed once: clipping returns it (NaN/inf when any gradient is)
        if grad_clip is not None:
            norm = full(torch.nn.utils.clip_grad_norm_(st.params, grad_clip))  # of sharded gradients too
        else:
            grads = [p.grad for p in st.params if p.grad is not None]
            norm = full(torch.nn.utils.get_total_norm(grads)) if grads else None
        if not all_ranks(acc, finite and (norm is None or bool(torch.isfinite(norm)))):
            opt.zero_grad(set_to_none=True)
            return totals, False
    if grad_clip is not None:
        totals[f"{st.name}/grad_norm"] = float(norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if st.ema is not None:
        st.ema.step(st.params)
    return totals, True


@contextlib.contextmanager
def ema_weights(states: dict[str, TrainableState]):
    """Inside the block the student trainables hold their EMA weights (no-op without EMA). The copies
    go through each parameter itself (``p.copy_``), not ``p.data`` as diffusers' ``EMAModel.copy_to``
    does: the ``.data`` of a sharded parameter (FSDP2's DTensor) is not its storage."""
    with_ema = [st for st in states.values() if st.ema is not None]
    saved = []
    with torch.no_grad():
        for st in with_ema:
            saved.append([p.detach().clone() for p in st.params])
            for p, avg in zip(st.params, st.ema.shadow_params):
                p.copy_(avg.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for st, kept in zip(with_ema, saved):
                for p, old in zip(st.params, kept):
                    p.copy_(old)
