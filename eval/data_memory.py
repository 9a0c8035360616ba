#!/usr/bin/env python
"""Peak memory of a run against the size of its data: the same short DMD2 run (tiny SD pipeline, GAN
head on real images, so every batch draws captions and images) over a small and a large caption
file and image set, each run in a fresh process.

    python eval/data_memory.py [--small 1000,200] [--large 1000000,20000] [--steps 20] [--out runs/data_memory]

It prints, per run, the peak resident set of the training process (``ru_maxrss``), the largest peak
of its loader workers, and the wall time, then the large run's peak over the small run's. The data
(a caption .txt file of N lines, a folder of M captioned 24x24 PNGs) is written once under ``--out``
by ``stepdistill/testing/data_fixtures.py``. The small image set (<= loading.IN_MEMORY_ITEMS) is
encoded once at start and held; the large one is drawn per batch: both paths are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
from stepdistill.config import load_config
from stepdistill.training import Trainer
t = time.time()
cfg = load_config(sys.argv[1], sys.argv[2:])
Trainer(cfg).fit()
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "seconds": time.time() - t}))
"""


def make_data(out: Path, lines: int, images: int) -> tuple[Path, Path]:
    from stepdistill.testing import data_fixtures as fx

    caps, folder = out / f"captions_{lines}.txt", out / f"images_{images}"
    if not caps.is_file():
        fx.write_caption_lines(caps, lines)
    if not (folder / f"{images - 1}.txt").is_file():
        fx.write_image_folder(folder, images)
    return caps, folder


def run(pipeline: Path, caps: Path, folder: Path, out: Path, steps: int) -> dict:
    run_dir = out / f"run_{caps.stem}_{folder.name}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    args = [f"teacher.path={pipeline}", f"data.prompts={caps}", f"data.images={folder}", "method_args.gan=true",
            f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.validate_every={steps * 10}",
            f"train.output_dir={run_dir}", "train.report_to=none", "train.progress=false", "data.num_workers=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs/tiny-sd/dmd2_4step.yaml"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default="1000,200", help="caption lines,images of the small run")
    p.add_argument("--large", default="1000000,20000", help="caption lines,images of the large run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "data_memory")
    a = p.parse_args()
    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

    a.out.mkdir(parents=True, exist_ok=True)
    pipeline = a.out / "tiny_sd"
    if not (pipeline / "model_index.json").is_file():
        TINY_FAMILIES["sd"](pipeline)
    rows = {}
    for name, spec in (("small", a.small), ("large", a.large)):
        lines, images = (int(v) for v in spec.split(","))
        t = time.time()
        caps, folder = make_data(a.out, lines, images)
        made = time.time() - t
        rows[name] = {"lines": lines, "images": images, **run(pipeline, caps, folder, a.out, a.steps)}
        r = rows[name]
        print(f"{name}: {lines} caption lines, {images} images: peak RSS {r['rss_mb']:.0f} MB (loader workers "
              f"{r['workers_mb']:.0f} MB), {r['seconds']:.1f} s for {a.steps} steps (data written in {made:.0f} s)",
              flush=True)
    ratio = rows["large"]["rss_mb"] / rows["small"]["rss_mb"]
    print(f"large / small peak RSS: {ratio:.3f}")
    (a.out / "data_memory.json").write_text(json.dumps({**rows, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
