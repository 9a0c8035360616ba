"""eval/memory.py's simulated rank (--simulate N): one process as rank 0 of N-process FSDP over torch's
fake process group holds a 1/N share of every sharded tensor, takes real optimiser steps, and reports
the build's peak beside the training peak."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _measure(tmp_path, pipeline, simulate):
    spec = {"model": "sd15", "case": "dmd2-full-full-bf16-ckpt", "batch": 1, "processes": 1, "latent": 8,
            "out": str(tmp_path / "mem"), "pipeline": str(pipeline), "simulate": simulate}
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "memory.py"), "--one", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # about 40 s: two fresh processes
def test_a_simulated_rank_holds_its_share(tmp_path, tiny_pipelines):
    one = _measure(tmp_path, tiny_pipelines["sdxl"], 1)
    four = _measure(tmp_path, tiny_pipelines["sdxl"], 4)
    assert not one["simulated"] and four["simulated"] and four["processes"] == 4
    assert four["trained_params"] == one["trained_params"]  # the same networks, whole
    # the optimiser state (both trainables stepped: a skipped update would raise) and the gradients are a
    # quarter per rank, up to the padding of each block's flat shard
    assert 0.24 < four["optimizer_gb"] / one["optimizer_gb"] < 0.30, (one, four)
    assert 0.24 < four["grads_gb"] / one["grads_gb"] < 0.30, (one, four)
    assert four["build_peak_gb"] > 0 and four["peak_gb"] > 0
