"""What the ranks of a multi-process run agree on: flags, starting weights, logged values, and a check
that their weights stay identical (``ddp``; gradients are reduced by FSDP2, ``stepdistill/training/parallel.py``).
Every function is a no-op with one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, Interrupted, OtherRankFailed
from ..models.sharding import local


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when it is true on any (ranks must agree before a collective save)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def all_ranks(accelerator, flag: bool) -> bool:
    """True on every rank when it is true on all."""
    return not any_rank(accelerator, not flag)


def mean_over_ranks(accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged value over the ranks (each rank's is of its own rows of the batch), so that
    a run logs the same losses whatever the number of processes; every rank logs the same keys."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def on_main(accelerator, fn, what: str):
    """``fn()`` on the main process and its result on every rank (picklable). When it raises, the main
    process re-raises and every other rank raises too, so that no rank is left waiting in a collective
    for a process that has failed: bad input (an :class:`~stepdistill.errors.InputError`) as bad input, a
    stop (:class:`~stepdistill.errors.Interrupted`) as a stop, anything else as
    :class:`~stepdistill.errors.OtherRankFailed`, each naming ``what``."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except BaseException as exc:  # noqa: B902  (re-raised below, after the ranks agree)
            error = exc
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        failure = None if error is None else (_kind(error), str(error))
        box = [None if error is not None else result, failure]
        dist.broadcast_object_list(box, src=0)
        result, failure = box
    else:
        failure = None if error is None else (_kind(error), str(error))
    if failure is not None:
        if error is not None:
            raise error
        kind, message = failure
        if kind == "stop":
            raise Interrupted(None, signal=f"the main process's stop during {what}")
        raise (InputError if kind == "input" else OtherRankFailed)(f"{what} failed on the main process: {message}")
    return result


def _kind(error: BaseException) -> str:
    return "input" if isinstance(error, InputError) else "stop" if isinstance(error, Interrupted) else "other"


def broadcast_from_main(accelerator, module: nn.Module) -> None:
    """Start every rank from rank 0's weights (what DDP does when it wraps a module); a part already
    sharded (each rank holds its own shards) is left as it is."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if not isinstance(t, DTensor):
                dist.broadcast(t.data, src=0)


def verify_rank_sync(accelerator, params_by_name: dict[str, list[nn.Parameter]], step: int, log: Path) -> None:
    """All-gather a checksum of each trainable, fail if the ranks disagree, and append the checksums to
    ``log`` (JSON list, main process)."""
    acc = accelerator
    sums = []
    for name in sorted(params_by_name):
        flat = torch.cat([local(p.detach()).double().flatten() for p in params_by_name[name]])
        probe = torch.sin(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
        sums += [flat.sum(), (flat * probe).sum()]
    sums = torch.stack(sums).to(acc.device)
    gathered = acc.gather(sums[None]).reshape(acc.num_processes, -1)
    spread = float((gathered - gathered[0]).abs().max())
    if spread != 0.0:
        raise RuntimeError(f"step {step}: trainable weights differ across ranks (max checksum difference {spread})")
    if acc.is_main_process:
        done = json.loads(log.read_text()) if log.is_file() else []
        log.write_text(json.dumps(done + [{"step": step, "ranks": acc.num_processes, "checksums": gathered[0].tolist()}]))
