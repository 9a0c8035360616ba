#!/usr/bin/env python
"""The first thing to run on a lent GPU: a few real training iterations at the sizes that matter, with
the figures a GPU answers and this project's CPU machines cannot.

    python eval/gpu_smoke.py [--out runs/gpu_smoke] [--steps 4]     # on the GPU (eval/gpu_smoke.sh)
    python eval/gpu_smoke.py --dry-run                               # the same path on tiny networks, CPU

Each case is a DMD2 run through the real ``Trainer`` (bf16 mixed precision on a GPU, batch 4; Wan 1): the
full-size SD1.5 UNet (859.5M parameters, random weights, ``eval/memory.py``'s pipeline) at 64x64
latents, and every reduced-depth family of ``CASES`` whose adapter this version has. After one warm-up
iteration it times ``--steps`` iterations and prints one JSON line per case:

- ``max_memory_allocated_gb``: torch.cuda's peak over the timed iterations (on the CPU: None);
- ``iteration_s``: the mean wall time of an iteration (CUDA synchronised);
- ``network_share``: the share of that time spent inside the networks' forward and backward passes
  (forward hooks on every network, timed with CUDA events; the rest is the loop, the optimiser, data);
- ``tflops_per_iteration`` and ``mfu``: the FLOPs of one iteration (torch's FlopCounterMode, forward
  and backward) over the iteration time, against the card's dense bf16 peak (``PEAK_BF16_TFLOPS`` by
  device name, or ``--peak-tflops``).

``--dry-run`` runs the same code on the tiny SD, Flux and Wan pipelines (``stepdistill.testing``) for 1
timed iteration on whatever device there is; the tests run it. On the GPU the Flux and Wan cases are the
public configs at full width and reduced depth (``REDUCED``), which eval/memory_projection.py's
per-block figures can be checked against.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 peaks (TFLOP/s) of the cards this project may be lent, by a name fragment torch reports
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}
# (case, family or None for the full-size SD1.5 UNet, overrides). On the GPU the Flux and Wan cases run their
# public transformer config at full width and reduced depth (REDUCED) at a real sample size: FLUX.1-dev at
# 1024 px (4096 packed tokens), Wan2.1-14B at 81 frames of 480p (32,760 tokens, batch 1, checkpointed);
# the dry run uses the tiny families
CASES = [("sd15-dmd2-1step", None, []),
         ("flux-reduced-dmd2", "flux", ["teacher.sample_size=128"]),
         ("wan-reduced-dmd2", "wan", ["teacher.video_size=[81,240,416]", "train.batch_size=1",
                                      "train.gradient_checkpointing=true"])]
# blocks kept of each list; the text inputs keep the tiny encoders' width (negligible FLOPs beside the blocks)
REDUCED = {"flux": {"num_layers": 1, "num_single_layers": 2}, "wan": {"num_layers": 2}}


def reduced_pipeline(family: str, path: Path) -> Path:
    """The tiny ``family`` pipeline with its transformer replaced by the public config (eval/memory_projection.py)
    at full width and ``REDUCED`` depth, random bf16 weights; the text widths follow the tiny encoders."""
    sys.path.insert(0, str(ROOT / "eval"))
    from memory_projection import FAMILIES, build

    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

    TINY_FAMILIES[family](path)
    config = dict(FAMILIES[family]["config"], **REDUCED[family])
    if family == "flux":
        config.update(joint_attention_dim=32, pooled_projection_dim=32)  # the tiny T5 / CLIP widths
    else:
        config.update(text_dim=32)
    torch.manual_seed(0)
    build(family, config=config, device="cpu").save_pretrained(path / "transformer")
    return path


def peak_tflops(name: str, given: float | None) -> float | None:
    return given if given is not None else next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class NetworkTimer:
    """Wall time inside the networks' forward passes and the backward passes they start."""

    def __init__(self, modules, cuda: bool):
        self.cuda, self.total, self.handles, self.starts = cuda, 0.0, [], {}
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._start))
            self.handles.append(m.register_forward_hook(self._stop))
            self.handles.append(m.register_full_backward_pre_hook(lambda mod, g: self._start(mod, None)))
            self.handles.append(m.register_full_backward_hook(lambda mod, gi, go: self._stop(mod, None, None)))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args):
        self.starts[id(module)] = self._now()

    def _stop(self, module, args, out):
        t0 = self.starts.pop(id(module), None)
        if t0 is not None:
            self.total += self._now() - t0

    def close(self):
        for h in self.handles:
            h.remove()


def run_case(name: str, family: str | None, overrides: list[str], work: Path, steps: int, dry_run: bool,
             peak: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from stepdistill.config import load_config
    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES
    from stepdistill.training import Trainer

    cuda = torch.cuda.is_available()
    if family is not None and family not in TINY_FAMILIES:
        return {"case": name, "skipped": f"this version has no {family} family"}
    if dry_run:
        teacher = TINY_FAMILIES[family or "sd"](work / "teachers" / (family or "sd"))
        overrides = []  # the tiny families' own sizes
    elif family is not None:
        teacher = reduced_pipeline(family, work / "teachers" / family)
    else:
        sys.path.insert(0, str(ROOT / "eval"))
        from memory import build_pipeline

        teacher = build_pipeline("sd15", work / "teachers" / "sd15", 64)
    config = ROOT / "configs" / ("tiny-sd" if family is None else f"tiny-{family}") / "dmd2_4step.yaml"
    cfg = load_config(config, [f"teacher.path={teacher}", f"train.output_dir={work / name}", "train.batch_size=4",
                               f"train.max_steps={steps + 1}", "train.report_to=none", "train.progress=false",
                               f"train.mixed_precision={'bf16' if cuda else 'no'}", "student.num_steps=1",
                               "student.timesteps=null", "train.checkpoint_every=100000",
                               "train.validate_every=100000", *overrides])
    trainer = Trainer(cfg)
    try:
        micro = cfg.train.batch_size // (trainer.accelerator.num_processes * cfg.train.gradient_accumulation_steps)
        trainer._iteration(0, micro, {})  # warm-up: kernels, allocator
        nets = {id(unwrap(st.module)): unwrap(st.module) for st in trainer.states.values()}
        nets[id(unwrap(trainer.teacher.denoiser.model))] = unwrap(trainer.teacher.denoiser.model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = NetworkTimer(nets.values(), cuda)
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            trainer._iteration(i, micro, {})
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        timer.close()
        with FlopCounterMode(display=False) as counter:
            trainer._iteration(steps + 1, micro, {})
        flops = counter.get_total_flops()
    finally:
        trainer.close()
    per_iteration = elapsed / steps
    return {"case": name, "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": cfg.train.batch_size, "steps": steps,
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "iteration_s": per_iteration, "network_share": timer.total / elapsed,
            "tflops_per_iteration": flops / 1e12,
            "mfu": flops / per_iteration / (peak * 1e12) if peak else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke")
    p.add_argument("--steps", type=int, default=4, help="timed iterations per case")
    p.add_argument("--dry-run", action="store_true", help="the tiny pipelines, 1 timed iteration, any device")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    from stepdistill.cli import quiet_imports
    from stepdistill.errors import InputError
    from stepdistill.storage import claim_folder

    quiet_imports()
    try:
        claim_folder(args.out, "gpu_smoke", {"dry_run": args.dry_run})
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    rows = []
    for case, family, overrides in CASES:
        row = run_case(case, family, overrides, args.out, 1 if args.dry_run else args.steps, args.dry_run, peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
