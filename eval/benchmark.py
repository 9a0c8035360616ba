#!/usr/bin/env python
"""Compare every method under a fixed budget and write results JSON, a markdown table and a picture.

    python eval/benchmark.py --suite mnist [--out runs/benchmark/mnist] [--runs dmd2:1,sid:1] [--max-steps N]
        [--guidance 1] [--set key=value ...] [--curve 1000,3000,10000]
    python eval/benchmark.py --suite oracle [--out runs/benchmark/oracle] [--process vp|flow]

The mnist suite distils the shipped MNIST mini-SD teacher (``stepdistill:mnist-sd``) with every
method at 1, 2 and 4 steps where the method has them, each from its config under configs/mnist-sd/
(the budget is in those files; guided's is the longest, as its w input needs a long stage 1), and
measures each student on the same 2000 prompts (digits and prompt templates in turn) and the same
initial noise: FD against the train digits in the project's classifier's feature space (FD, not
FID), the classifier's accuracy on the digit the prompt names, NFE, sampling time per image (batch
of 100, decoding included) and training time. The teacher's DDIM rows (1, 2, 4, 50 steps with CFG,
50 without) are measured the same way, and the 1-step students' sampling speed is compared with the
teacher's 50 steps with CFG.

Every mnist row has several judges: FD, KID and improved precision / recall (Kynkaanniemi et al.) in
the classifier's features; FD and KID under a second evaluator (another architecture and seed,
trained only on the 1,000 held-out digits, ``stepdistill/assets/mnist_sd/judge``); and the mean ink
(the share of white in an image) against the real digits'. ``--guidance 1`` distils every method
against the unguided teacher (each method's own guidance options set to 1, SiD's mode to none);
``--set`` adds overrides to every run; ``--curve`` trains to the largest of its iteration counts,
keeps a checkpoint at each, and measures and plots every one (``curve.png``).

The oracle suite distils the exact 8-mode Gaussian-mixture teacher with each shipped config under
configs/oracle/ (the budgets are in those files) and measures every student against the true
distribution: energy distance and its noise floor at n = 1000, the smallest mode's mass (exact:
1/8), the mean log-density, per-sample deviation from the teacher's 64-step DDIM map, NFE, and
training / sampling time. The teacher's own DDIM rows are measured the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from stepdistill.errors import InputError
from stepdistill.models.oracle import ORACLE_LAYOUTS
from stepdistill.storage import claim_folder

ROOT = Path(__file__).resolve().parents[1]
ORACLE_CONFIGS = ["progressive_1step", "guided_1step", "boot_1step", "vsd_1step", "dmd_1step", "dmd2_1step",
                  "sid_1step", "phased_dmd_4step", "lcm_4step", "disback_1step", "dmd2_1step_halfwidth"]
# rows that are a shipped config with overrides: name -> (config, overrides)
# name -> (config, overrides, a run it starts from): the half-width student on MSD's path, teacher score
# matching first, then DMD2 from that network ({out} is the suite's folder)
ORACLE_VARIANTS = {"dmd2_1step_halfwidth": ("dmd2_1step", ["student.init={out}/tsm_16step/student"], "tsm_16step")}


def _row(name, x, gmm, nfe, train_s, sample_s, traj=None):
    ev = gmm.evaluate(x)
    # the worst-covered mode: its share of the samples over its true weight (1: every mode at its weight)
    coverage = float((torch.tensor(ev["mode_mass"], dtype=torch.float64) / gmm.weights).min())
    return {"method": name, "nfe": nfe, "energy": ev["energy"], "floor": ev["floor"], "ratio": ev["energy"] / ev["floor"],
            "min_mode_mass": ev["min_mode_mass"], "min_coverage": coverage, "log_prob": ev["log_prob"],
            "traj_mse": traj, "train_s": train_s, "sample_ms": 1000 * sample_s}


def oracle_suite(out: Path, process: str, n: int = 1000, layout: list[str] = (), configs=ORACLE_CONFIGS,
                 extra: tuple[str, ...] = ()) -> list[dict]:
    from stepdistill.diffusion.sampling import ode_sample
    from stepdistill.testing.oracle_runs import run_oracle

    rows, samples = [], {}
    cache = out / "oracle_networks"
    teacher = gmm = None
    for cfg in configs:
        config, variant, before = ORACLE_VARIANTS.get(cfg, (cfg, [], None))
        overrides = [f"teacher.oracle.process={process}", *layout, *(e.format(out=out) for e in variant), *extra]
        if cfg.startswith("guided"):
            overrides.append("teacher.oracle.conditional=true")
        t0 = time.time()  # train_s includes the run a variant starts from
        if before is not None:
            run_oracle(f"{before}.yaml", out / before, [f"teacher.oracle.process={process}", *layout, *extra], cache)
        student, teacher_c, gmm, _ = run_oracle(f"{config}.yaml", out / cfg, overrides, cache)
        train_s = time.time() - t0
        z = torch.randn(n, *teacher_c.sample_shape, generator=torch.Generator().manual_seed(123))
        steps = len(student.spec.timesteps)
        with torch.no_grad():
            t1 = time.time()
            if cfg.startswith("guided"):  # its samples at w = 1 (no guidance) are comparable to the others
                labels = torch.multinomial(gmm.weights.float(), n, replacement=True, generator=torch.Generator().manual_seed(5))
                cond, _ = teacher_c.encode(labels)
                x = student.sample(z, cond, guidance=1.0)
            else:
                x = student.sample(z, generator=torch.Generator().manual_seed(7))
                teacher = teacher_c
            sample_s = time.time() - t1
            traj = None
            if student.spec.sampler in ("deterministic", "signal"):
                ref = ode_sample(teacher_c.denoiser, z, 64, None if not cfg.startswith("guided") else cond)
                traj = float((x - ref).pow(2).sum(1).mean())
        rows.append(_row(cfg, x, gmm, steps, train_s, sample_s, traj))
        samples[cfg] = x
        print(json.dumps(rows[-1]), flush=True)
        if student.spec.consistency is not None and steps != 1:  # the same consistency student in one step
            with torch.no_grad():
                t1 = time.time()
                x1 = student.at_steps(1).sample(z)
                ref = ode_sample(teacher_c.denoiser, z, 64)
            rows.append(_row(f"{cfg} at 1 step", x1, gmm, 1, train_s, time.time() - t1, float((x1 - ref).pow(2).sum(1).mean())))
            print(json.dumps(rows[-1]), flush=True)
    for steps in (1, 2, 4, 64):
        with torch.no_grad():
            t1 = time.time()
            x = ode_sample(teacher.denoiser, z, steps)
            rows.append(_row(f"teacher DDIM {steps}", x, gmm, steps, 0.0, time.time() - t1))
        samples[f"teacher DDIM {steps}"] = x
    _grid(samples, gmm, out / "comparison.png")
    return rows


def mode_plane(gmm):
    """Samples -> their coordinates in the plane of the modes' two largest spreads, about the modes' centre
    (in 2-D, the two coordinates themselves)."""
    centre = gmm.means.mean(0)
    basis = torch.linalg.svd(gmm.means - centre, full_matrices=False)[2][:2].T if gmm.dim > 2 else \
        torch.eye(2, dtype=torch.float64)
    return lambda v: (v.double().reshape(v.shape[0], -1) - centre) @ basis


def _grid(samples: dict, gmm, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3 * cols, 3 * ((len(names) + cols - 1) // cols)),
                             dpi=90, squeeze=False)
    ref, _ = gmm.sample(2000, torch.Generator().manual_seed(0))
    project = mode_plane(gmm)
    ref = project(ref)
    lim = float(ref.abs().max()) * 1.15
    for ax, name in zip(axes.flat, names):
        x = project(samples[name])
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="lightgray")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# oracle on random layouts (stepdistill/models/oracle_layouts.py)
# ------------------------------------------------------------------------------------------------
def random_layouts_suite(out: Path, seeds: list[int], configs: list[str], extra: tuple[str, ...] = ()) -> list[dict]:
    """Every config of ``configs`` on each layout of ``seeds``, each layout in its own folder (a layout whose
    results.json is there is read back, so the suite can be grown layout by layout)."""
    from stepdistill.models.oracle_layouts import random_layout

    done = []
    for seed in seeds:
        lay = random_layout(seed)
        folder = out / f"layout-{seed:03d}"
        path = folder / "results.json"
        print(lay.describe(), flush=True)
        if path.is_file() and {r["method"] for r in json.loads(path.read_text())} >= set(configs):
            rows = json.loads(path.read_text())
        else:
            folder.mkdir(parents=True, exist_ok=True)
            rows = oracle_suite(folder, lay.process, layout=["teacher.oracle.layout=random",
                                                             f"teacher.oracle.seed={seed}"], configs=configs, extra=extra)
            path.write_text(json.dumps(rows, indent=1))
        done.append({"seed": seed, "layout": lay.describe(), "process": lay.process, "rows": rows})
    return done


def layouts_summary(done: list[dict], configs: list[str]) -> list[dict]:
    """Per method: median and worst energy / floor over all layouts, over the VP and over the flow ones, and the
    worst mode coverage (a mode's share of the samples over its weight)."""
    import statistics

    out = []
    for cfg in configs:
        row = {"method": cfg}
        for part, keep in (("all", lambda d: True), ("vp", lambda d: d["process"] == "vp"),
                           ("flow", lambda d: d["process"] == "flow")):
            vals = [(r["ratio"], d["seed"]) for d in done if keep(d) for r in d["rows"] if r["method"] == cfg]
            if vals:
                row[part] = {"n": len(vals), "median": statistics.median(v for v, _ in vals),
                             "worst": max(vals)[0], "worst_layout": max(vals)[1]}
        cov = [(r["min_coverage"], d["seed"]) for d in done for r in d["rows"] if r["method"] == cfg]
        row["min_coverage"], row["min_coverage_layout"] = min(cov) if cov else (None, None)
        out.append(row)
    return out


def layouts_markdown(summary: list[dict]) -> str:
    lines = ["| method | layouts | median | worst (layout) | VP median / worst | flow median / worst | "
             "worst mode coverage (layout) |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        if "all" not in r:
            continue
        part = lambda k: f"{r[k]['median']:.2f} / {r[k]['worst']:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {r['method']} | {r['all']['n']} | {r['all']['median']:.2f} | {r['all']['worst']:.2f} "
                     f"({r['all']['worst_layout']}) | {part('vp')} | {part('flow')} | "
                     f"{r['min_coverage']:.2f} ({r['min_coverage_layout']}) |")
    return "\n".join(lines)


def layouts_pictures(done: list[dict], configs: list[str], out: Path) -> None:
    """layouts.png: each method's energy / floor on every layout (VP and flow apart), with the 1.5x and 3x
    lines; layouts_gallery.png: each layout's true distribution in the plane of its modes' largest spreads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepdistill.models.oracle_layouts import random_layout

    fig, ax = plt.subplots(figsize=(1.1 * len(configs) + 2, 4), dpi=100)
    for i, cfg in enumerate(configs):
        for d in done:
            for r in d["rows"]:
                if r["method"] == cfg:
                    flow = d["process"] == "flow"
                    ax.scatter(i + (0.12 if flow else -0.12), r["ratio"], s=14,
                               c="tab:orange" if flow else "tab:blue", label="flow" if flow else "VP")
    for y in (1.5, 3.0):
        ax.axhline(y, c="gray", lw=0.8, ls="--")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("energy / noise floor")
    ax.set_title(f"{len(done)} random layouts", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "layouts.png")
    plt.close(fig)
    cols = min(4, len(done))
    rows = (len(done) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), dpi=90, squeeze=False)
    for ax, d in zip(axes.flat, done):
        gmm = random_layout(d["seed"]).mixture()
        x, labels = gmm.sample(3000, torch.Generator().manual_seed(0))
        p = mode_plane(gmm)(x)
        ax.scatter(p[:, 0], p[:, 1], s=1, c=labels, cmap="tab20")
        ax.set_title(d["layout"].split(": ")[1].split(", weights")[0], fontsize=7)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(done):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "layouts_gallery.png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# mnist: the shipped MNIST mini-SD teacher
# ------------------------------------------------------------------------------------------------
MNIST_CONFIGS = ROOT / "configs" / "mnist-sd"
# every method at 1, 2 and 4 steps where it has them: about 2.5 hours on 2 CPU cores at the configs'
# 1000 steps each; --runs picks a subset (finished runs are reused, so a suite can be grown run by run)
MNIST_RUNS = [("progressive", 1), ("progressive", 2), ("progressive", 4), ("guided", 1), ("guided", 2), ("guided", 4),
              ("boot", 1), ("vsd", 1), ("dmd", 1), ("dmd2", 1), ("dmd2", 2), ("dmd2", 4), ("phased_dmd", 2),
              ("phased_dmd", 4), ("sid", 1), ("sid", 2), ("sid", 4), ("lcm", 4), ("lcm_lora", 4), ("disback", 1)]
MNIST_TEACHER = "stepdistill:mnist-sd"
JUDGES = 3  # the version of DigitBench.judge_all: rows measured by another version are judged again (not retrained)


def msd_parts(method: str) -> tuple[int, str] | None:
    """(students, base method) of an MSD run name such as ``msd2_dmd``, or None."""
    head, _, base = method.partition("_")
    if head.startswith("msd") and head[3:].isdigit() and base:
        return int(head[3:]), base
    return None


def mnist_config(method: str) -> Path:
    if msd_parts(method):  # msd<K>_<method>: K students of that method's config (stepdistill.msd)
        method = msd_parts(method)[1]
    matches = sorted(p for p in MNIST_CONFIGS.glob(f"{method}_*step.yaml") if p.stem[len(method) + 1:-4].isdigit())
    if not matches:
        raise FileNotFoundError(f"no config for {method} under {MNIST_CONFIGS}")
    return matches[0]


# the overrides that make each method distil the unguided teacher (--guidance 1)
UNGUIDED = {"progressive": ["method_args.guidance_scale=1.0"], "guided": ["method_args.sample_guidance=1.0"],
            "boot": ["method_args.guidance_scale=1.0"],
            "vsd": ["method_args.guidance_scale=1.0", "method_args.fake_guidance_scale=1.0"],
            "dmd": ["method_args.guidance_scale=1.0"], "dmd2": ["method_args.guidance_scale=1.0"],
            "phased_dmd": ["method_args.guidance_scale=1.0"], "sid": ["method_args.guidance_mode=none"],
            "lcm": ["method_args.w_min=1.0", "method_args.w_max=1.0", "method_args.sample_guidance=1.0"],
            "lcm_lora": ["method_args.w_min=1.0", "method_args.w_max=1.0"],
            "disback": ["method_args.guidance_scale=1.0"]}


class DigitBench:
    """The fixed evaluation draw (prompts, labels, noise) and the judges of the mnist suite."""

    def __init__(self, teacher, out: Path, n: int, seed: int = 2024, time_batch: int = 100):
        from stepdistill.evaluation.digits import DigitsEvaluator, load_classifier
        from stepdistill.models.shipped import MNIST_SD, evaluation_prompts, load_mnist

        self.teacher, self.n, self.time_batch = teacher, n, time_batch
        real = load_mnist("train")[0]
        self.evaluator = DigitsEvaluator(load_classifier(MNIST_SD / "classifier"), real, cache_dir=out / "fd_cache")
        self.judge = DigitsEvaluator(load_classifier(MNIST_SD / "judge"), real, cache_dir=out / "fd_cache")
        self.real_ink = _ink(real)
        self.labels, self.prompts = evaluation_prompts(n)
        self.noise = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
        self.conds = [teacher.encode(self.prompts[i:i + 500]) for i in range(0, n, 500)]

    @torch.no_grad()
    def images(self, sample) -> torch.Tensor:
        """Decoded images of ``sample(noise, cond, uncond, generator)`` over the whole draw."""
        out = []
        for k, (cond, uncond) in enumerate(self.conds):
            z = self.noise[500 * k:500 * (k + 1)]
            out.append(self.teacher.decode(sample(z, cond, uncond, torch.Generator().manual_seed(k))))
        return torch.cat(out)

    @torch.no_grad()
    def ms_per_image(self, sample, batch: int | None = None, repeats: int = 3) -> float:
        batch = batch or self.time_batch
        cond, uncond = self.teacher.encode(self.prompts[:batch])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.teacher.decode(sample(self.noise[:batch], cond, uncond, torch.Generator().manual_seed(0)))
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[len(times) // 2] / batch

    def judge_all(self, x: torch.Tensor) -> dict:
        """Every judge's verdict on the decoded samples x."""
        precision, recall = self.evaluator.precision_recall(x)
        ink = _ink(x)
        return {"fd": self.evaluator.fd(x), "accuracy": self.evaluator.accuracy(x, self.labels),
                "kid": self.evaluator.kid(x), "precision": precision, "recall": recall,
                "fd_judge2": self.judge.fd(x), "kid_judge2": self.judge.kid(x), "accuracy_judge2": self.judge.accuracy(x, self.labels),
                "ink_mean": float(ink.mean()), "ink_std": float(ink.std()), "real_ink_mean": float(self.real_ink.mean())}

    def row(self, name, sample, nfe, train_s) -> tuple[dict, torch.Tensor]:
        x = self.images(sample)
        return {"method": name, "nfe": nfe, **self.judge_all(x), "sample_ms": self.ms_per_image(sample),
                "train_s": train_s}, x


def _ink(images: torch.Tensor) -> torch.Tensor:
    """The share of white (the stroke) in each image in [-1, 1]: bold strokes have more."""
    return ((images.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def _student_sampler(student):
    def sample(z, cond, uncond, g):
        return student.sample(z, cond, generator=g)
    return sample


def _teacher_sampler(teacher, steps, w):
    from stepdistill.diffusion.sampling import ode_sample

    def sample(z, cond, uncond, g):
        return ode_sample(teacher.denoiser, z, steps, cond, **({"guidance_scale": w, "uncond": uncond} if w != 1.0 else {}))
    return sample


def mnist_suite(out: Path, runs: list[tuple[str, int]], n: int = 2000, max_steps: int | None = None,
                guidance: float | None = None, extra: tuple[str, ...] = (), curve: list[int] | None = None,
                time_batch: int = 100) -> list[dict]:
    import yaml

    from stepdistill.config import load_config
    from stepdistill.models.shipped import shipped_path
    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher
    from stepdistill.storage import write_json
    from stepdistill.training import Trainer

    configs = {method: mnist_config(method) for method, _ in runs}  # every --runs name checked before any training
    teacher = load_teacher(MNIST_TEACHER)
    bench = DigitBench(teacher, out, n, time_batch=time_batch)
    rows, pictures = [], {}
    for method, steps in runs:
        name = f"{method}_{steps}step" + ("_g1" if guidance == 1.0 else "")
        run_dir = out / name
        done = run_dir / "bench.json"
        cfg_path = configs[method]
        overrides = [f"train.output_dir={run_dir}", f"student.num_steps={steps}", "train.report_to=none",
                     f"teacher.path={MNIST_TEACHER}"]
        if guidance == 1.0:  # an MSD run's students are distilled with their base method's overrides
            overrides += UNGUIDED[msd_parts(method)[1] if msd_parts(method) else method]
        overrides += list(extra)
        if curve:
            max_steps = max(curve)
            every = curve[0]
            for c in curve:
                every = math.gcd(every, c)
            overrides += ["train.checkpoints_total_limit=null"]
        if max_steps is not None:
            overrides += [f"train.max_steps={max_steps}", f"train.checkpoint_every={every if curve else max_steps}",
                          f"train.validate_every={max_steps}"]
        timesteps = (yaml.safe_load(cfg_path.read_text()).get("student") or {}).get("timesteps")
        if timesteps is not None and len(timesteps) != steps:  # the config's own list is for another count
            overrides.append("student.timesteps=null")
        cfg = load_config(cfg_path, overrides)
        if curve and (cfg.student.lora_rank or (method == "phased_dmd" and cfg.method_args.get("experts", True))):
            raise SystemExit(f"--curve: {name}'s checkpoints hold no one-network student (a LoRA student or per-phase "
                             f"experts); measure it without --curve")
        # a finished run of an earlier invocation is kept when it was trained under the same settings, and
        # its measurement when that was made with the same n and judges
        trained_key = {"overrides": overrides, "config": hashlib.sha256(cfg_path.read_bytes()).hexdigest()[:16]}
        key = {"n": n, **trained_key, "judges": JUDGES}
        old = json.loads(done.read_text()) if done.is_file() else None
        old_key = old.get("key", {}) if old else {}
        trained = old is not None and {k: old_key.get(k) for k in trained_key} == trained_key
        measured = trained and old_key == key
        if old is not None and not trained:
            shutil.rmtree(run_dir)  # trained under another budget or config: trained again from scratch
        msd = msd_parts(method)
        if trained:
            train_s = old["train_s"]
        else:
            t0 = time.time()
            if msd:
                from stepdistill.msd import train_students

                train_students(cfg_path, msd[0], run_dir, [o for o in overrides if not o.startswith("train.output_dir=")])
            else:
                Trainer(cfg).fit()
            train_s = time.time() - t0
        if msd:
            from stepdistill.msd import RoutedStudent

            student = RoutedStudent.load(run_dir)
        else:
            student = Student.load_run(run_dir)
        if measured:  # every verdict and the training time kept; the sampling time measured again, in this run
            row = {k: v for k, v in old.items() if k != "key"}
            row["sample_ms"] = bench.ms_per_image(_student_sampler(student))
        else:
            row, _ = bench.row(name, _student_sampler(student), steps, train_s)
            row.update(config=str(cfg_path.relative_to(ROOT)), steps=cfg.train.max_steps, batch_size=cfg.train.batch_size)
            write_json(done, {**row, "key": key})
        rows.append(row)
        pictures[name] = student
        print(json.dumps(row), flush=True)
        if curve:
            rows += _curve_rows(bench, run_dir, name, curve)
    w = float(yaml.safe_load(mnist_config("dmd2").read_text())["method_args"]["guidance_scale"])
    # the teacher's FD and accuracy depend only on the draw: kept from an earlier invocation at the same n
    cache = out / "teacher_rows.json"
    key = {"n": n, "teacher": shipped_path(MNIST_TEACHER).name, "judges": JUDGES}
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    kept = kept.get("rows", {}) if kept.get("key") == key else {}
    for steps, scale in ((1, w), (2, w), (4, w), (50, w), (1, 1.0), (2, 1.0), (4, 1.0), (50, 1.0)):
        name = f"teacher DDIM {steps}" + (f", CFG {scale:g}" if scale != 1.0 else "")
        sampler = _teacher_sampler(teacher, steps, scale)
        if name in kept:
            row = {**kept[name], "sample_ms": bench.ms_per_image(sampler)}
        else:
            row, _ = bench.row(name, sampler, steps * (2 if scale != 1.0 else 1), 0.0)
            kept[name] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(cache, {"key": key, "rows": kept})
    if curve:  # against the 50-step teacher the students learnt
        target = kept["teacher DDIM 50" if guidance == 1.0 else f"teacher DDIM 50, CFG {w:g}"]
        _plot_curve([r for r in rows if "iterations" in r], out / "curve.png", target)
    if guidance == 1.0:  # the students learnt the unguided teacher: that is the row to compare with
        pictures["teacher DDIM 50"] = (teacher, 1.0)
    else:
        pictures[f"teacher DDIM 50, CFG {w:g}"] = (teacher, w)
    _digit_grid(pictures, teacher, out / "comparison.png")
    return rows


def _curve_rows(bench: DigitBench, run_dir: Path, name: str, curve: list[int]) -> list[dict]:
    """The student at each iteration count of ``curve`` (its checkpoints; the EMA weights where the run
    keeps an EMA, as its final row), measured by every judge (cached beside the checkpoint)."""
    from stepdistill.storage import write_json
    from stepdistill.training.checkpoints import checkpoint_student

    rows = []
    for it in curve:
        ckpt = run_dir / "checkpoints" / f"checkpoint-{it}"
        cached = run_dir / "curve" / f"checkpoint-{it}.json"  # beside, not inside: a checkpoint holds only its files
        row = json.loads(cached.read_text()) if cached.is_file() else {}
        if row.get("judges") != JUDGES or row.get("n") != bench.n or "ema" not in row:
            student = checkpoint_student(ckpt)  # the EMA where the run keeps one, as its final row
            row = {"method": name, "iterations": it, **bench.judge_all(bench.images(_student_sampler(student))),
                   "judges": JUDGES, "n": bench.n, "ema": (run_dir / "student_ema").is_dir()}
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json(cached, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _plot_curve(rows: list[dict], path: Path, target: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == name]
        for ax, key, label in ((axes[0], "fd", "FD (classifier)"), (axes[1], "fd_judge2", "FD (second judge)")):
            ax.plot([r["iterations"] for r in pts], [r[key] for r in pts], "o-", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("iterations (batch 32)")
            ax.set_ylabel(label)
    for ax, key in ((axes[0], "fd"), (axes[1], "fd_judge2")):
        ax.axhline(target[key], color="0.4", linestyle="--", label=f"{target['method']} (the target)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def _digit_grid(pictures: dict, teacher, path: Path):
    """One row per method: digits 0-9 from the same noise and prompts (template 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepdistill.diffusion.sampling import ode_sample
    from stepdistill.models.shipped import digit_prompt

    cond, uncond = teacher.encode([digit_prompt(d) for d in range(10)])
    z = torch.randn(10, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    fig, axes = plt.subplots(len(pictures), 10, figsize=(10 * 0.8, len(pictures) * 0.85), dpi=100, squeeze=False)
    for r, (name, what) in enumerate(pictures.items()):
        if isinstance(what, tuple):
            x = ode_sample(what[0].denoiser, z, 50, cond, guidance_scale=what[1], uncond=uncond)
        else:
            x = what.sample(z, cond, generator=torch.Generator().manual_seed(0))
        img = teacher.decode(x)
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(img[c, 0].cpu(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def mnist_markdown(rows: list[dict]) -> str:
    lines = ["| method | NFE | FD | accuracy | KID x1e3 | precision | recall | FD judge 2 | KID judge 2 x1e3 | ink | "
             "sample (ms / image) | train (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    curve = [r for r in rows if "iterations" in r]
    for r in rows:
        if "iterations" in r:
            continue
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fd']:.1f} | {r['accuracy']:.3f} | {1e3 * r['kid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fd_judge2']:.1f} | {1e3 * r['kid_judge2']:.2f} | "
                     f"{r['ink_mean']:.3f} | {r['sample_ms']:.2f} | {r['train_s']:.0f} |")
    if curve:
        lines += ["", "| run | iterations | FD | accuracy | KID x1e3 | precision | recall | FD judge 2 | ink |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['iterations']} | {r['fd']:.1f} | {r['accuracy']:.3f} | {1e3 * r['kid']:.2f} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fd_judge2']:.1f} | {r['ink_mean']:.3f} |" for r in curve]
    rows = [r for r in rows if "iterations" not in r]
    teacher50 = next((r for r in rows if r["method"].startswith("teacher DDIM 50, CFG")), None)
    fast = [r for r in rows if r["nfe"] == 1 and not r["method"].startswith("teacher")]
    if teacher50 and fast:
        best = min(fast, key=lambda r: r["fd"])
        lines += ["", f"Sampling speed: {best['method']} {best['sample_ms']:.2f} ms / image vs the teacher's 50 steps with "
                      f"CFG ({teacher50['nfe']} network evaluations) {teacher50['sample_ms']:.2f} ms / image: "
                      f"{teacher50['sample_ms'] / best['sample_ms']:.0f}x faster (same run, decoding included)."]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | NFE | energy / floor | min mode mass | log p | traj. MSE vs 64-step | train (s) | sample (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        traj = "" if r["traj_mse"] is None else f"{r['traj_mse']:.3f}"
        lines.append(f"| {r['method']} | {r['nfe']} | {r['ratio']:.2f} | {r['min_mode_mass']:.3f} | {r['log_prob']:.2f} | "
                     f"{traj} | {r['train_s']:.0f} | {r['sample_ms']:.1f} |")
    return "\n".join(lines)


def _claim(out: Path, settings: dict) -> bool:
    """The benchmark writes only into a folder it created or one it wrote with these settings
    (``storage.claim_folder``); otherwise one line and False."""
    try:
        claim_folder(out, "benchmark", settings)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["mnist", "oracle"], required=True)
    parser.add_argument("--process", choices=["vp", "flow"], default="vp", help="oracle: the noise process")
    parser.add_argument("--layout", choices=list(ORACLE_LAYOUTS), default="ring", help="oracle: the mixture")
    parser.add_argument("--layouts", default=None, help="oracle: random:N, every config on random layouts 0..N-1 "
                        "(stepdistill/models/oracle_layouts.py); random:A-B, layouts A..B")
    parser.add_argument("--configs", default=None, help="oracle: a subset of the shipped configs, e.g. dmd2_1step,sid_1step")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", default=None, help="mnist: a subset, e.g. dmd2:1,sid:1 (default: every method)")
    parser.add_argument("--max-steps", type=int, default=None, help="mnist: override every config's train.max_steps")
    parser.add_argument("--n", type=int, default=2000, help="mnist: samples per row")
    parser.add_argument("--guidance", type=float, choices=[1.0], default=None,
                        help="mnist: 1 distils every method against the unguided teacher")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run (both suites)")
    parser.add_argument("--time-batch", type=int, default=100, help="mnist: batch of the sampling-time measurement")
    parser.add_argument("--curve", default=None, help="mnist: iteration counts to measure, e.g. 1000,3000,10000")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set: '{item}' is not key=value")
    if args.suite == "mnist":
        runs = MNIST_RUNS
        if args.runs:
            runs = []
            for item in args.runs.split(","):
                method, _, steps = item.partition(":")
                if not steps.isdigit():
                    parser.error(f"--runs: '{item}' is not method:steps (e.g. dmd2:1)")
                runs.append((method, int(steps)))
                try:
                    mnist_config(method)
                except FileNotFoundError as exc:
                    parser.error(f"--runs: {exc}")
        curve = None
        if args.curve:
            if not all(c.isdigit() and int(c) > 0 for c in args.curve.split(",")):
                parser.error(f"--curve: '{args.curve}' is not a list of iteration counts (e.g. 1000,3000,10000)")
            curve = sorted(int(c) for c in args.curve.split(","))
        out = args.out or ROOT / "runs" / "benchmark" / "mnist"
        if not _claim(out, {"suite": "mnist", "n": args.n, "guidance": args.guidance}):
            return 2
        rows = mnist_suite(out, runs, args.n, args.max_steps, args.guidance, tuple(args.set), curve, args.time_batch)
        table = mnist_markdown(rows)
    elif args.layouts is not None:
        kind, _, count = args.layouts.partition(":")
        lo, _, hi = count.partition("-")
        if kind != "random" or not lo.isdigit() or (hi and not hi.isdigit()) or (not hi and int(lo) < 1):
            parser.error(f"--layouts: '{args.layouts}' is not random:N or random:A-B")
        seeds = list(range(int(lo), int(hi) + 1)) if hi else list(range(int(lo)))
        configs = args.configs.split(",") if args.configs else ORACLE_CONFIGS
        unknown = [c for c in configs if c not in ORACLE_CONFIGS]
        if unknown:
            parser.error(f"--configs: {unknown} are not among {ORACLE_CONFIGS}")
        out = args.out or ROOT / "runs" / "benchmark" / "oracle-random"
        if not _claim(out, {"suite": "oracle", "layouts": "random", **({"set": list(args.set)} if args.set else {})}):
            return 2
        done = random_layouts_suite(out, seeds, configs, tuple(args.set))
        rows = layouts_summary(done, configs)
        layouts_pictures(done, configs, out)
        table = layouts_markdown(rows)
        (out / "layouts.json").write_text(json.dumps(done, indent=1))
    else:
        configs = args.configs.split(",") if args.configs else ORACLE_CONFIGS
        unknown = [c for c in configs if c not in ORACLE_CONFIGS]
        if unknown:
            parser.error(f"--configs: {unknown} are not among {ORACLE_CONFIGS}")
        out = args.out or ROOT / "runs" / "benchmark" / f"{args.suite}-{args.process}-{args.layout}"
        settings = {"suite": args.suite, "process": args.process, "layout": args.layout}
        if not _claim(out, {**settings, **({"set": list(args.set)} if args.set else {})}):
            return 2
        rows = oracle_suite(out, args.process, layout=ORACLE_LAYOUTS[args.layout], configs=configs, extra=tuple(args.set))
        table = markdown(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table + "\n")
    print(table)
    pictures = "layouts.png, layouts_gallery.png" if args.layouts else "comparison.png"
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, {pictures} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
