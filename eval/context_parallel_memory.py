#!/usr/bin/env python
"""What context parallelism (``train.context_parallel``) buys: the activation bytes one process keeps for
the backward of one training forward, with a sample's tokens on one process and split over k.

    python eval/context_parallel_memory.py [--family wan] [--grid 2x30x52] [--blocks 2] [--k 1,2]

The network is the family's public config at full width (eval/memory_projection.py's Wan2.1-14B /
FLUX.1-dev) with ``--blocks`` blocks, random bf16 weights on the CPU; each k runs as k gloo processes
(diffusers' context parallelism, Ulysses attention, through ``stepdistill.diffusion.context_parallel``).
The bytes are counted as eval/memory_projection.py counts them (distinct storages autograd saves,
parameters excluded), per rank, with and without gradient checkpointing, and the forward is timed.
Prints a table and writes it as JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from memory_projection import FAMILIES, build, inputs, saved_bytes, tokens  # noqa: E402

GB = 1e9


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(rank: int, k: int, port: int, args, out: Path) -> None:
    import torch.distributed as dist

    from stepdistill.diffusion import context_parallel
    from stepdistill.diffusion.denoiser import unwrap

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // k))
    if k > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=k)
    fam = FAMILIES[args.family]
    torch.manual_seed(0)
    model = build(args.family, {n: args.blocks for n in fam["blocks"]}, device="cpu").train()
    grid = tuple(int(v) for v in args.grid.split("x"))
    kw = inputs(args.family, grid, fam["full"]["text"])
    rows = {}
    mesh = context_parallel.build_mesh("cpu", k, k) if k > 1 else None
    with context_parallel.using(mesh):
        if mesh is not None:
            context_parallel.prepare(unwrap(model))
        for ckpt in (False, True):
            (model.enable_gradient_checkpointing if ckpt else model.disable_gradient_checkpointing)()
            saved_bytes(model, kw)  # warm-up (first-call allocations, the hooks)
            start = time.perf_counter()
            rows["ckpt" if ckpt else "plain"] = dict(saved=saved_bytes(model, kw), seconds=time.perf_counter() - start)
    if k > 1:
        dist.destroy_process_group()
    if rank == 0:
        (out / f"k{k}.json").write_text(json.dumps(rows))


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="wan", choices=["wan", "flux"])
    p.add_argument("--grid", default="2x30x52", help="token grid: Wan frames x rows x columns, Flux rows x columns")
    p.add_argument("--blocks", type=int, default=2, help="blocks of each kind (full width)")
    p.add_argument("--k", default="1,2", help="group sizes to compare")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "context-parallel-memory")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ks = [int(v) for v in args.k.split(",")]
    for k in ks:
        mp.spawn(_measure, args=(k, _port(), args, args.out), nprocs=k)
    results = {k: json.loads((args.out / f"k{k}.json").read_text()) for k in ks}
    n = tokens(args.family, tuple(int(v) for v in args.grid.split("x")))
    print(f"{args.family} at full width, {args.blocks} blocks of each kind, {n} image tokens "
          f"(+{FAMILIES[args.family]['full']['text']} text), bf16, batch 1; per rank:")
    print("| k | saved (no ckpt) | ratio | saved (ckpt) | ratio | forward s (no ckpt) |")
    print("|---|---|---|---|---|---|")
    base = results[ks[0]]
    for k in ks:
        r = results[k]
        print(f"| {k} | {r['plain']['saved'] / GB:.3f} GB | {r['plain']['saved'] / base['plain']['saved']:.3f} | "
              f"{r['ckpt']['saved'] / GB:.3f} GB | {r['ckpt']['saved'] / base['ckpt']['saved']:.3f} | "
              f"{r['plain']['seconds']:.1f} |")
    (args.out / "table.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
