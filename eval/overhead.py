#!/usr/bin/env python
"""Loop overhead of every distiller: one training iteration versus the sum of its network passes.

    python eval/overhead.py [--family sd] [--iters 5] [--methods dmd2 sid ...]
    python eval/overhead.py --pipeline runs/memory/pipeline-sd15-32 --methods dmd2 --iters 2 \
        --set train.batch_size=1 method_args.fake_lora_rank=64     # the SD1.5 UNet (eval/memory.py builds it)

For each method on a tiny pipeline (built offline into a temporary folder), the script times whole
training iterations through the real Trainer, records every network call the iteration makes
(forward hooks, set afresh each iteration, on the text encoders, teacher, student, experts, fake
score and frozen round teachers), then replays each recorded call alone (forward, plus backward
where the call was part of a graph that needed gradients) and prints iteration time / sum of passes.
1.00 means the loop adds nothing; the target is <= 1.10. A second ratio divides by the same passes
timed in place (the hooked forwards plus the loop's backward calls): it isolates the loop's own
work from what running a pass alone changes (warm caches, one small graph per backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"progressive": "progressive_2step", "guided": "guided_2step", "boot": "boot_1step", "vsd": "vsd_1step",
           "dmd": "dmd_1step", "dmd2": "dmd2_4step", "phased_dmd": "phased_dmd_2step", "sid": "sid_1step"}


class Recorder:
    """Forward hooks that record each call of the watched networks with its inputs, and the time the
    calls take in place (``forward_s``)."""

    def __init__(self, models):
        self.calls, self.on, self.forward_s, self._start = [], False, 0.0, {}
        self.handles = [m.register_forward_pre_hook(self._pre) for m in models]
        self.handles += [m.register_forward_hook(self._hook, with_kwargs=True) for m in models]

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _hook(self, module, args, kwargs, output):
        if not self.on:
            return
        self.forward_s += time.perf_counter() - self._start.pop(id(module))
        needs_grad = torch.is_grad_enabled() and (any(p.requires_grad for p in module.parameters()) or any(
            torch.is_tensor(a) and a.requires_grad for a in list(args) + list(kwargs.values())))
        detach = lambda v: v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v  # noqa: E731
        self.calls.append((module, [detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}, needs_grad))

    def close(self):
        for h in self.handles:
            h.remove()


def _out_tensor(out):
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def replay(calls, repeats: int = 3) -> float:
    """Seconds for the recorded calls run alone (median over repeats)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for module, args, kwargs, needs_grad in calls:
            with torch.set_grad_enabled(needs_grad):
                out = _out_tensor(module(*args, **kwargs))
                if needs_grad and out.requires_grad:
                    out.float().sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _networks(tr) -> list:
    """Every network an iteration can call: the pipeline's components (text encoders, VAE, denoiser),
    the trainables, and the denoisers a distiller holds (frozen round teachers included)."""
    from torch import nn

    from stepdistill.diffusion.denoiser import Denoiser, unwrap

    nets = {id(m): m for m in tr.teacher.pipeline.components.values() if isinstance(m, nn.Module)}
    nets.update({id(unwrap(st.module)): unwrap(st.module) for st in tr.states.values()})
    stack = [tr.distiller]
    seen = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module) else []:
            if isinstance(value, Denoiser):
                nets[id(unwrap(value.model))] = unwrap(value.model)
            elif (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor))
                  and type(value).__module__.startswith("stepdistill")):
                stack.append(value)
    # a mixture of experts is never called itself: the Denoiser calls its experts
    from stepdistill.models.nets import PhasedExperts

    for k, m in list(nets.items()):
        if isinstance(m, PhasedExperts):
            del nets[k]
            nets.update({id(e): e for e in m.experts})
    # hook the outermost networks only (a hooked submodule would count its pass twice)
    inner = {id(sub) for m in nets.values() for sub in m.modules() if sub is not m}
    return [m for k, m in nets.items() if k not in inner]


def measure(method: str, teacher_path: Path, out_dir: Path, iters: int, family: str | None = None,
            extra: list[str] = ()) -> dict:
    from stepdistill.config import load_config
    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.training import Trainer

    family = family or teacher_path.name
    cfg = load_config(ROOT / "configs" / f"tiny-{family}" / f"{CONFIGS[method]}.yaml",
                      [f"teacher.path={teacher_path}", f"train.output_dir={out_dir}", "train.report_to=none",
                       "train.progress=false", f"train.max_steps={iters + 10}", *extra])
    tr = Trainer(cfg)
    micro = cfg.train.batch_size

    def iteration(step):
        for name in tr.distiller.updates(step):
            tr._update(name, step, micro)

    for s in range(3):  # warm-up (also creates lazily built networks: round teachers, stage-2 teachers)
        iteration(s)
    per_iter, per_passes, per_inplace, counts = [], [], [], []
    backward_s = [0.0]
    plain_backward = tr.accelerator.backward

    def timed_backward(loss, **kw):
        t0 = time.perf_counter()
        plain_backward(loss, **kw)
        backward_s[0] += time.perf_counter() - t0

    tr.accelerator.backward = timed_backward
    for s in range(3, 3 + iters):
        rec = Recorder(_networks(tr))  # hooked afresh: a method may build networks as it goes (round teachers)
        backward_s[0] = 0.0
        rec.on = True
        t0 = time.perf_counter()
        iteration(s)
        per_iter.append(time.perf_counter() - t0)
        rec.on = False
        per_inplace.append(rec.forward_s + backward_s[0])
        per_passes.append(replay(list(rec.calls)))
        counts.append(len(rec.calls))
        rec.close()
        for m in (st.module for st in tr.states.values()):
            for p in unwrap(m).parameters():
                p.grad = None
    tr.accelerator.backward = plain_backward
    it, ps, ip = statistics.median(per_iter), statistics.median(per_passes), statistics.median(per_inplace)
    return {"method": method, "iteration_ms": 1000 * it, "passes_ms": 1000 * ps, "ratio": it / ps,
            "passes": max(counts), "in_place_ms": 1000 * ip, "in_place_ratio": it / ip}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=["sd", "dit", "sd3"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=list(CONFIGS))
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="a pipeline folder to use instead of the tiny one (with --family's tiny configs)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every method's config")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.pipeline or TINY_FAMILIES[args.family](Path(tmp) / args.family)
        rows = []
        for m in args.methods:
            if m == "guided" and args.family != "sd":
                continue
            rows.append(measure(m, teacher, Path(tmp) / f"run-{m}", args.iters, args.family, args.set))
            r = rows[-1]
            print(f"{r['method']:>12}  iteration {r['iteration_ms']:8.1f} ms  passes {r['passes_ms']:8.1f} ms "
                  f"({r['passes']:2d} calls)  ratio {r['ratio']:.3f}  in place {r['in_place_ms']:8.1f} ms "
                  f"ratio {r['in_place_ratio']:.3f}", flush=True)
    print("\n| method | iteration (ms) | sum of passes (ms) | passes | ratio | passes in place (ms) | ratio |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['iteration_ms']:.1f} | {r['passes_ms']:.1f} | {r['passes']} | {r['ratio']:.3f} "
              f"| {r['in_place_ms']:.1f} | {r['in_place_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
