#!/usr/bin/env python
"""Start-up peak memory per rank of an FSDP run: the networks built whole on every rank and then
sharded (the old path, ``STEPDISTILL_WHOLE_LOAD=1``) against built sharded (``models/sharded_load.py``).

    OMP_NUM_THREADS=1 python eval/startup_memory.py [--processes 2] [--case dmd2-full-full-bf16]
                                                    [--out runs/startup-memory]

Each mode launches N processes under ``configs/accelerate/fsdp.yaml`` (gloo on the CPU) that build a
Trainer (teacher, student, fake score, encoders, optimisers) on the full-size SD1.5 UNet of
``eval/memory.py`` (``build_pipeline``: 859.5M parameters, random weights, saved in fp32 safetensors), with
the recipe and options of one of its cases, and report every rank's peak resident set (``VmHWM`` of
``/proc/self/status``) once the networks are built and sharded, before the first step; and the resident
set then (``VmRSS``). Memory, not time: other jobs on the machine change neither figure much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

from memory import CASES, build_pipeline  # noqa: E402  (eval/memory.py: the SD1.5 pipeline and the cases)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(spec: dict) -> None:
    """In each launched process: build the run and report the ranks' VmHWM and VmRSS (GiB), from rank 0."""
    import torch

    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    config, overrides = CASES[spec["case"]]
    out = Path(spec["out"]) / f"run-{spec['mode']}"
    cfg = load_config(ROOT / "configs" / f"{config}.yaml",
                      [f"teacher.path={spec['pipeline']}", f"train.output_dir={out}", "train.report_to=none",
                       "train.progress=false", f"train.batch_size={spec['processes']}", "train.max_steps=1",
                       "train.ema_decay=null", "data.prompts=[a photo of a cat, a red car]", *overrides,
                       *spec["extra"]])
    trainer = Trainer(cfg)
    mine = torch.tensor([_status_kib("VmHWM"), _status_kib("VmRSS")], dtype=torch.float64) / 2**20
    acc = trainer.accelerator
    ranks = acc.gather(mine[None].to(acc.device)).reshape(-1, 2).tolist()
    trainer.close()
    if acc.is_main_process:
        print("RESULT " + json.dumps({"mode": spec["mode"], "peak_gib": [r[0] for r in ranks],
                                      "rss_gib": [r[1] for r in ranks]}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--case", default="dmd2-full-full-bf16-ckpt", choices=sorted(CASES))
    p.add_argument("--extra", default="teacher.dtype=bf16", help="comma-separated config overrides")
    p.add_argument("--modes", default="whole,sharded")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "startup-memory")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        measure(json.loads(args.one))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline("sd15", args.out / "pipeline-sd15-32", 32)
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(args.processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__]
    rows = []
    for mode in args.modes.split(","):
        spec = {"mode": mode, "case": args.case, "processes": args.processes, "out": str(args.out),
                "pipeline": str(pipeline), "extra": [e for e in args.extra.split(",") if e]}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "STEPDISTILL_WHOLE_LOAD": "1" if mode == "whole" else "0"}
        r = subprocess.run(head + ["--one", json.dumps(spec)], capture_output=True, text=True, env=env)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-3:]}", flush=True)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    if len(rows) == 2:
        ratio = max(rows[1]["peak_gib"]) / max(rows[0]["peak_gib"])
        print(f"largest rank peak: {rows[1]['mode']} / {rows[0]['mode']} = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
