"""What several test files share: the repository root, ``train/distill.py`` launched as a user would
(plain python or ``accelerate launch``), and every tensor a checkpoint holds, for exact comparisons."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def env(**extra) -> dict:
    """The environment of a command the tests run: offline, one thread per process."""
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out.update(extra)
    return out


def launch(config, overrides, processes=1, env_vars=None, python=False, accelerate_args=None):
    """``train/distill.py`` with ``config``: plain python, or accelerate launch with ``processes`` (DDP, or
    what ``accelerate_args`` such as ``--config_file`` say)."""
    if python:
        cmd = [sys.executable, str(ROOT / "train" / "distill.py")]
    else:
        if accelerate_args:
            cmd = LAUNCH + accelerate_args + ["--num_processes", str(processes)]
        else:
            cmd = LAUNCH + (["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"])
        cmd += [str(ROOT / "train" / "distill.py")]
    cmd += ["--config", str(ROOT / config), "train.report_to=none", "train.progress=false", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env_vars or env(), capture_output=True, text=True, timeout=600)


def state_files(ckpt: Path) -> dict:
    """Every number a checkpoint holds, as tensors: the trainables' weights (safetensors, in their
    folders), the optimisers, the EMA, and the training state's values (loop counters, schedules)."""
    out = {}
    if (ckpt / "sharded").is_dir():  # a parallel run's trainables (torch distributed checkpoint), gathered
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        whole = ckpt.parent / f"{ckpt.name}.whole.pt"
        dcp_to_torch_save(ckpt / "sharded", whole)
        out.update(_flatten(torch.load(whole, weights_only=True), "sharded"))
        whole.unlink()
    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".safetensors":
            out.update({f"{f.relative_to(ckpt)}:{k}": v for k, v in load_file(f).items()})
        elif f.suffix in (".bin", ".pkl") and not f.name.startswith("random_states"):
            out.update(_flatten(torch.load(f, weights_only=True), f.name))
        elif f.name == "training_state.json":
            out.update(_flatten(json.loads(f.read_text()), f.name))
    return out


def _flatten(obj, prefix):
    if torch.is_tensor(obj):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}[{i}]").items()}
    return {prefix: torch.tensor(float(obj))} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}
