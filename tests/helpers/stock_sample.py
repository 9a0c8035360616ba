"""Samples exported pipelines with plain diffusers, in a process of its own that never imports
stepdistill (checked at the end): ``python stock_sample.py jobs.json``.

Each job: {"folder": an exported pipeline (or a teacher pipeline), "out": a safetensors file to write,
"call": the pipeline's call arguments (JSON), "lora": a folder for ``load_lora_weights`` or null,
"scheduler_from": a folder whose scheduler/ replaces the pipeline's, or null}. Every call is made with
``generator=torch.Generator().manual_seed(7)`` after ``torch.manual_seed(123)`` (the stream that stochastic
schedulers re-noise from); ``sample`` in the output file is the call's images or frames, as a tensor.
"""

import json
import sys

import diffusers
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file


def main(jobs_file: str) -> None:
    for job in json.loads(open(jobs_file).read()):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])
        if job.get("scheduler_from"):
            config = json.loads(open(f"{job['scheduler_from']}/scheduler/scheduler_config.json").read())
            cls = getattr(diffusers, config["_class_name"])
            pipe.scheduler = cls.from_pretrained(job["scheduler_from"], subfolder="scheduler")
        if job.get("lora"):
            pipe.load_lora_weights(job["lora"])
        torch.manual_seed(123)
        out = pipe(**job["call"], generator=torch.Generator().manual_seed(7))
        sample = out.frames if hasattr(out, "frames") else out.images
        save_file({"sample": torch.as_tensor(sample).float().contiguous()}, job["out"])
    mods = sorted(m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill."))
    if mods:
        raise SystemExit(f"stepdistill was imported while sampling: {mods[:5]}")
    print("sampled", len(json.loads(open(jobs_file).read())), "without stepdistill")


if __name__ == "__main__":
    main(sys.argv[1])
